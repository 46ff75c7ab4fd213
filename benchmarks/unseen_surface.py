"""How much of each shape's true surface no input view sees, and how much of the Chamfer error lies there.

Why: Chamfer-L1 and F@0.02 score the whole ground-truth surface, including parts that none of the six
views shows (the inside of a vase's neck, the floor of a mug, the top of the crate's shelf). No
reconstruction from those views can know them; a miss there is the benchmark's, not the method's
(the silhouettes close such a cavity, so the mesh has a lid where the truth is hollow). This script
splits the completeness term (true surface -> mesh) into the part the views see and the part they do
not, for meshes a recon_bench.py run wrote, without reconstructing anything.

A ground-truth sample counts as seen when some input view's z-buffer of the true mesh has it in front
(within `--tol-px` pixels of depth). The samples are those recon_bench.py scores with (same count, seed).

Run: python benchmarks/unseen_surface.py --data bench_data --glbs DIR [--shapes mug,crate] [--out x.json]
(DIR holds recon_<shape>_<preset>_<noise>.glb, e.g. recon_bench.py's --work folder)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import trimesh
from scipy import ndimage
from scipy.spatial import cKDTree

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "backend"))
from recon_bench import _samples, load_split  # noqa: E402

from make_your_3d.recon.camera import project, view_camera  # noqa: E402
from make_your_3d.recon.texture import raster_triangles  # noqa: E402
from make_your_3d.views import load_views  # noqa: E402


def seen_by_views(gt: trimesh.Trimesh, points: np.ndarray, viewset, tol_px: float = 1.0) -> np.ndarray:
    """(N,) True where some orthographic view of `viewset` sees the point: the true mesh's z-buffer at
    its pixel is not in front of it by more than `tol_px` pixels of depth."""
    seen = np.zeros(len(points), bool)
    faces = torch.tensor(np.asarray(gt.faces))
    for view in viewset.views:
        cam = view_camera(view, torch.device("cpu"), torch.float64)
        W, H = view.size
        uv, z = project(torch.as_tensor(np.asarray(gt.vertices, dtype=np.float64)), cam)
        zbuf = raster_triangles(uv[faces], z[faces], W, H)[2].numpy()
        # a surface seen edge-on projects onto the outline, where no triangle covers a pixel centre: take
        # the nearest covered pixel's depth there, or every edge-on face would count as seen
        zbuf = np.where(np.isfinite(zbuf), zbuf, ndimage.minimum_filter(zbuf, size=3, mode="constant", cval=np.inf))
        uv, z = (t.numpy() for t in project(torch.as_tensor(points, dtype=torch.float64), cam))
        u, r = np.floor(uv[:, 0]).astype(int), np.floor(uv[:, 1]).astype(int)
        inside = (u >= 0) & (u < W) & (r >= 0) & (r < H)
        front = np.full(len(points), np.inf)
        front[inside] = zbuf[r[inside], u[inside]]
        seen |= inside & (z <= front + tol_px / float(cam.Ks[0][0, 0]))
    return seen


def split_completeness(pred: trimesh.Trimesh, gt: trimesh.Trimesh, folder: Path, tol_px: float) -> dict:
    """recon_bench's completeness and F-score recall, over the seen and the unseen true surface."""
    gp, _ = _samples(gt, 1_000_000, 2)
    pp, _ = _samples(pred, 300_000, 1)
    d = cKDTree(pp).query(gp, workers=-1)[0]
    seen = seen_by_views(gt, gp, load_views(folder / "views"), tol_px)
    acc = cKDTree(gp).query(pp, workers=-1)[0].mean()
    return {"unseen_fraction": float(1 - seen.mean()), "completeness": float(d.mean()),
            "completeness_seen": float(d[seen].mean()), "completeness_unseen": float(d[~seen].mean()) if (~seen).any()
            else 0.0, "share_of_completeness_unseen": float(d[~seen].sum() / max(d.sum(), 1e-12)),
            "recall_seen": float((d[seen] < 0.02).mean()), "accuracy": float(acc),
            "chamfer_l1": float((acc + d.mean()) / 2), "chamfer_l1_seen": float((acc + d[seen].mean()) / 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description="unseen true surface and its share of the Chamfer error")
    ap.add_argument("--data", required=True)
    ap.add_argument("--glbs", required=True)
    ap.add_argument("--shapes", default=None, help="comma list (default: every shape of the split)")
    ap.add_argument("--preset", default="default")
    ap.add_argument("--noise", default="none")
    ap.add_argument("--tol-px", type=float, default=1.0)
    ap.add_argument("--out")
    args = ap.parse_args()
    split = load_split()
    shapes = args.shapes.split(",") if args.shapes else split["tuning"] + split["heldout"]
    rows = []
    print("| shape | set | unseen true surface | Chamfer-L1 | completeness seen / unseen | share of completeness "
          "unseen | Chamfer-L1 over the seen truth |")
    print("|---|---|---|---|---|---|---|")
    for shape in shapes:
        folder = Path(args.data) / shape
        g = np.load(folder / "gt_mesh.npz")
        gt = trimesh.Trimesh(g["vertices"], g["faces"], process=False)
        for noise in args.noise.split(","):
            glb = Path(args.glbs) / f"recon_{shape}_{args.preset}_{noise}.glb"
            r = {"shape": shape, "set": "tuning" if shape in split["tuning"] else "heldout", "noise": noise,
                 **split_completeness(trimesh.load(glb, force="mesh"), gt, folder, args.tol_px)}
            rows.append(r)
            print(f"| {shape} {noise} | {r['set']} | {100 * r['unseen_fraction']:.1f}% | {r['chamfer_l1']:.4f} | "
                  f"{r['completeness_seen']:.4f} / {r['completeness_unseen']:.4f} | "
                  f"{100 * r['share_of_completeness_unseen']:.0f}% | {r['chamfer_l1_seen']:.4f} |", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"tol_px": args.tol_px, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
