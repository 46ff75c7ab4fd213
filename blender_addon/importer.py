"""Import a generated GLB into the scene: one mesh in the "Make-Your-3D" collection, standing on the
3D cursor.

The glTF importer may add empties (node hierarchy); they are removed with their children kept in
place. The origin goes to the mesh's bottom centre and the mesh is scaled to the panel's height.
The result goes beside any visible mesh already at the cursor (+X), never inside or on top of it:
variants, repeated imports and the default scene's 2 m cube, which hid the first 0.3 m results.
A 3D view that does not show the new object is moved to frame it (a preference, on by default).
The object is named from prompt and seed and
carries job_id, seed and prompt as custom properties. Its texture is either packed into the .blend
or written next to the job's files and linked (a preference).
"""

from __future__ import annotations

import re
import struct
from array import array
from pathlib import Path

import bpy
from mathutils import Matrix, Vector

COLLECTION_NAME = "Make-Your-3D"
DEFAULT_HEIGHT = 0.3  # metres: a figurine on a desk; the panel's Height field (0 keeps the mesh's own size)
GLB_MAGIC = b"glTF"


class ImportProblem(Exception):
    """The file cannot be imported; the message says why."""


def check_glb(path: Path) -> None:
    """Raise ImportProblem unless `path` is a complete binary glTF 2.0 file."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            header = fh.read(12)
        size = path.stat().st_size
    except OSError as exc:
        raise ImportProblem(f"Cannot read {path}: {exc.strerror or exc}") from None
    if len(header) < 12 or header[:4] != GLB_MAGIC:
        raise ImportProblem(f"{path.name} is not a GLB file (no glTF header)")
    version, length = struct.unpack("<II", header[4:12])
    if version != 2:
        raise ImportProblem(f"{path.name} is glTF version {version}; only version 2 is supported")
    if length != size:
        raise ImportProblem(f"{path.name} is truncated ({size} of {length} bytes); import it again once the download completes")


def _local_bounds(mesh: bpy.types.Mesh) -> tuple[Vector, Vector]:
    n = len(mesh.vertices)
    if n == 0:
        return Vector((0.0, 0.0, 0.0)), Vector((0.0, 0.0, 0.0))
    co = array("f", [0.0]) * (3 * n)
    mesh.vertices.foreach_get("co", co)
    xs, ys, zs = co[0::3], co[1::3], co[2::3]
    return Vector((min(xs), min(ys), min(zs))), Vector((max(xs), max(ys), max(zs)))


def stand_on_floor(obj: bpy.types.Object, height: float | None) -> None:
    """Bake the importer's transform into the mesh, put the origin at the bottom centre (so the object
    stands on whatever point it is placed at) and scale it uniformly to `height` (None or 0: keep).
    The backend's meshes are centred on their own origin and about 2 units tall."""
    mesh = obj.data
    mesh.transform(obj.matrix_world)
    obj.matrix_world = Matrix.Identity(4)
    lo, hi = _local_bounds(mesh)
    tall = hi.z - lo.z
    scale = height / tall if height and height > 0 and tall > 1e-9 else 1.0
    centre = Vector(((lo.x + hi.x) / 2, (lo.y + hi.y) / 2, lo.z))
    mesh.transform(Matrix.Scale(scale, 4) @ Matrix.Translation(-centre))
    mesh.update()


def world_bounds(obj: bpy.types.Object) -> tuple[Vector, Vector]:
    corners = [obj.matrix_world @ Vector(c) for c in obj.bound_box]
    return (Vector((min(c.x for c in corners), min(c.y for c in corners), min(c.z for c in corners))),
            Vector((max(c.x for c in corners), max(c.y for c in corners), max(c.z for c in corners))))


