"""Synthetic views for reconstruction tests, without Blender: analytic ray casting of simple shapes
(a sphere, a box frame with a square hole) into the views contract, plus their exact surfaces for
measuring Chamfer distance."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from make_your_3d.models.wonder3d_views import WONDER3D_VIEWS
from make_your_3d.recon.camera import orbit_c2w
from make_your_3d.views import View, ViewSet, encode_normals

SPHERE_R = 0.8
# box frame: outer half sizes (x, y, z), square hole of half size HOLE through z
FRAME = (0.8, 0.8, 0.3)
HOLE = 0.35
TOP = np.array([0.85, 0.25, 0.2])
BOTTOM = np.array([0.2, 0.35, 0.85])


@dataclass
class Hit:
    t: np.ndarray  # (N,) ray parameter, inf where missed
    normal: np.ndarray  # (N, 3)
    point: np.ndarray  # (N, 3)


def _sphere_hit(o: np.ndarray, d: np.ndarray) -> Hit:
    b = np.einsum("ij,ij->i", o, d)
    c = np.einsum("ij,ij->i", o, o) - SPHERE_R**2
    disc = b * b - c
    t = np.where(disc >= 0, -b - np.sqrt(np.clip(disc, 0, None)), np.inf)
    p = o + d * np.where(np.isfinite(t), t, 0)[:, None]
    return Hit(t, p / SPHERE_R, p)


def _boxes() -> list[tuple[np.ndarray, np.ndarray]]:
    X, Y, Z = FRAME
    h = HOLE
    return [
        (np.array([-X, h, -Z]), np.array([X, Y, Z])),  # top bar
        (np.array([-X, -Y, -Z]), np.array([X, -h, Z])),  # bottom bar
        (np.array([-X, -h, -Z]), np.array([-h, h, Z])),  # left bar
        (np.array([h, -h, -Z]), np.array([X, h, Z])),  # right bar
    ]


def _box_hit(o: np.ndarray, d: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> Hit:
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / d
        t0, t1 = (lo - o) * inv, (hi - o) * inv
    tmin, tmax = np.minimum(t0, t1), np.maximum(t0, t1)
    tmin = np.nan_to_num(tmin, nan=-np.inf)
    tmax = np.nan_to_num(tmax, nan=np.inf)
    tn, tf = tmin.max(1), tmax.min(1)
    hit = (tn <= tf) & (tf > 0)
    axis = tmin.argmax(1)
    n = np.zeros_like(o)
    n[np.arange(len(o)), axis] = -np.sign(d[np.arange(len(o)), axis])
    return Hit(np.where(hit, tn, np.inf), n, o + d * np.where(hit, tn, 0)[:, None])


def _frame_hit(o: np.ndarray, d: np.ndarray) -> Hit:
    return _boxes_hit(o, d, _boxes())


def _dish(p: np.ndarray) -> np.ndarray:
    """A square dish (negative inside): a flat floor 0.4 below its rim, walls sloping up from radius 0.5
    to 0.8; concave, and one smooth surface from the floor over the rim."""
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    rim = -0.1 + 0.4 * np.clip((np.sqrt(x * x + z * z) - 0.5) / 0.3, 0, 1)
    return np.maximum.reduce([np.abs(x) - 0.8, np.abs(z) - 0.8, -0.3 - y, y - rim])


def _box_sdf(p: np.ndarray, lo, hi) -> np.ndarray:
    """Signed distance bound of an axis-aligned box (negative inside)."""
    c, h = (np.asarray(lo) + np.asarray(hi)) / 2, (np.asarray(hi) - np.asarray(lo)) / 2
    q = np.abs(p - c) - h
    return np.linalg.norm(np.maximum(q, 0), axis=-1) + np.minimum(q.max(-1), 0)


# an open box seen into from the front: outer half sizes, walls 0.2 thick, the cavity's floor at z = -0.1
OPEN_BOX_OUTER = ((-0.7, -0.6, -0.5), (0.7, 0.6, 0.5))
OPEN_BOX_CAVITY = ((-0.5, -0.4, -0.1), (0.5, 0.4, 9.0))
# a step seen head-on: a block whose lower middle is recessed 0.35 (a ledge under a lintel, open at the bottom)
STEP_BLOCK = ((-0.7, -0.6, -0.5), (0.7, 0.6, 0.5))
STEP_CUT = ((-0.45, -9.0, 0.15), (0.45, 0.0, 9.0))
# the open box with a shelf across its cavity, 0.1 thick, its front flush with the rim (a crate's shelf)
SHELF = ((-0.7, -0.05, -0.5), (0.7, 0.05, 0.5))


def _open_box(p: np.ndarray) -> np.ndarray:
    return np.maximum(_box_sdf(p, *OPEN_BOX_OUTER), -_box_sdf(p, *OPEN_BOX_CAVITY))


def _step(p: np.ndarray) -> np.ndarray:
    return np.maximum(_box_sdf(p, *STEP_BLOCK), -_box_sdf(p, *STEP_CUT))


def _shelf(p: np.ndarray) -> np.ndarray:
    return np.minimum(_open_box(p), _box_sdf(p, *SHELF))


SDFS = {"dish": _dish, "open_box": _open_box, "step": _step, "shelf": _shelf}


def _sdf_hit(sdf, o: np.ndarray, d: np.ndarray, steps: int = 300) -> Hit:
    """First crossing into an SDF's inside along each ray (marched, then bisected); normals by differences."""
    ts = np.linspace(1.5, 4.5, steps)
    t = np.full(len(o), np.inf)
    for i in range(0, len(o), 4096):
        oo, dd = o[i : i + 4096], d[i : i + 4096]
        inside = sdf(oo[:, None] + dd[:, None] * ts[None, :, None]) < 0
        a, b = ts[np.maximum(inside.argmax(1) - 1, 0)], ts[inside.argmax(1)]
        for _ in range(30):
            m = 0.5 * (a + b)
            ins = sdf(oo + dd * m[:, None]) < 0
            a, b = np.where(ins, a, m), np.where(ins, m, b)
        t[i : i + 4096] = np.where(inside.any(1), b, np.inf)
    p = o + d * np.where(np.isfinite(t), t, 0)[:, None]
    e = 1e-4 * np.eye(3)
    n = np.stack([sdf(p + e[k]) - sdf(p - e[k]) for k in range(3)], -1)
    return Hit(t, n / np.clip(np.linalg.norm(n, axis=-1, keepdims=True), 1e-9, None), p)


