"""Views as tensors: per-view targets at a working resolution, the masks' sub-pixel edges, the
visual hull as a field, and the scene's bounding box from the masks (cameras: recon/camera.py)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from make_your_3d.recon.camera import Cameras, cameras_for, projection_matrix
from make_your_3d.recon.config import HullConfig
from make_your_3d.views import ViewSet


@dataclass
class ViewTargets:
    """All views at one working resolution (W, H) as float tensors."""

    cams: list[Cameras]  # one batch per projection model
    groups: list[list[int]]  # view indices of each batch
    rgb: Tensor  # (V, H, W, 3) straight colour
    mask: Tensor  # (V, H, W) soft foreground in [0, 1]
    normal: Tensor | None  # (V, H, W, 3) world unit normals, None when no view has normals
    has_normal: Tensor  # (V,) bool
    width: int
    height: int

    def camera(self, v: int) -> Cameras:
        for cams, idx in zip(self.cams, self.groups):
            if v in idx:
                return cams.subset([idx.index(v)])
        raise IndexError(v)


def targets_for(viewset: ViewSet, size: int, device: torch.device) -> ViewTargets:
    """Downsample colour (premultiplied, so edges do not bleed background), masks and normals."""
    W0, H0 = viewset.image_size
    scale = min(1.0, size / max(W0, H0))
    W, H = max(8, round(W0 * scale)), max(8, round(H0 * scale))
    cols = torch.tensor(np.stack([v.color for v in viewset.views]), dtype=torch.float32) / 255.0  # (V,H0,W0,4)
    a = cols[..., 3:4]
    prem = torch.cat([cols[..., :3] * a, a], -1).permute(0, 3, 1, 2)
    has_n = torch.tensor([v.normal is not None for v in viewset.views])
    nrm = torch.stack([torch.tensor(v.normals_world()) if v.normal is not None else torch.zeros(H0, W0, 3) for v in viewset.views])
    nrm = (nrm * a).permute(0, 3, 1, 2)
    if (W, H) != (W0, H0):
        prem = F.interpolate(prem, size=(H, W), mode="area")
        nrm = F.interpolate(nrm, size=(H, W), mode="area")
    prem = prem.permute(0, 2, 3, 1)
    alpha = prem[..., 3]
    rgb = prem[..., :3] / alpha[..., None].clamp_min(1e-4)
    n = F.normalize(nrm.permute(0, 2, 3, 1), dim=-1)
    cams, groups = cameras_for(viewset, W, H, device)
    return ViewTargets(cams, groups, rgb.clamp(0, 1).to(device), alpha.to(device), n.to(device) if bool(has_n.any()) else None,
                       has_n.to(device), W, H)


def _edge_offset(coverage: Tensor, n: Tensor) -> Tensor:
    """Signed distance (pixels, positive outside) from a pixel's centre to the straight edge with unit
    outward normal n that leaves `coverage` of the pixel inside: the inverse of the area a half-plane cuts
    from a unit square (linear while the edge crosses two opposite sides, quadratic near a corner)."""
    major, minor = n.abs().max(-1).values, n.abs().min(-1).values
    c = torch.minimum(coverage, 1 - coverage)
    knee = minor / (2 * major)  # the coverage where the edge reaches a corner of the pixel
    mag = torch.where(c >= knee, (0.5 - c) * major, 0.5 * (major + minor) - torch.sqrt(2 * major * minor * c))
    return torch.where(coverage < 0.5, mag, -mag)


def subpixel_mask(alpha: Tensor, upsample: int = HullConfig.mask_upsample,
                  sharp: float = HullConfig.sharp_edge) -> Tensor:
    """Binary foreground (H*u, W*u) at `upsample` times the resolution of an anti-aliased mask (H,W).

    A partly covered pixel between a full and an empty one (an anti-aliased sharp edge) is cut by a
    straight edge whose direction is the coverage gradient's and whose offset is read from the coverage
    itself, so the edge lands where the renderer put it, to the upsampled grid's 1/(2u) px; elsewhere
    the mask is upsampled bilinearly. (Bilinear upsampling and a 0.5 threshold instead move a sharp
    edge by up to 0.2 px depending on where it falls in the pixel, which tightens the visual hull and
    pushes surfaces anchored to it back.)"""
    a = alpha.float().clamp(0, 1)
    H, W = a.shape
    u = int(upsample)
    # soft edges (a matte that ramps over several pixels) keep the bilinear 0.5 crossing
    out = F.interpolate(a[None, None], scale_factor=u, mode="bilinear", align_corners=False)[0, 0] >= 0.5
    sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=a.device) / 8.0
    pad = F.pad(a[None, None], (1, 1, 1, 1), mode="replicate")
    gx = F.conv2d(pad, sobel[None, None])[0, 0]
    gy = F.conv2d(pad, sobel.T[None, None])[0, 0]
    norm = torch.sqrt(gx**2 + gy**2)
    # a sharp edge: a partly covered pixel with full and empty pixels next to it
    hi = F.max_pool2d(pad, 3, 1)[0, 0]
    lo = -F.max_pool2d(-pad, 3, 1)[0, 0]
    part = (a > 1e-3) & (a < 1 - 1e-3) & (norm > 1e-6) & (hi > 1 - sharp) & (lo < sharp)
    iy, ix = torch.nonzero(part, as_tuple=True)
    if iy.numel() == 0:
        return out
    n = -torch.stack([gx[iy, ix], gy[iy, ix]], -1) / norm[iy, ix, None]  # outward normal
    s = _edge_offset(a[iy, ix], n)
    off = (torch.arange(u, device=a.device, dtype=torch.float32) + 0.5) / u - 0.5
    qy, qx = torch.meshgrid(off, off, indexing="ij")
    inside = (s[:, None, None] + qx * n[:, 0, None, None] + qy * n[:, 1, None, None]) < 0  # (P,u,u)
    rows = (iy[:, None, None] * u + torch.arange(u, device=a.device)[None, :, None]).expand(-1, u, u)
    cols = (ix[:, None, None] * u + torch.arange(u, device=a.device)[None, None, :]).expand(-1, u, u)
    out[rows, cols] = inside
    return out


class HullField:
    """The visual hull as a field: min over views of (mask - 1/2) at each point's projection (> 0 inside),
    with each mask's edges placed at sub-pixel precision (`subpixel_mask`).

    All views are sampled in one batched grid_sample through precomputed 3x4 projection matrices.
    Points outside a view's image count as outside (every view must see the whole subject)."""

    def __init__(self, viewset: ViewSet, masks: list[Tensor], cfg: HullConfig = HullConfig()):
        dev = masks[0].device
        mats = []
        for v in viewset.views:
            W, H = v.size
            # to grid_sample's normalised coordinates: x_n = u / W * 2 - 1
            N = np.array([[2.0 / W, 0, -1], [0, 2.0 / H, -1], [0, 0, 1]])
            mats.append(N @ projection_matrix(v))
        self.mats = torch.tensor(np.stack(mats), dtype=torch.float32, device=dev)  # (V,3,4)
        self.masks = torch.stack([subpixel_mask(m, cfg.mask_upsample, cfg.sharp_edge).float() for m in masks])[:, None]  # (V,1,H*u,W*u)
        self.ortho = torch.tensor([v.projection == "orthographic" for v in viewset.views], device=dev)

    def __call__(self, points: Tensor, chunk: int = 1_000_000) -> Tensor:
        return torch.cat([self._sample(points[i : i + chunk]).min(0).values - 0.5
                          for i in range(0, points.shape[0], chunk)])

    def per_view(self, points: Tensor, chunk: int = 1_000_000) -> Tensor:
        """(V, N) each view's mask at each point's projection (0 off the image)."""
        return torch.cat([self._sample(points[i : i + chunk]) for i in range(0, points.shape[0], chunk)], 1)

    def _sample(self, p: Tensor) -> Tensor:
        ph = torch.cat([p, torch.ones_like(p[:, :1])], -1)
        uvw = torch.einsum("vij,nj->vni", self.mats, ph)
        w = torch.where(self.ortho[:, None], torch.ones_like(uvw[..., 2]), uvw[..., 2].clamp_min(1e-6))
        grid = uvw[..., :2] / w[..., None]
        val = F.grid_sample(self.masks, grid[:, None], mode="bilinear", padding_mode="zeros", align_corners=False)[:, 0, 0]
        inside = (grid.abs() <= 1).all(-1)
        return torch.where(inside, val, torch.zeros_like(val))