def free_spot(start: Vector, obj: bpy.types.Object, others: list[bpy.types.Object]) -> Vector:
    """Where to put `obj` (origin at its bottom centre): at `start` unless that overlaps one of `others`,
    else to the right (+X) of what is there, with a gap of a quarter of its size. Variants and repeated
    imports line up beside each other instead of on top."""
    lo, hi = _local_bounds(obj.data)
    half_x, half_y, tall = (hi.x - lo.x) / 2, (hi.y - lo.y) / 2, hi.z - lo.z
    gap = 0.25 * max(hi.x - lo.x, hi.y - lo.y, 1e-3)
    boxes = [world_bounds(o) for o in others if o.type == "MESH"]
    x = start.x
    for _ in range(len(boxes) + 1):
        blocking = [b for b in boxes if b[0].x < x + half_x and b[1].x > x - half_x and b[0].y < start.y + half_y
                    and b[1].y > start.y - half_y and b[0].z < start.z + tall and b[1].z > start.z]
        if not blocking:
            break
        x = max(b[1].x for b in blocking) + gap + half_x
    return Vector((x, start.y, start.z))


def _box_corners(lo: Vector, hi: Vector) -> list[Vector]:
    return [Vector((x, y, z)) for x in (lo.x, hi.x) for y in (lo.y, hi.y) for z in (lo.z, hi.z)]


def frame_if_out_of_view(context: bpy.types.Context, obj: bpy.types.Object) -> int:
    """Move every 3D view that does not show all of `obj` so it is centred and fits; the view's angle
    is kept. Returns how many views moved: 0 where no window exists (background mode, tests)."""
    from bpy_extras.view3d_utils import location_3d_to_region_2d

    wm = context.window_manager
    lo, hi = world_bounds(obj)
    corners = _box_corners(lo, hi)
    moved = 0
    for window in (wm.windows if wm is not None else []):
        for area in window.screen.areas:
            if area.type != "VIEW_3D":
                continue
            region = next((r for r in area.regions if r.type == "WINDOW"), None)
            r3d = getattr(area.spaces.active, "region_3d", None)
            if region is None or r3d is None:
                continue
            points = [location_3d_to_region_2d(region, r3d, c) for c in corners]
            if all(p is not None and 0 <= p.x <= region.width and 0 <= p.y <= region.height for p in points):
                continue
            r3d.view_location = (lo + hi) / 2
            r3d.view_distance = max((hi - lo).length * 2.0, 0.1)
            area.tag_redraw()
            moved += 1
    return moved


def blocking_objects(context: bpy.types.Context, obj: bpy.types.Object) -> list[bpy.types.Object]:
    """Visible meshes of the view layer besides `obj`: what the new result must not land in."""
    return [o for o in context.view_layer.objects if o != obj and o.type == "MESH" and o.visible_get()]


def object_name(prompt: str, seed: int) -> str:
    words = re.sub(r"[^\w\s-]", "", prompt, flags=re.UNICODE).split()
    stem = " ".join(words)[:40].strip() or "subject"
    return f"{stem} s{seed}"


def ensure_collection(scene: bpy.types.Scene) -> bpy.types.Collection:
    coll = bpy.data.collections.get(COLLECTION_NAME)
    if coll is None:
        coll = bpy.data.collections.new(COLLECTION_NAME)
    if coll.name not in scene.collection.children and not _in_tree(scene.collection, coll):
        scene.collection.children.link(coll)
    return coll


def _in_tree(root: bpy.types.Collection, coll: bpy.types.Collection) -> bool:
    return any(child == coll or _in_tree(child, coll) for child in root.children)


def _ensure_gltf_importer() -> None:
    try:
        bpy.ops.import_scene.gltf.get_rna_type()
    except KeyError:
        import addon_utils

        addon_utils.enable("io_scene_gltf2", default_set=True)


def _remove_empties(objects: list[bpy.types.Object]) -> list[bpy.types.Object]:
    kept = []
    for obj in objects:
        if obj.type != "EMPTY":
            kept.append(obj)
    for obj in objects:
        if obj.type == "EMPTY":
            for child in list(obj.children):
                world = child.matrix_world.copy()
                child.parent = None
                child.matrix_world = world
            bpy.data.objects.remove(obj, do_unlink=True)
    return kept


