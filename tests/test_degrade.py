"""recon/degrade.py: each field does what its docstring says (analytic checks on ray-cast views)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from make_your_3d.errors import BadRequest
from make_your_3d.recon.degrade import STRENGTHS, Degradation, degrade, shift_image, strength, tilt_normals
from make_your_3d.views import View, ViewSet, load_views, save_views
from recon_shapes import render_views


@pytest.fixture(scope="module")
def sphere() -> ViewSet:
    return render_views("sphere", size=64)


def _angles_deg(a: ViewSet, b: ViewSet, inner: bool = True) -> np.ndarray:
    """Angles between the normals of two view sets, over pixels fully inside both masks."""
    out = []
    for va, vb in zip(a.views, b.views):
        m = (va.color[..., 3] == 255) & (vb.color[..., 3] == 255) if inner else va.mask & vb.mask
        cos = np.clip((va.normals_world()[m] * vb.normals_world()[m]).sum(-1), -1, 1)
        out.append(np.degrees(np.arccos(cos)))
    return np.concatenate(out)


# 8-bit normals: half a level (1/255 in n) on each component moves a normal by up to about 0.4 degree
QUANT_DEG = 0.45


def test_zero_strength_is_the_identity(sphere):
    d = Degradation(seed=7)
    assert d.is_identity and STRENGTHS["none"].is_identity
    out = degrade(sphere, d)
    for a, b in zip(sphere.views, out.views):
        assert np.array_equal(a.color, b.color) and np.array_equal(a.normal, b.normal)
        assert np.array_equal(a.c2w, b.c2w)
    assert "degradation" not in out.extras
    # a copy: changing the output leaves the input alone
    out.views[0].color[...] = 0
    assert sphere.views[0].color.any()


def test_seeds_are_reproducible_and_differ(sphere):
    a = degrade(sphere, strength("strong", seed=3))
    b = degrade(sphere, strength("strong", seed=3))
    c = degrade(sphere, strength("strong", seed=4))
    assert all(np.array_equal(x.color, y.color) and np.array_equal(x.normal, y.normal) for x, y in zip(a.views, b.views))
    assert a.extras["degradation"] == b.extras["degradation"]
    assert any(not np.array_equal(x.normal, y.normal) for x, y in zip(a.views, c.views))


def test_tilt_turns_every_normal_by_exactly_the_stated_angle():
    rng = np.random.default_rng(0)
    n = rng.normal(size=(40, 50, 3))
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    for deg in (1.0, 2.5):
        t = tilt_normals(n, deg, 8.0, np.random.default_rng(1))
        assert np.allclose(np.linalg.norm(t, axis=-1), 1.0, atol=1e-12)
        ang = np.degrees(np.arccos(np.clip((t * n).sum(-1), -1, 1)))
        assert np.allclose(ang, deg, atol=1e-6)
    # the direction of the tilt varies smoothly: neighbours turn (nearly) the same way, except near the
    # few points where a constant-magnitude direction field must turn round (a hairy-ball singularity)
    flat = np.zeros((64, 64, 3))
    flat[..., 2] = 1.0
    t = tilt_normals(flat, 3.0, 32.0, np.random.default_rng(2))
    step = np.degrees(np.arccos(np.clip((t[:, 1:] * t[:, :-1]).sum(-1), -1, 1)))
    assert np.percentile(step, 90) < 0.5 and np.median(step) < 0.25 and np.ptp(t[..., 0]) > 0.02
    noisy = tilt_normals(flat, 3.0, 0.5, np.random.default_rng(2))  # wrong variant: per-pixel noise
    assert np.median(np.degrees(np.arccos(np.clip((noisy[:, 1:] * noisy[:, :-1]).sum(-1), -1, 1)))) > 1.0


def test_tilt_and_bias_angles_through_the_views(sphere):
    floor = QUANT_DEG
    tilted = degrade(sphere, Degradation(normal_tilt_deg=2.0, seed=1))
    ang = _angles_deg(sphere, tilted)
    assert abs(np.median(ang) - 2.0) < 0.15 and np.all(np.abs(ang - 2.0) < 2 * floor)
    # wrong variant: a 1 degree tilt is told apart from the 2 degrees the field says
    ang1 = _angles_deg(sphere, degrade(sphere, Degradation(normal_tilt_deg=1.0, seed=1)))
    assert abs(np.median(ang1) - 2.0) > 0.7
    # bias: one rotation per view, about the recorded axis
    biased = degrade(sphere, Degradation(normal_bias_deg=3.0, seed=2))
    ang = _angles_deg(sphere, biased)
    axes = []
    for v0, v1, rec in zip(sphere.views, biased.views, biased.extras["degradation"]["views"]):
        axis = np.array(rec["normal_bias_axis"])
        axes.append(axis)
        m = v0.color[..., 3] == 255
        n0, n1 = v0.normals_world()[m], v1.normals_world()[m]
        # the component along the axis is unchanged by a rotation about it, and a normal at angle phi
        # to the axis turns by 2 asin(sin(3 deg / 2) sin(phi))
        assert np.abs(n0 @ axis - n1 @ axis).max() < 0.02
        sin_phi = np.sqrt(np.clip(1 - (n0 @ axis) ** 2, 0, 1))
        want = np.degrees(2 * np.arcsin(math.sin(math.radians(1.5)) * sin_phi))
        got = np.degrees(np.arccos(np.clip((n0 * n1).sum(-1), -1, 1)))
        assert np.abs(got - want).max() < 2 * floor and abs(np.median(got - want)) < 0.1
    assert ang.max() > 2.8 and ang.max() < 3.0 + 2 * floor
    assert min(abs(float(a @ b)) for a in axes for b in axes if a is not b) < 0.99  # per-view axes


def test_mask_moves_by_one_pixel(sphere):
    d = Degradation(mask_px=1, seed=5)
    out = degrade(sphere, d)
    kinds = set()
    for v0, v1, rec in zip(sphere.views, out.views, out.extras["degradation"]["views"]):
        kind, px = rec["mask"]
        kinds.add(kind)
        assert px == 1
        a0 = v0.color[..., 3].astype(int)
        p = np.pad(a0, 1, mode="edge")
        cross = np.stack([a0, p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]])
        want = cross.max(0) if kind == "dilate" else cross.min(0)
        assert np.array_equal(v1.color[..., 3].astype(int), want)
        assert np.array_equal(v1.normal[..., 3], v1.color[..., 3])
        m0, m1 = v0.mask, v1.mask
        # the binary mask grew or shrank by one pixel ring: every changed pixel touches the old edge
        changed = m0 ^ m1
        assert changed.any()
        assert (m1 >= m0).all() if kind == "dilate" else (m1 <= m0).all()
        # newly covered pixels carry the colour of a covered neighbour, not the background's black
        if kind == "dilate":
            grown = (v1.color[..., 3] > 0) & (v0.color[..., 3] == 0)
            assert v1.color[grown][:, :3].max(1).min() > 0
    assert kinds == {"dilate", "erode"}  # six views: both drawn (seed 5)


def test_shift_moves_an_edge_by_the_sub_pixel_amount():
    img = np.full((16, 32, 4), (255, 255, 255, 0), np.uint8)  # transparent white: must not bleed in
    img[:, :12] = (200, 100, 50, 255)  # a vertical edge at x = 12
    for dx in (0.7, -0.5, 1.0):
        out = shift_image(img, dx, 0.0)
        edge = 6 + out[:, 6:, 3].astype(float).sum(1) / 255.0  # covered width right of x = 6: the edge
        assert np.allclose(edge, 12 + dx, atol=1.0 / 255)
        assert np.all(out[out[..., 3] > 0][:, :3] == (200, 100, 50))  # straight colour kept
    out = shift_image(img, 0.0, 0.6)  # a shift along the edge leaves it where it was (inside rows)
    assert np.allclose(6 + out[1:, 6:, 3].astype(float).sum(1) / 255.0, 12, atol=1.0 / 255)


def test_shift_through_degrade_moves_one_view(sphere):
    d = Degradation(shift_px=0.8, shift_view="right", seed=1)
    out = degrade(sphere, d)
    moved = [rec for rec in out.extras["degradation"]["views"] if "shift_px" in rec]
    assert [r["name"] for r in moved] == ["right"]
    dx, dy = moved[0]["shift_px"]
    assert math.isclose(math.hypot(dx, dy), 0.8, rel_tol=1e-9)
    v0, v1 = sphere.views[2], out.views[2]
    assert v0.name == "right"
    # the alpha-weighted centroid moves by the shift
    ys, xs = np.mgrid[:64, :64]
    def centroid(a):
        a = a.astype(float)
        return np.array([(xs * a).sum(), (ys * a).sum()]) / a.sum()
    assert np.allclose(centroid(v1.color[..., 3]) - centroid(v0.color[..., 3]), (dx, dy), atol=0.02)
    for i in (0, 1, 3, 4, 5):
        assert np.array_equal(sphere.views[i].color, out.views[i].color)


def test_colour_gain_and_exposure_stay_in_their_ranges(sphere):
    d = Degradation(color_gain=0.05, exposure_stops=0.2, seed=0)
    out = degrade(sphere, d)
    lo, hi = 0.95 * 2**-0.2, 1.05 * 2**0.2
    for v0, v1, rec in zip(sphere.views, out.views, out.extras["degradation"]["views"]):
        g = np.array(rec["rgb_gain"])
        assert np.all((g >= lo) & (g <= hi)) and np.ptp(g) > 0
        m = v0.color[..., 3] == 255
        c0, c1 = v0.color[m][:, :3].astype(float), v1.color[m][:, :3].astype(float)
        assert np.allclose(c1, np.clip(np.round(c0 * g), 0, 255), atol=0)
        assert np.array_equal(v0.normal, v1.normal)


def test_degraded_views_round_trip_through_the_views_folder(sphere, tmp_path):
    out = degrade(sphere, strength("mild", seed=2))
    back = load_views(save_views(tmp_path / "v", out))
    assert back.extras["degradation"]["fields"]["normal_tilt_deg"] == 1.0
    assert all(np.array_equal(a.normal, b.normal) for a, b in zip(out.views, back.views))


def test_bad_fields_and_names_are_clear_errors(sphere):
    with pytest.raises(BadRequest, match="normal_tilt_deg"):
        Degradation(normal_tilt_deg=-1.0)
    with pytest.raises(BadRequest, match="mask_px"):
        Degradation(mask_px=1.5)
    with pytest.raises(BadRequest, match="unknown degradation strength"):
        strength("extreme")
    with pytest.raises(BadRequest, match="shift_view"):
        degrade(sphere, Degradation(shift_px=0.5, shift_view="top"))
    dot = np.zeros((7, 7, 4), np.uint8)
    dot[3, 3] = 255  # one covered pixel: an erosion leaves nothing
    tiny = ViewSet(views=[View(name="v", color=dot, c2w=np.eye(4))])
    raised = 0
    for seed in range(8):
        try:
            degrade(tiny, Degradation(mask_px=1, seed=seed))
        except BadRequest as exc:
            assert "empty mask" in str(exc)
            raised += 1
    assert 0 < raised < 8  # erosions raise, dilations do not
