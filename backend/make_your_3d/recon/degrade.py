"""Generated-like views: perturb a clean ViewSet the way a multi-view diffusion model's output differs
from a perfect render, so that a reconstruction benchmark on rendered views also says something
about the views Wonder3D actually produces.

What generated views get wrong, and the field that models it (all seeded, all zero = identity):
- colour: each view is a little brighter or darker and tinted (`exposure_stops`, `color_gain`);
- normals: a smoothly varying error of a few degrees over each view (`normal_tilt_deg`) and a
  constant rotation of a whole view's normals (`normal_bias_deg`, the view's own frame slightly off);
- masks: the outline a pixel too far in or out (`mask_px`, erosion or dilation, drawn per view);
- registration: one view misplaced by a fraction of a pixel (`shift_px`).

`degrade(viewset, Degradation(...))` returns a new ViewSet (the input is not changed) whose
`extras["degradation"]` records every drawn value, so a result can be traced to what was done.
Colour and normal PNG values stay 8-bit; the perturbations act on the stored values.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np

from make_your_3d.errors import BadRequest
from make_your_3d.views import View, ViewSet, encode_normals


@dataclass(frozen=True)
class Degradation:
    """How far generated-like views are from the clean ones. Every field at 0 is the identity."""

    color_gain: float = 0.0
    """Per view and channel, RGB is multiplied by 1 + color_gain * u, u uniform in [-1, 1] (a tint)."""
    exposure_stops: float = 0.0
    """Per view, RGB is also multiplied by 2 ** (exposure_stops * u), u uniform in [-1, 1]."""
    normal_tilt_deg: float = 0.0
    """Every foreground normal is turned by exactly this angle, towards a direction that varies
    smoothly over the image (correlation length `tilt_scale_px`): the angle between a degraded and a
    clean normal is this value at every pixel (before 8-bit quantisation, and without bias)."""
    tilt_scale_px: float = 32.0
    """Spacing of the random control grid of the tilt directions, in pixels."""
    normal_bias_deg: float = 0.0
    """Per view, all normals of the view are rotated by this angle about one random axis."""
    mask_px: int = 0
    """Per view, the alpha is eroded or dilated (drawn 50/50) by this many pixels (4-neighbour steps);
    pixels newly covered by a dilation take the colour and normal of their most covered neighbour."""
    shift_px: float = 0.0
    """One view (`shift_view`) is translated by this many pixels (bilinear, premultiplied), in a
    random direction."""
    shift_view: str | None = None
    """Name of the view to shift; None: drawn from the views other than the first (the front)."""
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("color_gain", "exposure_stops", "normal_tilt_deg", "normal_bias_deg", "shift_px"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise BadRequest(f"degradation field {name} = {v!r} must be a finite number >= 0.")
        if self.color_gain >= 1:
            raise BadRequest(f"degradation field color_gain = {self.color_gain} must be below 1.")
        if not isinstance(self.mask_px, int) or self.mask_px < 0:
            raise BadRequest(f"degradation field mask_px = {self.mask_px!r} must be a whole number >= 0.")
        if not self.tilt_scale_px > 0:
            raise BadRequest(f"degradation field tilt_scale_px = {self.tilt_scale_px!r} must be positive.")

    @property
    def is_identity(self) -> bool:
        return not (self.color_gain or self.exposure_stops or self.normal_tilt_deg or self.normal_bias_deg
                    or self.mask_px or self.shift_px)


# Named strengths. `mild`: about what a good multi-view model gives on an easy subject; `strong`:
# the upper end of the ranges issue 17 names (normal errors of 3 degrees, 1 px shift).
STRENGTHS: dict[str, Degradation] = {
    "none": Degradation(),
    "mild": Degradation(color_gain=0.03, exposure_stops=0.1, normal_tilt_deg=1.0, normal_bias_deg=1.0,
                        mask_px=1, shift_px=0.5),
    "strong": Degradation(color_gain=0.08, exposure_stops=0.3, normal_tilt_deg=3.0, normal_bias_deg=3.0,
                          mask_px=1, shift_px=1.0),
}


def strength(name: str, seed: int = 0) -> Degradation:
    if name not in STRENGTHS:
        raise BadRequest(f"unknown degradation strength {name!r}; use one of {', '.join(STRENGTHS)}.")
    return replace(STRENGTHS[name], seed=seed)


def _rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    """Rodrigues: rotation matrix turning by `angle` radians about the unit `axis`."""
    x, y, z = axis
    k = np.array([[0, -z, y], [z, 0, -x], [-y, x, 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * (k @ k)


def _random_unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(size=3)
    return v / np.linalg.norm(v)


def _upsample(grid: np.ndarray, h: int, w: int, scale: float) -> np.ndarray:
    """Bilinear lookup of a control grid (gh, gw, C) with spacing `scale` px at pixel centres."""
    ys = (np.arange(h) + 0.5) / scale
    xs = (np.arange(w) + 0.5) / scale
    y0 = np.clip(np.floor(ys).astype(int), 0, grid.shape[0] - 2)
    x0 = np.clip(np.floor(xs).astype(int), 0, grid.shape[1] - 2)
    fy = (ys - y0)[:, None, None]
    fx = (xs - x0)[None, :, None]
    g00, g01 = grid[y0][:, x0], grid[y0][:, x0 + 1]
    g10, g11 = grid[y0 + 1][:, x0], grid[y0 + 1][:, x0 + 1]
    return (g00 * (1 - fx) + g01 * fx) * (1 - fy) + (g10 * (1 - fx) + g11 * fx) * fy


def tilt_normals(n: np.ndarray, tilt_deg: float, scale_px: float, rng: np.random.Generator) -> np.ndarray:
    """Turn each unit normal (H, W, 3) by exactly `tilt_deg` towards a smoothly varying direction."""
    h, w = n.shape[:2]
    grid = rng.normal(size=(int(math.ceil(h / scale_px)) + 2, int(math.ceil(w / scale_px)) + 2, 3))
    v = _upsample(grid, h, w, scale_px)
    t = v - (v * n).sum(-1, keepdims=True) * n
    norm = np.linalg.norm(t, axis=-1, keepdims=True)
    # where the random direction is (nearly) parallel to the normal, use any perpendicular one
    fallback = np.cross(n, np.where(np.abs(n[..., :1]) < 0.9, [1.0, 0, 0], [0, 1.0, 0]))
    t = np.where(norm > 1e-6, t / np.maximum(norm, 1e-12), fallback / np.linalg.norm(fallback, axis=-1, keepdims=True))
    a = math.radians(tilt_deg)
    return math.cos(a) * n + math.sin(a) * t


def _neighbours(img: np.ndarray) -> list[np.ndarray]:
    """The image and its four 1-pixel shifts (edge-replicated)."""
    p = np.pad(img, [(1, 1), (1, 1)] + [(0, 0)] * (img.ndim - 2), mode="edge")
    return [img, p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]]


def morph_alpha(color: np.ndarray, normal: np.ndarray | None, steps: int, dilate: bool):
    """Erode or dilate the alpha (grey-scale, 4-neighbour cross) of RGBA images by `steps` pixels;
    newly covered pixels copy RGB (and the normal's RGB) from their most covered neighbour."""
    color = color.copy()
    normal = None if normal is None else normal.copy()
    for _ in range(steps):
        a = _neighbours(color[..., 3])
        stack = np.stack(a)
        if dilate:
            src = stack.argmax(0)
            pick = lambda im: np.take_along_axis(np.stack(_neighbours(im)), src[None, ..., None], 0)[0]  # noqa: E731
            grown = stack.max(0) > color[..., 3]
            rgb = pick(color[..., :3])
            color[..., :3] = np.where(grown[..., None], rgb, color[..., :3])
            color[..., 3] = stack.max(0)
            if normal is not None:
                nrgb = pick(normal[..., :3])
                normal[..., :3] = np.where(grown[..., None], nrgb, normal[..., :3])
                normal[..., 3] = color[..., 3]
        else:
            color[..., 3] = stack.min(0)
            if normal is not None:
                normal[..., 3] = color[..., 3]
    return color, normal


def shift_image(img: np.ndarray, dx: float, dy: float) -> np.ndarray:
    """Translate an RGBA uint8 image by (dx, dy) pixels: bilinear resampling of premultiplied colour,
    so an edge's coverage moves by exactly the shift; outside the frame is transparent."""
    f = img.astype(np.float64) / 255.0
    prem = np.concatenate([f[..., :3] * f[..., 3:], f[..., 3:]], -1)
    h, w = img.shape[:2]
    ys = np.arange(h)[:, None] - dy
    xs = np.arange(w)[None, :] - dx
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    fy, fx = (ys - y0)[..., None], (xs - x0)[..., None]

    def at(yy, xx):
        ok = ((yy >= 0) & (yy < h))[..., None] & ((xx >= 0) & (xx < w))[..., None]
        return np.where(ok, prem[np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)], 0.0)

    out = ((at(y0, x0) * (1 - fx) + at(y0, x0 + 1) * fx) * (1 - fy)
           + (at(y0 + 1, x0) * (1 - fx) + at(y0 + 1, x0 + 1) * fx) * fy)
    a = out[..., 3:]
    rgb = np.where(a > 1e-6, out[..., :3] / np.maximum(a, 1e-6), 0.0)
    return np.clip(np.round(np.concatenate([rgb, a], -1) * 255.0), 0, 255).astype(np.uint8)


