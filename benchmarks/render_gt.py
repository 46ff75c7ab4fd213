"""Ground-truth renders for the reconstruction benchmark, made with Blender (bpy from PyPI, Cycles on CPU).

For each shape (holes, thin parts, texture) this writes, in the views contract of docs/DESIGN.md:
  OUT/<shape>/views/     the six Wonder3D views (orthographic, elevation 0): colour + world normals
  OUT/<shape>/heldout/   other views (other azimuths and elevations), for held-out IoU / PSNR
  OUT/<shape>/gt_mesh.npz  the triangulated surface in the glTF world frame (vertices, faces)

Albedo and world normals are rendered with emission shaders (no lighting), the 'Standard' view
transform for colour (sRGB PNG) and 'Raw' for normals (RGB = (n + 1) / 2 stored linearly). Blender
is +Z up; the contract's world is glTF (+Y up, subject faces +Z): points map (x, y, z)_gltf =
(x, z, -y)_blender, and cameras are converted the same way.

Run: python benchmarks/render_gt.py --out bench_data [--size 256] [--samples 16] [--shapes ring,chair,blob]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "backend"))
from make_your_3d.models.wonder3d_views import WONDER3D_VIEWS  # noqa: E402
from make_your_3d.recon.camera import orbit_c2w  # noqa: E402

HELDOUT = [("h_az22_el15", 22.5, 15.0), ("h_az112_elm10", 112.5, -10.0), ("h_az202_el25", 202.5, 25.0),
           ("h_azm67_el5", -67.5, 5.0)]
# glTF world -> Blender world
G2B = np.array([[1, 0, 0, 0], [0, 0, -1, 0], [0, 1, 0, 0], [0, 0, 0, 1.0]])
CV2GL = np.diag([1.0, -1.0, -1.0, 1.0])  # OpenCV camera axes -> Blender camera axes


def _material(bpy, name: str, albedo_node_fn):
    """Emission material: Mix Shader between albedo (Fac 0) and encoded glTF world normal (Fac 1)."""
    mat = bpy.data.materials.new(name)
    mat.use_nodes = True
    nt = mat.node_tree
    nt.nodes.clear()
    out = nt.nodes.new("ShaderNodeOutputMaterial")
    mix = nt.nodes.new("ShaderNodeMixShader")
    mix.name = "passmix"
    e_col = nt.nodes.new("ShaderNodeEmission")
    e_nrm = nt.nodes.new("ShaderNodeEmission")
    albedo_node_fn(nt, e_col.inputs["Color"])
    geo = nt.nodes.new("ShaderNodeNewGeometry")
    sep = nt.nodes.new("ShaderNodeSeparateXYZ")
    comb = nt.nodes.new("ShaderNodeCombineXYZ")
    neg = nt.nodes.new("ShaderNodeMath")
    neg.operation = "MULTIPLY"
    neg.inputs[1].default_value = -1.0
    enc = nt.nodes.new("ShaderNodeVectorMath")
    enc.operation = "MULTIPLY_ADD"
    enc.inputs[1].default_value = (0.5, 0.5, 0.5)
    enc.inputs[2].default_value = (0.5, 0.5, 0.5)
    nt.links.new(geo.outputs["Normal"], sep.inputs[0])
    nt.links.new(sep.outputs["X"], comb.inputs["X"])
    nt.links.new(sep.outputs["Z"], comb.inputs["Y"])
    nt.links.new(sep.outputs["Y"], neg.inputs[0])
    nt.links.new(neg.outputs[0], comb.inputs["Z"])
    nt.links.new(comb.outputs[0], enc.inputs[0])
    nt.links.new(enc.outputs[0], e_nrm.inputs["Color"])
    nt.links.new(e_col.outputs[0], mix.inputs[1])
    nt.links.new(e_nrm.outputs[0], mix.inputs[2])
    nt.links.new(mix.outputs[0], out.inputs["Surface"])
    return mat


def _solid(rgb):
    def fn(nt, socket):
        socket.default_value = (*rgb, 1.0)

    return fn


def _checker(c1, c2, scale):
    def fn(nt, socket):
        tex = nt.nodes.new("ShaderNodeTexChecker")
        tex.inputs["Color1"].default_value = (*c1, 1.0)
        tex.inputs["Color2"].default_value = (*c2, 1.0)
        tex.inputs["Scale"].default_value = scale
        nt.links.new(tex.outputs["Color"], socket)

    return fn


def _stripes(c1, c2, scale):
    def fn(nt, socket):
        tex = nt.nodes.new("ShaderNodeTexWave")
        tex.inputs["Scale"].default_value = scale
        ramp = nt.nodes.new("ShaderNodeValToRGB")
        ramp.color_ramp.elements[0].color = (*c1, 1.0)
        ramp.color_ramp.elements[1].color = (*c2, 1.0)
        nt.links.new(tex.outputs["Fac"], ramp.inputs["Fac"])
        nt.links.new(ramp.outputs["Color"], socket)

    return fn


def _add(bpy, kind: str, mat, **kw):
    getattr(bpy.ops.mesh, f"primitive_{kind}_add")(**kw)
    obj = bpy.context.active_object
    obj.data.materials.append(mat)
    return obj


def build_shape(bpy, name: str) -> None:
    """Objects spanning 1.8 units (Blender coordinates, +Z up, front is -Y)."""
    if name == "ring":  # a hole through the front, texture on the ring, a flat base
        ring = _material(bpy, "ring", _checker((0.85, 0.75, 0.2), (0.15, 0.35, 0.7), 4.0))
        base = _material(bpy, "base", _solid((0.2, 0.2, 0.25)))
        _add(bpy, "torus", ring, major_radius=0.62, minor_radius=0.22, major_segments=96, minor_segments=32,
             location=(0, 0, 0.06), rotation=(math.pi / 2, 0, 0))
        _add(bpy, "cube", base, size=1.0, location=(0, 0, -0.8), scale=(1.1, 0.5, 0.2))
    elif name == "chair":  # thin legs, a slatted back (holes), several colours
        seat = _material(bpy, "seat", _solid((0.7, 0.15, 0.1)))
        wood = _material(bpy, "wood", _stripes((0.45, 0.28, 0.12), (0.3, 0.16, 0.06), 3.0))
        rail = _material(bpy, "rail", _checker((0.9, 0.9, 0.85), (0.1, 0.4, 0.2), 6.0))
        _add(bpy, "cube", seat, size=1.0, location=(0, 0, -0.1), scale=(1.1, 1.0, 0.12))
        for sx in (-1, 1):
            for sy in (-1, 1):
                _add(bpy, "cube", wood, size=1.0, location=(sx * 0.48, sy * 0.43, -0.53), scale=(0.09, 0.09, 0.74))
        for x in (-0.48, 0.0, 0.48):
            _add(bpy, "cube", wood, size=1.0, location=(x, 0.43, 0.3), scale=(0.12, 0.09, 0.68))
        _add(bpy, "cube", rail, size=1.0, location=(0, 0.43, 0.78), scale=(1.1, 0.12, 0.24))
    elif name == "blob":  # a smooth textured body with a thin fin on top
        body = _material(bpy, "body", _checker((0.9, 0.45, 0.1), (0.15, 0.55, 0.45), 5.0))
        fin = _material(bpy, "fin", _solid((0.6, 0.1, 0.5)))
        _add(bpy, "uv_sphere", body, radius=1.0, segments=96, ring_count=48, location=(0, 0, -0.1),
             scale=(0.9, 0.6, 0.7))
        _add(bpy, "cube", fin, size=1.0, location=(0, 0, 0.6), scale=(0.8, 0.06, 0.5))
    else:
        raise SystemExit(f"unknown shape {name}")


def gt_mesh(bpy) -> tuple[np.ndarray, np.ndarray]:
    """All mesh objects, triangulated, in glTF world coordinates."""
    dg = bpy.context.evaluated_depsgraph_get()
    verts, faces, off = [], [], 0
    B2G = np.linalg.inv(G2B)
    for obj in bpy.context.scene.objects:
        if obj.type != "MESH":
            continue
        ev = obj.evaluated_get(dg)
        me = ev.to_mesh()
        me.calc_loop_triangles()
        v = np.array([obj.matrix_world @ vv.co for vv in me.vertices], dtype=np.float64)
        t = np.array([lt.vertices[:] for lt in me.loop_triangles], dtype=np.int64)
        verts.append((np.c_[v, np.ones(len(v))] @ B2G.T)[:, :3])
        faces.append(t + off)
        off += len(v)
        ev.to_mesh_clear()
    return np.concatenate(verts), np.concatenate(faces)


def render_set(bpy, folder: Path, views: list[tuple[str, float, float]], size: int) -> None:
    from mathutils import Matrix

    scene = bpy.context.scene
    folder.mkdir(parents=True, exist_ok=True)
    cam_data = bpy.data.cameras.new("cam")
    cam_data.type = "ORTHO"
    cam_data.ortho_scale = 2.0
    cam_data.clip_start, cam_data.clip_end = 0.01, 100.0
    cam = bpy.data.objects.new("cam", cam_data)
    scene.collection.objects.link(cam)
    scene.camera = cam
    records = []
    for name, az, el in views:
        c2w = orbit_c2w(az, el, radius=3.0)
        cam.matrix_world = Matrix((G2B @ c2w @ CV2GL).tolist())
        for kind, fac, transform in (("color", 0.0, "Standard"), ("normal", 1.0, "Raw")):
            for mat in bpy.data.materials:
                if mat.node_tree and "passmix" in mat.node_tree.nodes:
                    mat.node_tree.nodes["passmix"].inputs[0].default_value = fac
            scene.view_settings.view_transform = transform
            scene.render.filepath = str(folder / f"{kind}_{name}.png")
            bpy.ops.render.render(write_still=True)
        records.append({"name": name, "color": f"color_{name}.png", "normal": f"normal_{name}.png",
                        "c2w": c2w.tolist(), "projection": "orthographic", "ortho_size": [2.0, 2.0],
                        "azimuth": az, "elevation": el})
    doc = {"world": "gltf", "image_size": [size, size], "views": records}
    (folder / "cameras.json").write_text(json.dumps(doc, indent=2))
    bpy.data.objects.remove(cam)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench_data")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--shapes", default="ring,chair,blob")
    args = ap.parse_args(argv)
    import bpy

    out = Path(args.out)
    for shape in args.shapes.split(","):
        t = time.time()
        bpy.ops.wm.read_factory_settings(use_empty=True)
        scene = bpy.context.scene
        scene.render.engine = "CYCLES"
        scene.cycles.device = "CPU"
        scene.cycles.samples = args.samples
        scene.cycles.use_denoising = False
        scene.cycles.filter_width = 1.0
        scene.render.film_transparent = True
        scene.render.resolution_x = scene.render.resolution_y = args.size
        scene.render.resolution_percentage = 100
        scene.render.image_settings.file_format = "PNG"
        scene.render.image_settings.color_mode = "RGBA"
        scene.render.image_settings.color_depth = "8"
        scene.view_settings.look = "None"
        scene.view_settings.exposure = 0.0
        scene.view_settings.gamma = 1.0
        build_shape(bpy, shape)
        v, f = gt_mesh(bpy)
        (out / shape).mkdir(parents=True, exist_ok=True)
        np.savez(out / shape / "gt_mesh.npz", vertices=v, faces=f)
        render_set(bpy, out / shape / "views", [(n, a, 0.0) for n, a in WONDER3D_VIEWS], args.size)
        render_set(bpy, out / shape / "heldout", HELDOUT, args.size)
        ext = v.max(0) - v.min(0)
        print(f"{shape}: extent {np.round(ext, 3).tolist()}, {len(f)} triangles, {time.time() - t:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
