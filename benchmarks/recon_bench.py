"""Reconstruction benchmark: ground-truth views (benchmarks/render_gt.py) -> reconstruct -> metrics.

Per shape and preset: Chamfer-L1, F-score@0.02, normal consistency against the ground-truth mesh;
silhouette IoU and colour PSNR on held-out views (the GLB rendered with its texture into cameras the
reconstruction never saw); face count and seconds. Prints a markdown table and writes JSON.

Definitions (units: world units; objects span 1.8):
- Chamfer-L1 = (accuracy + completeness) / 2, accuracy = mean distance from points sampled on the
  reconstruction to the ground truth, completeness = the reverse; distances to dense samples
  (1M on the ground truth, 300k on the reconstruction), nearest neighbour.
- F-score@0.02 = harmonic mean of the fractions of those distances below 0.02.
- Normal consistency = mean |cos| between each sample's face normal and its nearest neighbour's, both ways.
- Held-out IoU: masks (alpha >= 0.5) of the reconstruction rendered at 2x supersampling vs Blender's.
- Held-out PSNR: both images composited on white, over the union of the two masks.

Texture ceiling (`--ceiling`): the ground-truth mesh, unwrapped and baked by the same code from the
same six views, scored on the same held-out views: what the texture path gives with perfect geometry.

Shapes and sets: benchmarks/shape_split.json splits the shapes of render_gt.py once into a tuning set
and a held-out set (`--split tuning|heldout|all`); tune only on the tuning set.
Generated-like views: `--noise none,mild,strong` reconstructs from views degraded by
make_your_3d.recon.degrade (colour/exposure gains, normal tilt and bias, 1 px mask change, a sub-pixel
shift of one view; seeded); metrics are always against the clean ground truth.
Targets (issue 17, default preset): Chamfer-L1 <= 0.008, F@0.02 >= 0.95, held-out IoU >= 0.95, PSNR >=
26 dB, watertight single component; degraded views: Chamfer-L1 <= 0.015, F@0.02 >= 0.85. Each row
lists the targets it misses.

Run: python benchmarks/recon_bench.py --data bench_data --presets default --split all --noise none,mild,strong
     [--out results.json] [--part 0/2] [--ceiling];  --merge a.json,b.json --out all.json joins parts
     [--beside earlier.json,...] (each row beside an earlier method's row of the same shape and noise)
     [--set lift.contact_px=1.0 ...]  (any ReconConfig setting by dotted name, to sweep without editing code)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import trimesh
from scipy.spatial import cKDTree

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "backend"))
from make_your_3d.errors import Make3DError  # noqa: E402
from make_your_3d.recon.reconstruct import ReconOptions, parse_settings, reconstruct  # noqa: E402
from make_your_3d.recon.texture import raster_triangles  # noqa: E402
from make_your_3d.views import load_views  # noqa: E402


def _samples(mesh: trimesh.Trimesh, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    pts, fidx = trimesh.sample.sample_surface(mesh, n, seed=seed)
    return np.asarray(pts), np.asarray(mesh.face_normals[fidx])


def geometry_metrics(pred: trimesh.Trimesh, gt: trimesh.Trimesh, threshold: float = 0.02) -> dict:
    pp, pn = _samples(pred, 300_000, 1)
    gp, gn = _samples(gt, 1_000_000, 2)
    d_acc, i_acc = cKDTree(gp).query(pp, workers=-1)
    d_comp, i_comp = cKDTree(pp).query(gp, workers=-1)
    prec, rec = (d_acc < threshold).mean(), (d_comp < threshold).mean()
    nc = 0.5 * (np.abs((pn * gn[i_acc]).sum(1)).mean() + np.abs((gn * pn[i_comp]).sum(1)).mean())
    return {"chamfer_l1": float((d_acc.mean() + d_comp.mean()) / 2), "accuracy": float(d_acc.mean()),
            "completeness": float(d_comp.mean()), "fscore": float(2 * prec * rec / max(prec + rec, 1e-9)),
            "normal_consistency": float(nc)}


def render_textured(mesh: trimesh.Trimesh, c2w: np.ndarray, ortho: tuple[float, float], size: int, ss: int = 2):
    """Colour (H,W,3) in [0,1] and alpha (H,W) of a textured mesh in an orthographic contract camera."""
    tex = np.asarray(mesh.visual.material.baseColorTexture.convert("RGB")).astype(np.float32) / 255.0
    n = size * ss
    w2c = np.linalg.inv(c2w)
    cam = np.asarray(mesh.vertices) @ w2c[:3, :3].T + w2c[:3, 3]
    uvpix = np.stack([(cam[:, 0] / ortho[0] + 0.5) * n, (cam[:, 1] / ortho[1] + 0.5) * n], -1)
    f = torch.tensor(np.asarray(mesh.faces))
    fid, bary, _ = raster_triangles(torch.tensor(uvpix, dtype=torch.float32)[f], torch.tensor(cam[:, 2], dtype=torch.float32)[f], n, n)
    hit = fid >= 0
    uv = (torch.tensor(mesh.visual.uv, dtype=torch.float32)[f[fid[hit]]] * bary[hit][..., None]).sum(1)
    grid = torch.stack([uv[:, 0] * 2 - 1, (1 - uv[:, 1]) * 2 - 1], -1)[None, None]
    col = torch.nn.functional.grid_sample(torch.tensor(tex).permute(2, 0, 1)[None], grid, mode="bilinear",
                                          padding_mode="border", align_corners=False)[0, :, 0].T
    img = torch.zeros(n, n, 3)
    img[hit] = col
    a = hit.float()
    img = img.reshape(size, ss, size, ss, 3).mean((1, 3)).numpy()
    a = a.reshape(size, ss, size, ss).mean((1, 3)).numpy()
    return img, a


def heldout_metrics(mesh: trimesh.Trimesh, folder: Path) -> dict:
    vs = load_views(folder)
    ious, psnrs = [], []
    for v in vs.views:
        W, H = v.size
        prem, a = render_textured(mesh, v.c2w, v.ortho_size, W)
        gt = v.color.astype(np.float32) / 255.0
        ga = gt[..., 3]
        pm, gm = a >= 0.5, ga >= 0.5
        ious.append((pm & gm).sum() / max((pm | gm).sum(), 1))
        pred_white = prem + (1 - a[..., None])  # prem is premultiplied (mean of hit colours)
        gt_white = gt[..., :3] * ga[..., None] + (1 - ga[..., None])
        u = pm | gm
        mse = float(((pred_white - gt_white) ** 2)[u].mean())
        psnrs.append(10 * np.log10(1.0 / max(mse, 1e-10)))
    return {"heldout_iou": float(np.mean(ious)), "heldout_psnr": float(np.mean(psnrs))}


def texture_ceiling(folder: Path, texture_size: int = 2048) -> dict:
    """Held-out IoU and PSNR of the ground-truth mesh textured by our bake from the input views."""
    from make_your_3d.recon.glb import textured_mesh, write_glb
    from make_your_3d.recon.reconstruct import _full_res_sources
    from make_your_3d.recon.texture import bake, unwrap

    g = np.load(folder / "gt_mesh.npz")
    v, f = trimesh.remesh.subdivide_to_size(g["vertices"], g["faces"], 0.03)[:2]
    gt = trimesh.Trimesh(v, f, process=True)
    sources, _ = _full_res_sources(load_views(folder / "views"), torch.device("cpu"))
    uvm = unwrap(gt, texture_size)
    texture, _ = bake(uvm, sources, texture_size, depth_tol=0.017)
    out = write_glb(textured_mesh(uvm, texture), folder / "ceiling.glb")
    return heldout_metrics(trimesh.load(out, force="mesh"), folder / "heldout")


TARGETS = {  # issue 17: default preset, every shape; degraded views get the looser geometry targets
    "none": {"chamfer_l1": ("<=", 0.008), "fscore": (">=", 0.95), "heldout_iou": (">=", 0.95),
             "heldout_psnr": (">=", 26.0), "watertight": ("==", True), "components": ("==", 1)},
    "degraded": {"chamfer_l1": ("<=", 0.015), "fscore": (">=", 0.85), "watertight": ("==", True),
                 "components": ("==", 1)},
}


def misses(row: dict) -> list[str]:
    """Names of the issue's targets this row misses (targets are stated for the default preset)."""
    if row["preset"] != "default":
        return []
    out = []
    for key, (op, val) in TARGETS["none" if row["noise"] == "none" else "degraded"].items():
        v = row[key]
        ok = v <= val if op == "<=" else v >= val if op == ">=" else v == val
        if not ok:
            out.append(key)
    return out


