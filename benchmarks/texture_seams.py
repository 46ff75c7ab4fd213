"""Seam pixels of a mip-mapped texture at distant views, by chart padding and gutter fill (issue 26.4).

    python benchmarks/texture_seams.py [--mesh GLB_OR_NPZ] [--size 1024] [--views 64,32] [--json out.json]

A mesh (default: a bumpy sphere simplified to 20k faces, about a reconstruction's chart count; or a
benchmark ground-truth mesh, gt_mesh.npz) is unwrapped by the reconstruction's `unwrap` with each
padding, and each texel of its charts gets the exact colour of a smooth 3D colour field at its surface
point (so any error is the atlas's, not the bake's). The gutters are then left black (no fill) or filled
by the reconstruction's `dilate` (each empty texel copies its nearest chart texel). The textured mesh is
rendered at small sizes, as a GPU does at a distance: a mip pyramid of 2x2 box averages and trilinear
lookups at the level of each face's texel footprint (max of the UV derivatives' lengths). The
reference is the same render with the colour field itself at each pixel; a pixel whose colour differs
from it by more than 0.1 (max over channels) is a seam pixel. Reports the share of the object's pixels
that are seam pixels, per padding, fill and view size (median over 8 view directions).
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "backend"))
from make_your_3d.recon.camera import orbit_c2w  # noqa: E402
from make_your_3d.recon.config import BakeConfig  # noqa: E402
from make_your_3d.recon.texture import chart_texels, dilate, raster_triangles, unwrap  # noqa: E402

THRESHOLD = 0.1


def colour_field(p: np.ndarray) -> np.ndarray:
    """A smooth colour per surface point (N,3) in [0,1], varying a few times across the object."""
    return 0.5 + 0.45 * np.sin(np.stack([3.1 * p[:, 0] + 0.3, 2.7 * p[:, 1] + 1.1, 3.3 * p[:, 2] + 2.0], 1)
                               + np.sin(2.0 * p[:, [1, 2, 0]]))


def ideal_atlas(uvm, size: int, fill: bool) -> np.ndarray:
    tx = chart_texels(uvm, size)
    P = tx.interpolate(torch.tensor(uvm.vertices, dtype=torch.float64), torch.tensor(uvm.faces)).numpy()
    img = np.zeros((size, size, 3))
    chart = tx.chart.numpy()
    img[chart] = colour_field(P)
    return dilate(img, chart) if fill else img


def mip_pyramid(img: np.ndarray) -> list[torch.Tensor]:
    levels = [torch.tensor(img, dtype=torch.float32).permute(2, 0, 1)[None]]
    while levels[-1].shape[-1] > 1:
        levels.append(torch.nn.functional.avg_pool2d(levels[-1], 2))
    return levels


def trilinear(levels: list[torch.Tensor], uv: torch.Tensor, lod: torch.Tensor) -> torch.Tensor:
    """GPU-style LINEAR_MIPMAP_LINEAR lookups (N,3) at glTF-style UVs (v down) and level of detail."""
    lod = lod.clamp(0, len(levels) - 1)
    lo = lod.floor().long()
    hi = (lo + 1).clamp(max=len(levels) - 1)
    frac = (lod - lo.float())[:, None]
    grid = (uv * 2 - 1)[None, None].float()

    def at(level_idx: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(uv.shape[0], 3)
        for k in torch.unique(level_idx).tolist():
            m = level_idx == k
            out[m] = torch.nn.functional.grid_sample(levels[k], grid[:, :, m], mode="bilinear", padding_mode="border",
                                                     align_corners=False)[0, :, 0].T
        return out

    return at(lo) * (1 - frac) + at(hi) * frac


def render(uvm, atlas_levels, c2w: np.ndarray, size: int, ss: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(size,size,3) mip-mapped render, the colour field's own render (both box-averaged from ss x ss
    samples, each sample looked up at the footprint of a `size` pixel) and the coverage."""
    n = size * ss
    w2c = np.linalg.inv(c2w)
    cam = uvm.vertices @ w2c[:3, :3].T + w2c[:3, 3]
    ext = 1.05 * np.abs(uvm.vertices).max() * 2
    pix = np.stack([(cam[:, 0] / ext + 0.5) * n, (cam[:, 1] / ext + 0.5) * n], -1)
    f = torch.tensor(uvm.faces)
    fid, bary, _ = raster_triangles(torch.tensor(pix, dtype=torch.float32)[f], torch.tensor(cam[:, 2], dtype=torch.float32)[f], n, n)
    hit = fid >= 0
    faces = f[fid[hit]]
    b = bary[hit].double()
    uv = torch.tensor(np.stack([uvm.uvs[:, 0], 1 - uvm.uvs[:, 1]], 1))
    uvs = (uv[faces] * b[..., None]).sum(1)
    P = (torch.tensor(uvm.vertices)[faces] * b[..., None]).sum(1).numpy()
    # each face's texel footprint per output pixel (orthographic: constant over the face)
    s = torch.tensor(pix / ss)[faces]
    t = uv[faces] * atlas_levels[0].shape[-1]
    S = torch.stack([s[:, 1] - s[:, 0], s[:, 2] - s[:, 0]], -1)  # (N,2,2): columns are screen edges
    T = torch.stack([t[:, 1] - t[:, 0], t[:, 2] - t[:, 0]], -1)
    det = torch.linalg.det(S)
    ok = det.abs() > 1e-12
    J = T @ torch.linalg.inv(torch.where(ok[:, None, None], S, torch.eye(2, dtype=S.dtype).expand_as(S)))
    rho = torch.maximum(J[:, :, 0].norm(dim=-1), J[:, :, 1].norm(dim=-1))
    lod = torch.log2(rho.clamp_min(1e-6)).float()
    col = trilinear(atlas_levels, uvs, lod).numpy()
    img = np.zeros((n, n, 3))
    ref = np.zeros((n, n, 3))
    h = hit.numpy()
    img[h], ref[h] = col, colour_field(P)
    cov = h.reshape(size, ss, size, ss).mean((1, 3))
    box = lambda x: x.reshape(size, ss, size, ss, 3).mean((1, 3))  # noqa: E731
    return box(img), box(ref), cov


