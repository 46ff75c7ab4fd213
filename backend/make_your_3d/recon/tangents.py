"""Shading normals and MikkTSpace tangents of the final mesh: the frame a tangent-space normal map is
baked in and read back in.

A GLB's mesh is split at UV seams (xatlas gives each chart its own vertices), so normals computed per
vertex index would break the shading along every seam; `smooth_normals` averages over the welded
positions instead. `mikk_tangents` follows MikkTSpace's rules (per-triangle tangent from the UV
derivatives, projected into each corner's tangent plane, weighted by the corner's angle, summed per
vertex, the bitangent's sign from the UV orientation), so Blender, which recomputes MikkTSpace tangents
on import, and an engine that reads the file's TANGENT attribute both see the frame the map was baked
in (tests/test_asset_maps.py compares them with Blender's own `calc_tangents`). UVs are in the
v-up convention of `UVMesh`: the bitangent points to increasing v, i.e. up the image (glTF's +Y green).
"""

from __future__ import annotations

import numpy as np


def _corner_angles(vertices: np.ndarray, faces: np.ndarray, normals: np.ndarray | None = None) -> np.ndarray:
    """(F,3) angle at each corner; with `normals` (V,3) the edges are first projected into the corner's
    tangent plane, as MikkTSpace does."""
    p = vertices[faces]
    out = np.zeros(faces.shape, np.float64)
    for c in range(3):
        e1 = p[:, (c + 1) % 3] - p[:, c]
        e2 = p[:, (c + 2) % 3] - p[:, c]
        if normals is not None:
            n = normals[faces[:, c]]
            e1 = e1 - n * (e1 * n).sum(1, keepdims=True)
            e2 = e2 - n * (e2 * n).sum(1, keepdims=True)
        e1 = e1 / np.maximum(np.linalg.norm(e1, axis=1, keepdims=True), 1e-20)
        e2 = e2 / np.maximum(np.linalg.norm(e2, axis=1, keepdims=True), 1e-20)
        out[:, c] = np.arccos(np.clip((e1 * e2).sum(1), -1.0, 1.0))
    return out


def _normalized(v: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(v, axis=1, keepdims=True)
    return np.where(n > 1e-12, v / np.maximum(n, 1e-30), fallback)


def smooth_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """(V,3) unit normals, angle-weighted over every face around each welded position (identical
    positions share one normal, so UV seams do not show in the shading)."""
    vertices = np.asarray(vertices, np.float64)
    faces = np.asarray(faces, np.int64)
    _, weld = np.unique(vertices, axis=0, return_inverse=True)
    weld = weld.reshape(-1)
    p = vertices[faces]
    fn = np.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0])
    fn = _normalized(fn, np.zeros(3))
    w = _corner_angles(vertices, faces)
    acc = np.zeros((int(weld.max()) + 1 if len(weld) else 0, 3))
    for c in range(3):
        np.add.at(acc, weld[faces[:, c]], fn * w[:, c:c + 1])
    return _normalized(acc, np.array([0.0, 1.0, 0.0]))[weld]


def mikk_tangents(vertices: np.ndarray, normals: np.ndarray, uvs: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """(V,4) MikkTSpace tangents: xyz unit and perpendicular to the vertex normal, w = +1 or -1 with
    bitangent = w * cross(normal, tangent) (glTF's rule). A vertex whose faces disagree on the UV
    orientation (a mirrored chart meeting itself; xatlas charts never flip) takes the majority's."""
    vertices = np.asarray(vertices, np.float64)
    normals = np.asarray(normals, np.float64)
    uvs = np.asarray(uvs, np.float64)
    faces = np.asarray(faces, np.int64)
    p, t = vertices[faces], uvs[faces]
    d1, d2 = p[:, 1] - p[:, 0], p[:, 2] - p[:, 0]
    s1, s2 = t[:, 1] - t[:, 0], t[:, 2] - t[:, 0]
    area_st = s1[:, 0] * s2[:, 1] - s1[:, 1] * s2[:, 0]  # twice the signed UV area
    preserving = area_st > 0
    # d(position)/du up to a positive scale, flipped where the UV triangle is mirrored (MikkTSpace's vOs)
    os_ = s2[:, 1:2] * d1 - s1[:, 1:2] * d2
    os_ = os_ * np.where(preserving, 1.0, -1.0)[:, None]
    os_ = _normalized(os_, np.zeros(3)) * (np.abs(area_st) > 1e-20)[:, None]
    angles = _corner_angles(vertices, faces, normals)
    acc = np.zeros_like(vertices)
    orient = np.zeros(len(vertices))
    for c in range(3):
        v = faces[:, c]
        n = normals[v]
        proj = os_ - n * (os_ * n).sum(1, keepdims=True)
        proj = _normalized(proj, np.zeros(3))
        np.add.at(acc, v, proj * angles[:, c:c + 1])
        np.add.at(orient, v, np.where(preserving, 1.0, -1.0) * angles[:, c])
    # a vertex with no usable UV derivative gets any unit vector perpendicular to its normal
    helper = np.where(np.abs(normals[:, :1]) < 0.9, [[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]])
    fallback = _normalized(helper - normals * (helper * normals).sum(1, keepdims=True), np.array([1.0, 0.0, 0.0]))
    tan = acc - normals * (acc * normals).sum(1, keepdims=True)
    tan = _normalized(tan, fallback)
    w = np.where(orient >= 0, 1.0, -1.0)
    return np.concatenate([tan, w[:, None]], 1)
