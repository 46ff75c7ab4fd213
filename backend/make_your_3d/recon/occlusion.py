"""Ambient occlusion of the final mesh, baked per texel into the red channel of an ORM texture.

Each texel's point is lit from a set of directions over the sphere (a Fibonacci set turned by a
rotation drawn from the seeded generator, so the result is reproducible and has no fixed banding):
from each direction the whole mesh is rasterized as a depth map (an orthographic 'shadow map'), and the
texel sees the sky that way if nothing lies in front of it. Occlusion = the cosine-weighted share of
its hemisphere that it sees (1: open, 0: enclosed). Rays are unbounded: the mesh is one object in empty
space, so a cavity darkens by how much of the sky its opening shows.

ORM packing (glTF): R = occlusion, G = roughness, B = metallic, so one image serves both
`occlusionTexture` and `pbrMetallicRoughness.metallicRoughnessTexture`; roughness and metallic are
the documented constants of `BakeConfig`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from make_your_3d.recon.config import BakeConfig
from make_your_3d.recon.texture import UVMesh, chart_texels, dilate, raster_triangles


def sphere_directions(n: int, gen: torch.Generator) -> Tensor:
    """n unit directions (n,3) spread evenly over the sphere (Fibonacci), turned by a random rotation."""
    i = torch.arange(n, dtype=torch.float64) + 0.5
    z = 1 - 2 * i / n
    phi = math.pi * (1 + 5**0.5) * i
    r = torch.sqrt((1 - z**2).clamp_min(0))
    d = torch.stack([r * torch.cos(phi), r * torch.sin(phi), z], -1)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))
    return (d @ q.T).float()


def _frame(d: Tensor) -> tuple[Tensor, Tensor]:
    """Two unit vectors perpendicular to d and to each other."""
    helper = torch.tensor([1.0, 0.0, 0.0]) if abs(float(d[0])) < 0.9 else torch.tensor([0.0, 1.0, 0.0])
    e1 = torch.nn.functional.normalize(torch.cross(d, helper, dim=0), dim=0)
    return e1, torch.cross(d, e1, dim=0)


def occlusion(points: Tensor, normals: Tensor, vertices: Tensor, faces: Tensor, cfg: BakeConfig,
              gen: torch.Generator) -> Tensor:
    """Per-point occlusion (N,) in [0,1] (1: nothing occludes) of `points` with unit `normals`, by the mesh."""
    centre = (vertices.max(0).values + vertices.min(0).values) / 2
    radius = float((vertices - centre).norm(dim=-1).max()) * 1.01 + 1e-9
    res = cfg.occlusion_map_px
    px = 2 * radius / res  # world size of one shadow-map pixel
    seen = torch.zeros(points.shape[0])
    total = torch.zeros(points.shape[0])
    for d in sphere_directions(cfg.occlusion_directions, gen):
        e1, e2 = _frame(d)
        cos = (normals * d).sum(-1)
        lit = cos > 0
        if not bool(lit.any()):
            continue

        def to_map(x: Tensor) -> tuple[Tensor, Tensor]:
            rel = x - centre
            xy = torch.stack([(rel * e1).sum(-1), (rel * e2).sum(-1)], -1) / px + res / 2
            return xy, -(rel * d).sum(-1)  # depth grows away from the light

        vxy, vz = to_map(vertices)
        _, _, zbuf = raster_triangles(vxy[faces], vz[faces], res, res)
        pxy, pz = to_map(points[lit])
        ix = pxy[:, 0].floor().long().clamp(0, res - 1)
        iy = pxy[:, 1].floor().long().clamp(0, res - 1)
        c = cos[lit]
        # slope-scaled bias: a surface at a grazing angle spans several depths within one pixel
        bias = px * (cfg.occlusion_bias_px + torch.sqrt((1 - c**2).clamp_min(0)) / c.clamp_min(0.05))
        vis = (pz <= zbuf[iy, ix] + bias).float()
        seen[lit] += vis * c
        total[lit] += c
    return torch.where(total > 0, seen / total.clamp_min(1e-9), torch.ones_like(total))


def bake_orm(uvm: UVMesh, normals: np.ndarray, size: int, cfg: BakeConfig = BakeConfig(), seed: int = 0,
             with_occlusion: bool = True) -> tuple[np.ndarray, dict]:
    """(size,size,3) uint8 ORM texture: R occlusion (1 everywhere when `with_occlusion` is False),
    G roughness, B metallic; chart edges dilated over the atlas."""
    gen = torch.Generator().manual_seed(seed)
    img = np.ones((size, size, 3), np.float32)
    img[..., 1], img[..., 2] = cfg.roughness, cfg.metallic
    stats: dict = {}
    if with_occlusion:
        tx = chart_texels(uvm, size)
        faces = torch.tensor(uvm.faces, dtype=torch.long)
        V = torch.tensor(uvm.vertices, dtype=torch.float32)
        P = tx.interpolate(V, faces)
        N = torch.nn.functional.normalize(tx.interpolate(torch.tensor(normals, dtype=torch.float32), faces), dim=-1)
        ao = occlusion(P, N, V, faces, cfg, gen).numpy()
        chart = tx.chart.numpy()
        r = np.ones((size, size), np.float32)
        r[chart] = ao
        img[..., 0] = dilate(r, chart, fallback=1.0)
        stats = {"mean": float(ao.mean()) if len(ao) else 1.0, "min": float(ao.min()) if len(ao) else 1.0}
    return np.clip(np.round(img * 255), 0, 255).astype(np.uint8), stats
