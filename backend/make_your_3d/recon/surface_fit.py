"""One surface fitted to every view at once (issue 23): a dense signed-distance grid, coarse to fine, no
MLP, whose volume renderings in each view's camera match that view's silhouette and normals where the
surface is visible in that view.

Why: each view's normals integrated into pieces and placed on the visual hull by rules cannot see a
step or a cavity floor; the other views can, through visibility. Rendering every view from one field
makes a filled cavity render its front where a diagonal view sees an inner wall, and the normal loss
pushes it back; a region seen by two diagonal views is placed by both.

Two parts. `carve`: space carving with the world normal as the consistent quantity: a surface voxel
that two neighbouring views see (visibility by marching the occupancy towards each camera) with
normals that disagree is not on the surface and goes; views vote with weights from their agreement
with the others (`view_agreement`). The carving opens a recess only near its walls; `bridge` then
joins its openings across the lid left between them, along each view's epipolar lines, by the view's
own integrated normals. Then `fit_surface` refines the carved grid by rendering (off by
default, `SurfConfig.iterations`: measured not to pay yet, BENCHMARKS 'Global surface fit').

Rendering (NeuS-style, discrete): samples along a ray inside the box, opacity of each interval from the
drop of sigmoid(s * f) across it (f negative inside), weights alpha times transmittance, normals the
field's gradient. Losses: opacity vs mask (binary cross-entropy), robust 1 - cos on normals (grazing
pixels dropped, the worst errors trimmed, each view weighted by its agreement with the fit of all
views), a small eikonal term and a small Laplacian. CPU torch by default; the same code on CUDA.
Every number comes from `SurfConfig`; cameras, rays and pixel conventions from recon/camera.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import Tensor

from make_your_3d.recon.camera import pixel_rays_world, pixel_size, project, sample_image, view_dirs
from make_your_3d.recon.config import SurfConfig
from make_your_3d.recon.scene import ViewTargets, grid_counts

__all__ = ["Grid", "bridge", "carve", "first_hits", "fit_surface", "grid_over", "render_rays", "sample_grid", "signed_distance_init", "silhouette_guard", "view_residual"]


def grid_hi(lo: Tensor, step: float, shape: tuple[int, ...] | torch.Size) -> Tensor:
    """The last grid point of a grid of `shape` points from `lo`, `step` apart (the box's far corner)."""
    return lo + step * (torch.tensor(tuple(shape), dtype=lo.dtype, device=lo.device) - 1)


@dataclass
class Grid:
    """A field on the points lo + ijk * step (shape (nx, ny, nz), x slowest, like recon/mesh.py's grids)."""

    values: Tensor  # (nx, ny, nz), world units, negative inside
    lo: Tensor  # (3,)
    step: float

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.values.shape)  # type: ignore[return-value]

    @property
    def hi(self) -> Tensor:
        return grid_hi(self.lo, self.step, self.shape)

    def points(self) -> Tensor:
        """(nx, ny, nz, 3) world coordinates of the grid points."""
        axes = [self.lo[k] + self.step * torch.arange(n, device=self.lo.device, dtype=self.lo.dtype)
                for k, n in enumerate(self.shape)]
        return torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)


def grid_over(lo: Tensor, hi: Tensor, res: int) -> tuple[tuple[int, int, int], float]:
    """Point counts and step of the grid with `res` points along the box's longest side (scene.grid_counts)."""
    lo_np, hi_np = lo.cpu().numpy().astype(np.float64), hi.cpu().numpy().astype(np.float64)
    step = float(np.max(hi_np - lo_np)) / (res - 1)
    return tuple(int(n) for n in grid_counts(lo_np, hi_np, res)), step  # type: ignore[return-value]


def sample_grid(vol: Tensor, pts: Tensor, lo: Tensor, step: float) -> Tensor:
    """Trilinear samples (N, C) of channels vol (C, nx, ny, nz) at world points (N, 3) (border-clamped)."""
    C, nx, ny, nz = vol.shape
    ext = torch.tensor([nx - 1, ny - 1, nz - 1], dtype=pts.dtype, device=pts.device) * step
    g = (pts - lo) / ext * 2 - 1  # (x, y, z) in [-1, 1]; grid_sample reads (W, H, D) = (z, y, x)
    out = F.grid_sample(vol[None], g.flip(-1)[None, :, None, None], mode="bilinear", padding_mode="border",
                        align_corners=True)
    return out[0, :, :, 0, 0].T


def gradient(values: Tensor, step: float) -> Tensor:
    """(3, nx, ny, nz) central differences (one-sided at the borders) of a grid field."""
    gs = torch.gradient(values, spacing=step)
    return torch.stack(gs, 0)


