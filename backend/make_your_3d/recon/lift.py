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
from scipy import ndimage
from scipy.sparse.csgraph import connected_components

from make_your_3d.recon.camera import Cameras, pixel_rays, to_world, unproject, view_camera, view_dirs
from make_your_3d.recon.config import HullConfig, LiftConfig
from make_your_3d.recon.scene import HullField


@dataclass
class LiftedView:
    depth: np.ndarray  # (H,W) camera depth, nan outside the mask or where unknown
    points: np.ndarray  # (M,3) world points of the valid pixels
    normals: np.ndarray  # (M,3) world normals
    colors: np.ndarray  # (M,3) straight colours in [0,1]
    area: np.ndarray  # (M,) surface area each pixel stands for


def hull_depths(viewset, masks: list[torch.Tensor], cams: Cameras, lo: np.ndarray, hi: np.ndarray,
                pixels: np.ndarray, field: HullField | None = None,
                cfg: HullConfig = HullConfig()) -> tuple[np.ndarray, np.ndarray]:
    """Front and back depth of the visual hull along the orthographic rays of `pixels` (H,W bool),
    found by marching the mask field and refining the crossings by bisection (inf / -inf: missed).

    Marching the field itself (not a marching-cubes mesh of it) keeps flat faces exactly flat, which
    the anchoring of integrated normals relies on. `field`: the views' HullField, when the caller has it."""
    field = HullField(viewset, masks, cfg) if field is None else field
    steps, refine = cfg.march_steps, cfg.march_refine
    H, W = pixels.shape
    front = np.full((H, W), np.inf)
    back = np.full((H, W), -np.inf)
    v, u = np.nonzero(pixels)
    if len(v) == 0:
        return front, back
    dev = cams.viewmats.device
    vm = cams.viewmats[0].double()
    K = cams.Ks[0].double()
    c2w = torch.linalg.inv(vm)
    corners = torch.tensor(np.array(np.meshgrid(*zip(lo, hi))).T.reshape(-1, 3), dtype=torch.float64, device=dev)
    zc = corners @ vm[2, :3] + vm[2, 3]
    z0, z1 = float(zc.min()), float(zc.max())
    x, y = pixel_rays(torch.tensor(u, dtype=torch.float64, device=dev), torch.tensor(v, dtype=torch.float64, device=dev), K)
    zs = torch.linspace(z0, z1, steps, dtype=torch.float64, device=dev)

    def world(xx, yy, zz):
        return to_world(torch.stack([xx, yy, zz], -1), c2w).float()

    R = len(u)
    pts = world(x[:, None].expand(R, steps), y[:, None].expand(R, steps), zs[None].expand(R, steps))
    inside = (field(pts.reshape(-1, 3)).reshape(R, steps) > 0).cpu()
    any_in = inside.any(1)
    first = torch.argmax(inside.to(torch.int8), 1)
    last = steps - 1 - torch.argmax(inside.flip(1).to(torch.int8), 1)

    def bisect(i_out, i_in):
        a = zs[i_out.clamp(0, steps - 1)]
        b = zs[i_in]
        a = torch.where(i_out < 0, torch.full_like(a, z0), a)
        a = torch.where(i_out >= steps, torch.full_like(a, z1), a)
        for _ in range(refine):
            mid = 0.5 * (a + b)
            ins = (field(world(x, y, mid)) > 0).cpu()
            b = torch.where(ins, mid, b)
            a = torch.where(ins, a, mid)
        return b

    f = bisect(first - 1, first).cpu().numpy()
    bk = bisect(last + 1, last).cpu().numpy()
    ok = any_in.numpy()
    front[v[ok], u[ok]] = f[ok]
    back[v[ok], u[ok]] = bk[ok]
    return front, back