def _boxes_hit(o: np.ndarray, d: np.ndarray, boxes: list[tuple[np.ndarray, np.ndarray]]) -> Hit:
    best = Hit(np.full(len(o), np.inf), np.zeros_like(o), np.zeros_like(o))
    for lo, hi in boxes:
        h = _box_hit(o, d, lo, hi)
        closer = h.t < best.t
        best.t[closer], best.normal[closer], best.point[closer] = h.t[closer], h.normal[closer], h.point[closer]
    return best


HITS = {"sphere": _sphere_hit, "frame": _frame_hit, "dish": lambda o, d: _sdf_hit(_dish, o, d),
        "open_box": lambda o, d: _sdf_hit(_open_box, o, d), "step": lambda o, d: _sdf_hit(_step, o, d),
        "shelf": lambda o, d: _sdf_hit(_shelf, o, d)}


def albedo(points: np.ndarray) -> np.ndarray:
    """Two colours split at y = 0: easy to check under any view."""
    return np.where(points[:, 1:2] >= 0, TOP, BOTTOM)


def render_views(shape: str, size: int = 64, azimuths: list[tuple[str, float, float]] | None = None, ss: int = 2,
                 projection: str = "orthographic") -> ViewSet:
    """Views of `shape` ('sphere', 'frame' or 'dish'), `ss`x supersampled: orthographic (2x2 world units)
    or perspective (pinhole at distance 3 seeing 2.4 units across at the origin)."""
    if azimuths is None:
        azimuths = [(n, a, 0.0) for n, a in WONDER3D_VIEWS]
    hit_fn = HITS[shape]
    views = []
    n = size * ss
    for name, az, el in azimuths:
        c2w = orbit_c2w(az, el, radius=3.0)
        px = (np.arange(n) + 0.5) / n - 0.5
        if projection == "orthographic":
            x, y = np.meshgrid(px * 2.0, px * 2.0, indexing="xy")
            o = (c2w[:3, :3] @ np.stack([x.ravel(), y.ravel(), np.zeros(n * n)])).T + c2w[:3, 3]
            d = np.broadcast_to(c2w[:3, 2], o.shape).copy()
        else:
            x, y = np.meshgrid(px * 0.8, px * 0.8, indexing="xy")  # 2.4 units across at distance 3
            d = (c2w[:3, :3] @ np.stack([x.ravel(), y.ravel(), np.ones(n * n)])).T
            d /= np.linalg.norm(d, axis=1, keepdims=True)
            o = np.broadcast_to(c2w[:3, 3], d.shape).copy()
        h = hit_fn(o, d)
        m = np.isfinite(h.t)
        col = np.where(m[:, None], albedo(h.point), 0.0)
        nrm = np.where(m[:, None], h.normal, 0.0)

        def down(a: np.ndarray) -> np.ndarray:
            return a.reshape(size, ss, size, ss, -1).mean((1, 3))

        a = down(m[:, None].astype(float).reshape(n, n, 1))[..., 0]
        c = down((col * m[:, None]).reshape(n, n, 3)) / np.clip(a[..., None], 1e-6, None)
        nn = down((nrm * m[:, None]).reshape(n, n, 3))
        nn = nn / np.clip(np.linalg.norm(nn, axis=-1, keepdims=True), 1e-6, None)
        alpha = np.round(a * 255).astype(np.uint8)
        rgba = np.concatenate([np.clip(np.round(c * 255), 0, 255).astype(np.uint8), alpha[..., None]], -1)
        if projection == "orthographic":
            views.append(View(name=name, color=rgba, normal=encode_normals(nn, alpha), c2w=c2w,
                              projection="orthographic", ortho_size=(2.0, 2.0)))
        else:
            f = size / 0.8
            K = np.array([[f, 0, size / 2], [0, f, size / 2], [0, 0, 1.0]])
            views.append(View(name=name, color=rgba, normal=encode_normals(nn, alpha), c2w=c2w,
                              projection="perspective", ortho_size=None, K=K))
    return ViewSet(views=views)