def laplacian(values: Tensor) -> Tensor:
    """Discrete Laplacian of the interior points (same units as values)."""
    v = values
    c = v[1:-1, 1:-1, 1:-1]
    return (v[2:, 1:-1, 1:-1] + v[:-2, 1:-1, 1:-1] + v[1:-1, 2:, 1:-1] + v[1:-1, :-2, 1:-1]
            + v[1:-1, 1:-1, 2:] + v[1:-1, 1:-1, :-2] - 6 * c)


def signed_distance_init(inside: np.ndarray, step: float) -> np.ndarray:
    """A signed distance (world units, negative inside) from a boolean occupancy: the warm start must be
    a distance everywhere (a truncated field has no gradient to render normals from far from its surface)."""
    if not inside.any() or inside.all():
        raise ValueError("the warm start has no surface")
    d_out = ndimage.distance_transform_edt(~inside)
    d_in = ndimage.distance_transform_edt(inside)
    return (np.where(inside, -(d_in - 0.5), d_out - 0.5) * step).astype(np.float32)


def _box_hits(o: Tensor, d: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """Entry and exit ray parameters of the box [lo, hi] (exit <= entry: missed)."""
    safe = torch.where(d.abs() < 1e-9, torch.full_like(d, 1e-9), d)
    a, b = (lo - o) / safe, (hi - o) / safe
    return torch.minimum(a, b).amax(-1), torch.maximum(a, b).amin(-1)


def render_rays(values: Tensor, grad: Tensor, lo: Tensor, step: float, o: Tensor, d: Tensor, samples: int,
                sharp: float, visibility: bool, jitter: Tensor) -> tuple[Tensor, Tensor]:
    """Opacity (N,) and unit-free normal (N, 3) (weighted sum of gradients) of rays (o, d) through the field.

    Interval k's opacity is the relative drop of sigmoid(f / sharp) from sample k to k + 1 (NeuS; zero
    where the ray leaves the surface); its weight is that opacity times the transmittance in front of it
    (`visibility`), or the opacity alone (every entering crossing along the ray counts: the tests' wrong
    variant)."""
    hi = grid_hi(lo, step, values.shape)
    t0, t1 = _box_hits(o, d, lo, hi)
    hit = t1 > t0
    t0 = torch.where(hit, t0, torch.zeros_like(t0))
    t1 = torch.where(hit, t1, t0 + step)
    k = torch.arange(samples, device=o.device, dtype=o.dtype)
    t = t0[:, None] + (k[None] + jitter[:, None]) / samples * (t1 - t0)[:, None]  # (N, S)
    pts = o[:, None] + d[:, None] * t[..., None]
    vol = torch.cat([values[None], grad], 0)
    s = sample_grid(vol, pts.reshape(-1, 3), lo, step).reshape(*t.shape, 4)
    f, g = s[..., 0], s[..., 1:]
    phi = torch.sigmoid(-f / sharp)  # ~ occupancy
    alpha = ((phi[:, 1:] - phi[:, :-1]) / (1 - phi[:, :-1]).clamp_min(1e-5)).clamp(0, 1)
    alpha = alpha * hit[:, None]
    trans = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), 1 - alpha[:, :-1] + 1e-7], -1), -1)
    w = alpha * trans if visibility else alpha
    opacity = 1 - trans[:, -1] * (1 - alpha[:, -1])
    n_mid = F.normalize(0.5 * (g[:, 1:] + g[:, :-1]), dim=-1, eps=1e-6)
    return opacity.clamp(1e-5, 1 - 1e-5), (w[..., None] * n_mid).sum(1)


