"""All views' depths solved as one surface (recon/joint_depth.py), against analytic shapes.

The views' normals are degraded the way generated views are (a smooth 3 degree tilt and a 3 degree
per-view bias, recon/degrade.py): integrated view by view they warp by pixels; solved jointly (the other
views' matches and the hull contacts straighten each view) the error must drop clearly, and on clean
views it must not grow. The true depth comes from ray casting the analytic shape."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from recon_shapes import HITS, render_views

from make_your_3d.recon.config import JointConfig, ReconConfig
from make_your_3d.recon.degrade import Degradation, degrade
from make_your_3d.recon.joint_depth import joint_depths
from make_your_3d.recon.lift import integrate_view
from make_your_3d.recon.scene import HullField, mask_tensors, scene_bounds, targets_for

TILTED = Degradation(normal_tilt_deg=3.0, normal_bias_deg=3.0, seed=3)


def _integrated(shape: str, degradation: Degradation | None, size: int = 96):
    """Every view integrated and hull-placed, and each view's true depth of its solved pixels."""
    clean = render_views(shape, size)
    vs = degrade(clean, degradation) if degradation is not None else clean
    cfg = ReconConfig()
    dev = torch.device("cpu")
    masks = mask_tensors(vs, dev)
    lo, hi = scene_bounds(vs, masks, dev, cfg.hull)
    tg = targets_for(vs, size, dev)
    field = HullField(vs, masks, cfg.hull)
    views, truths = [], []
    for v in range(len(vs.views)):
        iv = integrate_view(v, tg.rgb[v].numpy(), tg.mask[v].numpy(), tg.normal[v].numpy().astype(np.float64),
                            tg.camera(v), vs, masks, lo, hi, field=field, hull=cfg.hull, cfg=cfg.lift)
        views.append(iv)
        row, col = np.nonzero(iv.pieces.mask)
        c2w = np.linalg.inv(iv.vm)
        lateral = np.stack([(col + 0.5 - iv.K[0, 2]) / iv.K[0, 0], (row + 0.5 - iv.K[1, 2]) / iv.K[1, 1], 0 * col], -1)
        origin = lateral @ c2w[:3, :3].T + c2w[:3, 3]
        truths.append(HITS[shape](origin, np.broadcast_to(c2w[:3, 2], origin.shape).copy()).t)
    return views, truths


def _error_px(views, depths, truths) -> float:
    """Mean |depth - true| in pixels over the solved pixels whose ray hits the shape."""
    errs = [np.abs(z - t)[np.isfinite(t)] * iv.K[0, 0] for iv, z, t in zip(views, depths, truths)]
    return float(np.mean(np.concatenate(errs)))


def _hull_placed(views):
    return [iv.pieces.placed for iv in views]


@pytest.mark.parametrize("shape", ["sphere", "frame"])
def test_joint_solve_straightens_tilted_normals(shape):
    views, truths = _integrated(shape, TILTED)
    hull = _error_px(views, _hull_placed(views), truths)
    joint = _error_px(views, joint_depths(views, JointConfig()), truths)
    off = _error_px(views, joint_depths(views, JointConfig(enabled=False)), truths)
    print(shape, "hull-placed", hull, "joint", joint)
    assert off == hull  # disabled: the hull's placement, untouched
    assert joint < 0.7 * hull, (hull, joint)


def test_joint_solve_needs_the_matches():
    # the wrong variant: without the matches between views (weight 0) only the contacts act, and most of
    # the gain is gone
    views, truths = _integrated("sphere", TILTED)
    hull = _error_px(views, _hull_placed(views), truths)
    no_match = _error_px(views, joint_depths(views, JointConfig(match_weight=0.0)), truths)
    joint = _error_px(views, joint_depths(views, JointConfig()), truths)
    print("hull", hull, "contacts only", no_match, "joint", joint)
    assert no_match > 1.2 * joint, (no_match, joint)


@pytest.mark.parametrize("shape", ["sphere", "frame"])
def test_joint_solve_keeps_clean_views(shape):
    views, truths = _integrated(shape, None)
    hull = _error_px(views, _hull_placed(views), truths)
    joint = _error_px(views, joint_depths(views, JointConfig()), truths)
    print(shape, "clean: hull-placed", hull, "joint", joint)
    assert joint < hull + 0.05 and joint < 0.5, (hull, joint)