def surface_samples(shape: str, n: int = 20000, seed: int = 0) -> np.ndarray:
    """Uniform points on the exact surface (for Chamfer distance)."""
    rng = np.random.default_rng(seed)
    if shape == "sphere":
        p = rng.normal(size=(n, 3))
        return p / np.linalg.norm(p, axis=1, keepdims=True) * SPHERE_R
    X, Y, Z = FRAME
    h = HOLE
    out_area = 8 * (X * Y + Y * Z + X * Z) - 2 * 4 * h * h
    wall_area = 4 * (2 * h) * (2 * Z)
    k_out = int(n * out_area / (out_area + wall_area))
    # outer box surface without the hole's openings
    pts = []
    while sum(len(p) for p in pts) < k_out:
        face = rng.integers(0, 6, size=k_out)
        u = rng.uniform(-1, 1, size=(k_out, 3)) * np.array([X, Y, Z])
        ax = face // 2
        u[np.arange(k_out), ax] = np.where(face % 2 == 0, -1.0, 1.0) * np.array([X, Y, Z])[ax]
        w = np.array([Y * Z, Y * Z, X * Z, X * Z, X * Y, X * Y])[face]  # area weights by rejection
        ok = rng.uniform(0, w.max(), size=k_out) < w
        ok &= ~((np.abs(u[:, 0]) < h) & (np.abs(u[:, 1]) < h))
        pts.append(u[ok])
    outer = np.concatenate(pts)[:k_out]
    k_w = n - k_out
    side = rng.integers(0, 4, size=k_w)
    t = rng.uniform(-h, h, size=k_w)
    z = rng.uniform(-Z, Z, size=k_w)
    fixed = np.where(side % 2 == 0, -h, h)
    wall = np.where((side < 2)[:, None], np.stack([fixed, t, z], 1), np.stack([t, fixed, z], 1))
    return np.concatenate([outer, wall])


def surface_distance(shape: str, points: np.ndarray) -> np.ndarray:
    """Unsigned distance from points to the exact surface (exact for the sphere, CSG bound for the frame,
    the SDF shapes)."""
    if shape in SDFS:
        return np.abs(SDFS[shape](points))
    if shape == "sphere":
        return np.abs(np.linalg.norm(points, axis=1) - SPHERE_R)

    def box_sdf(p: np.ndarray, half: np.ndarray) -> np.ndarray:
        q = np.abs(p) - half
        return np.linalg.norm(np.maximum(q, 0), axis=1) + np.minimum(q.max(1), 0)

    outer = box_sdf(points, np.array(FRAME))
    hole = box_sdf(points, np.array([HOLE, HOLE, 10.0]))
    return np.abs(np.maximum(outer, -hole))


def chamfer(shape: str, pred_points: np.ndarray, n_gt: int = 50000, threshold: float = 0.02) -> dict:
    """Chamfer-L1 (mean of accuracy and completeness) and F-score at `threshold` against the exact shape."""
    from scipy.spatial import cKDTree

    acc = surface_distance(shape, pred_points)
    comp = cKDTree(pred_points).query(surface_samples(shape, n_gt))[0]
    p, r = (acc < threshold).mean(), (comp < threshold).mean()
    return {"accuracy": float(acc.mean()), "completeness": float(comp.mean()),
            "chamfer_l1": float((acc.mean() + comp.mean()) / 2), "fscore": float(2 * p * r / max(p + r, 1e-9))}


def lumpy_sphere_field(seed: int, res: int = 40, bump: float = 0.12) -> tuple[np.ndarray, np.ndarray, float]:
    """A signed field (negative inside) of a sphere of radius 0.7 with smooth random lumps, on a res^3 grid
    over [-1, 1]^3: returns (field, lo, step). Its marching-cubes surface is closed, and quadric
    decimation to a few hundred faces pinches its thin lumps into non-manifold edges (e.g. seed 6)."""
    from scipy import ndimage

    g = np.stack(np.meshgrid(*[np.linspace(-1.0, 1.0, res)] * 3, indexing="ij"), -1)
    noise = ndimage.gaussian_filter(np.random.default_rng(seed).standard_normal((res,) * 3), 2.0)
    field = np.linalg.norm(g, axis=-1) - 0.7 + bump * noise / noise.std()
    return field, np.full(3, -1.0), 2.0 / (res - 1)
