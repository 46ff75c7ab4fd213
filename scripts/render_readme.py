#!/usr/bin/env python3
"""Render what the artist gets from the add-on: generated GLBs imported the way the add-on imports
them (its own importer: "Make-Your-3D" collection, variants side by side at the 3D cursor), in a small
scene, with Cycles on the CPU in background mode.

    python scripts/render_readme.py --glb out/demo/subject.glb [--glb more.glb ...] \
        [--out docs/addon_result.png] [--samples 48] [--width 960 --height 540]

Runs on the `bpy` module from PyPI (or `blender -b -P scripts/render_readme.py -- --glb ...`).
Each GLB's job.json (next to it, when present) gives the prompt and seed used for the object name.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path

import bpy
from mathutils import Vector

REPO = Path(__file__).resolve().parents[1]


def load_importer():
    """The add-on's importer module (it imports nothing from the add-on but bpy)."""
    spec = importlib.util.spec_from_file_location("make_your_3d_importer", REPO / "blender_addon" / "importer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def job_meta(glb: Path) -> tuple[str, int, str]:
    """(prompt, seed, job id) from the job.json beside the GLB, else from the file name."""
    record = glb.parent / "job.json"
    if record.is_file():
        try:
            data = json.loads(record.read_text(encoding="utf-8"))
            req = data.get("inputs") or data.get("request") or data
            return str(req.get("prompt", glb.stem)), int(req.get("seed", 0) or 0), str(data.get("id", glb.parent.name))
        except (ValueError, TypeError, AttributeError):
            pass
    return glb.stem, 0, glb.parent.name


def _is_tiny(glb: Path) -> bool:
    try:
        return bool(json.loads((glb.parent / "job.json").read_text(encoding="utf-8")).get("tiny_models"))
    except (OSError, ValueError, AttributeError):
        return False


def make_scene(resolution: tuple[int, int], samples: int) -> bpy.types.Scene:
    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    scene.render.engine = "CYCLES"
    scene.cycles.device = "CPU"
    scene.cycles.samples = samples
    scene.cycles.use_denoising = True
    scene.render.resolution_x, scene.render.resolution_y = resolution
    scene.render.resolution_percentage = 100
    scene.render.image_settings.file_format = "PNG"
    scene.render.film_transparent = False
    scene.view_settings.view_transform = "Standard"  # show the baked texture colours as they are
    world = bpy.data.worlds.new("World")
    if world.node_tree is None:
        world.use_nodes = True
    world.node_tree.nodes["Background"].inputs["Color"].default_value = (0.62, 0.66, 0.72, 1.0)
    world.node_tree.nodes["Background"].inputs["Strength"].default_value = 0.6
    scene.world = world
    return scene


def add_ground_and_lights(scene: bpy.types.Scene, lo: Vector, hi: Vector) -> None:
    size = max((hi - lo).length * 4.0, 4.0)
    mesh = bpy.data.meshes.new("Ground")
    c = Vector(((lo.x + hi.x) / 2, (lo.y + hi.y) / 2, lo.z))
    h = size / 2
    mesh.from_pydata([(c.x - h, c.y - h, c.z), (c.x + h, c.y - h, c.z), (c.x + h, c.y + h, c.z), (c.x - h, c.y + h, c.z)], [], [(0, 1, 2, 3)])
    ground = bpy.data.objects.new("Ground", mesh)
    mat = bpy.data.materials.new("Ground")
    if mat.node_tree is None:  # Blender 4.x; 5.x materials always have nodes
        mat.use_nodes = True
    bsdf = mat.node_tree.nodes["Principled BSDF"]
    bsdf.inputs["Base Color"].default_value = (0.8, 0.8, 0.78, 1.0)
    bsdf.inputs["Roughness"].default_value = 0.9
    mesh.materials.append(mat)
    scene.collection.objects.link(ground)

    key = bpy.data.lights.new("Key", "SUN")
    key.energy = 3.0
    key.angle = math.radians(8)
    key_obj = bpy.data.objects.new("Key", key)
    key_obj.rotation_euler = (math.radians(50), math.radians(10), math.radians(-35))
    scene.collection.objects.link(key_obj)
    fill = bpy.data.lights.new("Fill", "AREA")
    fill.energy = 150.0 * max((hi - lo).length, 1.0) ** 2
    fill.size = max((hi - lo).length, 1.0) * 2
    fill_obj = bpy.data.objects.new("Fill", fill)
    fill_obj.location = c + Vector((-(hi - lo).length * 1.5, -(hi - lo).length * 2.0, (hi - lo).length * 1.5))
    direction = c - fill_obj.location
    fill_obj.rotation_euler = direction.to_track_quat("-Z", "Y").to_euler()
    scene.collection.objects.link(fill_obj)


def frame_camera(scene: bpy.types.Scene, lo: Vector, hi: Vector) -> None:
    cam_data = bpy.data.cameras.new("Camera")
    cam_data.lens = 50
    cam = bpy.data.objects.new("Camera", cam_data)
    scene.collection.objects.link(cam)
    scene.camera = cam
    centre = (lo + hi) / 2
    radius = max((hi - lo).length / 2, 1e-3)
    aspect = scene.render.resolution_x / scene.render.resolution_y
    fov = 2 * math.atan(cam_data.sensor_width / (2 * cam_data.lens))  # horizontal
    fov_v = 2 * math.atan(math.tan(fov / 2) / aspect)
    distance = radius / math.sin(min(fov, fov_v) / 2) * 1.05
    direction = Vector((0.25, -1.0, 0.4)).normalized()
    cam.location = centre + direction * distance
    cam.rotation_euler = (centre - cam.location).to_track_quat("-Z", "Y").to_euler()
    cam_data.clip_end = distance * 10


def world_bounds(objects: list[bpy.types.Object]) -> tuple[Vector, Vector]:
    pts = [o.matrix_world @ Vector(c) for o in objects for c in o.bound_box]
    lo = Vector((min(p.x for p in pts), min(p.y for p in pts), min(p.z for p in pts)))
    hi = Vector((max(p.x for p in pts), max(p.y for p in pts), max(p.z for p in pts)))
    return lo, hi


def render(glbs: list[Path], out: Path, samples: int, resolution: tuple[int, int]) -> Path:
    importer = load_importer()
    scene = make_scene(resolution, samples)
    objects = []
    tiny = any(_is_tiny(glb) for glb in glbs)
    if tiny:
        print("note: these results come from the tiny random-weight model set (job.json says tiny_models); "
              "caption the image accordingly")
    for i, glb in enumerate(glbs):
        prompt, seed, job_id = job_meta(glb)
        objects.append(importer.import_glb(bpy.context, glb, job_id=job_id, seed=seed, prompt=prompt, variant_index=i,
                                           texture_mode="PACK"))
    bpy.context.view_layer.update()
    lo, hi = world_bounds(objects)
    for obj in objects:  # stand the results on the ground
        obj.location.z -= lo.z
    bpy.context.view_layer.update()
    lo, hi = world_bounds(objects)
    add_ground_and_lights(scene, lo, hi)
    frame_camera(scene, lo, hi)
    out.parent.mkdir(parents=True, exist_ok=True)
    scene.render.filepath = str(out)
    bpy.ops.render.render(write_still=True)
    return out


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[sys.argv.index("--") + 1:] if "--" in sys.argv else sys.argv[1:]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--glb", action="append", type=Path, required=True, help="a generated subject.glb (repeat for variants)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "addon_result.png")
    parser.add_argument("--samples", type=int, default=48)
    parser.add_argument("--width", type=int, default=960)
    parser.add_argument("--height", type=int, default=540)
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.glb if not p.is_file()]
    if missing:
        parser.error(f"no such GLB: {', '.join(missing)} (make one with `make-your-3d demo` or the add-on)")
    out = render(args.glb, args.out, args.samples, (args.width, args.height))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
