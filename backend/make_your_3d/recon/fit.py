"""Fit flat 3D Gaussians (surfels) to the colour, mask and normal views.

Why flat: a Gaussian squashed along its local z has a well-defined normal, so rendered normals can be
supervised by the given normal maps, and depth rendered from surfels is sharp enough to fuse into a
surface. Initialisation puts surfels on the visual hull of the masks, oriented by its normals and
coloured from the best-facing view. Losses: colour (L1), opacity vs mask, rendered normals vs given
normals, and normals derived from the rendered depth vs given normals (this last one moves the
surfels, not just turns them, so concavities the masks cannot see get carved).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from skimage.measure import marching_cubes
from torch import Tensor

from make_your_3d.progress import Reporter
from make_your_3d.recon.camera import Cameras, project, sample_image, unproject, view_camera, view_dirs
from make_your_3d.recon.config import FitConfig, HullConfig, ReconConfig
from make_your_3d.recon.rasterize import rasterize
from make_your_3d.recon.scene import HullField, ViewTargets, grid_points
from make_your_3d.views import ViewSet

__all__ = ["FitConfig", "Gaussians", "fit_gaussians", "init_from_lift", "render"]


@dataclass
class Gaussians:
    means: Tensor  # (N,3)
    quats: Tensor  # (N,4) wxyz, unnormalised
    log_scales: Tensor  # (N,2) in-plane; the normal axis is `thin` of the smaller one
    opacity_logits: Tensor  # (N,)
    colors: Tensor  # (N,3) in [0,1] after clamp
    thin: float = FitConfig.thin  # normal-axis scale as a fraction of the smaller in-plane scale

    def params(self) -> list[Tensor]:
        return [self.means, self.quats, self.log_scales, self.opacity_logits, self.colors]

    @property
    def n(self) -> int:
        return int(self.means.shape[0])

    def scales(self) -> Tensor:
        s = self.log_scales.exp()
        return torch.cat([s, self.thin * s.min(-1, keepdim=True).values], -1)

    def opacities(self) -> Tensor:
        return torch.sigmoid(self.opacity_logits)

    def normals(self) -> Tensor:
        """World normal of each surfel: the rotation's z column."""
        q = F.normalize(self.quats, dim=-1)
        w, x, y, z = q.unbind(-1)
        return torch.stack([2 * (x * z + w * y), 2 * (y * z - w * x), 1 - 2 * (x * x + y * y)], -1)

    def detach_subset(self, keep: Tensor) -> "Gaussians":
        return Gaussians(*[p.detach()[keep].clone().requires_grad_(True) for p in self.params()], thin=self.thin)


def render(g: Gaussians, cams: Cameras, background: float | Tensor = 0.0, tile_size: int = FitConfig.tile_size):
    """Render colour (C,H,W,3), world normals facing the camera (C,H,W,3), alpha and expected depth."""
    n = g.normals()
    dirs = cams.c2w[:, :3, 2]  # ortho viewing direction; good enough for orientation of pinhole too
    if cams.model == "pinhole":
        cam_pos = cams.c2w[:, :3, 3]
        view = F.normalize(g.means[None] - cam_pos[:, None], dim=-1)
    else:
        view = dirs[:, None, :].expand(-1, g.n, -1)
    sign = torch.where((n[None] * view).sum(-1, keepdim=True) > 0, -1.0, 1.0)
    feats = torch.cat([g.colors.clamp(0, 1)[None].expand(len(cams), -1, -1), n[None] * sign], -1)
    C = len(cams)
    bg = None
    if not (isinstance(background, float) and background == 0.0):
        bgc = torch.as_tensor(background, dtype=feats.dtype, device=feats.device).reshape(-1)
        bg = torch.cat([bgc.expand(3), torch.zeros(3, device=feats.device)])[None].expand(C, -1)
    out = rasterize(g.means, g.quats, g.scales(), g.opacities(), feats, cams, backgrounds=bg, tile_size=tile_size)
    return out.features[..., :3], out.features[..., 3:], out.alpha[..., 0], out.depth[..., 0]


