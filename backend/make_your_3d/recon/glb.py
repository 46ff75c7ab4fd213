"""GLB writing: the reconstruction's asset (one mesh with normals, MikkTSpace tangents, UVs and its
embedded PNG maps: base colour, tangent-space normal map, ORM = occlusion/roughness/metallic), written
atomically; and stamping a finished GLB with what made it (`asset.generator`, `asset.extras`: job,
prompt, seed) and names.

`asset_glb` writes the glTF JSON and binary chunk itself (trimesh's exporter has no TANGENT attribute,
no normalTexture scale and no image shared by two textures): every accessor is 4-byte aligned with
min/max, normals and tangents' xyz unit, tangents' w +-1, images PNG, one sampler with mip-mapping.
The Khronos validator reports nothing on the result (benchmarks/gltf_validate.py)."""

from __future__ import annotations

import io
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import trimesh
from PIL import Image

from make_your_3d.errors import DiskFull
from make_your_3d.recon.texture import UVMesh

# glTF enums
_FLOAT, _UINT16, _UINT32 = 5126, 5123, 5125
_ARRAY_BUFFER, _ELEMENT_ARRAY_BUFFER = 34962, 34963
_LINEAR, _LINEAR_MIPMAP_LINEAR, _CLAMP_TO_EDGE = 9729, 9987, 33071


@dataclass
class Asset:
    """What the GLB holds: the mesh (UVs v-up, as UVMesh), unit normals (V,3), tangents (V,4) or None,
    and its maps as uint8 RGB images (None: not written)."""

    mesh: UVMesh
    normals: np.ndarray
    tangents: np.ndarray | None = None
    base_color: np.ndarray | None = None
    normal_map: np.ndarray | None = None
    orm: np.ndarray | None = None
    normal_scale: float = 1.0
    occlusion_strength: float = 1.0
    roughness: float = 0.9
    metallic: float = 0.0
    name: str = "subject"


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image[..., :3]), "RGB").save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def asset_glb(asset: Asset) -> bytes:
    """The asset as GLB 2.0 bytes (see the module docstring)."""
    m = asset.mesh
    if len(m.faces) == 0:
        raise ValueError("an asset needs at least one face")
    blob = bytearray()
    views: list[dict] = []
    accessors: list[dict] = []

    def add_view(data: bytes, target: int | None) -> int:
        blob.extend(b"\0" * (-len(blob) % 4))
        view = {"buffer": 0, "byteOffset": len(blob), "byteLength": len(data)}
        if target is not None:
            view["target"] = target
        blob.extend(data)
        views.append(view)
        return len(views) - 1

    def add_accessor(array: np.ndarray, kind: str, component: int, target: int, bounds: bool) -> int:
        acc = {"bufferView": add_view(array.tobytes(), target), "componentType": component, "count": int(len(array)),
               "type": kind}
        if bounds:
            flat = array.reshape(len(array), -1)
            acc["min"] = [float(x) if component == _FLOAT else int(x) for x in flat.min(0)]
            acc["max"] = [float(x) if component == _FLOAT else int(x) for x in flat.max(0)]
        accessors.append(acc)
        return len(accessors) - 1

    pos = np.ascontiguousarray(m.vertices, np.float32)
    nrm = np.asarray(asset.normals, np.float32)
    nrm = np.ascontiguousarray(nrm / np.linalg.norm(nrm, axis=1, keepdims=True).clip(1e-12), np.float32)
    uv = np.ascontiguousarray(np.stack([m.uvs[:, 0], 1.0 - m.uvs[:, 1]], 1), np.float32)  # glTF: v down
    attributes = {"POSITION": add_accessor(pos, "VEC3", _FLOAT, _ARRAY_BUFFER, True),
                  "NORMAL": add_accessor(nrm, "VEC3", _FLOAT, _ARRAY_BUFFER, True)}
    if asset.tangents is not None and asset.normal_map is not None:
        tan = np.asarray(asset.tangents, np.float64)
        xyz = tan[:, :3] / np.linalg.norm(tan[:, :3], axis=1, keepdims=True).clip(1e-12)
        w = np.where(tan[:, 3] < 0, -1.0, 1.0)
        attributes["TANGENT"] = add_accessor(np.ascontiguousarray(np.concatenate([xyz, w[:, None]], 1), np.float32),
                                             "VEC4", _FLOAT, _ARRAY_BUFFER, True)
    attributes["TEXCOORD_0"] = add_accessor(uv, "VEC2", _FLOAT, _ARRAY_BUFFER, True)
    small = len(pos) < 65535
    idx = np.ascontiguousarray(m.faces.reshape(-1), np.uint16 if small else np.uint32)
    indices = add_accessor(idx, "SCALAR", _UINT16 if small else _UINT32, _ELEMENT_ARRAY_BUFFER, True)

    images: list[dict] = []
    textures: list[dict] = []

    def add_texture(image: np.ndarray, label: str) -> int:
        images.append({"name": f"{asset.name} {label}", "mimeType": "image/png", "bufferView": add_view(_png(image), None)})
        textures.append({"sampler": 0, "source": len(images) - 1})
        return len(textures) - 1

    pbr: dict = {"metallicFactor": float(asset.metallic)}
    material: dict = {"name": f"{asset.name} material", "pbrMetallicRoughness": pbr, "doubleSided": False}
    if asset.base_color is not None:
        pbr["baseColorTexture"] = {"index": add_texture(asset.base_color, "base colour")}
    else:
        pbr["baseColorFactor"] = [0.5, 0.5, 0.5, 1.0]
    if asset.normal_map is not None:
        material["normalTexture"] = {"index": add_texture(asset.normal_map, "normal"), "scale": float(asset.normal_scale)}
    if asset.orm is not None:
        orm = add_texture(asset.orm, "ORM")
        material["occlusionTexture"] = {"index": orm, "strength": float(asset.occlusion_strength)}
        pbr["metallicRoughnessTexture"] = {"index": orm}
        pbr["roughnessFactor"] = 1.0  # the texture's G holds the roughness
    else:
        pbr["roughnessFactor"] = float(asset.roughness)
    blob.extend(b"\0" * (-len(blob) % 4))
    doc: dict = {
        "asset": {"version": "2.0", "generator": generator_name()},
        "scene": 0,
        "scenes": [{"nodes": [0]}],
        "nodes": [{"mesh": 0, "name": asset.name}],
        "meshes": [{"name": asset.name, "primitives": [{"attributes": attributes, "indices": indices, "material": 0,
                                                         "mode": 4}]}],
        "materials": [material],
        "accessors": accessors,
        "bufferViews": views,
        "buffers": [{"byteLength": len(blob)}],
    }
    if textures:
        doc.update(textures=textures, images=images,
                   samplers=[{"magFilter": _LINEAR, "minFilter": _LINEAR_MIPMAP_LINEAR, "wrapS": _CLAMP_TO_EDGE,
                              "wrapT": _CLAMP_TO_EDGE}])
    body = json.dumps(doc, separators=(",", ":")).encode("utf-8")
    body += b" " * (-len(body) % 4)
    total = 12 + 8 + len(body) + 8 + len(blob)
    return (struct.pack("<4sII", b"glTF", 2, total) + struct.pack("<I4s", len(body), b"JSON") + body
            + struct.pack("<I4s", len(blob), b"BIN\0") + bytes(blob))


