"""One Gaussian rasterizer behind one function: gsplat's CUDA kernels when CUDA is there, otherwise
a pure-torch path built on gsplat's own torch projection helpers plus tiled dense alpha compositing.

Both paths follow gsplat's "classic" rules (EWA projection with eps2d blur, alpha = min(0.999,
o * exp(-sigma)), alphas below 1/255 skipped, a ray stops once transmittance would fall to 1e-4) and
return the same things: features composited over an optional background, accumulated alpha and
expected depth (gsplat's "ED").

Cameras and their conventions: recon/camera.py (the contract's orthographic camera is gsplat's "ortho"
model). ALPHA_MIN, ALPHA_MAX and T_MIN are gsplat's own constants, not tuned here.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from make_your_3d.recon.camera import Cameras, view_K  # noqa: F401  (view_K re-exported)
from make_your_3d.recon.config import FitConfig

log = logging.getLogger(__name__)

ALPHA_MIN = 1.0 / 255.0
ALPHA_MAX = 0.999
T_MIN = 1e-4


@dataclass
class RenderOut:
    features: Tensor  # (C, H, W, D) composited features (over `backgrounds` when given)
    alpha: Tensor  # (C, H, W, 1)
    depth: Tensor  # (C, H, W, 1) expected depth (accumulated depth / alpha), 0 where alpha is 0


@dataclass(frozen=True)
class RasterizerChoice:
    gsplat_cuda: bool  # True: gsplat's CUDA kernels; False: the torch path (on the GPU too when there is one)
    reason: str  # one sentence for logs and `doctor`


@functools.lru_cache(maxsize=1)
def rasterizer_choice() -> RasterizerChoice:
    """Which rasterizer runs CUDA tensors, decided once per process. gsplat's kernels need a CUDA
    device and either a prebuilt extension or the CUDA toolkit (nvcc) to build one; a user with a
    driver but no toolkit gets the torch path on the GPU (slower, same rules) instead of a failed
    job. Logged once."""
    if not torch.cuda.is_available():
        choice = RasterizerChoice(False, "no CUDA device: the torch rasterizer runs on the CPU")
        log.info("rasterizer: %s", choice.reason)
        return choice
    import contextlib
    import io

    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            from gsplat.cuda._backend import _C  # loads the prebuilt kernels or builds them (needs nvcc)
    except Exception as exc:  # noqa: BLE001 - any build failure means: use the torch path
        choice = RasterizerChoice(False, f"gsplat's CUDA kernels could not be built ({type(exc).__name__}: {str(exc)[:200]}); "
                                         "the torch rasterizer runs on the GPU instead (slower)")
    else:
        if _C is None:
            choice = RasterizerChoice(False, "gsplat's CUDA kernels are not built and no CUDA toolkit (nvcc) was found to build "
                                             "them; the torch rasterizer runs on the GPU instead (slower). Install the CUDA "
                                             "toolkit for full speed")
        else:
            choice = RasterizerChoice(True, "gsplat's CUDA kernels")
    (log.info if choice.gsplat_cuda else log.warning)("rasterizer: %s", choice.reason)
    return choice


def cuda_available() -> bool:
    """True when gsplat's CUDA kernels can run (see rasterizer_choice)."""
    return rasterizer_choice().gsplat_cuda


def rasterize(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    cams: Cameras,
    backgrounds: Tensor | None = None,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    eps2d: float = 0.3,
    tile_size: int = FitConfig.tile_size,
    force_torch: bool = False,
) -> RenderOut:
    """Render N Gaussians into C cameras.

    means (N,3), quats (N,4) wxyz, scales (N,3) (not log), opacities (N,) in [0,1], colors (N,D) or
    (C,N,D) features (colour, normals, ...), backgrounds (C,D) or None.
    """
    if means.is_cuda and cuda_available() and not force_torch:
        return _rasterize_gsplat(means, quats, scales, opacities, colors, cams, backgrounds, near_plane, far_plane, eps2d)
    return _rasterize_torch(means, quats, scales, opacities, colors, cams, backgrounds, near_plane, far_plane, eps2d, tile_size)