def _pick_pixels(mask: Tensor, n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Pixel indices (u, v): half from the foreground, half anywhere (the background carves)."""
    H, W = mask.shape
    fg = torch.nonzero(mask.reshape(-1).cpu() > 0.5)[:, 0]
    n_fg = n // 2 if len(fg) else 0
    a = fg[torch.randint(len(fg), (n_fg,), generator=gen)] if n_fg else torch.zeros(0, dtype=torch.long)
    b = torch.randint(H * W, (n - n_fg,), generator=gen)
    flat = torch.cat([a, b]).to(mask.device)
    return flat % W, flat // W


def fit_surface(init: Grid, targets: ViewTargets, cfg: SurfConfig, gen: torch.Generator,
                box: tuple[Tensor, Tensor] | None = None) -> tuple[Grid, Grid, dict]:
    """The signed-distance grid fitted to every view's mask and normals, warm-started from `init` (any
    field negative inside): carved first (`carve`, at cfg.coarse_res), then refined by rendering
    (cfg.iterations per stage, at cfg.coarse_res then cfg.fine_res points along the box's longest side;
    `box`: (lo, hi), default init's). Returns the last stage's grid, what the carving removed (1 where the
    warm start was inside and the carving emptied it, on the coarse grid) and a record (losses, view
    weights, carving)."""
    dev = targets.mask.device
    lo, hi = box if box is not None else (init.lo, init.hi)
    lo, hi = lo.to(dev, torch.float32), hi.to(dev, torch.float32)
    V = targets.mask.shape[0]
    cams = [targets.camera(v) for v in range(V)]
    weights = torch.ones(V, device=dev)
    record: dict = {"stages": [], "view_weights": []}
    current = Grid(init.values.to(dev, torch.float32), init.lo.to(dev, torch.float32), init.step)
    resolutions = [cfg.coarse_res] + ([cfg.fine_res] if cfg.fine_res > cfg.coarse_res else [])
    for si, res in enumerate(resolutions):
        counts, step = grid_over(lo, hi, res)
        g0 = Grid(torch.zeros(counts, device=dev), lo, step)
        with torch.no_grad():
            start = sample_grid(current.values[None], g0.points().reshape(-1, 3), current.lo,
                                current.step).reshape(counts)
            if si == 0:  # carved by the views' normals, then a true distance from its inside
                inside = start < 0
                before = inside
                if targets.normal is not None and cfg.carve_passes > 0:
                    if cfg.view_weights:
                        weights = view_agreement(inside, lo, step, targets, cfg)
                    inside, carved = carve(inside, lo, step, targets, cfg, weights)
                    record["carve"] = carved
                    if cfg.bridge_closure_voxels > 0:
                        inside, record["bridge"] = bridge(before, inside, lo, step, targets, cfg, carved["voting"])
                    record["view_weights"].append([round(float(w), 3) for w in weights])
                removed = Grid((before & ~inside).float(), lo, step)
                start = torch.tensor(signed_distance_init(inside.cpu().numpy(), step), device=dev)
        u = (start / step).clone().requires_grad_(True)  # in voxels: lr is in voxels per step
        opt = torch.optim.Adam([u], lr=cfg.lr)
        losses = []
        for it in range(cfg.iterations):
            values = u * step
            grad = gradient(values, step)
            loss = _step_loss(values, grad, lo, step, targets, cams, weights, cfg, gen)
            eik = ((grad.norm(dim=0) - 1) ** 2).mean()
            smooth = (laplacian(u) ** 2).mean()
            total = loss + cfg.w_eikonal * eik + cfg.w_smooth * smooth
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            losses.append(float(total.detach()))
        current = Grid(u.detach() * step, lo, step)
        record["stages"].append({"res": res, "grid": list(counts),
                                 "loss_first": round(losses[0], 5) if losses else None,
                                 "loss_last": round(float(np.mean(losses[-10:])), 5) if losses else None})
        record["view_weights"].append([round(float(w), 3) for w in weights])
    return current, removed, record


def _step_loss(values: Tensor, grad: Tensor, lo: Tensor, step: float, targets: ViewTargets, cams: list,
               weights: Tensor, cfg: SurfConfig, gen: torch.Generator) -> Tensor:
    """Mask and normal losses over a random subset of every view's pixels (normals weighted per view)."""
    V = len(cams)
    dev = values.device
    per = max(2, cfg.rays // V)
    os_, ds, ms, ns, vs, ok_n = [], [], [], [], [], []
    for v in range(V):
        u_px, v_px = _pick_pixels(targets.mask[v], per, gen)
        o, d = pixel_rays_world(u_px, v_px, cams[v])
        os_.append(o)
        ds.append(d)
        m = targets.mask[v][v_px, u_px]
        ms.append(m)
        vs.append(torch.full_like(m, v, dtype=torch.long))
        if targets.normal is not None and bool(targets.has_normal[v]):
            n = targets.normal[v][v_px, u_px]
            good = (m > cfg.core_mask) & ((n * d).sum(-1).abs() > cfg.grazing_cos)
        else:
            n = torch.zeros_like(o)
            good = torch.zeros_like(m, dtype=torch.bool)
        ns.append(n)
        ok_n.append(good)
    o, d, m, n_t, vid, good = (torch.cat(x) for x in (os_, ds, ms, ns, vs, ok_n))
    jitter = torch.rand(len(o), generator=gen).to(dev)
    opacity, n_r = render_rays(values, grad, lo, step, o, d, cfg.samples, cfg.sharpness * step, cfg.visibility,
                               jitter)
    mask_loss = F.binary_cross_entropy(opacity, m.clamp(0, 1))
    err = 1 - (F.normalize(n_r, dim=-1, eps=1e-6) * n_t).sum(-1)
    normal_loss = torch.zeros((), device=dev)
    if bool(good.any()):
        e = err[good]
        keep = e <= torch.quantile(e.detach(), 1 - cfg.trim) if cfg.trim > 0 else torch.ones_like(e, dtype=torch.bool)
        w = weights[vid[good]] * keep
        normal_loss = (w * e).sum() / w.sum().clamp_min(1e-6)
    return cfg.w_mask * mask_loss + cfg.w_normal * normal_loss


# ------------------------------------------------------------------ carving by normal consistency

def _surface_voxels(inside: Tensor) -> Tensor:
    """Indices (N, 3) of inside points with an outside neighbour in their 3x3x3 block (the border counts
    as outside)."""
    p = F.pad(inside.float()[None, None], (1, 1, 1, 1, 1, 1))
    out_nb = -F.max_pool3d(-p, 3, 1)[0, 0] < 0.5  # the block's minimum: any outside
    return torch.nonzero(inside & out_nb)


def _view_evidence(pts: Tensor, n_cur: Tensor, occ: Tensor, lo: Tensor, step: float, targets: ViewTargets, v: int,
                   cfg: SurfConfig) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """For surface points seen by view v: whether it sees them (in its mask, facing it, nothing of the
    occupancy in front when cfg.visibility), its normal there, its normals within a voxel around it
    (the point's projection is uncertain by a voxel), and its direction towards them."""
    cam = targets.camera(v)
    d = view_dirs(pts, cam)
    uv, z = project(pts, cam)
    W, H = targets.width, targets.height
    m = sample_image(targets.mask[v][..., None], uv, W, H)[:, 0]
    nmap = targets.normal[v]
    n0 = F.normalize(sample_image(nmap, uv, W, H), dim=-1, eps=1e-6)
    r = (step / pixel_size(cam, z)).clamp_min(1.0)  # a voxel in pixels
    offs = torch.tensor([[i, j] for i in (-1, 0, 1) for j in (-1, 0, 1)], dtype=pts.dtype, device=pts.device)
    nb = torch.stack([sample_image(nmap, uv + o * r[:, None], W, H) for o in offs], 1)
    nb = F.normalize(nb, dim=-1, eps=1e-6)
    sees = (m > cfg.core_mask) & ((n_cur * -d).sum(-1) > cfg.grazing_cos) & ((n0 * -d).sum(-1) > cfg.grazing_cos)
    if cfg.visibility:
        k = torch.arange(2, cfg.samples + 2, device=pts.device, dtype=pts.dtype) * step
        ray = pts[:, None] - d[:, None] * k[None, :, None]  # towards the camera
        hi = grid_hi(lo, step, occ.shape)
        inbox = ((ray >= lo) & (ray <= hi)).all(-1)
        o = sample_grid(occ[None], ray.reshape(-1, 3), lo, step).reshape(ray.shape[:2])
        sees &= ~((o > 0.5) & inbox).any(1)
    return sees, n0, nb, d


def carve(inside: Tensor, lo: Tensor, step: float, targets: ViewTargets, cfg: SurfConfig,
          weights: Tensor | None = None) -> tuple[Tensor, dict]:
    """Space carving with normals as the consistent quantity (world normals are the same in every view
    that sees a point): a surface point that two views see (within 90 degrees of each other) with normals
    that disagree beyond cfg.carve_cos, even allowing a voxel of slack in each, is not on the surface and
    is removed; repeated until nothing changes. Visibility decides which views see a point: a filled
    cavity's lid is seen by the front view (the floor's normal) and by a diagonal one (an inner wall's)
    and goes; the floor, hidden from the diagonal view behind the wall, stays. `weights` (V,): a view
    below cfg.carve_min_weight does not vote (its normals disagree with the others')."""
    V = targets.mask.shape[0]
    w = torch.ones(V, device=inside.device) if weights is None else weights
    voting = [v for v in range(V) if bool(targets.has_normal[v]) and float(w[v]) >= cfg.carve_min_weight]
    inside = inside.clone()
    removed = restored = 0
    passes = 0
    edge_px = contour_distance(targets)  # the masks do not change between passes
    for passes in range(1, cfg.carve_passes + 1):
        idx = _surface_voxels(inside)
        if len(idx) == 0:
            break
        pts = lo + idx.to(lo.dtype) * step
        sd = torch.tensor(ndimage.gaussian_filter(signed_distance_init(inside.cpu().numpy(), step), 1.0),
                          device=lo.device)
        n_cur = F.normalize(sample_grid(gradient(sd, step), pts, lo, step), dim=-1, eps=1e-6)
        occ = inside.float()
        ev = {v: _view_evidence(pts, n_cur, occ, lo, step, targets, v, cfg) for v in voting}
        bad = torch.zeros(len(pts), dtype=torch.bool, device=lo.device)
        contour = near_contour(pts, step, targets, cfg, edge_px)
        for a in voting:
            sa, na, nba, da = ev[a]
            for b in voting:
                if b <= a:
                    continue
                sb, nb_, nbb, db = ev[b]
                near = (da * db).sum(-1) > cfg.carve_pair_cos
                both = sa & sb & near
                ab = (nba * nb_[:, None]).sum(-1).amax(1)  # best agreement of a's neighbourhood with b's normal
                ba = (nbb * na[:, None]).sum(-1).amax(1)
                # opposite normals at one voxel: the two sides of a part thinner than a voxel, not a lid
                two_sides = (na * nb_).sum(-1) < cfg.carve_thin_cos
                bad |= both & (torch.minimum(ab, ba) < cfg.carve_cos) & ~two_sides & ~(contour[a] | contour[b])
        if not bool(bad.any()):
            break
        i = idx[bad]
        after = inside.clone()
        after[i[:, 0], i[:, 1], i[:, 2]] = False
        after, kept = silhouette_guard(inside, after, lo, step, targets, cfg)
        restored += kept
        if bool((after == inside).all()):
            break
        removed += int((inside & ~after).sum())
        inside = after
    return inside, {"passes": passes, "removed": removed, "restored": restored, "voting": voting}


def first_hits(inside: Tensor, lo: Tensor, step: float, o: Tensor, d: Tensor) -> Tensor:
    """(N,) ray parameter of each ray's first point inside the occupancy (inf: none), marched at half a
    grid step."""
    hi = grid_hi(lo, step, inside.shape)
    t0, t1 = _box_hits(o, d, lo, hi)
    n = int(np.ceil(float((t1 - t0).clamp_min(0).max()) / (0.5 * step))) + 1 if len(o) else 0
    out = torch.full((len(o),), float("inf"), device=o.device)
    occ = inside.float()[None]
    for i in range(0, len(o), 8192):
        oo, dd, a = o[i:i + 8192], d[i:i + 8192], t0[i:i + 8192]
        t = a[:, None] + 0.5 * step * torch.arange(n, device=o.device, dtype=o.dtype)[None]
        pts = oo[:, None] + dd[:, None] * t[..., None]
        hit = (sample_grid(occ, pts.reshape(-1, 3), lo, step).reshape(t.shape) > 0.5) & (t <= t1[i:i + 8192, None])
        first = hit.float().argmax(1)
        out[i:i + 8192] = torch.where(hit.any(1), t.gather(1, first[:, None])[:, 0], out[i:i + 8192])
    return out


def _bridge_line(t_before: np.ndarray, t_after: np.ndarray, ok: np.ndarray, o: np.ndarray, d: np.ndarray,
                 n: np.ndarray, step: float, cfg: SurfConfig) -> np.ndarray:
    """One image line (a row or a column) of one view. Along a run of pixels with no crease between
    neighbours, the view's normals give its surface up to one offset (integrated plane to plane). The
    carving emptied the space in front of each opened pixel, so the surface lies at least as deep as the
    deepest opening on either side says. Where the deepest openings on its two sides agree on that
    offset within cfg.bridge_closure_voxels, a pixel gets the surface at the shallower of the two. Returns the bridged ray parameters (nan: none, or not deeper than now)."""
    out = np.full(len(ok), np.nan)
    brk = np.ones(len(ok), dtype=bool)  # brk[k]: a run ends after pixel k
    brk[:-1] = ~(ok[:-1] & ok[1:]) | ((n[1:] * n[:-1]).sum(-1) < cfg.carve_cos)
    opened = ok & (t_after > t_before + step)
    s = 0
    for e in np.nonzero(brk)[0]:
        run = slice(s, e + 1)
        s = e + 1
        if not ok[run.start] or opened[run].sum() < 2:
            continue
        rel = np.zeros(e + 1 - run.start)  # the integral, relative to the run's first pixel
        p = o[run.start] + t_after[run.start] * d[run.start]
        for k in range(1, len(rel)):
            g = run.start + k
            m = n[g - 1] + n[g]
            den = float(m @ d[g])
            if abs(den) < 1e-6:
                rel = None
                break
            t = float(m @ (p - o[g])) / den
            rel[k] = t - t_after[run.start]
            p = o[g] + t * d[g]
        if rel is None:
            continue
        off = np.where(opened[run], t_after[run] - rel, -np.inf)  # opened: the integral's offset is at least this
        left, right = np.maximum.accumulate(off), np.maximum.accumulate(off[::-1])[::-1]
        with np.errstate(invalid="ignore"):
            agree = np.isfinite(left) & np.isfinite(right) & (np.abs(left - right) <= cfg.bridge_closure_voxels * step)
        t = rel + np.minimum(left, right)
        out[run] = np.where(agree & (t > t_after[run] + step), t, np.nan)
    return out


def _epipolar_rows(v: int, voting: list[int], centre: Tensor, targets: ViewTargets, cfg: SurfConfig) -> bool:
    """Whether view v's neighbours (the views it is compared with in the carving) displace a point's image
    mostly along v's rows (True) or its columns. Why: depth shows only as parallax along the epipolar
    lines, so the carving's openings say something about depth only along them; across them (a
    horizontal shelf for views on a horizontal orbit) two openings can lie on either side of a real
    part that no view can tell from a lid, and bridging there would remove it. `centre`: (1, 3), the grid's
    centre, where the views' directions are compared (pinhole views differ across the image)."""
    cam = targets.camera(v)
    dv = view_dirs(centre, cam)[0]
    w2c = cam.viewmats[0, :3, :3]
    along = torch.zeros(2, device=centre.device)
    for b in voting:
        db = view_dirs(centre, targets.camera(b))[0]
        if b != v and float(dv @ db) > cfg.carve_pair_cos:
            along += (w2c @ db)[:2].abs()
    return bool(along[0] >= along[1])


def bridge(before: Tensor, after: Tensor, lo: Tensor, step: float, targets: ViewTargets, cfg: SurfConfig,
           voting: list[int]) -> tuple[Tensor, dict]:
    """The carving's openings joined across what it left closed between them. Why: where every view sees
    a flat floor, a lid at the wrong depth agrees with all of them, so the carving opens a recess only
    near its walls (where a diagonal view sees a wall through the lid) and leaves the lid in the middle.
    A view's normals say whether the floor it sees is one surface from one opening to the next; if the
    integral of its normals from one opening closes on the other, the pixels between lie on that
    surface, and the space in front of it along their rays is empty. Only along the lines on which the
    views' parallax lies (`_epipolar_rows`). Each voting view in turn; the silhouette guard after each."""
    removed = 0
    W, H = targets.width, targets.height
    jj, ii = torch.meshgrid(torch.arange(H, device=lo.device), torch.arange(W, device=lo.device), indexing="ij")
    centre = (0.5 * (lo + grid_hi(lo, step, after.shape)))[None]
    for v in voting:
        cam = targets.camera(v)
        o, d = pixel_rays_world(ii.reshape(-1), jj.reshape(-1), cam)
        tb = first_hits(before, lo, step, o, d).reshape(H, W)
        ta = first_hits(after, lo, step, o, d).reshape(H, W)
        n = targets.normal[v]
        ok = (targets.mask[v] > cfg.core_mask) & ((n * -d.reshape(H, W, 3)).sum(-1) > cfg.grazing_cos) & torch.isfinite(ta)
        tb_, ta_, o_, d_, n_ = (x.cpu().numpy().astype(np.float64) for x in (tb, ta, o.reshape(H, W, 3), d.reshape(H, W, 3), n))
        ok_ = ok.cpu().numpy()

        def line(sel) -> np.ndarray:
            return _bridge_line(tb_[sel], ta_[sel], ok_[sel], o_[sel], d_[sel], n_[sel], step, cfg)

        if _epipolar_rows(v, voting, centre, targets, cfg):
            t = np.stack([line(np.s_[r]) for r in range(H)])
        else:
            t = np.stack([line(np.s_[:, c]) for c in range(W)], 1)
        if not np.isfinite(t).any():
            continue
        # a point goes when every pixel of its footprint was bridged deeper than it (by a step)
        depth = torch.tensor(np.where(np.isfinite(t), t, -np.inf), dtype=torch.float32, device=lo.device)
        idx = torch.nonzero(after)
        pts = lo + idx.to(lo.dtype) * step
        uv, _ = project(pts, cam)
        r = int(np.ceil(float((step / pixel_size(cam, torch.ones(1, device=lo.device)))[0]) / 2))
        floor = -F.max_pool2d(-depth[None, None], 2 * r + 1, 1, r)[0, 0]
        px = uv.floor().long()
        inimg = (px[:, 0] >= 0) & (px[:, 0] < W) & (px[:, 1] >= 0) & (px[:, 1] < H)
        px[:, 0].clamp_(0, W - 1)
        px[:, 1].clamp_(0, H - 1)
        o1, d1 = pixel_rays_world(px[:, 0], px[:, 1], cam)
        t_pt = ((pts - o1) * d1).sum(-1)
        go = inimg & (t_pt < floor[px[:, 1], px[:, 0]] - step)
        if not bool(go.any()):
            continue
        new = after.clone()
        i = idx[go]
        new[i[:, 0], i[:, 1], i[:, 2]] = False
        new, _ = silhouette_guard(after, new, lo, step, targets, cfg)
        removed += int((after & ~new).sum())
        after = new
    return after, {"removed": removed}


def contour_distance(targets: ViewTargets) -> Tensor:
    """(V, H, W) each foreground pixel's distance in pixels to its view's silhouette contour (0 outside)."""
    fg = (targets.mask > 0.5).cpu().numpy()
    return torch.tensor(np.stack([ndimage.distance_transform_edt(m) for m in fg]), dtype=torch.float32,
                        device=targets.mask.device)


def near_contour(pts: Tensor, step: float, targets: ViewTargets, cfg: SurfConfig, edge_px: Tensor) -> Tensor:
    """(V, N) whether each point projects within cfg.contour_voxels grid steps of view v's silhouette
    contour (inside its mask; `edge_px` from `contour_distance`). Why: there the view sees a facet of a
    convex edge that a neighbouring view may not (a thin leg's corner, a slat's edge), and the two
    disagree without anything being wrong. A pair of views does not carve near either one's contour; a
    filled cavity's lid lies inside the silhouettes of the views that carve it."""
    V = targets.mask.shape[0]
    out = torch.zeros(V, len(pts), dtype=torch.bool, device=pts.device)
    if cfg.contour_voxels <= 0:
        return out
    W, H = targets.width, targets.height
    for v in range(V):
        cam = targets.camera(v)
        uv, z = project(pts, cam)
        d = sample_image(edge_px[v][..., None].to(pts.dtype), uv, W, H)[:, 0]
        out[v] = (d > 0) & (d < cfg.contour_voxels * step / pixel_size(cam, z))
    return out


def silhouette_guard(before: Tensor, after: Tensor, lo: Tensor, step: float, targets: ViewTargets,
                     cfg: SurfConfig) -> tuple[Tensor, int]:
    """`after` with every removed point put back whose removal would empty a foreground ray: the point
    projects inside some view's mask (above cfg.core_mask) and no point of `after` projects into its
    cell of that view (cells one grid step wide in pixels, one cell of slack around). Why: the views'
    silhouettes are their most certain evidence; carving may move a surface along a ray but never
    take the last of the object off one (a thin leg, a slat, a bowl's rim). Returns the guarded
    occupancy and how many points it restored."""
    gone = torch.nonzero(before & ~after)
    if len(gone) == 0 or cfg.guard_cells <= 0:
        return after, 0
    keep = torch.zeros(len(gone), dtype=torch.bool, device=after.device)
    pts_gone = lo + gone.to(lo.dtype) * step
    pts_left = lo + _surface_voxels(after).to(lo.dtype) * step  # a solid's surface covers every pixel its inside does
    W, H = targets.width, targets.height
    for v in range(targets.mask.shape[0]):
        cam = targets.camera(v)
        uv_g, z_g = project(pts_gone, cam)
        fg = sample_image(targets.mask[v][..., None], uv_g, W, H)[:, 0] > cfg.core_mask
        if not bool(fg.any()):
            continue
        cell = float((step / pixel_size(cam, z_g.median()[None]))[0].clamp_min(1.0))  # a step in pixels
        cw, ch = int(np.ceil(W / cell)) + 2, int(np.ceil(H / cell)) + 2
        covered = torch.zeros(ch, cw, dtype=torch.bool, device=after.device)
        if len(pts_left):
            uv_l, _ = project(pts_left, cam)
            c = (uv_l / cell).floor().long() + 1
            ok = (c[:, 0] >= 0) & (c[:, 0] < cw) & (c[:, 1] >= 0) & (c[:, 1] < ch)
            covered[c[ok, 1], c[ok, 0]] = True
        k = 2 * cfg.guard_cells + 1
        covered = F.max_pool2d(covered.float()[None, None], k, 1, cfg.guard_cells)[0, 0] > 0.5
        c = ((uv_g / cell).floor().long() + 1).clamp_min(0)
        c[:, 0].clamp_(max=cw - 1)
        c[:, 1].clamp_(max=ch - 1)
        keep |= fg & ~covered[c[:, 1], c[:, 0]]
    out = after.clone()
    i = gone[keep]
    out[i[:, 0], i[:, 1], i[:, 2]] = True
    return out, int(keep.sum())


def view_agreement(inside: Tensor, lo: Tensor, step: float, targets: ViewTargets, cfg: SurfConfig) -> Tensor:
    """(V,) each view's weight from its agreement with the others on the warm start's surface: the share
    of the points it sees with another view whose normals agree with it (same test as `carve`), over the
    median view's share, at most 1. A view whose normals are wrong (a generated view inconsistent with
    the rest) disagrees almost everywhere; a good view only where the warm start is wrong."""
    V = targets.mask.shape[0]
    idx = _surface_voxels(inside)
    pts = lo + idx.to(lo.dtype) * step
    sd = torch.tensor(ndimage.gaussian_filter(signed_distance_init(inside.cpu().numpy(), step), 1.0), device=lo.device)
    n_cur = F.normalize(sample_grid(gradient(sd, step), pts, lo, step), dim=-1, eps=1e-6)
    views = [v for v in range(V) if bool(targets.has_normal[v])]
    ev = {v: _view_evidence(pts, n_cur, inside.float(), lo, step, targets, v, cfg) for v in views}
    share = torch.ones(V, device=lo.device)
    for a in views:
        sa, na, nba, da = ev[a]
        agree = torch.zeros(len(pts), dtype=torch.bool, device=lo.device)
        compared = torch.zeros_like(agree)
        for b in views:
            if b == a:
                continue
            sb, nb_, nbb, db = ev[b]
            both = sa & sb & ((da * db).sum(-1) > cfg.carve_pair_cos)
            ok = torch.minimum((nba * nb_[:, None]).sum(-1).amax(1),
                               (nbb * na[:, None]).sum(-1).amax(1)) >= cfg.carve_cos
            compared |= both
            agree |= both & ok
        share[a] = agree.sum() / compared.sum() if bool(compared.any()) else float("nan")
    known = [v for v in views if bool(torch.isfinite(share[v]))]
    if not known:
        return torch.ones(V, device=lo.device)
    med = share[known].median()
    # a view compared with no other (no neighbour within carve_pair_cos) keeps weight 1
    return torch.nan_to_num(share / med.clamp_min(1e-6), nan=1.0).clamp(max=1.0)


# ------------------------------------------------------------------ the data term, as the acceptance test

def view_residual(vertices: Tensor, faces: Tensor, targets: ViewTargets, cfg: SurfConfig,
                  weights: Tensor | None = None) -> float:
    """How far a mesh renders from the views: per view with normals, the mean 1 - cos between the mesh's
    face normal (turned to face the camera) and the view's normal over its confident foreground, plus the
    share of that foreground the mesh misses; views averaged with `weights` (their agreement). Why: the
    carving is accepted only if it brings the surface closer to what the views show (a carving that
    leaves a jagged wedge in a cavity renders worse than the lid it replaced)."""
    from make_your_3d.recon.texture import raster_triangles

    V = targets.mask.shape[0]
    w = torch.ones(V, device=vertices.device) if weights is None else weights
    fn = F.normalize(torch.cross(vertices[faces[:, 1]] - vertices[faces[:, 0]],
                                 vertices[faces[:, 2]] - vertices[faces[:, 0]], dim=-1), dim=-1, eps=1e-12)
    total, wsum = 0.0, 0.0
    for v in range(V):
        if targets.normal is None or not bool(targets.has_normal[v]):
            continue
        cam = targets.camera(v)
        uv, z = project(vertices, cam)
        fid, _, _ = raster_triangles(uv[faces], z[faces], targets.width, targets.height)
        core = targets.mask[v] > cfg.core_mask
        hit = core & (fid >= 0)
        n = fn[fid[hit]]
        jj, ii = torch.nonzero(hit, as_tuple=True)
        _, d = pixel_rays_world(ii, jj, cam)
        n = torch.where(((n * d).sum(-1) > 0)[:, None], -n, n)
        err = (1 - (n * targets.normal[v][hit]).sum(-1)).sum() + (core & ~hit).sum() * 2.0
        total += float(w[v]) * float(err) / max(int(core.sum()), 1)
        wsum += float(w[v])
    return total / max(wsum, 1e-9)