def _degrade_view(view: View, d: Degradation, rng: np.random.Generator, shift: tuple[float, float] | None) -> tuple[View, dict]:
    rec: dict = {"name": view.name}
    color = view.color.copy()
    normal = None if view.normal is None else view.normal.copy()
    # draw every random number in a fixed order, whatever the fields, so that one field's value
    # does not change what another field draws
    gains = 1.0 + d.color_gain * rng.uniform(-1, 1, size=3)
    exposure = 2.0 ** (d.exposure_stops * rng.uniform(-1, 1))
    bias_axis = _random_unit(rng)
    dilate = bool(rng.integers(0, 2))
    tilt_rng = np.random.default_rng(rng.integers(0, 2**63))
    if d.color_gain or d.exposure_stops:
        g = gains * exposure
        color[..., :3] = np.clip(np.round(color[..., :3].astype(np.float64) * g), 0, 255).astype(np.uint8)
        rec["rgb_gain"] = [float(x) for x in g]
    if normal is not None and (d.normal_tilt_deg or d.normal_bias_deg):
        n = view.normals_world().astype(np.float64)
        if d.normal_tilt_deg:
            n = tilt_normals(n, d.normal_tilt_deg, d.tilt_scale_px, tilt_rng)
        if d.normal_bias_deg:
            n = n @ _rotation(bias_axis, math.radians(d.normal_bias_deg)).T
            rec["normal_bias_axis"] = [float(x) for x in bias_axis]
        enc = encode_normals(n, normal[..., 3])
        normal = np.where(normal[..., 3:] > 0, enc, normal)  # background pixels keep their stored values
    if d.mask_px:
        color, normal = morph_alpha(color, normal, d.mask_px, dilate)
        rec["mask"] = ("dilate" if dilate else "erode", d.mask_px)
    if shift is not None:
        color = shift_image(color, *shift)
        if normal is not None:
            normal = shift_image(normal, *shift)
        rec["shift_px"] = [float(shift[0]), float(shift[1])]
    if not (color[..., 3] >= 128).any():
        raise BadRequest(f"the degradation leaves view {view.name} with an empty mask; use a smaller mask_px.")
    return replace(view, color=color, normal=normal), rec