def _join(context: bpy.types.Context, meshes: list[bpy.types.Object]) -> bpy.types.Object:
    if len(meshes) == 1:
        return meshes[0]
    with context.temp_override(active_object=meshes[0], object=meshes[0], selected_objects=meshes,
                               selected_editable_objects=meshes):
        bpy.ops.object.join()
    return meshes[0]


def _images_of(obj: bpy.types.Object) -> list[bpy.types.Image]:
    images = []
    for slot in obj.material_slots:
        mat = slot.material
        if mat is None or mat.node_tree is None:
            continue
        for node in mat.node_tree.nodes:
            if node.type == "TEX_IMAGE" and node.image is not None and node.image not in images:
                images.append(node.image)
    return images


def _sniff_ext(data: bytes) -> str:
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return ".png"
    if data[:3] == b"\xff\xd8\xff":
        return ".jpg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    return ".png"


def keep_textures(obj: bpy.types.Object, mode: str, folder: Path | None) -> list[bpy.types.Image]:
    """PACK: every texture packed into the .blend. LINK: written to `folder/textures/` and referenced."""
    images = _images_of(obj)
    for image in images:
        if mode == "LINK" and folder is not None:
            tex_dir = Path(folder) / "textures"
            tex_dir.mkdir(parents=True, exist_ok=True)
            if image.packed_file is not None:
                data = bytes(image.packed_file.data)
                safe = re.sub(r"[^\w.-]", "_", f"{obj.name}_{image.name}")
                target = tex_dir / (Path(safe).stem + _sniff_ext(data))
                target.write_bytes(data)
                image.unpack(method="REMOVE")
                image.filepath = str(target)
                image.reload()
        elif image.packed_file is None and image.source == "FILE":
            image.pack()
    return images


def import_glb(
    context: bpy.types.Context,
    path: Path,
    *,
    job_id: str,
    seed: int,
    prompt: str,
    variant_index: int = 0,
    texture_mode: str = "PACK",
    folder: Path | None = None,
    height: float | None = DEFAULT_HEIGHT,
    frame_view: bool = True,
) -> bpy.types.Object:
    """Import one result and return its mesh object (see the module docstring for what happens)."""
    path = Path(path)
    check_glb(path)
    _ensure_gltf_importer()
    scene = context.scene
    before = set(bpy.data.objects)
    result = bpy.ops.import_scene.gltf(filepath=str(path))
    if "FINISHED" not in result:
        raise ImportProblem(f"Blender's glTF importer could not read {path.name}")
    _remove_empties([o for o in bpy.data.objects if o not in before])
    new = [o for o in bpy.data.objects if o not in before]
    meshes = [o for o in new if o.type == "MESH"]
    for other in [o for o in new if o.type != "MESH"]:
        bpy.data.objects.remove(other, do_unlink=True)  # cameras/lights a GLB might carry
    if not meshes:
        raise ImportProblem(f"{path.name} holds no mesh")
    obj = _join(context, meshes)
    coll = ensure_collection(scene)
    for c in list(obj.users_collection):
        c.objects.unlink(obj)
    coll.objects.link(obj)

    name = object_name(prompt, seed)
    obj.name = name
    if obj.data is not None:
        obj.data.name = name
    for i, slot in enumerate(obj.material_slots):
        if slot.material is not None:
            slot.material.name = name if i == 0 else f"{name} {i + 1}"
    for i, image in enumerate(_images_of(obj)):
        image.name = f"{name} texture" if i == 0 else f"{name} texture {i + 1}"
    obj["job_id"] = job_id
    obj["seed"] = int(seed)
    obj["prompt"] = prompt

    stand_on_floor(obj, height)
    context.view_layer.update()
    obj.location = free_spot(scene.cursor.location, obj, blocking_objects(context, obj))
    context.view_layer.update()
    keep_textures(obj, texture_mode, folder)
    if frame_view:
        frame_if_out_of_view(context, obj)
    return obj