def depth_slopes(normals_cam: np.ndarray, fx: float, fy: float,
                 cfg: LiftConfig = LiftConfig()) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Depth change per pixel step in x and y of an orthographic view's surface, from its camera-space
    normals (H,W,3), and where the surface faces the camera enough for them to be trusted (0 elsewhere)."""
    nz = normals_cam[..., 2]
    facing = nz < -cfg.min_nz
    with np.errstate(divide="ignore", invalid="ignore"):
        gx = np.where(facing, np.clip(-normals_cam[..., 0] / nz, -cfg.max_slope, cfg.max_slope) / fx, 0.0)
        gy = np.where(facing, np.clip(-normals_cam[..., 1] / nz, -cfg.max_slope, cfg.max_slope) / fy, 0.0)
    return gx, gy, facing


@dataclass
class ViewPieces:
    """One view's normals integrated into pieces, each known up to an offset along the view's rays.

    The hull's placement of each piece (`shift`: contacts, else the quantile) is kept apart from the
    integral, and the integral's equations are kept, so that recon/joint_depth.py can solve all views
    together."""

    mask: np.ndarray  # (H,W) the solved pixels
    z: np.ndarray  # (n,) the integral at each solved pixel (row-major order of `mask`)
    label: np.ndarray  # (n,) the piece of each solved pixel
    shift: np.ndarray  # (P,) the hull's placement of each piece (added to z)
    front: np.ndarray  # (H,W) the hull's front depth
    back: np.ndarray  # (H,W) the hull's back depth
    contact: np.ndarray  # (n,) the solved pixels where the surface touches the hull (used for placing)
    grad: sp.csr_matrix | None = None  # the integral's gradient equations over the solved pixels,
    grad_rhs: np.ndarray | None = None  # their right-hand sides (slopes)
    grad_weight: np.ndarray | None = None  # and their final reweighting (occluding edges count less)

    @property
    def placed(self) -> np.ndarray:
        """(n,) each solved pixel's depth with its piece at the hull's placement."""
        return self.z + self.shift[self.label]

    def depth(self, values: np.ndarray | None = None) -> np.ndarray:
        """(H,W) depth of the solved pixels (`values`, one per solved pixel; default: `placed`), inside
        the hull; nan outside the solved pixels."""
        out = np.full(self.mask.shape, np.nan)
        if len(self.z):
            out[self.mask] = np.clip(self.placed if values is None else values, self.front[self.mask],
                                     self.back[self.mask])
        return out


def integrate_normals(normals_cam: np.ndarray, mask: np.ndarray, front: np.ndarray, back: np.ndarray,
                      fx: float, fy: float, contact: np.ndarray | None = None,
                      cfg: LiftConfig = LiftConfig()) -> np.ndarray:
    """Least-squares depth whose finite differences match the normals' slopes (orthographic camera),
    each piece at the hull's placement (`integrate_pieces`). Returns (H,W) depth, nan outside the mask."""
    return integrate_pieces(normals_cam, mask, front, back, fx, fy, contact, cfg).depth()


def integrate_pieces(normals_cam: np.ndarray, mask: np.ndarray, front: np.ndarray, back: np.ndarray,
                     fx: float, fy: float, contact: np.ndarray | None = None,
                     cfg: LiftConfig = LiftConfig()) -> ViewPieces:
    """The normals' integral, fixed up to one offset per connected piece, and the hull's placement of
    each piece: just behind the visual hull's front, touching it (robustly: a high quantile of the gap),
    refined to the median gap over the piece's `contact` pixels (where the surface is known to touch the
    hull) that lie within `cfg.contact_px` of that placement."""
    m = mask & np.isfinite(front) & np.isfinite(back)
    n = int(m.sum())
    if n == 0:
        empty = np.zeros(0)
        return ViewPieces(m, empty, np.zeros(0, np.int64), empty, front, back, np.zeros(0, bool))
    A, b, w0, n_grad = _gradient_system(normals_cam, m, front, fx, fy, cfg)
    z, w = _solve_irls(A, b, w0, n_grad, 0.5 / min(fx, fy), cfg.irls)
    label, shift, used = _anchor_pieces(z, A[:n_grad], m, front, contact, fx, cfg)
    return ViewPieces(m, z, label, shift, front, back, used, A[:n_grad].tocsr(), b[:n_grad], w[:n_grad])


