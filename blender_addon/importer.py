"""Import a generated GLB into the scene: one mesh in the "Make-Your-3D" collection at the 3D cursor.

The glTF importer may add empties (node hierarchy); they are removed with their children kept in
place. Variants of one click go side by side along X. The object is named from prompt and seed and
carries job_id, seed and prompt as custom properties. Its texture is either packed into the .blend
or written next to the job's files and linked (a preference).
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

import bpy
from mathutils import Vector

COLLECTION_NAME = "Make-Your-3D"
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
    obj["job_id"] = job_id
    obj["seed"] = int(seed)
    obj["prompt"] = prompt

    context.view_layer.update()
    width = max(max(obj.dimensions), 1e-3)
    spacing = width * 1.25
    obj.location = scene.cursor.location + Vector((variant_index * spacing, 0.0, 0.0))
    keep_textures(obj, texture_mode, folder)
    return obj
