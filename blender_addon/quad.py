# SPDX-License-Identifier: GPL-3.0-or-later
"""Quad remesh with Blender's own tools: a quad-dominant copy of an imported subject, textured.

QuadriFlow (Blender's Remesh > QuadriFlow) rebuilds the surface as quads for subdivision and
sculpting; Cycles' selected-to-active bake then carries the base colour and the shading (as a
tangent-space normal map) from the original onto the quad mesh's own UVs (Smart UV Project). Cycles'
normal bake reads the original's shading normal with its own normal map applied, so the fine-surface
detail the backend baked into the GLB carries over (tests/test_asset_maps.py); the occlusion map is
not re-baked (glTF keeps it outside the shading, and the quad copy is for sculpting and subdivision).
The original stays in the collection, hidden, so nothing is lost. Main thread only (bpy operators).
"""

from __future__ import annotations

import time

import bmesh
import bpy
from mathutils import Matrix

WELD_FRACTION = 1e-5  # vertices closer than this share of the object's size are one (the GLB splits them at UV seams)
CAGE_FRACTION = 0.02  # bake rays start this share of the object's size outside the quad surface
BAKE_MARGIN_PX = 8  # texels the bake extends past each UV island (mip-mapping shows no seams)
QUADRIFLOW_MIN_EDGE = 2e-4  # object units: twice the edge length below which QuadriFlow refuses a mesh
MAX_QUADRIFLOW_SCALE = 1e4  # at most this much scaling to lift the shortest edge over it
MIN_QUAD_SHARE = 0.5  # fewer quads than this share of the faces means QuadriFlow did not run


class QuadProblem(Exception):
    """The quad remesh cannot run on this object; the message says why."""


def _size(obj: bpy.types.Object) -> float:
    return max(max(obj.dimensions), 1e-6)


def only_selected(context, *objects: bpy.types.Object, active: bpy.types.Object) -> None:
    """Select exactly `objects`, with `active` the active one (what bpy operators act on)."""
    for other in context.view_layer.objects:
        other.select_set(False)
    for obj in objects:
        obj.select_set(True)
    context.view_layer.objects.active = active


def _source_image(obj: bpy.types.Object) -> bpy.types.Image | None:
    for slot in obj.material_slots:
        mat = slot.material
        if mat is not None and mat.node_tree is not None:
            for node in mat.node_tree.nodes:
                if node.type == "TEX_IMAGE" and node.image is not None:
                    return node.image
    return None


def _bake_targets(name: str, size: int) -> tuple[bpy.types.Material, dict[str, bpy.types.ShaderNodeTexImage]]:
    """A material holding a new base-colour image and a new normal-map image, not yet connected:
    an image the material reads while it is baked into is a circular dependency, and Cycles then
    bakes black."""
    color = bpy.data.images.new(f"{name} base colour", size, size)
    normal = bpy.data.images.new(f"{name} normal", size, size)
    normal.colorspace_settings.name = "Non-Color"
    mat = bpy.data.materials.new(f"{name} material")
    mat.use_nodes = True
    nodes = {}
    for key, image in (("color", color), ("normal", normal)):
        nodes[key] = mat.node_tree.nodes.new("ShaderNodeTexImage")
        nodes[key].image = image
    return mat, nodes


def _connect(mat: bpy.types.Material, nodes: dict[str, bpy.types.ShaderNodeTexImage]) -> None:
    """Base colour and tangent-space normal map into the material's Principled BSDF."""
    tree = mat.node_tree
    bsdf = next(n for n in tree.nodes if n.type == "BSDF_PRINCIPLED")
    normal_map = tree.nodes.new("ShaderNodeNormalMap")
    tree.links.new(nodes["color"].outputs["Color"], bsdf.inputs["Base Color"])
    tree.links.new(nodes["normal"].outputs["Color"], normal_map.inputs["Color"])
    tree.links.new(normal_map.outputs["Normal"], bsdf.inputs["Normal"])


