"""GLB writing: one mesh with UVs and an embedded baseColor PNG, written atomically."""

from __future__ import annotations

import os
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
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno == 28:
            raise DiskFull(f"No space left to write {path}; free some disk space and run again.") from None
        raise
    return path