def _rasterize_gsplat(means, quats, scales, opacities, colors, cams, backgrounds, near_plane, far_plane, eps2d) -> RenderOut:
    from gsplat import rasterization

    out, alpha, _ = rasterization(
        means, quats, scales, opacities, colors, cams.viewmats, cams.Ks, cams.width, cams.height,
        near_plane=near_plane, far_plane=far_plane, eps2d=eps2d, backgrounds=None,
        render_mode="RGB+ED", camera_model=cams.model, packed=False,
    )
    feats, depth = out[..., :-1], out[..., -1:]
    if backgrounds is not None:
        feats = feats + backgrounds[:, None, None, :] * (1.0 - alpha)
    return RenderOut(feats, alpha, depth)


def _project(means, quats, scales, cams: Cameras, near_plane, far_plane, eps2d):
    from gsplat.cuda._torch_impl import _fully_fused_projection, _quat_scale_to_covar_preci

    covars, _ = _quat_scale_to_covar_preci(quats, scales, compute_covar=True, compute_preci=False, triu=False)
    radii, means2d, depths, conics, _ = _fully_fused_projection(
        means, covars, cams.viewmats, cams.Ks, cams.width, cams.height, eps2d=eps2d,
        near_plane=near_plane, far_plane=far_plane, camera_model=cams.model,
    )
    return radii, means2d, depths, conics


def _rasterize_torch(means, quats, scales, opacities, colors, cams, backgrounds, near_plane, far_plane, eps2d, tile_size) -> RenderOut:
    radii, means2d, depths, conics = _project(means, quats, scales, cams, near_plane, far_plane, eps2d)
    C = len(cams)
    feats_out, alpha_out, depth_out = [], [], []
    for c in range(C):
        col = colors[c] if colors.dim() == 3 else colors
        f, a, d = _composite_one(means2d[c], conics[c], depths[c], radii[c], opacities, col, cams.width, cams.height, tile_size)
        feats_out.append(f)
        alpha_out.append(a)
        depth_out.append(d)
    feats = torch.stack(feats_out)
    alpha = torch.stack(alpha_out)
    acc_depth = torch.stack(depth_out)
    depth = torch.where(alpha > 1e-6, acc_depth / alpha.clamp_min(1e-6), torch.zeros_like(acc_depth))
    if backgrounds is not None:
        feats = feats + backgrounds[:, None, None, :] * (1.0 - alpha)
    return RenderOut(feats, alpha, depth)


