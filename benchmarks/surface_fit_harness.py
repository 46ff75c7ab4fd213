"""The surface fit (recon step 4b) with and without, from one cached fused field per shape: the
development harness behind BENCHMARKS 'Global surface fit' (issue 23).

Why not `recon_bench.py`: a whole reconstruction row takes 6-27 minutes on the shared 2-core VM, most
of it the Gaussian fit (steps 1-4), which the surface fit does not change. Here steps 1-4 run once per
shape (and noise level) and their fused field is saved; then step 4b (the fit) and step 5 (the mesh)
run from it with the fit off and on, and both meshes are scored by `recon_bench.geometry_metrics`
against the shape's true mesh. Texture, held-out IoU and PSNR are not computed.

    python benchmarks/surface_fit_harness.py cache --data DIR --cache DIR [--noise strong] SHAPE...
    python benchmarks/surface_fit_harness.py compare --data DIR --cache DIR [--noise strong] [--sample-div 5] SHAPE...

DIR is a `render_gt.py` output (one folder per shape with views/ and gt_mesh.npz). `compare` prints
one JSON row per shape and setting (metrics, the fit's record, seconds, load average).
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
from make_your_3d.recon.degrade import degrade, strength  # noqa: E402
from make_your_3d.recon.fit import fit_gaussians  # noqa: E402
from make_your_3d.recon.reconstruct import (ReconOptions, _deterministic, _depth_views, _extract_mesh, _fuse,  # noqa: E402
                                            _init_scene, _surface_fit, resolve_device)
from make_your_3d.views import load_views  # noqa: E402


def _cache_path(cache: Path, shape: str, noise: str) -> Path:
    return cache / (f"{shape}.pt" if noise == "none" else f"{shape}_{noise}.pt")


def cache_fused(data: Path, cache: Path, shapes: list[str], noise: str) -> None:
    """Steps 1-4 of the default preset, once per shape: what step 4b and 5 read."""
    cache.mkdir(parents=True, exist_ok=True)
    for shape in shapes:
        out = _cache_path(cache, shape, noise)
        if out.exists():
            continue
        t = time.time()
        cfg = ReconOptions("default").config()
        device = resolve_device("cpu")
        views = load_views(data / shape / "views")
        if noise != "none":
            views = degrade(views, strength(noise, seed=0))
        gen = torch.Generator().manual_seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        with _deterministic():
            scene = _init_scene(views, cfg, gen, device)
            g, _ = fit_gaussians(scene.gaussians, scene.fit, cfg.fit, scene.size, gen, Reporter("r", None, None),
                                 step_offset=0, total_steps=cfg.fit.iterations + 5, depth_targets=scene.fit_depth)
            dv, _ = _depth_views(g, scene, cfg, device)
            tsdf, step, sils = _fuse(dv, scene, cfg, device)
        torch.save({"tsdf": tsdf, "step": step, "lo": scene.lo, "hi": scene.hi, "fuse": scene.fuse, "dv": dv,
                    "sils": sils}, out)
        print(json.dumps({"shape": shape, "noise": noise, "steps_1_4_s": round(time.time() - t, 1)}), flush=True)


class _Scene:
    def __init__(self, c: dict):
        self.lo, self.hi, self.fuse = c["lo"], c["hi"], c["fuse"]


def compare(data: Path, cache: Path, shapes: list[str], noise: str, sample_div: int) -> None:
    import recon_bench

    full = recon_bench._samples
    recon_bench._samples = lambda m, n, seed: full(m, n // sample_div, seed)  # fewer samples: the time
    for shape in shapes:
        c = torch.load(_cache_path(cache, shape, noise), weights_only=False)
        g = np.load(data / shape / "gt_mesh.npz")
        truth = trimesh.Trimesh(g["vertices"], g["faces"], process=False)
        for on in (False, True):
            cfg = ReconOptions("default").config().with_overrides({"surf.enabled": on})
            t = time.time()
            tsdf, rec = c["tsdf"], {}
            if on:
                tsdf, rec = _surface_fit(c["tsdf"], c["step"], _Scene(c), cfg, torch.Generator().manual_seed(cfg.seed),
                                         torch.device("cpu"))
            fit_s = time.time() - t
            mesh, *_ = _extract_mesh(tsdf, c["lo"], c["step"], c["dv"], c["sils"], cfg)
            m = recon_bench.geometry_metrics(mesh, truth)
            rec.pop("stages", None)
            if "carve" in rec:
                rec["carve"] = {k: v for k, v in rec["carve"].items() if k != "voting"}
            print(json.dumps({"shape": shape, "noise": noise, "surf": on,
                              **{k: round(float(v), 5) for k, v in m.items() if isinstance(v, (int, float))},
                              "components": len(mesh.split(only_watertight=False)), "watertight": bool(mesh.is_watertight),
                              "fit_s": round(fit_s, 1), "record": rec, "sample_div": sample_div,
                              "load": open("/proc/loadavg").read().split()[:3]}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["cache", "compare"])
    ap.add_argument("shapes", nargs="+")
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--noise", default="none", help="none, mild or strong (recon/degrade.py, seed 0)")
    ap.add_argument("--sample-div", type=int, default=5, help="score with 1/N of recon_bench's samples")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.what == "cache":
        cache_fused(args.data, args.cache, args.shapes, args.noise)
    else:
        compare(args.data, args.cache, args.shapes, args.noise, args.sample_div)


if __name__ == "__main__":
    main()