def degrade(viewset: ViewSet, d: Degradation) -> ViewSet:
    """A degraded copy of `viewset` (see the module docstring); the identity when every field is 0."""
    if d.is_identity:
        return ViewSet(views=[replace(v, color=v.color.copy(), normal=None if v.normal is None else v.normal.copy())
                              for v in viewset.views], world=viewset.world, extras=dict(viewset.extras))
    rng = np.random.default_rng(d.seed)
    names = [v.name for v in viewset.views]
    if d.shift_view is not None and d.shift_view not in names:
        raise BadRequest(f"degradation shift_view {d.shift_view!r} is not a view; the views are {', '.join(names)}.")
    candidates = names[1:] or names
    shift_name = d.shift_view if d.shift_view is not None else candidates[int(rng.integers(0, len(candidates)))]
    angle = rng.uniform(0, 2 * math.pi)
    shift = (d.shift_px * math.cos(angle), d.shift_px * math.sin(angle))
    children = rng.spawn(len(viewset.views))
    views, records = [], []
    for view, child in zip(viewset.views, children):
        v, rec = _degrade_view(view, d, child, shift if (d.shift_px and view.name == shift_name) else None)
        views.append(v)
        records.append(rec)
    extras = dict(viewset.extras)
    extras["degradation"] = {"fields": asdict(d), "views": records}
    return ViewSet(views=views, world=viewset.world, extras=extras)