def quad_remesh(context: bpy.types.Context, source: bpy.types.Object, target_faces: int = 10_000, texture_size: int = 1024) -> bpy.types.Object:
    """A quad-dominant, textured copy of `source` beside it in its collections; `source` is hidden.
    Raises QuadProblem with a sentence when it cannot be done."""
    if source is None or source.type != "MESH":
        raise QuadProblem("Select a generated mesh to quad-remesh")
    if context.mode != "OBJECT":
        raise QuadProblem("Switch to Object Mode to quad-remesh")
    image = _source_image(source)
    if image is None:
        raise QuadProblem(f"'{source.name}' has no image texture to bake from")
    t0 = time.monotonic()
    quad = source.copy()
    quad.data = source.data.copy()
    quad.name = quad.data.name = f"{source.name} quads"
    for coll in source.users_collection:
        coll.objects.link(quad)
    bm = bmesh.new()  # weld the vertices the GLB split at UV seams: QuadriFlow needs one connected surface
    bm.from_mesh(quad.data)
    bmesh.ops.remove_doubles(bm, verts=bm.verts, dist=WELD_FRACTION * _size(source))
    # QuadriFlow refuses a mesh with an edge shorter than 1e-4 on every axis ("needs to be manifold and
    # have consistent normals"), an absolute length; decimated reconstructions have slivers with such
    # edges. Collapsing them can pinch the surface, so the mesh is scaled up for QuadriFlow instead.
    shortest = min((max(abs(a - b) for a, b in zip(e.verts[0].co, e.verts[1].co)) for e in bm.edges), default=1.0)
    scale = min(max(1.0, QUADRIFLOW_MIN_EDGE / max(shortest, 1e-12)), MAX_QUADRIFLOW_SCALE)
    bm.transform(Matrix.Scale(scale, 4))
    bm.to_mesh(quad.data)
    bm.free()
    quad.data.materials.clear()
    only_selected(context, quad, active=quad)
    before = len(quad.data.polygons)
    try:
        result = bpy.ops.object.quadriflow_remesh(target_faces=int(target_faces), mode="FACES", seed=0)
        problem = None if result == {"FINISHED"} else "it gave up"
    except RuntimeError as exc:
        problem = str(exc).strip().splitlines()[-1]
    quad.data.transform(Matrix.Scale(1.0 / scale, 4))
    quads = sum(len(p.vertices) == 4 for p in quad.data.polygons)
    if problem is None and (len(quad.data.polygons) == before or quads < MIN_QUAD_SHARE * len(quad.data.polygons)):
        problem = "it left the mesh unchanged (QuadriFlow needs one closed, manifold surface)"
    if problem is not None:
        bpy.data.objects.remove(quad)
        raise QuadProblem(f"QuadriFlow could not remesh '{source.name}': {problem}")
    bpy.ops.object.mode_set(mode="EDIT")
    bpy.ops.mesh.select_all(action="SELECT")
    bpy.ops.uv.smart_project(island_margin=0.01)
    bpy.ops.object.mode_set(mode="OBJECT")

    mat, image_nodes = _bake_targets(quad.name, texture_size)
    quad.data.materials.append(mat)
    scene = context.scene
    saved = (scene.render.engine, scene.cycles.samples, scene.cycles.device)
    scene.render.engine, scene.cycles.samples, scene.cycles.device = "CYCLES", 1, "CPU"
    try:
        only_selected(context, source, quad, active=quad)
        cage = CAGE_FRACTION * _size(source)
        for kind, target in (("DIFFUSE", "color"), ("NORMAL", "normal")):
            mat.node_tree.nodes.active = image_nodes[target]  # the bake writes into the active image node
            extra = {"pass_filter": {"COLOR"}} if kind == "DIFFUSE" else {"normal_space": "TANGENT"}
            bpy.ops.object.bake(type=kind, use_selected_to_active=True, cage_extrusion=cage, margin=BAKE_MARGIN_PX, **extra)
    finally:
        scene.render.engine, scene.cycles.samples, scene.cycles.device = saved
    _connect(mat, image_nodes)
    for node in image_nodes.values():
        node.image.pack()
    for key in ("job_id", "seed", "prompt", "result_key"):
        if key in source:
            quad[key] = source[key]
    quad["quad_of"] = source.name
    quad["quad_seconds"] = round(time.monotonic() - t0, 2)
    source.hide_set(True)
    source.hide_render = True
    only_selected(context, quad, active=quad)
    return quad


class MAKE_YOUR_3D_OT_quad_remesh(bpy.types.Operator):
    """Make a quad-dominant copy of the selected generated mesh (QuadriFlow) with its colour and shading baked onto it; the original stays hidden"""

    bl_idname = "make_your_3d.quad_remesh"
    bl_label = "Quad Remesh"
    bl_options = {"REGISTER", "UNDO"}

    target_faces: bpy.props.IntProperty(name="Target faces", default=10_000, min=100, max=200_000)
    texture_size: bpy.props.IntProperty(name="Texture size", default=1024, min=64, max=8192)

    @classmethod
    def poll(cls, context):
        obj = context.active_object
        reason = None
        if obj is None or obj.type != "MESH":
            reason = "Select a generated mesh"
        elif context.mode != "OBJECT":
            reason = "Switch to Object Mode"
        elif "quad_of" in obj:
            reason = "This is already the quad version"
        if reason:
            cls.poll_message_set(reason)
            return False
        return True

    def execute(self, context):
        try:
            quad = quad_remesh(context, context.active_object, self.target_faces, self.texture_size)
        except QuadProblem as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        quads = sum(len(p.vertices) == 4 for p in quad.data.polygons)
        self.report({"INFO"}, f"{quad.name}: {quads} quads of {len(quad.data.polygons)} faces in {quad['quad_seconds']:.1f} s")
        return {"FINISHED"}


CLASSES = (MAKE_YOUR_3D_OT_quad_remesh,)
