"""Shading-normal error of the reconstructed asset at the benchmark's held-out views, with and without
its normal map (issue 26.1).

    python benchmarks/normal_map_bench.py --data bench_data [--preset fast] [--split all] [--out results.json]
        [--set mesh.faces=5000 ...]

For each shape: reconstruct the six views (benchmarks/render_gt.py's `views/`) into a GLB, then, in each
held-out camera (`heldout/`, views the reconstruction never saw), compute per pixel the shading normal a
glTF renderer gives the simplified mesh: the interpolated vertex normal (without the map), and
normalize(x T + y B + z N) with (x, y, z) read (bilinear) from the normal map and the file's MikkTSpace
tangents (with it). Error = the angle to the true surface normal (the held-out normal PNG rendered by
Blender from the ground-truth mesh), over the pixels inside both silhouettes. Reports the mean angle
(degrees) without and with the map, their ratio, and the fine surface's own error (the floor the map
can reach: the marching-cubes mesh before simplification, rendered the same way, when `--floor`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import struct
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "backend"))
from make_your_3d.recon.texture import raster_triangles  # noqa: E402

_DTYPES = {5126: np.float32, 5125: np.uint32, 5123: np.uint16, 5121: np.uint8}
_WIDTH = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4}


def read_glb(path: Path) -> dict:
    """The first primitive's arrays and the material's decoded images of a GLB (our writer's layout:
    tightly packed accessors). Keys: positions, normals, tangents (or None), uvs (glTF, v down), faces,
    images {'baseColor'|'normal'|'orm': (H,W,3) float in [0,1]}, normal_scale, doc (the JSON)."""
    import io

    from PIL import Image

    data = Path(path).read_bytes()
    json_len = struct.unpack_from("<I", data, 12)[0]
    doc = json.loads(data[20:20 + json_len])
    bin_start = 20 + json_len + 8
    blob = data[bin_start:]

    def view_bytes(i: int) -> bytes:
        v = doc["bufferViews"][i]
        return blob[v.get("byteOffset", 0):v.get("byteOffset", 0) + v["byteLength"]]

    def accessor(i: int) -> np.ndarray:
        a = doc["accessors"][i]
        arr = np.frombuffer(view_bytes(a["bufferView"]), _DTYPES[a["componentType"]], a["count"] * _WIDTH[a["type"]],
                            a.get("byteOffset", 0))
        return arr.reshape(a["count"], _WIDTH[a["type"]]) if _WIDTH[a["type"]] > 1 else arr

    prim = doc["meshes"][0]["primitives"][0]
    att = prim["attributes"]
    mat = doc["materials"][prim["material"]]

    def image(tex: dict | None) -> np.ndarray | None:
        if tex is None:
            return None
        src = doc["textures"][tex["index"]]["source"]
        img = Image.open(io.BytesIO(view_bytes(doc["images"][src]["bufferView"]))).convert("RGB")
        return np.asarray(img, np.float32) / 255.0

    pbr = mat.get("pbrMetallicRoughness", {})
    return {"positions": accessor(att["POSITION"]).astype(np.float64), "normals": accessor(att["NORMAL"]).astype(np.float64),
            "tangents": accessor(att["TANGENT"]).astype(np.float64) if "TANGENT" in att else None,
            "uvs": accessor(att["TEXCOORD_0"]).astype(np.float64), "faces": accessor(prim["indices"]).reshape(-1, 3).astype(np.int64),
            "images": {"baseColor": image(pbr.get("baseColorTexture")), "normal": image(mat.get("normalTexture")),
                       "orm": image(mat.get("occlusionTexture"))},
            "normal_scale": float(mat.get("normalTexture", {}).get("scale", 1.0)), "doc": doc}


def _bilinear(img: np.ndarray, uv: torch.Tensor) -> torch.Tensor:
    """Bilinear lookup of (H,W,C) at glTF UVs (N,2) (v down, texel centres at (i + 0.5) / size)."""
    grid = (uv * 2 - 1).float()[None, None]
    t = torch.tensor(img, dtype=torch.float32).permute(2, 0, 1)[None]
    return torch.nn.functional.grid_sample(t, grid, mode="bilinear", padding_mode="border", align_corners=False)[0, :, 0].T


def shading_normals(glb: dict, c2w: np.ndarray, ortho: tuple[float, float], size: int, use_map: bool,
                    flip_green: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """World shading normals (size,size,3) and a hit mask (size,size) of the GLB's mesh in an orthographic
    contract camera (one sample per pixel centre). `flip_green`: read the map with -Y (a wrong variant)."""
    w2c = np.linalg.inv(c2w)
    cam = glb["positions"] @ w2c[:3, :3].T + w2c[:3, 3]
    pix = np.stack([(cam[:, 0] / ortho[0] + 0.5) * size, (cam[:, 1] / ortho[1] + 0.5) * size], -1)
    f = torch.tensor(glb["faces"])
    fid, bary, _ = raster_triangles(torch.tensor(pix, dtype=torch.float32)[f], torch.tensor(cam[:, 2], dtype=torch.float32)[f],
                                    size, size)
    hit = fid >= 0
    b = bary[hit].double()
    corners = f[fid[hit]]

    def interp(values: np.ndarray) -> torch.Tensor:
        return (torch.tensor(values)[corners] * b[..., None]).sum(1)

    N = interp(glb["normals"])
    out = torch.nn.functional.normalize(N, dim=-1)
    if use_map and glb["images"]["normal"] is not None and glb["tangents"] is not None:
        T = interp(glb["tangents"][:, :3])
        w = torch.tensor(glb["tangents"][:, 3])[corners[:, 0]]
        B = w[:, None] * torch.cross(N, T, dim=-1)
        ts = _bilinear(glb["images"]["normal"], interp(glb["uvs"])).double() * 2 - 1
        ts[:, :2] *= glb["normal_scale"]
        if flip_green:
            ts[:, 1] = -ts[:, 1]
        out = torch.nn.functional.normalize(ts[:, :1] * T + ts[:, 1:2] * B + ts[:, 2:] * N, dim=-1)
    img = np.zeros((size, size, 3))
    img[hit.numpy()] = out.numpy()
    return img, hit.numpy()


def angle_error(pred: np.ndarray, hit: np.ndarray, true: np.ndarray, mask: np.ndarray) -> tuple[float, int]:
    """Mean angle (degrees) between unit normals over pixels in both masks, and how many pixels."""
    m = hit & mask
    if not m.any():
        return float("nan"), 0
    t = true[m] / np.linalg.norm(true[m], axis=1, keepdims=True).clip(1e-9)
    cos = np.clip((pred[m] * t).sum(1), -1, 1)
    return float(np.degrees(np.arccos(cos)).mean()), int(m.sum())


def heldout_normal_errors(glb_path: Path, heldout: Path, fine_glb: Path | None = None) -> dict:
    """Mean shading-normal angle error over the held-out views: without the map, with it (and the fine
    surface's, if given)."""
    from make_your_3d.views import load_views

    glb = read_glb(glb_path)
    fine = read_glb(fine_glb) if fine_glb else None
    vs = load_views(heldout)
    errs: dict[str, list[float]] = {"without": [], "with": [], "fine": []}
    for v in vs.views:
        W, _ = v.size
        true = v.normal[..., :3].astype(np.float64) / 255.0 * 2 - 1
        mask = v.normal[..., 3] >= 128
        for key, use in (("without", False), ("with", True)):
            pred, hit = shading_normals(glb, v.c2w, v.ortho_size, W, use)
            errs[key].append(angle_error(pred, hit, true, mask)[0])
        if fine is not None:
            pred, hit = shading_normals(fine, v.c2w, v.ortho_size, W, False)
            errs["fine"].append(angle_error(pred, hit, true, mask)[0])
    out = {f"{k}_deg": float(np.mean(x)) for k, x in errs.items() if x}
    out["ratio"] = out["without_deg"] / max(out["with_deg"], 1e-9)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="bench_data")
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--split", default="all", choices=["tuning", "heldout", "fresh", "all"])
    ap.add_argument("--shapes", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    args = ap.parse_args(argv)
    from make_your_3d.recon.reconstruct import ReconOptions, parse_settings, reconstruct

    split = json.loads((Path(__file__).parent / "shape_split.json").read_text())
    shapes = args.shapes.split(",") if args.shapes else (split["tuning"] + split["heldout"] if args.split == "all"
                                                          else split[args.split])
    overrides = parse_settings(args.set)
    meta = {"machine": f"{platform.machine()} {os.cpu_count()} CPUs", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "preset": args.preset, "overrides": overrides, "torch_threads": torch.get_num_threads()}
    rows = []
    for shape in shapes:
        d = Path(args.data) / shape
        glb = d / f"normalmap_{shape}_{args.preset}.glb"
        load0 = os.getloadavg()[0]
        t = time.perf_counter()
        res = reconstruct(d / "views", glb, ReconOptions(preset=args.preset, **overrides))
        secs = time.perf_counter() - t
        row = {"shape": shape, "faces": res.faces, "seconds": round(secs, 1), "maps_seconds": res.timings.get("maps"),
               "load": round(load0, 2), "maps": res.record.get("maps"), **heldout_normal_errors(glb, d / "heldout")}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print("\n| shape | faces | without map (deg) | with map (deg) | ratio |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['faces']} | {r['without_deg']:.2f} | {r['with_deg']:.2f} | {r['ratio']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