def seam_share(uvm, atlas: np.ndarray, view_size: int) -> float:
    levels = mip_pyramid(atlas)
    shares = []
    for az in range(0, 360, 45):
        img, ref, cov = render(uvm, levels, orbit_c2w(az + 10, 20 if az % 90 else -15), view_size)
        inside = cov > 0.99  # interior pixels: silhouette pixels mix with the background in both
        bad = (np.abs(img - ref).max(-1) > THRESHOLD) & inside
        shares.append(bad.sum() / max(inside.sum(), 1))
    return float(np.median(shares))


def load_mesh(path: Path | None) -> trimesh.Trimesh:
    from make_your_3d.recon.mesh import simplify

    if path is None:
        s = trimesh.creation.icosphere(subdivisions=6, radius=0.8)
        d = s.vertices / np.linalg.norm(s.vertices, axis=1, keepdims=True)
        r = 0.8 + 0.05 * np.sin(7 * d[:, 0]) * np.sin(7 * d[:, 1]) * np.sin(7 * d[:, 2] + 1)
        return simplify(trimesh.Trimesh(d * r[:, None], s.faces, process=True), 20000)[0]
    if path.suffix == ".npz":
        g = np.load(path)
        return trimesh.Trimesh(g["vertices"], g["faces"], process=True)
    return trimesh.load(path, force="mesh")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mesh", type=Path, default=None)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--views", default="128,64,32")
    ap.add_argument("--padding-per", default="256,128,64,32", help="texture side / padding texels (BakeConfig.padding_per)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    mesh = load_mesh(args.mesh)
    views = [int(v) for v in args.views.split(",")]
    meta = {"machine": f"{platform.machine()} {os.cpu_count()} CPUs", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "load": os.getloadavg()[0], "faces": len(mesh.faces), "size": args.size, "threshold": THRESHOLD}
    rows = []
    for per in [int(x) for x in args.padding_per.split(",")]:
        cfg = BakeConfig(padding_per=per)
        uvm = unwrap(mesh, args.size, cfg)
        charts_share = float(chart_texels(uvm, args.size).chart.float().mean())
        for fill in (False, True):
            atlas = ideal_atlas(uvm, args.size, fill)
            row = {"padding_texels": max(cfg.padding_min, args.size // per), "fill": "nearest chart texel" if fill else "none",
                   "chart_share": round(charts_share, 4)}
            for v in views:
                row[f"seam_share_{v}px"] = round(seam_share(uvm, atlas, v), 4)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    keys = [f"seam_share_{v}px" for v in views]
    print("\n| padding (texels) | gutter fill | texels in charts | " + " | ".join(f"seam pixels at {v} px" for v in views) + " |")
    print("|---|---|---|" + "---|" * len(views))
    for r in rows:
        print(f"| {r['padding_texels']} | {r['fill']} | {r['chart_share']:.1%} | " + " | ".join(f"{r[k]:.2%}" for k in keys) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
