"""Ground-truth renders for the reconstruction benchmark, made with Blender (bpy from PyPI, Cycles on CPU).

For each shape (holes, thin parts, texture) this writes, in the views contract of docs/DESIGN.md:
  OUT/<shape>/views/     the six Wonder3D views (orthographic, elevation 0): colour + world normals
  OUT/<shape>/heldout/   other views (other azimuths and elevations), for held-out IoU / PSNR
  OUT/<shape>/gt_mesh.npz  the triangulated surface in the glTF world frame (vertices, faces)

Albedo and world normals are rendered with emission shaders (no lighting), the 'Standard' view
transform for colour (sRGB PNG) and 'Raw' for normals (RGB = (n + 1) / 2 stored linearly). Blender
is +Z up; the contract's world is glTF (+Y up, subject faces +Z): points map (x, y, z)_gltf =
(x, z, -y)_blender, and cameras are converted the same way.

Shapes (SHAPES below says what each tests; shape_split.json splits them into a tuning and a held-out set):
ring, chair, blob (the first three, unchanged), bowl, table, plant, kettlebell, head, mug, figurine,
fish, crate, vase, and issue 23's fresh held-out set: cubby, stairs, comb, spool, twohole, fence.
The new ones are single boolean-unioned shells (no internal faces in the ground truth).

Run: python benchmarks/render_gt.py --out bench_data [--size 256] [--samples 16] [--shapes ring,chair,blob]
(about 10-20 s a shape on 2 CPU cores at 256 px and 16 samples)
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


def _noise(c1, c2, scale, detail=2.0):
    """Mottled albedo (skin, clay): Perlin noise through a two-colour ramp."""
    def fn(nt, socket):
        tex = nt.nodes.new("ShaderNodeTexNoise")
        tex.inputs["Scale"].default_value = scale
        tex.inputs["Detail"].default_value = detail
        ramp = nt.nodes.new("ShaderNodeValToRGB")
        ramp.color_ramp.elements[0].position = 0.35
        ramp.color_ramp.elements[1].position = 0.65
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


def _boolean(main, others, operation: str) -> None:
    """Boolean modifiers (exact solver, operands' materials transferred) on `main`; the operands are
    hidden from the render and left out of the ground-truth mesh, so the scored surface is one
    closed shell without the internal faces that overlapping parts would leave."""
    for i, o in enumerate(others):
        mod = main.modifiers.new(f"{operation.lower()}{i}", "BOOLEAN")
        mod.operation = operation
        mod.solver = "EXACT"
        mod.object = o
        mod.material_mode = "TRANSFER"
        o.hide_render = True
        o["gt_skip"] = True


def _smooth(bpy, obj, angle_deg: float = 35.0) -> None:
    """Smooth normals on curved parts, sharp ones across creases (edges above `angle_deg`)."""
    bpy.ops.object.select_all(action="DESELECT")
    obj.select_set(True)
    bpy.context.view_layer.objects.active = obj
    bpy.ops.object.shade_auto_smooth(angle=math.radians(angle_deg))


def _ellipsoid(bpy, mat, loc, scale, rot=(0, 0, 0), seg=64):
    return _add(bpy, "uv_sphere", mat, radius=1.0, segments=seg, ring_count=seg // 2, location=loc,
                scale=scale, rotation=rot)


def _box(bpy, mat, loc, scale, rot=(0, 0, 0)):
    return _add(bpy, "cube", mat, size=1.0, location=loc, scale=scale, rotation=rot)


def _rod(bpy, mat, a, b, radius, seg=24):
    """A cylinder from point a to point b (Blender coordinates)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    d = b - a
    length = float(np.linalg.norm(d))
    d /= length
    obj = _add(bpy, "cylinder", mat, radius=radius, depth=length, vertices=seg, location=tuple((a + b) / 2))
    # turn +Z onto d: about the axis z x d
    axis = np.cross([0, 0, 1.0], d)
    if np.linalg.norm(axis) > 1e-9:
        from mathutils import Quaternion

        obj.rotation_mode = "QUATERNION"
        obj.rotation_quaternion = Quaternion(tuple(axis / np.linalg.norm(axis)), math.acos(float(np.clip(d[2], -1, 1))))
    return obj


def _tilt_all(bpy, degrees: float) -> None:
    """Turn the whole scene about the X axis (positive degrees: the top leans towards the front, -Y),
    which is what a photo taken from above looks like in the views' frame (elevation 0 is the input
    camera's elevation, whatever it was)."""
    from mathutils import Matrix

    bpy.context.view_layer.update()
    rot = Matrix.Rotation(math.radians(degrees), 4, "X")
    for obj in bpy.context.scene.objects:
        obj.matrix_world = rot @ obj.matrix_world
    bpy.context.view_layer.update()


def build_shape(bpy, name: str) -> None:
    """Objects spanning about 1.8 units (Blender coordinates, +Z up, front is -Y).

    What each shape tests is in SHAPES below; ring, chair and blob are unchanged from the first
    version of this benchmark (separate overlapping parts), the others are one boolean-unioned shell.
    """
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
    elif name == "bowl":  # near-white, a deep concavity tilted 30 degrees towards the front views
        glaze = _material(bpy, "glaze", _checker((0.95, 0.94, 0.92), (0.86, 0.88, 0.9), 3.0))
        outer = _ellipsoid(bpy, glaze, (0, 0, 0.25), (0.9, 0.9, 0.85), seg=96)
        inner = _ellipsoid(bpy, glaze, (0, 0, 0.25), (0.83, 0.83, 0.78), seg=96)
        lid = _box(bpy, glaze, (0, 0, 1.25), (2.2, 2.2, 2.0))
        foot = _add(bpy, "cylinder", glaze, radius=0.38, depth=0.12, vertices=64, location=(0, 0, -0.62))
        _boolean(outer, [foot], "UNION")
        _boolean(outer, [inner, lid], "DIFFERENCE")
        _smooth(bpy, outer)
        _tilt_all(bpy, 30.0)  # the inside faces the front views
    elif name == "table":  # flat boxy parts, thin legs, a shelf; very dark albedo
        wood = _material(bpy, "darkwood", _stripes((0.045, 0.035, 0.03), (0.02, 0.016, 0.014), 2.5))
        top = _box(bpy, wood, (0, 0, 0.42), (1.75, 1.0, 0.08))
        parts = [_box(bpy, wood, (sx * 0.78, sy * 0.42, -0.24), (0.08, 0.08, 1.26)) for sx in (-1, 1) for sy in (-1, 1)]
        parts.append(_box(bpy, wood, (0, 0, -0.55), (1.56, 0.84, 0.05)))
        _boolean(top, parts, "UNION")
    elif name == "plant":  # thin leaves (plates seen edge-on by some views) on a stem, a textured pot
        pot = _material(bpy, "pot", _stripes((0.72, 0.36, 0.2), (0.55, 0.25, 0.14), 4.0))
        leaf = _material(bpy, "leaf", _stripes((0.2, 0.55, 0.15), (0.1, 0.35, 0.08), 6.0))
        body = _add(bpy, "cone", pot, radius1=0.3, radius2=0.4, depth=0.6, vertices=64, location=(0, 0, -0.6))
        parts = [_rod(bpy, leaf, (0, 0, -0.35), (0.0, 0.0, 0.55), 0.035)]
        for i, (az, el, z) in enumerate([(20, 25, 0.0), (140, 35, 0.2), (260, 20, 0.35), (80, 45, 0.4)]):
            a, e = math.radians(az), math.radians(el)
            d = np.array([math.cos(e) * math.cos(a), math.cos(e) * math.sin(a), math.sin(e)])
            parts.append(_ellipsoid(bpy, leaf, tuple(np.array([0, 0, z]) + 0.36 * d), (0.38, 0.14, 0.016),
                                    rot=(math.radians(15 * i), -e, a), seg=48))
        _boolean(body, parts, "UNION")
        _smooth(bpy, body)
    elif name == "kettlebell":  # genus 1 with the hole seen from the side views, textured
        iron = _material(bpy, "iron", _checker((0.25, 0.45, 0.75), (0.85, 0.8, 0.3), 4.0))
        ball = _ellipsoid(bpy, iron, (0, 0, -0.32), (0.62, 0.62, 0.58), seg=96)
        handle = _add(bpy, "torus", iron, major_radius=0.42, minor_radius=0.09, major_segments=96,
                      minor_segments=24, location=(0, 0, 0.3), rotation=(0, math.pi / 2, 0))
        _boolean(ball, [handle], "UNION")
        _smooth(bpy, ball)
    elif name == "head":  # smooth body with shallow concave detail: eye sockets, a brow, a nose, thin ears
        skin = _material(bpy, "skin", _noise((0.85, 0.62, 0.5), (0.7, 0.45, 0.36), 6.0))
        brow = _material(bpy, "brow", _solid((0.3, 0.18, 0.1)))
        skull = _ellipsoid(bpy, skin, (0, 0, 0.1), (0.6, 0.68, 0.76), seg=96)
        parts = [_ellipsoid(bpy, brow, (0, -0.55, 0.3), (0.42, 0.14, 0.07)),
                 _ellipsoid(bpy, skin, (0, -0.66, 0.02), (0.07, 0.12, 0.16)),  # nose
                 _add(bpy, "cylinder", skin, radius=0.27, depth=0.5, vertices=64, location=(0, 0.05, -0.7))]
        for sx in (-1, 1):  # ears: plates 0.05 thick, seen edge-on from the front and back
            parts.append(_ellipsoid(bpy, skin, (sx * 0.6, 0.08, 0.08), (0.025, 0.15, 0.24),
                                    rot=(0, 0, sx * math.radians(-25)), seg=48))
        sockets = [_ellipsoid(bpy, skin, (sx * 0.21, -0.66, 0.14), (0.13, 0.1, 0.09)) for sx in (-1, 1)]
        _boolean(skull, parts, "UNION")
        _boolean(skull, sockets, "DIFFERENCE")
        _smooth(bpy, skull, 40.0)
    elif name == "mug":  # genus 1 handle, a deep cavity (tilted 20 degrees so the front views see in), stripes
        glaze = _material(bpy, "mugglaze", _stripes((0.15, 0.3, 0.7), (0.92, 0.9, 0.85), 3.0))
        body = _add(bpy, "cylinder", glaze, radius=0.55, depth=1.3, vertices=96, location=(-0.2, 0, 0))
        handle = _add(bpy, "torus", glaze, major_radius=0.33, minor_radius=0.07, major_segments=64,
                      minor_segments=20, location=(0.38, 0, 0.02), rotation=(math.pi / 2, 0, 0))
        cavity = _add(bpy, "cylinder", glaze, radius=0.48, depth=1.3, vertices=96, location=(-0.2, 0, 0.1))
        _boolean(body, [handle], "UNION")
        _boolean(body, [cavity], "DIFFERENCE")
        _smooth(bpy, body)
        _tilt_all(bpy, 20.0)
    elif name == "figurine":  # a toy figure: thin limbs (stick legs and arms), a head, a textured shirt
        skin = _material(bpy, "figskin", _solid((0.95, 0.78, 0.6)))
        shirt = _material(bpy, "shirt", _checker((0.8, 0.1, 0.1), (0.95, 0.85, 0.2), 8.0))
        pants = _material(bpy, "pants", _solid((0.1, 0.2, 0.55)))
        torso = _box(bpy, shirt, (0, 0, 0.12), (0.48, 0.26, 0.62))
        parts = [_ellipsoid(bpy, skin, (0, 0, 0.66), (0.22, 0.22, 0.24)),
                 _rod(bpy, skin, (0, 0, 0.38), (0, 0, 0.5), 0.07)]
        for sx in (-1, 1):
            parts.append(_rod(bpy, pants, (sx * 0.13, 0, -0.15), (sx * 0.15, 0, -0.82), 0.045))  # legs
            parts.append(_box(bpy, pants, (sx * 0.15, -0.04, -0.85), (0.1, 0.2, 0.06)))  # feet
            parts.append(_rod(bpy, skin, (sx * 0.22, 0, 0.36), (sx * 0.6, -0.08, -0.05), 0.04))  # arms
        _boolean(torso, parts, "UNION")
        _smooth(bpy, torso)
    elif name == "fish":  # fins: thin plates seen edge-on by the front and back views; stripes
        scales = _material(bpy, "scales", _stripes((0.95, 0.55, 0.1), (0.95, 0.95, 0.9), 5.0))
        finm = _material(bpy, "finm", _solid((0.85, 0.3, 0.1)))
        body = _ellipsoid(bpy, scales, (-0.15, 0, 0), (0.72, 0.24, 0.42), seg=96)
        parts = [_box(bpy, finm, (0.72, 0, 0), (0.32, 0.03, 0.7), rot=(0, 0, 0)),  # tail
                 _box(bpy, finm, (-0.1, 0, 0.45), (0.42, 0.025, 0.22), rot=(0, math.radians(-20), 0)),  # dorsal
                 _box(bpy, finm, (-0.05, 0, -0.42), (0.3, 0.025, 0.16), rot=(0, math.radians(15), 0))]  # ventral
        for sy in (-1, 1):
            parts.append(_box(bpy, finm, (-0.4, sy * 0.24, -0.12), (0.2, 0.02, 0.1), rot=(math.radians(sy * 30), 0, 0)))
        _boolean(body, parts, "UNION")
        _smooth(bpy, body)
    elif name == "crate":  # very dark, boxy, an open side facing the front views (a cubby), a shelf inside
        paint = _material(bpy, "darkpaint", _checker((0.04, 0.04, 0.05), (0.015, 0.015, 0.02), 5.0))
        shell = _box(bpy, paint, (0, 0, 0), (1.5, 1.0, 1.2))
        hole = _box(bpy, paint, (0, -0.1, 0), (1.4, 1.0, 1.1))
        _boolean(shell, [hole], "DIFFERENCE")
        shelf = _box(bpy, paint, (0, 0.0, 0.0), (1.45, 0.9, 0.05))
        _boolean(shell, [shelf], "UNION")
    elif name == "vase":  # near-white, a narrow deep neck opening, two handles (genus 2)
        porcelain = _material(bpy, "porcelain", _stripes((0.96, 0.96, 0.95), (0.85, 0.87, 0.9), 2.0))
        body = _ellipsoid(bpy, porcelain, (0, 0, -0.3), (0.55, 0.55, 0.58), seg=96)
        parts = [_add(bpy, "cylinder", porcelain, radius=0.2, depth=0.75, vertices=64, location=(0, 0, 0.45)),
                 _add(bpy, "torus", porcelain, major_radius=0.22, minor_radius=0.05, major_segments=64,
                      minor_segments=16, location=(0, 0, 0.82))]
        for sx in (-1, 1):
            parts.append(_add(bpy, "torus", porcelain, major_radius=0.2, minor_radius=0.045, major_segments=64,
                              minor_segments=16, location=(sx * 0.42, 0, 0.25), rotation=(math.pi / 2, 0, 0)))
        neck = _add(bpy, "cylinder", porcelain, radius=0.13, depth=0.9, vertices=64, location=(0, 0, 0.6))
        _boolean(body, parts, "UNION")
        _boolean(body, [neck], "DIFFERENCE")
        _smooth(bpy, body)
    elif name == "cubby":  # issue 23 fresh set: an open box seen into from the front (no shelf), wood
        wood = _material(bpy, "cubbywood", _stripes((0.55, 0.4, 0.25), (0.45, 0.3, 0.18), 4.0))
        shell = _box(bpy, wood, (0, 0, 0), (1.4, 1.0, 1.2))
        hole = _box(bpy, wood, (0, -0.2, 0), (1.1, 1.0, 0.9))
        _boolean(shell, [hole], "DIFFERENCE")
    elif name == "stairs":  # fresh: three steps seen head-on between two cheek walls (no silhouette shows them)
        stone = _material(bpy, "stone", _checker((0.55, 0.58, 0.65), (0.35, 0.38, 0.45), 5.0))
        base = _box(bpy, stone, (0, 0, -0.4), (1.4, 1.2, 0.4))
        parts = [_box(bpy, stone, (0, 0.2, 0.0), (1.4, 0.8, 0.4)), _box(bpy, stone, (0, 0.4, 0.4), (1.4, 0.4, 0.4))]
        for sx in (-1, 1):
            parts.append(_box(bpy, stone, (sx * 0.76, 0, 0), (0.12, 1.2, 1.2)))
        _boolean(base, parts, "UNION")
    elif name == "comb":  # fresh: eleven thin teeth with narrow gaps under a spine, gaps seen by the front
        horn = _material(bpy, "horn", _stripes((0.75, 0.5, 0.2), (0.55, 0.32, 0.12), 6.0))
        spine = _box(bpy, horn, (0, 0, 0.55), (1.6, 0.12, 0.25))
        teeth = [_box(bpy, horn, (-0.75 + 0.15 * i, 0, -0.1), (0.06, 0.1, 1.1)) for i in range(11)]
        _boolean(spine, teeth, "UNION")
    elif name == "spool":  # fresh: a surface of revolution with an undercut under each flange; near-white
        white = _material(bpy, "spoolwhite", _stripes((0.96, 0.96, 0.94), (0.88, 0.9, 0.92), 3.0))
        core = _add(bpy, "cylinder", white, radius=0.3, depth=1.0, vertices=96, location=(0, 0, 0))
        flanges = [_add(bpy, "cylinder", white, radius=0.8, depth=0.18, vertices=96, location=(0, 0, sz * 0.5))
                   for sz in (-1, 1)]
        _boolean(core, flanges, "UNION")
        _smooth(bpy, core)
    elif name == "twohole":  # fresh: genus 2, a slab with two round holes through the front; near-black
        black = _material(bpy, "nearblack", _checker((0.03, 0.03, 0.035), (0.012, 0.012, 0.015), 5.0))
        slab = _box(bpy, black, (0, 0, 0), (1.6, 0.35, 1.0))
        holes = [_add(bpy, "cylinder", black, radius=0.25, depth=1.0, vertices=64, location=(sx * 0.4, 0, 0),
                      rotation=(math.pi / 2, 0, 0)) for sx in (-1, 1)]
        _boolean(slab, holes, "DIFFERENCE")
        _smooth(bpy, slab)
    elif name == "fence":  # fresh: nine thin slats with narrow gaps on two rails
        paint = _material(bpy, "fencepaint", _solid((0.2, 0.45, 0.3)))
        rail = _box(bpy, paint, (0, 0.0, 0.45), (1.7, 0.08, 0.1))
        parts = [_box(bpy, paint, (0, 0.0, -0.45), (1.7, 0.08, 0.1))]
        parts += [_box(bpy, paint, (-0.8 + 0.2 * i, -0.06, 0), (0.1, 0.05, 1.3)) for i in range(9)]
        _boolean(rail, parts, "UNION")
    else:
        raise SystemExit(f"unknown shape {name}")


# what each shape is for (the split into tuning and held-out sets lives in shape_split.json)
SHAPES = {
    "ring": "genus 1, hole seen by the front view; checker texture; separate base",
    "chair": "flat boxy parts, thin legs, slatted back (holes); several textures",
    "blob": "smooth textured body with a thin fin on top",
    "bowl": "deep concavity (tilted towards the front views); near-white albedo",
    "table": "flat boxy parts, thin legs, a shelf; very dark albedo",
    "plant": "thin leaves (plates seen edge-on) on a thin stem, a tapered pot",
    "kettlebell": "genus 1 with the hole seen from the side views; smooth body",
    "head": "smooth body, shallow concave detail (eye sockets, brow, nose), thin ears; noise texture",
    "mug": "genus 1 handle, deep cavity (tilted 20 degrees), striped texture",
    "figurine": "toy figure: stick legs and arms (0.08-0.09 units), head, checker shirt",
    "fish": "thin fins seen edge-on by the front and back views, stripes",
    "crate": "very dark albedo, boxy, open front with a shelf inside (deep concavity)",
    "vase": "near-white albedo, narrow deep neck opening, two handles (genus 2)",
    "cubby": "fresh (issue 23): an open box seen into from the front, no shelf",
    "stairs": "fresh: three steps seen head-on between cheek walls (no silhouette shows the steps)",
    "comb": "fresh: eleven thin parallel teeth with narrow gaps",
    "spool": "fresh: surface of revolution with an undercut under each flange; near-white albedo",
    "twohole": "fresh: genus 2 (a slab with two round holes through the front); near-black albedo",
    "fence": "fresh: nine thin slats with narrow gaps on two rails",
}


def gt_mesh(bpy) -> tuple[np.ndarray, np.ndarray]:
    """All mesh objects, triangulated, in glTF world coordinates."""
    dg = bpy.context.evaluated_depsgraph_get()
    verts, faces, off = [], [], 0
    B2G = np.linalg.inv(G2B)
    for obj in bpy.context.scene.objects:
        if obj.type != "MESH" or obj.get("gt_skip"):
            continue
        ev = obj.evaluated_get(dg)
        me = ev.to_mesh()
        me.calc_loop_triangles()
        v = np.array([obj.matrix_world @ vv.co for vv in me.vertices], dtype=np.float64)
        t = np.array([lt.vertices[:] for lt in me.loop_triangles], dtype=np.int64)
        # exact booleans leave a few zero-area slivers (two triangles on a collapsed edge); drop them
        if len(t):
            area = np.linalg.norm(np.cross(v[t[:, 1]] - v[t[:, 0]], v[t[:, 2]] - v[t[:, 0]]), axis=1)
            t = t[area > 1e-10]
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
    ap.add_argument("--shapes", default=None, help="comma list (default: every shape in shape_split.json)")
    args = ap.parse_args(argv)
    import bpy

    out = Path(args.out)
    split = json.loads((Path(__file__).parent / "shape_split.json").read_text())
    shapes = args.shapes.split(",") if args.shapes else split["tuning"] + split["heldout"] + split["fresh"]
    for shape in shapes:
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