def mask_tensors(viewset: ViewSet, device: torch.device) -> list[Tensor]:
    return [torch.tensor(v.color[..., 3], dtype=torch.float32, device=device) / 255.0 for v in viewset.views]


def _rough_centre_and_radius(viewset: ViewSet) -> tuple[np.ndarray, float]:
    """Point nearest to all principal rays, and a radius that covers every view's image there."""
    A, b, c0, radius = np.zeros((3, 3)), np.zeros(3), [], 0.0
    for v in viewset.views:
        o, d = v.c2w[:3, 3], v.c2w[:3, 2] / np.linalg.norm(v.c2w[:3, 2])
        P = np.eye(3) - np.outer(d, d)
        A += P
        b += P @ o
        c0.append(o + d * max(np.dot(-o, d), 1e-3))
    c0 = np.mean(c0, axis=0)
    lam = 1e-3 * len(viewset.views)
    centre = np.linalg.solve(A + lam * np.eye(3), b + lam * c0)
    for v in viewset.views:
        W, H = v.size
        if v.projection == "orthographic":
            r = 0.5 * float(np.hypot(*v.ortho_size))
        else:
            depth = max(float(np.dot(centre - v.c2w[:3, 3], v.c2w[:3, 2])), 1e-3)
            r = 0.5 * depth * float(np.hypot(W / v.K[0, 0], H / v.K[1, 1]))
        radius = max(radius, r)
    return centre, radius


