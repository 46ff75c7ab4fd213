"""Seconds of the add-on's Quad Remesh (QuadriFlow + two Cycles bakes) at 10k and 40k faces.

    python benchmarks/quad_bench.py [--faces 10000,40000] [--texture 1024] [--json PATH]

Runs in the `bpy` module (Blender as a Python module, the test extras). The original is a textured
icosphere of 82k triangles (a generated mesh before simplification has about that many), imported
by the add-on's own importer; `blender_addon/quad.py` then remeshes it. Reports per target: faces,
quad share, seconds (median of `--repeats`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _module(name: str):
    """An add-on module that needs only bpy, loaded from its file (the add-on package needs Blender's extension system)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "blender_addon" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def sphere_glb(path: Path, subdivisions: int = 6) -> Path:
    """An icosphere of radius 0.5 (82k triangles at 6 subdivisions; closed and manifold, as the
    reconstruction's meshes are) whose texture is a smooth gradient of its own spherical UVs
    (R = u, G = v), so the colour a point should have follows from its direction: the add-on's quad
    test checks a bake with it."""
    import numpy as np
    import PIL.Image
    import trimesh

    s = trimesh.creation.icosphere(subdivisions=subdivisions, radius=0.5)
    v = s.vertices / np.linalg.norm(s.vertices, axis=1, keepdims=True)
    u = (np.arctan2(v[:, 1], v[:, 0]) / (2 * np.pi)) % 1.0
    w = np.arccos(np.clip(v[:, 2], -1, 1)) / np.pi
    yy, xx = np.mgrid[0:512, 0:512] / 511.0
    tex = (np.stack([xx, 1 - yy, 0.5 + 0 * xx], -1) * 255).astype(np.uint8)
    mat = trimesh.visual.material.PBRMaterial(baseColorTexture=PIL.Image.fromarray(tex), metallicFactor=0.0, roughnessFactor=1.0)
    s.visual = trimesh.visual.TextureVisuals(uv=np.stack([u, 1 - w], 1), material=mat)
    s.export(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faces", type=lambda s: [int(x) for x in s.split(",")], default=[10_000, 40_000])
    parser.add_argument("--texture", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    import bpy

    importer, quad = _module("importer"), _module("quad")
    glb = sphere_glb(Path(tempfile.mkdtemp(prefix="quad_bench_")) / "sphere.glb")
    rows = []
    for target in args.faces:
        times, faces, share = [], 0, 0.0
        for _ in range(args.repeats):
            bpy.ops.wm.read_factory_settings(use_empty=True)
            src = importer.import_glb(bpy.context, glb, job_id="bench", seed=0, prompt="sphere", height=1.0, frame_view=False)
            t0 = time.perf_counter()
            q = quad.quad_remesh(bpy.context, src, target, args.texture)
            times.append(time.perf_counter() - t0)
            faces = len(q.data.polygons)
            share = sum(len(p.vertices) == 4 for p in q.data.polygons) / faces
        rows.append({"target_faces": target, "faces": faces, "quad_share": round(share, 4), "source_faces": len(src.data.polygons),
                     "seconds_median": round(statistics.median(times), 2), "seconds": [round(t, 2) for t in times]})
        print(rows[-1], flush=True)
    result = {"machine": f"{platform.machine()} {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d"), "load_average": os.getloadavg(),
              "texture": args.texture, "bpy": bpy.app.version_string, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
