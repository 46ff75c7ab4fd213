"""Interior depth error of finished reconstructions: how far a GLB's surface lies from the true surface along
each input view's rays, where the view sees into a cavity (issue 23's interiors target: crate, mug and bowl
within 1.5 px mean).

`lift_bench.py` measures the same quantity for the lifted depth (before the Gaussians and the surface fit);
this scores what the artist gets: the GLB written by `recon_bench.py`. A pixel is *interior* when the true
surface there lies more than `--margin` px behind the true mesh's convex hull (the view looks into an opening,
onto a step's tread or a cavity's floor: what no silhouette shows). Per view: depth maps of the GLB, the true
mesh and its convex hull rasterized into the view's camera (`recon/camera.py`, the contract's orthographic
views); error = |GLB depth - true depth| in pixels of the view. Pixels the GLB misses count as `missed`, not
in the mean.

Run: python benchmarks/interior_depth.py --data bench_data --shapes crate,mug,bowl --noise none,mild,strong
     [--json OUT]   (GLBs: DATA/<shape>/recon_<shape>_<preset>_<noise>.glb, as recon_bench writes them)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import trimesh

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "backend"))
from make_your_3d.recon.camera import Cameras, to_camera  # noqa: E402
from make_your_3d.recon.scene import targets_for  # noqa: E402
from make_your_3d.recon.texture import raster_triangles  # noqa: E402
from make_your_3d.views import load_views  # noqa: E402


def depth_map(mesh: trimesh.Trimesh, cam: Cameras) -> np.ndarray:
    """(H,W) depth along the view's axis (inf where the rays miss); orthographic views only."""
    if cam.model != "ortho":
        raise ValueError("interior_depth scores the contract's orthographic views only")
    vm, K = cam.viewmats[0].double().numpy(), cam.Ks[0].double().numpy()
    c = to_camera(np.asarray(mesh.vertices, dtype=np.float64), vm)
    xy = np.stack([c[:, 0] * K[0, 0] + K[0, 2], c[:, 1] * K[1, 1] + K[1, 2]], -1)
    f = torch.tensor(np.asarray(mesh.faces))
    return raster_triangles(torch.tensor(xy)[f], torch.tensor(c[:, 2])[f], cam.width, cam.height)[2].numpy()


def interior_errors(glb: trimesh.Trimesh, gt: trimesh.Trimesh, cams: list[Cameras], margin_px: float) -> dict:
    """Mean |depth error| (px) over interior pixels of every view, and over every pixel both surfaces cover."""
    hull = gt.convex_hull
    inner, every, missed, n_inner = [], [], 0, 0
    for cam in cams:
        px = float(cam.Ks[0, 0, 0])
        d_true, d_hull, d_glb = depth_map(gt, cam), depth_map(hull, cam), depth_map(glb, cam)
        seen = np.isfinite(d_true)  # the hull covers every pixel the true mesh covers
        cavity = seen & ((np.where(seen, d_true, 0.0) - np.where(seen, d_hull, 0.0)) * px > margin_px)
        both = seen & np.isfinite(d_glb)
        err = np.where(both, np.abs(np.where(both, d_glb, 0.0) - np.where(both, d_true, 0.0)), 0.0) * px
        inner.append(err[cavity & both])
        every.append(err[both])
        missed += int((cavity & ~both).sum())
        n_inner += int(cavity.sum())
    inner_all, every_all = np.concatenate(inner), np.concatenate(every)
    return {"interior_px": round(float(inner_all.mean()), 3) if inner_all.size else None,
            "interior_pixels": n_inner, "interior_missed": missed,
            "all_px": round(float(every_all.mean()), 3) if every_all.size else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--shapes", default="crate,mug,bowl")
    ap.add_argument("--noise", default="none,mild,strong")
    ap.add_argument("--preset", default="default")
    ap.add_argument("--margin", type=float, default=2.0, help="px behind the convex hull that make a pixel interior")
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = []
    print("| shape | noise | interior depth error, mean px (pixels, missed) | all pixels, mean px |\n|---|---|---|---|")
    for shape in args.shapes.split(","):
        d = Path(args.data) / shape
        g = np.load(d / "gt_mesh.npz")
        gt = trimesh.Trimesh(g["vertices"], g["faces"], process=False)
        vs = load_views(d / "views")
        tg = targets_for(vs, max(vs.image_size), torch.device("cpu"))
        cams = [tg.camera(v) for v in range(len(vs.views))]
        for noise in args.noise.split(","):
            glb = d / f"recon_{shape}_{args.preset}_{noise}.glb"
            if not glb.is_file():
                print(f"| {shape} | {noise} | no GLB ({glb.name}) | |")
                continue
            r = {"shape": shape, "noise": noise, "glb": glb.name,
                 **interior_errors(trimesh.load(glb, force="mesh"), gt, cams, args.margin)}
            rows.append(r)
            print(f"| {shape} | {noise} | {r['interior_px']} ({r['interior_pixels']}, {r['interior_missed']}) | {r['all_px']} |",
                  flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"margin_px": args.margin, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