def write_asset(asset: Asset, path: str | Path) -> Path:
    """`asset_glb` written atomically to `path`."""
    path = Path(path)
    _write_atomic(path, asset_glb(asset))
    return path


def textured_mesh(uvm: UVMesh, texture: np.ndarray, name: str = "subject") -> trimesh.Trimesh:
    material = trimesh.visual.material.PBRMaterial(
        name=f"{name}_material",
        baseColorTexture=Image.fromarray(texture[..., :3], "RGB"),
        metallicFactor=0.0,
        roughnessFactor=0.9,
        doubleSided=False,
    )
    visual = trimesh.visual.TextureVisuals(uv=uvm.uvs, material=material)
    return trimesh.Trimesh(vertices=uvm.vertices, faces=uvm.faces, visual=visual, process=False)


def write_glb(mesh: trimesh.Trimesh, path: str | Path) -> Path:
    """Export to a temporary name beside `path`, then rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = trimesh.exchange.gltf.export_glb(trimesh.Scene({"subject": mesh}), include_normals=True)
    data = retag_glb(data, name=None, extras=None)
    _write_atomic(path, data)
    return path


def job_name(prompt: str, seed: int) -> str:
    """The name a job's mesh, material and texture carry: the prompt's first words and the seed
    (the Blender add-on names the imported object the same way)."""
    import re

    words = re.sub(r"[^\w\s-]", "", prompt, flags=re.UNICODE).split()
    return f"{' '.join(words)[:40].strip() or 'subject'} s{seed}"


def generator_name() -> str:
    from make_your_3d import __version__

    return f"Make-Your-3D {__version__} (make-your-3d, GPL-3.0-or-later)"


def _chunks(data: bytes) -> tuple[dict, bytes]:
    """The JSON and BIN chunks of a GLB 2.0 file."""
    magic, version, length = struct.unpack_from("<4sII", data, 0)
    if magic != b"glTF" or version != 2 or length != len(data):
        raise ValueError("not a complete GLB 2.0 file")
    json_len, json_type = struct.unpack_from("<I4s", data, 12)
    if json_type != b"JSON":
        raise ValueError("GLB without a JSON chunk first")
    doc = json.loads(data[20:20 + json_len].decode("utf-8"))
    rest = data[20 + json_len:]
    return doc, rest  # rest: the BIN chunk with its header, unchanged


def retag_glb(data: bytes, name: str | None, extras: dict | None) -> bytes:
    """`data` with asset.generator naming this project, asset.extras set (if given) and the node,
    mesh, material and image named `name` (if given). The binary chunk is kept byte for byte."""
    doc, rest = _chunks(data)
    asset = doc.setdefault("asset", {"version": "2.0"})
    asset["generator"] = generator_name()
    if extras:
        asset["extras"] = {k: v for k, v in extras.items() if v is not None}
    if name:
        for key, suffix in (("nodes", ""), ("meshes", ""), ("materials", " material"), ("images", " texture")):
            for i, item in enumerate(doc.get(key, [])):
                item["name"] = f"{name}{suffix}" + (f" {i + 1}" if i else "")
    body = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    body += b" " * (-len(body) % 4)  # chunks are 4-byte aligned; JSON pads with spaces
    total = 12 + 8 + len(body) + len(rest)
    return struct.pack("<4sII", b"glTF", 2, total) + struct.pack("<I4s", len(body), b"JSON") + body + rest


def stamp_glb(src: str | Path, dst: str | Path, name: str | None, extras: dict | None) -> Path:
    """Copy a GLB to `dst` (atomically) with this job's generator, extras and names."""
    _write_atomic(Path(dst), retag_glb(Path(src).read_bytes(), name, extras))
    return Path(dst)


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno == 28:
            raise DiskFull(f"No space left to write {path}; free some disk space and run again.") from None
        raise