def quat_from_z(normals: Tensor) -> Tensor:
    """Quaternions (wxyz) rotating +z onto each normal."""
    z = torch.tensor([0.0, 0.0, 1.0], device=normals.device)
    n = F.normalize(normals, dim=-1)
    axis = torch.cross(z.expand_as(n), n, dim=-1)
    w = 1.0 + n[:, 2]
    q = torch.cat([w[:, None], axis], -1)
    flip = w < 1e-6  # normal = -z: rotate pi about x
    q[flip] = torch.tensor([0.0, 1.0, 0.0, 0.0], device=normals.device)
    return F.normalize(q, dim=-1)


def hull_mesh(viewset: ViewSet, masks: list[Tensor], lo: np.ndarray, hi: np.ndarray, res: int,
              device: torch.device, cfg: HullConfig = HullConfig()) -> tuple[Tensor, Tensor]:
    """Visual hull surface: marching cubes of the mask field (vertices (V,3), faces (F,3), outward winding)."""
    pts, counts = grid_points(lo, hi, res, device)
    field = HullField(viewset, masks, cfg)(pts).reshape(*[int(c) for c in counts]).cpu().numpy()
    step = float(np.max(hi - lo)) / (res - 1)
    field = np.pad(field, 1, constant_values=-0.5)
    verts, faces, _, _ = marching_cubes(field, 0.0, spacing=(step, step, step))
    verts = verts - step + lo
    # skimage winds faces so that the cross product points towards increasing field (inside): flip
    return (torch.tensor(verts.copy(), dtype=torch.float32, device=device),
            torch.tensor(faces[:, ::-1].copy(), dtype=torch.long, device=device))


def _sample_surface(v: Tensor, f: Tensor, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor, float]:
    a, b, c = v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]
    cr = torch.cross(b - a, c - a, dim=-1)
    area = cr.norm(dim=-1) * 0.5
    fn = F.normalize(cr, dim=-1)
    pick = torch.multinomial(area + 1e-12, n, replacement=True, generator=generator)
    r = torch.rand(n, 2, generator=generator).to(v.device)
    r = torch.where(r.sum(-1, keepdim=True) > 1, 1 - r, r)
    pts = a[pick] + (b[pick] - a[pick]) * r[:, :1] + (c[pick] - a[pick]) * r[:, 1:]
    return pts, fn[pick], float(area.sum())


def _best_view_colors(means: Tensor, normals: Tensor, viewset: ViewSet) -> Tensor:
    colors = torch.full((means.shape[0], 3), 0.5, device=means.device)
    best = torch.full((means.shape[0],), -1.0, device=means.device)
    for vi, view in enumerate(viewset.views):
        cam = view_camera(view, means.device)
        uv, _ = project(means, cam)
        facing = -(normals * view_dirs(means, cam)).sum(-1)
        W, H = view.size
        col = sample_image(torch.tensor(view.color[..., :3], dtype=torch.float32, device=means.device) / 255.0, uv, W, H)
        better = facing > best
        colors[better], best[better] = col[better], facing[better]
    return colors


def _make_gaussians(means: Tensor, normals: Tensor, colors: Tensor, spacing: float, cfg: FitConfig) -> Gaussians:
    n = means.shape[0]
    dev = means.device
    return Gaussians(
        means.clone().requires_grad_(True),
        quat_from_z(normals).requires_grad_(True),
        torch.full((n, 2), float(np.log(cfg.init_scale * spacing)), device=dev).requires_grad_(True),
        torch.full((n,), cfg.init_opacity_logit, device=dev).requires_grad_(True),  # near-opaque: surfels are surfaces
        colors.clamp(0, 1).clone().requires_grad_(True),
        thin=cfg.thin,
    )