def _gradient_system(normals_cam: np.ndarray, m: np.ndarray, front: np.ndarray, fx: float, fy: float,
                     cfg: LiftConfig) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray, int]:
    """The sparse least-squares system over the pixels of `m`: one row per neighbouring pair whose depth
    difference must match the normals' mean slope (pairs across an occluding edge cut), then one weak row
    per pixel pulling it to the hull's front. Returns A, b, the rows' weights and the gradient rows' count."""
    H, W = m.shape
    idx = -np.ones((H, W), np.int64)
    n = int(m.sum())
    idx[m] = np.arange(n)
    gx, gy, facing = depth_slopes(normals_cam, fx, fy, cfg)
    good = m & facing
    rows, cols, vals, rhs, wts = [], [], [], [], []
    r = 0
    for axis, g in ((1, gx), (0, gy)):
        a = good[:, :-1] & good[:, 1:] if axis == 1 else good[:-1, :] & good[1:, :]
        ia = idx[:, :-1][a] if axis == 1 else idx[:-1, :][a]
        ib = idx[:, 1:][a] if axis == 1 else idx[1:, :][a]
        ga = g[:, :-1][a] if axis == 1 else g[:-1, :][a]
        gb = g[:, 1:][a] if axis == 1 else g[1:, :][a]
        # cut edges where the hull jumps far more than the normals allow: an occluding edge (a depth
        # discontinuity) that integration must not smooth over
        fa = front[:, :-1][a] if axis == 1 else front[:-1, :][a]
        fb = front[:, 1:][a] if axis == 1 else front[1:, :][a]
        keep = np.abs((fb - fa) - 0.5 * (ga + gb)) < cfg.jump_px / (fx if axis == 1 else fy)
        ia, ib, ga, gb = ia[keep], ib[keep], ga[keep], gb[keep]
        k = len(ia)
        e = np.arange(r, r + k)
        rows += [e, e]
        cols += [ib, ia]
        vals += [np.ones(k), -np.ones(k)]
        rhs.append(0.5 * (ga + gb))
        wts.append(np.ones(k))
        r += k
    # a weak pull to the hull's front fixes every piece (`_anchor_pieces` then places each piece)
    ids = idx[m]
    e = np.arange(r, r + n)
    rows.append(e)
    cols.append(ids)
    vals.append(np.ones(n))
    rhs.append(front[m])
    wts.append(np.full(n, cfg.anchor_weight))
    A = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(r + n, n))
    return A, np.concatenate(rhs), np.concatenate(wts), r


