#!/usr/bin/env python3
"""The README's asset picture (issue 26.5): one generated GLB three times, side by side, in Cycles:
as imported (base colour, normal and occlusion maps), the same with its normal map unplugged, and the
add-on's Quad Remesh of it (QuadriFlow plus the re-bake of colour and normal map).

    python scripts/readme_picture.py --glb subject.glb [--out docs/asset_maps.png] [--quad-faces 4000]
        [--samples 24] [--width 960 --height 400] [--max-kb 300]

Runs on the `bpy` module from PyPI. Objects are imported by the add-on's own importer and remeshed by
its own quad.py, so the picture shows what an artist gets. The PNG is reduced to a palette image when
that keeps it under --max-kb.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import bpy

REPO = Path(__file__).resolve().parents[1]
ZOOM = 0.6  # render_readme's framing fits the objects' bounding sphere; three in a row leave it mostly empty


def _module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def unplug_normal_map(obj: bpy.types.Object) -> None:
    """Remove the link from the Normal Map node to the BSDF (the 'without' object); the copy gets its
    own material so the other objects keep theirs."""
    for slot in obj.material_slots:
        if slot.material is None:
            continue
        slot.material = slot.material.copy()
        tree = slot.material.node_tree
        for link in list(tree.links):
            if link.to_node.type == "BSDF_PRINCIPLED" and link.to_socket.name == "Normal":
                tree.links.remove(link)


def render(glb: Path, out: Path, quad_faces: int, samples: int, resolution: tuple[int, int], max_kb: int) -> Path:
    scenes = _module("render_readme", REPO / "scripts" / "render_readme.py")
    importer = _module("importer", REPO / "blender_addon" / "importer.py")
    quad = _module("quad", REPO / "blender_addon" / "quad.py")
    scene = scenes.make_scene(resolution, samples)

    def load(label: str) -> bpy.types.Object:
        return importer.import_glb(bpy.context, glb, job_id=label, seed=0, prompt=label, height=1.0, frame_view=False)

    with_map = load("with normal map")
    without = load("without normal map")
    unplug_normal_map(without)
    source = load("quad source")
    quads = quad.quad_remesh(bpy.context, source, target_faces=quad_faces, texture_size=1024)
    objects = [with_map, without, quads]
    bpy.context.view_layer.update()
    lo, hi = scenes.world_bounds(objects)
    scenes.add_ground_and_lights(scene, lo, hi)
    scenes.frame_camera(scene, lo, hi)
    centre = (lo + hi) / 2
    scene.camera.location = centre + (scene.camera.location - centre) * ZOOM
    out.parent.mkdir(parents=True, exist_ok=True)
    scene.render.filepath = str(out)
    bpy.ops.render.render(write_still=True)
    if out.stat().st_size > max_kb * 1024:
        from PIL import Image

        Image.open(out).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(out, optimize=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--glb", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "asset_maps.png")
    ap.add_argument("--quad-faces", type=int, default=4000)
    ap.add_argument("--samples", type=int, default=24)
    ap.add_argument("--width", type=int, default=960)
    ap.add_argument("--height", type=int, default=400)
    ap.add_argument("--max-kb", type=int, default=300)
    args = ap.parse_args(argv)
    if not args.glb.is_file():
        ap.error(f"no such GLB: {args.glb}")
    out = render(args.glb, args.out, args.quad_faces, args.samples, (args.width, args.height), args.max_kb)
    print(f"wrote {out} ({out.stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
