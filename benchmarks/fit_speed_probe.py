"""The Gaussian fit (recon step 3) of the default preset: seconds per step at a tile size, and what fewer
steps do to the geometry (issue 23's speed target). Development probe behind BENCHMARKS 'Speed of the
default reconstruction'.

    python benchmarks/fit_speed_probe.py steps --data DIR --shape cubby --iterations 60 --tile 4
    python benchmarks/fit_speed_probe.py geometry --data DIR --iterations 100 chair kettlebell plant

`steps`: steps 1-3 only, seconds of step 3 per Adam step. `geometry`: steps 1-5 with the surface fit on (as
`default` runs), the mesh scored by `recon_bench.geometry_metrics` at 1/5 of its samples (texture, held-out
IoU and PSNR not computed). DIR is a `render_gt.py` output. One JSON line per run, with the load average.
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "backend"))
sys.path.insert(0, str(REPO / "benchmarks"))

from make_your_3d.progress import Reporter  # noqa: E402
from make_your_3d.recon.fit import fit_gaussians  # noqa: E402
from make_your_3d.recon.reconstruct import (ReconOptions, _deterministic, _depth_views, _extract_mesh, _fuse,  # noqa: E402
                                            _init_scene, _surface_fit, resolve_device)
from make_your_3d.views import load_views  # noqa: E402


def _load() -> list[str]:
    return open("/proc/loadavg").read().split()[:3]


def run(data: Path, shape: str, iterations: int, tile: int | None, geometry: bool) -> dict:
    t0 = time.time()
    over = {"fit.iterations": iterations, **({"fit.tile_size": tile} if tile else {})}
    cfg = ReconOptions("default").config().with_overrides(over)
    dev = resolve_device("cpu")
    views = load_views(data / shape / "views")
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    row: dict = {"shape": shape, "iterations": iterations, "tile": cfg.fit.tile_size, "load_start": _load()}
    with _deterministic():
        scene = _init_scene(views, cfg, gen, dev)
        t = time.time()
        g, _ = fit_gaussians(scene.gaussians, scene.fit, cfg.fit, scene.size, gen, Reporter("r", None, None),
                             depth_targets=scene.fit_depth)
        row["fit_s"] = round(time.time() - t, 1)
        row["s_per_step"] = round(row["fit_s"] / max(1, iterations), 3)
        if geometry:
            import recon_bench

            dv, _ = _depth_views(g, scene, cfg, dev)
            tsdf, step, sils = _fuse(dv, scene, cfg, dev)
            tsdf, _ = _surface_fit(tsdf, step, scene, cfg, gen, dev)
            mesh, *_ = _extract_mesh(tsdf, scene.lo, step, dv, sils, cfg)
            gt = np.load(data / shape / "gt_mesh.npz")
            full = recon_bench._samples
            recon_bench._samples = lambda m, n, seed: full(m, n // 5, seed)
            try:
                m = recon_bench.geometry_metrics(mesh, trimesh.Trimesh(gt["vertices"], gt["faces"], process=False))
            finally:
                recon_bench._samples = full
            row.update({k: round(float(v), 5) for k, v in m.items()})
            row["steps_1_5_s"] = round(time.time() - t0, 1)
    row["load_end"] = _load()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["steps", "geometry"])
    ap.add_argument("shapes", nargs="+")
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--iterations", type=int, default=60)
    ap.add_argument("--tile", type=int, default=None, help="fit.tile_size (default: the preset's)")
    args = ap.parse_args()
    for shape in args.shapes:
        print(json.dumps(run(args.data, shape, args.iterations, args.tile, args.what == "geometry")), flush=True)


if __name__ == "__main__":
    main()
