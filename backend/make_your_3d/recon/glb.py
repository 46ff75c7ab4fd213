"""GLB writing: one mesh with UVs and an embedded baseColor PNG, written atomically; and stamping a
finished GLB with what made it (`asset.generator`, `asset.extras`: job, prompt, seed) and names."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import trimesh
from PIL import Image

from make_your_3d.errors import DiskFull
from make_your_3d.recon.texture import UVMesh


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