def load_split() -> dict:
    return json.loads((Path(__file__).parent / "shape_split.json").read_text())


def _write_json(path: Path, doc: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path)


def print_table(rows: list[dict]) -> None:
    head = ("| set | shape | preset | noise | Chamfer-L1 | F@0.02 | normal cons. | held-out IoU | held-out PSNR (dB) "
            "| faces | watertight (components) | seconds | load avg | misses |")
    print("\n" + head + "\n|" + "---|" * 14)
    for r in rows:
        print(f"| {r['set']} | {r['shape']} | {r['preset']} | {r['noise']} | {r['chamfer_l1']:.4f} | {r['fscore']:.3f} | "
              f"{r['normal_consistency']:.3f} | {r['heldout_iou']:.3f} | {r['heldout_psnr']:.1f} | {r['faces']} | "
              f"{'yes' if r['watertight'] else 'no'} ({r['components']}) | {r['seconds']:.0f} | {r['load_avg'][0]:.1f} | "
              f"{', '.join(r['misses']) or '-'} |")


def earlier_rows(paths: list[str]) -> dict[tuple[str, str], dict]:
    """(shape, noise) -> an earlier method's row, from recon_bench results or the surface-fit harness's
    results (rows with `surf: false` are the method before the fit; "cubby_strong" is cubby under strong)."""
    out: dict[tuple[str, str], dict] = {}
    for path in paths:
        doc = json.loads(Path(path).read_text())
        for r in doc["rows"] if isinstance(doc, dict) else doc:
            if r.get("surf") is True or r.get("preset", "default") != "default":
                continue
            shape, _, noise = r["shape"].partition("_")
            out.setdefault((shape, r.get("noise") or noise or "none"), {**r, "from": Path(path).name})
    return out