def _composite_one(means2d, conics, depths, radii, opacities, colors, W, H, ts, budget: int = 6_000_000):
    """Front-to-back compositing of one image, tile by tile, all tiles of a chunk at once."""
    device, D = means2d.device, colors.shape[-1]
    TW, TH = math.ceil(W / ts), math.ceil(H / ts)
    feats = torch.zeros(TH * TW, ts * ts, D, device=device, dtype=means2d.dtype)
    alpha = torch.zeros(TH * TW, ts * ts, 1, device=device, dtype=means2d.dtype)
    depth = torch.zeros(TH * TW, ts * ts, 1, device=device, dtype=means2d.dtype)

    with torch.no_grad():
        valid = (radii > 0).all(-1) & (opacities >= ALPHA_MIN)
        gid = valid.nonzero().squeeze(1)
        if gid.numel() == 0:
            return _untile(feats, TW, TH, ts, W, H), _untile(alpha, TW, TH, ts, W, H), _untile(depth, TW, TH, ts, W, H)
        m2 = means2d[gid].detach()
        r = radii[gid].to(m2.dtype)
        tmin = torch.floor((m2 - r) / ts).long()
        tmax = torch.ceil((m2 + r) / ts).long()
        tmin[:, 0].clamp_(0, TW), tmin[:, 1].clamp_(0, TH)
        tmax[:, 0].clamp_(0, TW), tmax[:, 1].clamp_(0, TH)
        nx, ny = tmax[:, 0] - tmin[:, 0], tmax[:, 1] - tmin[:, 1]
        counts = (nx * ny).clamp_min(0)
        keep = counts > 0
        gid, tmin, nx, counts = gid[keep], tmin[keep], nx[keep], counts[keep]
        if gid.numel() == 0:
            return _untile(feats, TW, TH, ts, W, H), _untile(alpha, TW, TH, ts, W, H), _untile(depth, TW, TH, ts, W, H)
        rep = torch.repeat_interleave(torch.arange(gid.numel(), device=device), counts)
        starts = torch.cumsum(counts, 0) - counts
        local = torch.arange(rep.numel(), device=device) - starts[rep]
        tx = tmin[rep, 0] + local % nx[rep]
        ty = tmin[rep, 1] + local // nx[rep]
        tile = ty * TW + tx
        # sort by tile, then by depth (stable ranks so ties keep index order)
        drank = torch.empty_like(gid)
        drank[torch.argsort(depths[gid].detach(), stable=True)] = torch.arange(gid.numel(), device=device)
        order = torch.argsort(tile * gid.numel() + drank[rep], stable=True)
        tile, g = tile[order], gid[rep[order]]
        tcount = torch.bincount(tile, minlength=TW * TH)
        tstart = torch.cumsum(tcount, 0) - tcount
        slot = torch.arange(tile.numel(), device=device) - tstart[tile]
        tiles_sorted = torch.argsort(tcount, descending=True, stable=True)
        tcount_sorted = tcount[tiles_sorted]
        # pixel centre offsets inside a tile
        py, px = torch.meshgrid(torch.arange(ts, device=device), torch.arange(ts, device=device), indexing="ij")
        pix = torch.stack([px.reshape(-1), py.reshape(-1)], -1).to(m2.dtype) + 0.5  # (P, 2)

        table = torch.full((TW * TH, int(tcount.max())), -1, dtype=torch.long, device=device)
        table[tile, slot] = g

    P = ts * ts
    i = 0
    n_active = int((tcount_sorted > 0).sum())
    outs = []
    while i < n_active:
        kmax = int(tcount_sorted[i])
        n_tiles = max(1, min(n_active - i, budget // max(1, kmax * P)))
        chunk = tiles_sorted[i : i + n_tiles]
        i += n_tiles
        with torch.no_grad():
            idx = table[chunk, :kmax]  # (T, K)
            pad = idx < 0
            idx_c = idx.clamp_min(0)
            origin = torch.stack([(chunk % TW) * ts, (chunk // TW) * ts], -1).to(m2.dtype)  # (T, 2)
            pcoord = origin[:, None, :] + pix[None]  # (T, P, 2)
        mu = means2d[idx_c]  # (T, K, 2)
        cn = conics[idx_c]  # (T, K, 3)
        dx = pcoord[:, None, :, 0] - mu[..., 0:1]  # (T, K, P)
        dy = pcoord[:, None, :, 1] - mu[..., 1:2]
        sigma = 0.5 * (cn[..., 0:1] * dx * dx + cn[..., 2:3] * dy * dy) + cn[..., 1:2] * dx * dy
        a = (opacities[idx_c][..., None] * torch.exp(-sigma)).clamp_max(ALPHA_MAX)
        drop = (sigma < 0) | (a < ALPHA_MIN) | pad[..., None]
        a = torch.where(drop, torch.zeros_like(a), a)
        log_t = torch.cumsum(torch.log1p(-a), dim=1)  # inclusive log transmittance (T, K, P)
        t_incl = torch.exp(log_t)
        t_excl = torch.exp(log_t - torch.log1p(-a))
        alive = (t_incl > T_MIN).to(a.dtype).detach()
        w = a * t_excl * alive  # (T, K, P)
        f = torch.einsum("tkp,tkd->tpd", w, colors[idx_c])
        z = torch.einsum("tkp,tk->tp", w, depths[idx_c])[..., None]
        acc = w.sum(1)[..., None]
        outs.append((chunk, f, acc, z))
    if outs:
        chunks = torch.cat([o[0] for o in outs])
        feats = feats.index_put((chunks,), torch.cat([o[1] for o in outs]))
        alpha = alpha.index_put((chunks,), torch.cat([o[2] for o in outs]))
        depth = depth.index_put((chunks,), torch.cat([o[3] for o in outs]))
    return _untile(feats, TW, TH, ts, W, H), _untile(alpha, TW, TH, ts, W, H), _untile(depth, TW, TH, ts, W, H)


def _untile(x: Tensor, TW: int, TH: int, ts: int, W: int, H: int) -> Tensor:
    """(TH*TW, ts*ts, D) -> (H, W, D)."""
    D = x.shape[-1]
    x = x.reshape(TH, TW, ts, ts, D).permute(0, 2, 1, 3, 4).reshape(TH * ts, TW * ts, D)
    return x[:H, :W]
