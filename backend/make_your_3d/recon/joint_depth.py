"""Every view's depth solved as one surface: the views' normals and silhouettes fused jointly.

Why: integrating one view's normals gives its visible surface only up to one offset per connected
piece, and any error in the normals (a generated normal map is tilted by a degree or three, smoothly
varying over the image) integrates into a warp that grows with distance. Placing each piece on its
own against the visual hull (recon/lift.py) is a rule: it holds where the surface really touches the
hull and fails elsewhere (a cheek beside a protruding ear, the body behind a mug's handle, a region
seen mostly by the two diagonal views), and it cannot undo a warp.

Here all views' depths are the unknowns of one sparse least-squares problem:
- each view's normal-integration equations (depth differences = the normals' slopes), with the
  occluding-edge weights of that view's own robust solve;
- wherever a pixel of one view and a pixel of another are the same surface (the surface faces both
  views, their normals agree and the two points lie within a gate), the two points must coincide
  along the surface normal: n . (p_a + z_a f_a - p_b - z_b f_b) = 0, linear in the two depths
  (f: a view's ray direction). A region seen by two diagonal views is placed by both;
- the contact pixels (where the surface touches the visual hull on another view's contour) held on
  the hull's front: the silhouettes, distributed over the image instead of one offset per piece;
- a faint pull to the hull-placed integral, which keeps pieces without matches where they were.
The matches are reweighted towards L1 (one inconsistent view cannot drag the surface), found again
from the new depths, and the gate shrinks over the rounds. The depths stay inside the hull.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from make_your_3d.recon.camera import ortho_pixel, unproject
from make_your_3d.recon.config import JointConfig
from make_your_3d.recon.lift import IntegratedView


def joint_depths(views: list[IntegratedView], cfg: JointConfig = JointConfig()) -> list[np.ndarray]:
    """Every view's depth of its solved pixels (one array per view, parallel to its `pieces.z`), solved
    jointly; the hull-placed integrals when `cfg.enabled` is off or fewer than two views have normals."""
    placed = [iv.pieces.placed for iv in views]
    if not cfg.enabled or len(views) < 2 or cfg.rounds == 0:
        return placed
    base = np.cumsum([0] + [len(z) for z in placed])  # each view's first unknown
    n = int(base[-1])
    z0 = np.concatenate(placed)
    px = 1.0 / min(float(iv.K[0, 0]) for iv in views)
    samples = [_Samples.of(iv, cfg.stride) for iv in views]
    # the fixed part: every view's integration equations, the contacts, the pull to the placed integral
    blocks, rhs = [], []
    for k, iv in enumerate(views):
        pc = iv.pieces
        w = np.sqrt(pc.grad_weight)
        G = sp.csr_matrix(sp.diags(w) @ pc.grad)
        blocks.append(sp.hstack([sp.csr_matrix((G.shape[0], base[k])), G,
                                 sp.csr_matrix((G.shape[0], n - base[k + 1]))]).tocsr())
        rhs.append(w * pc.grad_rhs)
    F = sp.vstack(blocks).tocsr()
    FtF, Ftf = (F.T @ F).tocsr(), F.T @ np.concatenate(rhs)
    contact = np.concatenate([iv.pieces.contact for iv in views])
    front = np.concatenate([iv.pieces.front[iv.pieces.mask] for iv in views])
    back = np.concatenate([iv.pieces.back[iv.pieces.mask] for iv in views])
    diag = np.full(n, cfg.prior_weight) + cfg.contact_weight * contact
    target = (cfg.prior_weight * z0 + cfg.contact_weight * contact * front) / diag
    z = z0.copy()
    pairs = [(a, b) for a in range(len(views)) for b in range(len(views)) if a != b]
    for r in range(cfg.rounds):
        t = r / max(cfg.rounds - 1, 1)
        gate = ((1 - t) * cfg.gate_px + t * cfg.gate_final_px) * px
        found = [(a, b, _match(views[a], samples[a], z[base[a]:base[a + 1]], views[b], samples[b],
                               z[base[b]:base[b + 1]], gate, cfg)) for a, b in pairs]
        ia = np.concatenate([m.ka + base[a] for a, b, m in found])
        ib = np.concatenate([m.kb + base[b] for a, b, m in found])
        if len(ia) == 0:
            break
        ca = np.concatenate([m.ca for _, _, m in found])
        cb = np.concatenate([m.cb for _, _, m in found])
        # each match's residual is ca z_a + cb z_b + c0: its constant part at the current z
        c0 = np.concatenate([m.r0 for _, _, m in found]) - ca * z[ia] - cb * z[ib]
        rows = np.arange(len(ia))
        M = sp.csr_matrix((np.concatenate([ca, cb]), (np.tile(rows, 2), np.concatenate([ia, ib]))), shape=(len(ia), n))
        for _ in range(cfg.irls + 1):
            w = cfg.match_weight / np.maximum(np.abs(M @ z + c0) / (cfg.robust_px * px), 1.0)
            MtW = M.T.multiply(w).tocsr()
            z = _cg((FtF + MtW @ M + sp.diags(diag)).tocsr(), Ftf - MtW @ c0 + diag * target, z, cfg.cg_iters)
    z = np.clip(z, front, back)
    return [z[base[k]:base[k + 1]] for k in range(len(views))]


def _cg(A: sp.csr_matrix, b: np.ndarray, x0: np.ndarray, iters: int) -> np.ndarray:
    """Conjugate gradients on the symmetric positive definite normal equations, from the previous
    solution (a direct factorisation of six coupled views costs ten times more on a CPU)."""
    d = A.diagonal()
    pre = spla.LinearOperator(A.shape, matvec=lambda r: r / d)  # Jacobi
    x, _ = spla.cg(A, b, x0=x0, rtol=1e-8, maxiter=iters, M=pre)
    return x


@dataclass
class _Match:
    """Pixels ka of view a and kb of view b that are the same surface, which must coincide along its
    normal: r0 (the distance at the current depths, world units) + ca * (change of z_a[ka]) + cb *
    (change of z_b[kb]) = 0."""

    ka: np.ndarray
    kb: np.ndarray
    ca: np.ndarray
    cb: np.ndarray
    r0: np.ndarray


def _match(va: IntegratedView, sa: "_Samples", depth_a: np.ndarray, vb: IntegratedView, sb: "_Samples",
           depth_b: np.ndarray, gate: float, cfg: JointConfig) -> _Match:
    """View a's sampled pixels (at depths depth_a, one per solved pixel) that view b sees as the same
    surface: the surface faces both views, their normals agree and the points lie within `gate`."""
    ka = sa.k
    p = _points(va, sa.u, sa.v, depth_a[ka])
    ub, vv = ortho_pixel(p, vb.vm, vb.K)
    H, W = vb.pieces.mask.shape
    inside = (ub >= 0) & (ub < W) & (vv >= 0) & (vv < H)
    kb = np.full(len(p), -1)
    kb[inside] = sb.index[vv[inside], ub[inside]]
    ok = kb >= 0
    na = va.normals_world[sa.v, sa.u]
    nb = np.zeros_like(na)
    nb[ok] = vb.normals_world[vv[ok], ub[ok]]
    n = na + nb
    n /= np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-9)
    ca, cb = n @ _ray(va), -(n @ _ray(vb))
    ok &= (ca < -cfg.min_facing) & (cb > cfg.min_facing) & ((na * nb).sum(-1) > cfg.min_agree)
    q = np.zeros_like(p)
    q[ok] = _points(vb, ub[ok], vv[ok], depth_b[kb[ok]])
    r0 = ((p - q) * n).sum(-1)
    ok &= np.abs(r0) < gate
    return _Match(ka[ok], kb[ok], ca[ok], cb[ok], r0[ok])


def _ray(iv: IntegratedView) -> np.ndarray:
    """The view's ray direction in the world (orthographic: one per view)."""
    return np.linalg.inv(iv.vm)[:3, 2]


@dataclass
class _Samples:
    """Every `stride`-th solved pixel of one view: those matched against the other views."""

    k: np.ndarray  # (S,) index into the view's solved pixels (its z and label)
    u: np.ndarray  # (S,) pixel column
    v: np.ndarray  # (S,) pixel row
    index: np.ndarray  # (H,W) each solved pixel's index into z, -1 elsewhere

    @classmethod
    def of(cls, iv: IntegratedView, stride: int) -> "_Samples":
        m = iv.pieces.mask
        index = -np.ones(m.shape, np.int64)
        index[m] = np.arange(int(m.sum()))
        v, u = np.nonzero(m)
        keep = (u % stride == 0) & (v % stride == 0)
        return cls(index[v[keep], u[keep]], u[keep], v[keep], index)


def _points(iv: IntegratedView, u: np.ndarray, v: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """World points of view iv's pixels (columns u, rows v) at the given depths."""
    return unproject(u, v, depth, iv.K, np.linalg.inv(iv.vm))
