"""The asset's texture set around the baked colour: shading normals, MikkTSpace tangents, the normal map
of the fine surface and the ORM texture (occlusion, roughness, metallic), each switched by `BakeConfig`
(`base_color_map`, `normal_map`, `occlusion_map`); the result is what `glb.write_asset` writes."""

from __future__ import annotations

import numpy as np
import trimesh

from make_your_3d.recon.config import BakeConfig
from make_your_3d.recon.glb import Asset
from make_your_3d.recon.normal_bake import bake_normal_map
from make_your_3d.recon.occlusion import bake_orm
from make_your_3d.recon.tangents import mikk_tangents, smooth_normals
from make_your_3d.recon.texture import UVMesh


def build_asset(uvm: UVMesh, base_color: np.ndarray, fine: trimesh.Trimesh | None, cfg: BakeConfig, scene_size: float,
                seed: int = 0) -> tuple[Asset, dict]:
    """The Asset and a record of what was baked (sizes, coverage; no seconds: the record is part of the
    stage's cached result, which must be the same bytes for the same inputs, and `timings['maps']` has
    the step's time). `fine`: the surface before
    simplification (None: no normal map can be baked, e.g. nothing was simplified away and the caller
    has no fine mesh; the simplified mesh itself is then used)."""
    record: dict = {}
    normals = smooth_normals(uvm.vertices, uvm.faces)
    tangents = mikk_tangents(uvm.vertices, normals, uvm.uvs, uvm.faces) if cfg.normal_map else None
    normal_map = None
    if cfg.normal_map:
        source = fine if fine is not None else trimesh.Trimesh(uvm.vertices, uvm.faces, process=True)
        normal_map, stats = bake_normal_map(uvm, normals, tangents, source, cfg.texture_size, scene_size, cfg)
        record["normal"] = {"size": cfg.texture_size, "fine_faces": int(len(source.faces)),
                            **{k: round(v, 4) if isinstance(v, float) else v for k, v in stats.items()}}
    orm = None
    if cfg.occlusion_map:
        size = max(8, cfg.texture_size // cfg.orm_divisor)
        orm, stats = bake_orm(uvm, normals, size, cfg, seed=seed)
        record["occlusion"] = {"size": size, **{k: round(v, 4) for k, v in stats.items()}}
    asset = Asset(uvm, normals, tangents, base_color if cfg.base_color_map else None, normal_map, orm,
                  normal_scale=cfg.normal_scale, occlusion_strength=cfg.occlusion_strength, roughness=cfg.roughness,
                  metallic=cfg.metallic)
    record["maps"] = [k for k, v in (("base_color", asset.base_color), ("normal", normal_map), ("occlusion", orm))
                      if v is not None]
    return asset, record