def grid_counts(lo: np.ndarray, hi: np.ndarray, res: int) -> np.ndarray:
    """Points per axis of the cubic-voxel grid over [lo, hi] with `res` points along the longest side."""
    step = float(np.max(hi - lo)) / (res - 1)
    return np.maximum(2, np.ceil((hi - lo) / step).astype(int) + 1)


def grid_points(lo: np.ndarray, hi: np.ndarray, res: int, device: torch.device) -> tuple[Tensor, np.ndarray]:
    """Cubic-voxel grid covering [lo, hi]: points (X*Y*Z, 3) and the per-axis counts."""
    step = float(np.max(hi - lo)) / (res - 1)
    counts = grid_counts(lo, hi, res)
    axes = [torch.arange(int(n), dtype=torch.float32, device=device) * step + float(l) for n, l in zip(counts, lo)]
    g = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    return g, counts


def scene_bounds(viewset: ViewSet, masks: list[Tensor], device: torch.device,
                 cfg: HullConfig = HullConfig()) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned box around the visual hull, padded by a few voxels."""
    hull = HullField(viewset, masks, cfg)
    centre, radius = _rough_centre_and_radius(viewset)
    lo, hi = centre - radius, centre + radius
    res = cfg.bounds_res
    for _ in range(cfg.bounds_passes):
        pts, counts = grid_points(lo, hi, res, device)
        inside = hull(pts) > cfg.bounds_level
        if not bool(inside.any()):
            break
        p = pts[inside].cpu().numpy()
        step = float(np.max(hi - lo)) / (res - 1)
        lo, hi = p.min(0) - cfg.bounds_pad * step, p.max(0) + cfg.bounds_pad * step
    return lo, hi
