"""Lifted-depth benchmark: how far each view's depth lies from the true surface, hull-placed vs joint.

For each shape and degradation: every view's normals integrated and each piece placed on the visual hull
(recon/lift.py), then all views solved jointly (recon/joint_depth.py); each solved pixel lifted to a
world point and its distance to dense samples of the ground-truth mesh taken, in pixels of the views.
Reports the mean distance and the fraction under one pixel, both ways, and the mean error along each
view's rays against the true mesh's depth map (`depth px`): the distance to the nearest true surface
hides a piece placed at the wrong depth when it lands near another surface (a figurine's torso placed
10 px deep lies near its own arms). Seconds, not minutes, per shape: the quick check for a change to the
depth step, before the whole reconstruction benchmark.

Run: python benchmarks/lift_bench.py --data bench_data --split tuning --noise none,strong [--set joint.rounds=2 ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import trimesh
from scipy.spatial import cKDTree

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "backend"))
from make_your_3d.recon.config import parse_settings, preset_config  # noqa: E402
from make_your_3d.recon.degrade import degrade, strength  # noqa: E402
from make_your_3d.recon.joint_depth import joint_depths  # noqa: E402
from make_your_3d.recon.lift import integrate_view, lift_points  # noqa: E402
from make_your_3d.recon.scene import HullField, mask_tensors, scene_bounds, targets_for  # noqa: E402
from make_your_3d.views import load_views  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from interior_depth import depth_map  # noqa: E402  (the true mesh's z-buffer, the bake's own)

SPLIT = Path(__file__).with_name("shape_split.json")


def lift_errors(folder: Path, noise: str, cfg, seed: int = 0) -> dict:
    """Mean distance (px) and fraction under 1 px of the lifted points, hull-placed and joint."""
    g = np.load(folder / "gt_mesh.npz")
    gt = trimesh.Trimesh(g["vertices"], g["faces"], process=False)
    tree = cKDTree(trimesh.sample.sample_surface(gt, 400_000, seed=0)[0])
    vs = degrade(load_views(folder / "views"), strength(noise, seed=seed))
    dev = torch.device("cpu")
    masks = mask_tensors(vs, dev)
    lo, hi = scene_bounds(vs, masks, dev, cfg.hull)
    tg = targets_for(vs, cfg.fuse.view_size, dev)
    field = HullField(vs, masks, cfg.hull)
    views = [iv for v in range(len(vs.views)) if bool(tg.has_normal[v]) and (iv := integrate_view(
        v, tg.rgb[v].numpy(), tg.mask[v].numpy(), tg.normal[v].numpy().astype(np.float64), tg.camera(v), vs, masks,
        lo, hi, field=field, hull=cfg.hull, cfg=cfg.lift)) is not None]
    t = time.perf_counter()
    joint = joint_depths(views, cfg.joint)
    secs = time.perf_counter() - t
    out = {"joint_seconds": round(secs, 2)}
    truths = [depth_map(gt, tg.camera(iv.index)).astype(np.float64) for iv in views]
    for name, depths in (("hull", [None] * len(views)), ("joint", joint)):
        d = np.concatenate([tree.query(lift_points(iv, z, cfg.lift).points)[0]
                            * iv.K[0, 0] for iv, z in zip(views, depths)])
        e = np.concatenate([np.abs(iv.pieces.depth(z) - t)[iv.pieces.mask & np.isfinite(t)] * iv.K[0, 0]
                            for iv, z, t in zip(views, depths, truths)])
        out[name] = {"mean_px": round(float(d.mean()), 3), "under_1px": round(float((d < 1).mean()), 3),
                     "depth_px": round(float(e.mean()), 3)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description="lifted-depth benchmark")
    ap.add_argument("--data", required=True)
    ap.add_argument("--split", default="tuning", choices=["tuning", "heldout", "all"])
    ap.add_argument("--noise", default="none,strong")
    ap.add_argument("--preset", default="default")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    ap.add_argument("--out")
    args = ap.parse_args()
    split = json.loads(SPLIT.read_text())
    shapes = split["tuning"] + split["heldout"] if args.split == "all" else split[args.split]
    cfg = preset_config(args.preset).with_overrides(parse_settings(args.set))
    rows = []
    print("| shape | noise | hull-placed: mean px (<1 px), depth px | joint: mean px (<1 px), depth px | joint s |")
    print("|---|---|---|---|---|")
    for shape in shapes:
        for noise in args.noise.split(","):
            r = {"shape": shape, "noise": noise, **lift_errors(Path(args.data) / shape, noise, cfg)}
            rows.append(r)
            h, j = r["hull"], r["joint"]
            print(f"| {shape} | {noise} | {h['mean_px']:.2f} ({h['under_1px']:.3f}), {h['depth_px']:.2f} | "
                  f"{j['mean_px']:.2f} ({j['under_1px']:.3f}), {j['depth_px']:.2f} | {r['joint_seconds']:.1f} |",
                  flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "settings": args.set}, indent=1))


if __name__ == "__main__":
    main()