def beside_table(rows: list[dict], before: dict[tuple[str, str], dict], worse: float = 0.10) -> str:
    """Each row with the earlier method's row for the same shape and noise, and which of Chamfer-L1,
    F@0.02, held-out IoU and PSNR got worse by more than `worse` (relative; PSNR: in linear error)."""
    def fmt(r: dict | None, key: str, spec: str) -> str:
        return "-" if r is None or r.get(key) is None else format(r[key], spec)

    def regressed(new: dict, old: dict | None) -> list[str]:
        if old is None:
            return []
        out = []
        if old.get("chamfer_l1") and new["chamfer_l1"] > old["chamfer_l1"] * (1 + worse):
            out.append("Chamfer")
        for key, name in (("fscore", "F"), ("heldout_iou", "IoU")):
            if old.get(key) and new[key] < old[key] * (1 - worse):
                out.append(name)
        if old.get("heldout_psnr") and 10 ** ((old["heldout_psnr"] - new["heldout_psnr"]) / 10) > 1 + worse:
            out.append("PSNR")
        return out

    lines = ["| set | shape | noise | Chamfer-L1 (before) | F@0.02 (before) | held-out IoU (before) | PSNR dB (before) "
             "| watertight (parts) | seconds | load | misses | >10% worse |", "|" + "---|" * 12]
    for r in rows:
        o = before.get((r["shape"], r["noise"]))
        lines.append(f"| {r['set']} | {r['shape']} | {r['noise']} | {r['chamfer_l1']:.4f} ({fmt(o, 'chamfer_l1', '.4f')}) | "
                     f"{r['fscore']:.3f} ({fmt(o, 'fscore', '.3f')}) | {r['heldout_iou']:.3f} ({fmt(o, 'heldout_iou', '.3f')}) | "
                     f"{r['heldout_psnr']:.1f} ({fmt(o, 'heldout_psnr', '.1f')}) | {'yes' if r['watertight'] else 'no'} "
                     f"({r['components']}) | {r['seconds']:.0f} | {r['load_avg'][0]:.1f} | {', '.join(r['misses']) or '-'} | "
                     f"{', '.join(regressed(r, o)) or '-'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="reconstruction benchmark")
    ap.add_argument("--data", default="bench_data")
    ap.add_argument("--presets", default="default")
    ap.add_argument("--split", default="all", choices=["tuning", "heldout", "fresh", "all"],
                    help="which shapes of shape_split.json (tune on 'tuning' only; 'heldout' and issue 23's 'fresh' "
                         "set are for reporting; 'all' is all three)")
    ap.add_argument("--shapes", default=None, help="comma list (overrides --split)")
    ap.add_argument("--noise", default="none", help="comma list of view degradations: none, mild, strong (recon/degrade.py)")
    ap.add_argument("--noise-seed", type=int, default=0)
    ap.add_argument("--part", default="0/1", help="i/n: run every n-th job from the i-th (split one run over n processes)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--work", default=None, help="where GLBs go (default: DATA/<shape>/recon_<shape>_<preset>_<noise>.glb)")
    ap.add_argument("--out", default=None, help="JSON results file (rewritten after every shape)")
    ap.add_argument("--merge", default=None, help="comma list of result files: print their rows as one table and exit")
    ap.add_argument("--beside", default=None, help="with --merge: comma list of earlier result files; print each row "
                    "with the earlier row of the same shape and noise, and what got worse by more than 10%%")
    ap.add_argument("--ceiling", action="store_true", help="also score the ground-truth mesh baked by our code")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="override a reconstruction setting (recon/config.py), e.g. lift.contact_px=1.0; repeatable")
    args = ap.parse_args(argv)
    try:  # a bad name or value stops here, before any run
        overrides = parse_settings(args.set)
        for preset in filter(None, args.presets.split(",")):
            ReconOptions(preset=preset, **overrides).config()
    except Make3DError as exc:
        ap.error(exc.message)
    if args.merge:
        docs = [json.loads(Path(f).read_text()) for f in args.merge.split(",")]
        rows = [r for d in docs for r in d["rows"]]
        order = {n: i for i, n in enumerate(["none", "mild", "strong"])}
        sets = {"tuning": 0, "heldout": 1, "fresh": 2}
        rows.sort(key=lambda r: (r["preset"], order.get(r["noise"], 9), sets.get(r["set"], 3), r["shape"]))
        if args.beside:
            print(beside_table(rows, earlier_rows(args.beside.split(","))))
        else:
            print_table(rows)
        if args.out:
            _write_json(Path(args.out), {"meta": [d["meta"] for d in docs], "rows": rows,
                                         "ceiling": {k: v for d in docs for k, v in d.get("ceiling", {}).items()}})
        return 0
    from make_your_3d.recon.degrade import degrade, strength

    data = Path(args.data)
    split = load_split()
    set_of = {s: k for k in ("tuning", "heldout", "fresh") for s in split.get(k, [])}
    if args.shapes:
        shapes = args.shapes.split(",")
    elif args.split == "all":
        shapes = split["tuning"] + split["heldout"] + split["fresh"]
    else:
        shapes = split[args.split]
    for shape in shapes:
        if not (data / shape / "views").is_dir():
            raise SystemExit(f"no views for shape {shape!r} in {data}: run benchmarks/render_gt.py --out {data} first")
    noises = [n for n in args.noise.split(",") if n]
    for n in noises:
        strength(n)  # a clear error for an unknown name before any work
    part, nparts = (int(x) for x in args.part.split("/"))
    jobs = [(p, n, s) for p in filter(None, args.presets.split(",")) for n in noises for s in shapes][part::nparts]
    meta = {"overrides": overrides, "machine": f"{platform.machine()} {os.cpu_count()} CPUs", "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_avg_start": os.getloadavg(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "torch_threads": torch.get_num_threads(),
            "part": args.part, "noise_seed": args.noise_seed, "split": split}
    rows = []
    for preset, noise, shape in jobs:
        d = data / shape
        g = np.load(d / "gt_mesh.npz")
        gt = trimesh.Trimesh(g["vertices"], g["faces"], process=False)
        glb = Path(args.work or d) / f"recon_{shape}_{preset}_{noise}.glb"
        glb.parent.mkdir(parents=True, exist_ok=True)
        views = degrade(load_views(d / "views"), strength(noise, seed=args.noise_seed))
        load0 = os.getloadavg()
        t = time.perf_counter()
        res = reconstruct(views, glb, ReconOptions(preset=preset, device=args.device, **overrides))
        secs = time.perf_counter() - t
        mesh = trimesh.load(glb, force="mesh")
        welded = trimesh.Trimesh(np.asarray(mesh.vertices), np.asarray(mesh.faces), process=True)
        row = {"set": set_of.get(shape, "other"), "shape": shape, "preset": preset, "noise": noise,
               "faces": res.faces, "seconds": round(secs, 1), "timings": res.timings,
               "watertight": bool(res.record["watertight"]), "components": len(welded.split(only_watertight=False)),
               "device": res.record["device"], "load_avg": [round(x, 2) for x in load0],
               "load_avg_end": [round(x, 2) for x in os.getloadavg()]}
        if "surface_fit" in res.record:  # issue 23: what the global fit carved, the view weights it found
            row["surface_fit"] = res.record["surface_fit"]
        row.update(geometry_metrics(mesh, gt))
        row.update(heldout_metrics(mesh, d / "heldout"))
        row["misses"] = misses(row)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            _write_json(Path(args.out), {"meta": meta, "rows": rows, "ceiling": {}})
    ceiling = {}
    if args.ceiling:
        for shape in shapes:
            ceiling[shape] = texture_ceiling(data / shape)
            print(json.dumps({"shape": shape, "ceiling": ceiling[shape]}), flush=True)
    print_table(rows)
    if args.out:
        meta["load_avg_end"] = os.getloadavg()
        _write_json(Path(args.out), {"meta": meta, "rows": rows, "ceiling": ceiling})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
