"""Tangent-space normal map of the fine surface on the final (simplified) mesh's UVs.

Decimation to the face budget removes the detail the fused field had; the map puts its shading back.
For every chart texel: its point on the simplified mesh, the closest point on the fine surface (the
marching-cubes mesh before simplification) among the fine triangles nearest to it that face the same
way, and that triangle's smooth normal there, written in the texel's MikkTSpace frame (recon/tangents.py)
the way glTF renderers read it back: n = normalize(x T + y B + z N) with T, N interpolated across the
face and B = w cross(N, T). RGB = (x, y, z) / 2 + 1/2, +Y green (glTF, OpenGL convention).
"""

from __future__ import annotations

import numpy as np
import torch
import trimesh
from scipy.spatial import cKDTree
from torch import Tensor

from make_your_3d.recon.config import BakeConfig
from make_your_3d.recon.texture import UVMesh, chart_texels, dilate


def closest_on_triangles(p: Tensor, a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """Barycentric coordinates (...,3) of the point of triangle (a,b,c) closest to p; all (...,3).
    The usual region test (vertex, edge or face region of the projection)."""
    ab, ac, ap = b - a, c - a, p - a
    d1, d2 = (ab * ap).sum(-1), (ac * ap).sum(-1)
    bp = p - b
    d3, d4 = (ab * bp).sum(-1), (ac * bp).sum(-1)
    cp = p - c
    d5, d6 = (ab * cp).sum(-1), (ac * cp).sum(-1)
    va = d3 * d6 - d5 * d4
    vb = d5 * d2 - d1 * d6
    vc = d1 * d4 - d3 * d2
    eps = 1e-30
    denom = (va + vb + vc)
    v_in = vb / torch.where(denom.abs() > eps, denom, torch.full_like(denom, eps))
    w_in = vc / torch.where(denom.abs() > eps, denom, torch.full_like(denom, eps))
    bary = torch.stack([1 - v_in - w_in, v_in, w_in], -1)

    def put(mask: Tensor, u: Tensor, v: Tensor, w: Tensor) -> None:
        nonlocal bary
        bary = torch.where(mask[..., None], torch.stack([u, v, w], -1), bary)

    one, zero = torch.ones_like(d1), torch.zeros_like(d1)
    # edge regions (checked before vertices so a vertex region wins where both hold)
    t_bc = (d4 - d3) / torch.where(((d4 - d3) + (d5 - d6)).abs() > eps, (d4 - d3) + (d5 - d6), one)
    put((va <= 0) & (d4 - d3 >= 0) & (d5 - d6 >= 0), zero, 1 - t_bc, t_bc)
    t_ac = d2 / torch.where((d2 - d6).abs() > eps, d2 - d6, one)
    put((vb <= 0) & (d2 >= 0) & (d6 <= 0), 1 - t_ac, zero, t_ac)
    t_ab = d1 / torch.where((d1 - d3).abs() > eps, d1 - d3, one)
    put((vc <= 0) & (d1 >= 0) & (d3 <= 0), 1 - t_ab, t_ab, zero)
    put((d6 >= 0) & (d5 <= d6), zero, zero, one)
    put((d3 >= 0) & (d4 <= d3), zero, one, zero)
    put((d1 <= 0) & (d2 <= 0), one, zero, zero)
    return bary


def smoothed_vertex_normals(mesh: trimesh.Trimesh, iterations: int, edge_cos: float = 0.8) -> np.ndarray:
    """The mesh's vertex normals (V,3), each averaged `iterations` times with those of its edge neighbours
    that differ from it by less than arccos(`edge_cos`): marching cubes terraces a smooth surface at the
    scale of a voxel (normals off by 10-20 degrees), which is noise, while a crease (a chair's edge, about
    90 degrees) is detail and is not averaged across."""
    n = np.asarray(mesh.vertex_normals, np.float64)
    if iterations <= 0 or len(mesh.edges_unique) == 0:
        return n
    from scipy.sparse import coo_matrix

    e = np.asarray(mesh.edges_unique)
    i = np.concatenate([e[:, 0], e[:, 1], np.arange(len(n))])
    j = np.concatenate([e[:, 1], e[:, 0], np.arange(len(n))])
    for _ in range(iterations):
        w = ((n[i] * n[j]).sum(1) > edge_cos).astype(np.float64)
        n = coo_matrix((w, (i, j)), shape=(len(n), len(n))).tocsr() @ n
        n /= np.linalg.norm(n, axis=1, keepdims=True).clip(1e-12)
    return n


def fine_normals_at(points: Tensor, normals: Tensor, fine: trimesh.Trimesh, tree: cKDTree, k: int, reach: float,
                    chunk: int = 65536, smooth: int = 0, edge_cos: float = 0.8) -> tuple[Tensor, Tensor]:
    """The fine surface's smooth normal (N,3) at the point closest to each of `points` (N,3) among the `k`
    fine triangles whose centroids are nearest, counting only triangles that face within 90 degrees of
    `normals` (so the far side of a thin part is never taken) and closer than `reach`; and whether one
    was found (N,) bool."""
    fv = torch.tensor(np.asarray(fine.vertices), dtype=torch.float32)
    ff = torch.tensor(np.asarray(fine.faces), dtype=torch.long)
    fvn = torch.tensor(smoothed_vertex_normals(fine, smooth, edge_cos), dtype=torch.float32)
    ffn = torch.tensor(np.asarray(fine.face_normals), dtype=torch.float32)
    out = torch.zeros_like(points)
    found = torch.zeros(points.shape[0], dtype=torch.bool)
    k = min(k, len(ff))
    for s in range(0, points.shape[0], chunk):
        p, n = points[s:s + chunk], normals[s:s + chunk]
        _, idx = tree.query(p.numpy(), k=k)
        idx = torch.as_tensor(np.asarray(idx, np.int64).reshape(len(p), k))
        tri = ff[idx]  # (n,k,3)
        a, b, c = fv[tri[..., 0]], fv[tri[..., 1]], fv[tri[..., 2]]
        pe = p[:, None].expand_as(a)
        bary = closest_on_triangles(pe, a, b, c)
        q = bary[..., :1] * a + bary[..., 1:2] * b + bary[..., 2:] * c
        dist = (q - pe).norm(dim=-1)
        facing = (ffn[idx] * n[:, None]).sum(-1) > 0
        dist = torch.where(facing & (dist <= reach), dist, torch.full_like(dist, float("inf")))
        best = dist.argmin(1)
        rows = torch.arange(len(p))
        ok = torch.isfinite(dist[rows, best])
        tb, bb = tri[rows, best], bary[rows, best]
        nf = (fvn[tb] * bb[..., None]).sum(1)
        out[s:s + chunk] = torch.nn.functional.normalize(nf, dim=-1)
        found[s:s + chunk] = ok
    return out, found


def encode_tangent_space(world: Tensor, T: Tensor, N: Tensor, w: Tensor, min_z: float) -> Tensor:
    """Tangent-space coordinates (N,3), unit, z >= min_z, of world normals `world` in the per-texel
    frame (T, B = w cross(N, T), N) as a glTF renderer builds it (T and N interpolated, not normalized):
    the (x, y, z) whose normalize(x T + y B + z N) is `world`."""
    B = w[:, None] * torch.cross(N, T, dim=-1)
    frame = torch.stack([T, B, N], -1)  # columns T, B, N
    det = torch.linalg.det(frame)
    good = det.abs() > 1e-12
    eye = torch.eye(3, dtype=frame.dtype).expand_as(frame)
    ts = torch.linalg.solve(torch.where(good[:, None, None], frame, eye), world[..., None])[..., 0]
    ts = torch.where(good[:, None], ts, torch.tensor([0.0, 0.0, 1.0]))
    ts = torch.nn.functional.normalize(ts, dim=-1)
    # a normal turned away from the face cannot be shown; keep it just above the horizon
    xy = ts[:, :2]
    z = ts[:, 2].clamp_min(min_z)
    scale = torch.sqrt((1 - z**2).clamp_min(0)) / xy.norm(dim=-1).clamp_min(1e-12)
    xy = torch.where((ts[:, 2] < min_z)[:, None], xy * scale[:, None], xy)
    return torch.cat([xy, z[:, None]], -1)


def bake_normal_map(uvm: UVMesh, normals: np.ndarray, tangents: np.ndarray, fine: trimesh.Trimesh, size: int,
                    scene_size: float, cfg: BakeConfig = BakeConfig()) -> tuple[np.ndarray, dict]:
    """(size,size,3) uint8 tangent-space normal map of `fine` on `uvm`'s charts (dilated over the atlas,
    flat (128,128,255) where no fine surface is in reach), plus statistics."""
    tx = chart_texels(uvm, size)
    faces = torch.tensor(uvm.faces, dtype=torch.long)
    V = torch.tensor(uvm.vertices, dtype=torch.float32)
    Nv = torch.tensor(normals, dtype=torch.float32)
    Tv = torch.tensor(tangents[:, :3], dtype=torch.float32)
    P = tx.interpolate(V, faces)
    N = tx.interpolate(Nv, faces)
    T = tx.interpolate(Tv, faces)
    w = torch.tensor(tangents[:, 3], dtype=torch.float32)[faces[tx.face, 0]]
    tree = cKDTree(np.asarray(fine.triangles_center))
    world, found = fine_normals_at(P, torch.nn.functional.normalize(N, dim=-1), fine, tree, cfg.normal_candidates,
                                   cfg.normal_reach * scene_size, smooth=cfg.normal_smooth,
                                   edge_cos=cfg.normal_smooth_cos)
    world = torch.where(found[:, None], world, torch.nn.functional.normalize(N, dim=-1))
    ts = encode_tangent_space(world, T, N, w, cfg.normal_min_z)
    img = np.zeros((size, size, 3), np.float32)
    img[..., 2] = 1.0
    chart = tx.chart.numpy()
    img[chart] = ts.numpy()
    img = dilate(img, chart)
    rgb = np.clip(np.round((img * 0.5 + 0.5) * 255), 0, 255).astype(np.uint8)
    stats = {"texels": int(chart.sum()), "found": float(found.float().mean()) if len(found) else 0.0,
             "mean_tilt_deg": float(torch.rad2deg(torch.acos(ts[:, 2].clamp(-1, 1))).mean()) if len(ts) else 0.0}
    return rgb, stats