def hull_mesh_res(config: ReconConfig) -> int:
    """Grid of the hull mesh that seeds surfels: half the fusion grid, within bounds."""
    h = config.hull
    return min(h.mesh_res_max, max(h.mesh_res_min, config.fuse.grid_res // h.mesh_res_divisor))


def init_from_lift(viewset: ViewSet, masks: list[Tensor], tg: ViewTargets, lo: np.ndarray, hi: np.ndarray,
                   config: ReconConfig, generator: torch.Generator, device: torch.device) -> tuple[Gaussians, Tensor | None]:
    """Surfels at pixels lifted by normal integration (orthographic views with normals), plus hull surfels
    wherever no lifted point is near (surfaces all views see edge-on). Also returns the lifted depth maps
    (V,H,W), nan where unknown, for depth supervision; None when nothing could be lifted."""
    from scipy.spatial import cKDTree

    from make_your_3d.recon.lift import integrate_view, lift_points
    from make_your_3d.recon.joint_depth import joint_depths

    cfg = config.fit
    hv, hf = hull_mesh(viewset, masks, lo, hi, hull_mesh_res(config), device, config.hull)
    V = tg.rgb.shape[0]
    depth = torch.full((V, tg.height, tg.width), float("nan"), device=device)
    lifted = []
    if tg.normal is not None:
        field = HullField(viewset, masks, config.hull)  # one for every view's marching and contacts
        integrated = []
        for v in range(V):
            if not bool(tg.has_normal[v]):
                continue
            iv = integrate_view(v, tg.rgb[v].cpu().numpy(), tg.mask[v].cpu().numpy(),
                                tg.normal[v].cpu().numpy().astype(np.float64), tg.camera(v), viewset, masks, lo, hi,
                                field=field, hull=config.hull, cfg=config.lift)
            if iv is not None and len(iv.pieces.z):
                integrated.append(iv)
        for iv, z in zip(integrated, joint_depths(integrated, config.joint)):  # all views as one surface
            lv = lift_points(iv, z, config.lift)
            if len(lv.points):
                lifted.append(lv)
                depth[iv.index] = torch.tensor(lv.depth, dtype=torch.float32, device=device)
    hull_pts, hull_n, hull_area = _sample_surface(hv, hf, cfg.num_gaussians, generator)
    spacing = float(np.sqrt(hull_area / cfg.num_gaussians))
    if not lifted:
        return _make_gaussians(hull_pts, hull_n, _best_view_colors(hull_pts, hull_n, viewset), spacing, cfg), None
    pts = np.concatenate([lv.points for lv in lifted])
    nrm = np.concatenate([lv.normals for lv in lifted])
    col = np.concatenate([lv.colors for lv in lifted])
    area = np.concatenate([lv.area for lv in lifted])
    # hull surfels only where no lifted point is within a few spacings
    far = cKDTree(pts).query(hull_pts.cpu().numpy(), k=1)[0] > cfg.hull_gap_spacings * spacing
    n_hull = int(far.sum())
    n_lift = max(1, cfg.num_gaussians - n_hull)
    w = torch.tensor(area / area.sum(), dtype=torch.float64)
    pick = torch.multinomial(w, n_lift, replacement=len(w) < n_lift, generator=generator).numpy()
    hp, hn = hull_pts[torch.tensor(far)], hull_n[torch.tensor(far)]
    means = torch.cat([torch.tensor(pts[pick], dtype=torch.float32, device=device), hp])
    normals = torch.cat([torch.tensor(nrm[pick], dtype=torch.float32, device=device), hn])
    colors = torch.cat([torch.tensor(col[pick], dtype=torch.float32, device=device), _best_view_colors(hp, hn, viewset)])
    return _make_gaussians(means, F.normalize(normals, dim=-1), colors, spacing, cfg), depth


def _pixel_points(depth: Tensor, cams: Cameras) -> Tensor:
    """World points (C,H,W,3) of every pixel at the given camera depth."""
    C, H, W = depth.shape
    dev = depth.device
    v, u = torch.meshgrid(torch.arange(H, device=dev, dtype=depth.dtype), torch.arange(W, device=dev, dtype=depth.dtype),
                          indexing="ij")
    return unproject(u[None], v[None], depth, cams.Ks[:, None, None], cams.c2w, cams.model)


def depth_normals(depth: Tensor, cams: Cameras) -> tuple[Tensor, Tensor]:
    """Normals from central differences of the rendered depth (C,H-2,W-2,3), facing the camera, and the
    world points they belong to."""
    p = _pixel_points(depth, cams)
    dx = p[:, 1:-1, 2:] - p[:, 1:-1, :-2]
    dy = p[:, 2:, 1:-1] - p[:, :-2, 1:-1]
    n = F.normalize(torch.cross(dx, dy, dim=-1), dim=-1)
    # OpenCV axes: x right, y down, z forward -> dx x dy points along +z (away from the camera)
    return -n, p


def fit_gaussians(g: Gaussians, tg: ViewTargets, cfg: FitConfig, scene_size: float, generator: torch.Generator,
                  reporter: Reporter, step_offset: int = 0, total_steps: int | None = None,
                  depth_targets: Tensor | None = None) -> tuple[Gaussians, list[float]]:
    """Adam on all surfel parameters against random batches of views; returns the Gaussians and the loss curve."""
    total = total_steps or cfg.iterations
    opt = _make_opt(g, cfg, scene_size)
    losses: list[float] = []
    for it in range(cfg.iterations):
        reporter.step(step_offset + it + 1, total, "fitting Gaussians")
        gi = int(torch.randint(len(tg.cams), (1,), generator=generator)) if len(tg.cams) > 1 else 0
        group = tg.groups[gi]
        k = min(cfg.views_per_step, len(group))
        pick = torch.randperm(len(group), generator=generator)[:k].tolist()
        vidx = [group[p] for p in pick]
        cams = tg.cams[gi].subset(pick)
        loss = _loss(g, tg, cams, vidx, cfg, depth_targets, scene_size)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if cfg.prune_every and (it + 1) % cfg.prune_every == 0 and it + 1 < cfg.iterations:
            keep = g.opacities().detach() > cfg.prune_opacity
            if bool((~keep).any()) and int(keep.sum()) > 16:
                g = g.detach_subset(keep)
                opt = _make_opt(g, cfg, scene_size)
    return g, losses


def _make_opt(g: Gaussians, cfg: FitConfig, scene_size: float) -> torch.optim.Optimizer:
    return torch.optim.Adam([
        {"params": [g.means], "lr": cfg.lr_means * scene_size},
        {"params": [g.quats], "lr": cfg.lr_quats},
        {"params": [g.log_scales], "lr": cfg.lr_scales},
        {"params": [g.opacity_logits], "lr": cfg.lr_opacity},
        {"params": [g.colors], "lr": cfg.lr_colors},
    ], eps=1e-15)


def _loss(g: Gaussians, tg: ViewTargets, cams: Cameras, vidx: list[int], cfg: FitConfig,
          depth_targets: Tensor | None = None, scene_size: float = 1.0) -> Tensor:
    rgb, nrm, alpha, depth = render(g, cams, tile_size=cfg.tile_size)
    m = tg.mask[vidx]
    tgt = tg.rgb[vidx] * m[..., None]
    loss = cfg.w_rgb * (rgb - tgt).abs().mean() + cfg.w_mask * (alpha - m).abs().mean()
    if depth_targets is not None and cfg.w_depth > 0:
        dt = depth_targets[vidx]
        ok = torch.isfinite(dt) & (m > cfg.core_mask) & (alpha.detach() > cfg.depth_alpha)
        if bool(ok.any()):
            loss = loss + cfg.w_depth * ((depth - dt.nan_to_num(0.0)).abs() * ok).sum() / ok.sum() / scene_size
    if tg.normal is not None and (cfg.w_normal > 0 or cfg.w_depth_normal > 0):
        hn = tg.has_normal[vidx].to(m.dtype)[:, None, None]
        gt = tg.normal[vidx]
        fg = (m > cfg.core_mask).to(m.dtype) * hn
        if cfg.w_normal > 0:
            cos = (F.normalize(nrm, dim=-1) * gt).sum(-1)
            loss = loss + cfg.w_normal * ((1 - cos) * fg).sum() / fg.sum().clamp_min(1)
        if cfg.w_depth_normal > 0:
            dn, _ = depth_normals(depth, cams)
            inner = fg[:, 1:-1, 1:-1] * fg[:, 2:, 1:-1] * fg[:, :-2, 1:-1] * fg[:, 1:-1, 2:] * fg[:, 1:-1, :-2]
            inner = inner * (alpha[:, 1:-1, 1:-1].detach() > cfg.depth_normal_alpha)
            cos = (dn * gt[:, 1:-1, 1:-1]).sum(-1)
            loss = loss + cfg.w_depth_normal * ((1 - cos) * inner).sum() / inner.sum().clamp_min(1)
    return loss
