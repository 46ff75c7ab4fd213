"""Interior depth error of finished reconstructions: how far a GLB's surface lies from the true surface along
each input view's rays, where the view sees into a cavity (issue 23's interiors target: crate, mug and bowl
within 1.5 px mean).

`lift_bench.py` measures the same quantity for the lifted depth (before the Gaussians and the surface fit);
this scores what the artist gets: the GLB written by `recon_bench.py`. A pixel is *interior* when the true
surface there lies more than `--margin` px behind the true mesh's convex hull (the view looks into an opening,
onto a step's tread or a cavity's floor: what no silhouette shows). Per view: depth maps of the GLB, the true
mesh and its convex hull rasterized into the view's camera (`texture.mesh_depth`; the contract's orthographic
views); error = |GLB depth - true depth| in pixels of the view. Pixels the GLB misses count as `missed`, not in
the mean.

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
from make_your_3d.recon.camera import Cameras  # noqa: E402
from make_your_3d.recon.scene import targets_for  # noqa: E402
from make_your_3d.recon.texture import mesh_depth  # noqa: E402
from make_your_3d.views import load_views  # noqa: E402


def depth_map(mesh: trimesh.Trimesh, cam: Cameras) -> np.ndarray:
    """(H,W) camera depth of `mesh` in one view (inf where the rays miss): the bake's own z-buffer."""
    v = torch.tensor(np.asarray(mesh.vertices), dtype=cam.viewmats.dtype)
    return mesh_depth(v, torch.tensor(np.asarray(mesh.faces)), cam).numpy()


def interior_errors(glb: trimesh.Trimesh, gt: trimesh.Trimesh, cams: list[Cameras], margin_px: float) -> dict:
    """Mean |depth error| (px) over interior pixels of every view, and over every pixel both surfaces cover."""
    hull = gt.convex_hull
    inner, every, missed, n_inner = [], [], 0, 0
    for cam in cams:
        if cam.model != "ortho":  # K[0,0] is pixels per world unit of depth only in an orthographic view
            raise ValueError("interior_depth scores the contract's orthographic views only")
        px = float(cam.Ks[0, 0, 0])
        d_true, d_hull, d_glb = depth_map(gt, cam), depth_map(hull, cam), depth_map(glb, cam)
        seen = np.isfinite(d_true)  # the hull covers every pixel the true mesh covers
        behind = np.zeros_like(d_true)
        behind[seen] = (d_true[seen] - d_hull[seen]) * px
        cavity = behind > margin_px
        both = seen & np.isfinite(d_glb)
        err = np.zeros_like(d_true)
        err[both] = np.abs(d_glb[both] - d_true[both]) * px
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
