"""Depth maps from normal maps (per-view normal integration), anchored to the visual hull.

Why: silhouettes alone cannot see concavities or the true curvature between views (six views give
an octagon where a sphere should be), and surfel fitting moves positions only slowly. Integrating
each view's normals gives that view's visible surface up to an offset; the offset comes from the
visual hull along the silhouette, where the surface touches the hull. The lifted pixels seed the
Gaussians ("points lifted from the views").

Orthographic views only (the multi-view model's views); perspective views fall back to the hull.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch
from scipy.sparse.csgraph import connected_components

from make_your_3d.recon.rasterize import Cameras
from make_your_3d.recon.texture import raster_triangles, project_points


@dataclass
class LiftedView:
    depth: np.ndarray  # (H,W) camera depth, nan outside the mask or where unknown
    points: np.ndarray  # (M,3) world points of the valid pixels
    normals: np.ndarray  # (M,3) world normals
    colors: np.ndarray  # (M,3) straight colours in [0,1]
    area: np.ndarray  # (M,) surface area each pixel stands for


def hull_depths(verts: torch.Tensor, faces: torch.Tensor, cams: Cameras) -> tuple[np.ndarray, np.ndarray]:
    """Front and back depth of the visual hull mesh along every pixel ray (inf where missed)."""
    uv, z = project_points(verts, cams)
    _, _, front = raster_triangles(uv[faces], z[faces], cams.width, cams.height)
    _, _, back = raster_triangles(uv[faces], -z[faces], cams.width, cams.height)
    return front.cpu().numpy(), (-back).cpu().numpy()


def integrate_normals(normals_cam: np.ndarray, mask: np.ndarray, front: np.ndarray, back: np.ndarray,
                      fx: float, fy: float, max_slope: float = 4.0, min_nz: float = 0.15,
                      touch_quantile: float = 0.98) -> np.ndarray:
    """Least-squares depth whose finite differences match the normals' slopes (orthographic camera).

    The integral is fixed up to one offset per connected piece; the offset puts the piece just behind
    the visual hull's front, touching it (robustly: a high quantile of the gap). Returns (H,W) depth,
    nan outside the mask.
    """
    H, W = mask.shape
    ok_hull = np.isfinite(front) & np.isfinite(back)
    m = mask & ok_hull
    idx = -np.ones((H, W), np.int64)
    n = int(m.sum())
    if n == 0:
        return np.full((H, W), np.nan)
    idx[m] = np.arange(n)
    nz = normals_cam[..., 2]
    good = m & (nz < -min_nz)
    with np.errstate(divide="ignore", invalid="ignore"):
        gx = np.clip(-normals_cam[..., 0] / nz, -max_slope, max_slope) / fx  # dz per pixel step in x
        gy = np.clip(-normals_cam[..., 1] / nz, -max_slope, max_slope) / fy
    rows, cols, vals, rhs, wts = [], [], [], [], []
    r = 0
    for axis, g in ((1, gx), (0, gy)):
        a = good[:, :-1] & good[:, 1:] if axis == 1 else good[:-1, :] & good[1:, :]
        ia = idx[:, :-1][a] if axis == 1 else idx[:-1, :][a]
        ib = idx[:, 1:][a] if axis == 1 else idx[1:, :][a]
        ga = g[:, :-1][a] if axis == 1 else g[:-1, :][a]
        gb = g[:, 1:][a] if axis == 1 else g[1:, :][a]
        k = len(ia)
        e = np.arange(r, r + k)
        rows += [e, e]
        cols += [ib, ia]
        vals += [np.ones(k), -np.ones(k)]
        rhs.append(0.5 * (ga + gb))
        wts.append(np.ones(k))
        r += k
    # a weak pull to the hull's front fixes every piece; then each connected piece is shifted so that it
    # lies behind the hull's front and touches it (the surface meets the hull on every view's contour)
    ids = idx[m]
    k = len(ids)
    e = np.arange(r, r + k)
    rows.append(e)
    cols.append(ids)
    vals.append(np.ones(k))
    rhs.append(front[m])
    wts.append(np.full(k, 1e-4))
    r += k
    A = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(r, n))
    b = np.concatenate(rhs)
    w = np.concatenate(wts)
    AtW = A.T.multiply(w).tocsr()
    z = spla.spsolve((AtW @ A).tocsc(), AtW @ b)
    ncomp, label = connected_components(AtW @ A, directed=False)
    gap = front[m] - z
    for c in range(ncomp):
        sel = label == c
        z[sel] += np.quantile(gap[sel], touch_quantile) if sel.sum() > 4 else gap[sel].max()
    out = np.full((H, W), np.nan)
    out[m] = np.clip(z, front[m], back[m])
    return out


def lift_view(rgb: np.ndarray, alpha: np.ndarray, normals_world: np.ndarray, cams: Cameras,
              hull_verts: torch.Tensor, hull_faces: torch.Tensor) -> LiftedView | None:
    """Integrate one orthographic view's normals and lift its masked pixels to world points."""
    if cams.model != "ortho":
        return None
    vm = cams.viewmats[0].cpu().numpy().astype(np.float64)
    K = cams.Ks[0].cpu().numpy().astype(np.float64)
    front, back = hull_depths(hull_verts, hull_faces, cams)
    n_cam = normals_world @ vm[:3, :3].T
    mask = alpha > 0.5
    depth = integrate_normals(n_cam, mask, front, back, K[0, 0], K[1, 1])
    valid = np.isfinite(depth)
    H, W = mask.shape
    v, u = np.nonzero(valid)
    x = (u + 0.5 - K[0, 2]) / K[0, 0]
    y = (v + 0.5 - K[1, 2]) / K[1, 1]
    pc = np.stack([x, y, depth[v, u]], -1)
    c2w = np.linalg.inv(vm)
    pts = pc @ c2w[:3, :3].T + c2w[:3, 3]
    nz = np.clip(-n_cam[v, u, 2], 0.2, 1.0)
    area = 1.0 / (K[0, 0] * K[1, 1]) / nz
    return LiftedView(depth, pts, normals_world[v, u], rgb[v, u], area)