def _solve_irls(A: sp.csr_matrix, b: np.ndarray, w0: np.ndarray, n_grad: int, eps: float, irls: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Weighted least squares, reweighted `irls` times towards an L1 fit of the gradient rows: a depth jump
    hidden behind an occluding edge then stays a jump along that edge instead of bending the whole
    surface. Residuals below `eps` (half a pixel's width) count fully. Returns the solution and the
    rows' final weights."""
    w = w0.copy()
    for it in range(irls + 1):
        AtW = A.T.multiply(w).tocsr()
        z = spla.spsolve((AtW @ A).tocsc(), AtW @ b)
        if it == irls:
            break
        res = np.abs(A[:n_grad] @ z - b[:n_grad])
        w = w0.copy()
        w[:n_grad] = 1.0 / np.maximum(res / eps, 1.0)
    return z, w


def _anchor_pieces(z: np.ndarray, grad_rows: sp.csr_matrix, m: np.ndarray, front: np.ndarray,
                   contact: np.ndarray | None, fx: float, cfg: LiftConfig
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each connected piece of the integral placed so that it lies behind the hull's front and touches it
    (the surface meets the hull on every view's contour). Returns the pieces' labels, their placements
    and the contact pixels the placements used."""
    n = len(z)
    ncomp, label = connected_components(grad_rows.T @ grad_rows, directed=False)
    gap = front[m] - z
    # the hull is least reliable next to this view's own silhouette (partly covered pixels): leave a
    # rim out of the estimate where the piece is big enough
    core = ndimage.binary_erosion(m, iterations=cfg.rim_px, border_value=0)[m]
    on_hull = contact[m] if contact is not None else np.zeros(n, bool)
    shifts, used = np.zeros(ncomp), np.zeros(n, bool)
    for c in range(ncomp):
        sel = label == c
        use = sel & core if (sel & core).sum() > cfg.min_core_px else sel
        shift = np.quantile(gap[use], cfg.touch_quantile) if use.sum() > cfg.min_quantile_px else gap[use].max()
        # contacts that agree with that placement to within `contact_px`: a concave floor lying edge-on
        # under the hull's lid (a tray seen from above) passes the contact test but sits far behind it
        cand = sel & core & on_hull
        enough = max(cfg.min_contacts, cfg.contact_fraction * sel.sum())
        touch = cand & (np.abs(gap - shift) < cfg.contact_px / fx)
        if touch.sum() > enough:
            # where the surface is known to touch the hull: the typical gap there, robust to the hull's
            # sub-pixel noise and to the integral's drift between far parts of the piece (the high
            # quantile lets the few points where the hull is cut deepest push the whole piece back)
            shift = np.median(gap[touch])
            used |= touch
        shifts[c] = shift
    return label, shifts, used


def hull_contacts(viewset, masks: list[torch.Tensor], vm: np.ndarray, K: np.ndarray, front: np.ndarray,
                  normals_world: np.ndarray, field: HullField | None = None,
                  cfg: LiftConfig = LiftConfig()) -> np.ndarray:
    """Pixels (H,W bool) of an orthographic view where the surface touches the visual hull's front: the
    hull there is bounded by another view's silhouette (the point lies on its contour) and the surface
    turns edge-on to that view (its normal is nearly perpendicular to that view's rays), so the point is
    on that view's contour generator, unless the surface lies well behind the hull's front there (a
    concave floor under the hull's lid passes both tests too: `integrate_normals` drops contacts far from
    its placement). Elsewhere the hull's front may lie well in front of the surface.
    `cfg.contact_max_cos` keeps the band narrow on curved surfaces. `field`: the views' HullField, when
    the caller has it."""
    contact = np.zeros(front.shape, bool)
    v, u = np.nonzero(np.isfinite(front))
    if len(v) == 0:
        return contact
    c2w = np.linalg.inv(vm)
    pts = unproject(u, v, front[v, u], K, c2w)
    field = HullField(viewset, masks) if field is None else field
    vals = field.per_view(torch.tensor(pts, dtype=torch.float32, device=masks[0].device)).cpu().numpy()
    n = normals_world[v, u]
    own = c2w[:3, 2] / np.linalg.norm(c2w[:3, 2])
    for k, view in enumerate(viewset.views):
        d = view_dirs(torch.tensor(pts), view_camera(view, torch.device("cpu"), torch.float64)).numpy()
        if view.projection == "orthographic" and abs(float(d[0] @ own)) > 0.99:
            continue  # this view or its opposite: its contour is this view's rim
        on_contour = np.abs(vals[k] - 0.5) < cfg.contact_ramp  # the sub-pixel mask ramps only across its own edge
        edge_on = np.abs((n * d).sum(-1)) < cfg.contact_max_cos
        hit = on_contour & edge_on
        contact[v[hit], u[hit]] = True
    return contact


@dataclass
class IntegratedView:
    """One orthographic view's pieces with what placing and lifting them needs."""

    index: int  # the view's index in the view set
    pieces: ViewPieces
    vm: np.ndarray  # (4,4) world -> camera
    K: np.ndarray  # (3,3) intrinsics (orthographic)
    normals_world: np.ndarray  # (H,W,3)
    rgb: np.ndarray  # (H,W,3) straight colours in [0,1]


def integrate_view(index: int, rgb: np.ndarray, alpha: np.ndarray, normals_world: np.ndarray, cams: Cameras,
                   viewset, masks: list[torch.Tensor], lo: np.ndarray, hi: np.ndarray,
                   field: HullField | None = None, hull: HullConfig = HullConfig(),
                   cfg: LiftConfig = LiftConfig()) -> IntegratedView | None:
    """Integrate one orthographic view's normals into pieces placed on the visual hull (None for a
    perspective view). `field`: the views' HullField, when the caller has it."""
    if cams.model != "ortho":
        return None
    vm = cams.viewmats[0].cpu().numpy().astype(np.float64)
    K = cams.Ks[0].cpu().numpy().astype(np.float64)
    mask = alpha > 0.5
    field = HullField(viewset, masks, hull) if field is None else field
    front, back = hull_depths(viewset, masks, cams, lo, hi, mask, field=field, cfg=hull)
    n_cam = normals_world @ vm[:3, :3].T
    contact = hull_contacts(viewset, masks, vm, K, front, normals_world, field=field, cfg=cfg)
    pieces = integrate_pieces(n_cam, mask, front, back, K[0, 0], K[1, 1], contact=contact, cfg=cfg)
    return IntegratedView(index, pieces, vm, K, normals_world, rgb)


def lift_points(iv: IntegratedView, depth: np.ndarray | None = None, cfg: LiftConfig = LiftConfig()) -> LiftedView:
    """The view's solved pixels at `depth` (one per solved pixel; default: the hull's placement of their
    pieces), as world points with normals, colours and the surface area each stands for."""
    depth = iv.pieces.depth(depth)
    v, u = np.nonzero(np.isfinite(depth))
    pts = unproject(u, v, depth[v, u], iv.K, np.linalg.inv(iv.vm))
    n_cam = iv.normals_world[v, u] @ iv.vm[:3, :3].T
    nz = np.clip(-n_cam[:, 2], cfg.area_min_cos, 1.0)
    area = 1.0 / (iv.K[0, 0] * iv.K[1, 1]) / nz
    return LiftedView(depth, pts, iv.normals_world[v, u], iv.rgb[v, u], area)
