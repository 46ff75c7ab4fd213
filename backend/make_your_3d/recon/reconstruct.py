"""Stage 6: views folder -> textured GLB, in numbered steps of one call each (`reconstruct`).

1. visual hull of the masks (bounds, and the anchor for step 2);
2. each orthographic view's normals integrated into a depth map (recon/lift.py), its pixels lifted
   to surfels: the Gaussians' initialisation (hull surfels where no view lifts a point);
3. flat Gaussians fitted to colour, mask, normal and lifted-depth targets (gsplat rasterization on
   CUDA, the torch path otherwise; recon/fit.py, recon/rasterize.py);
4. TSDF fusion over the input cameras: lifted depth where known, else the Gaussians' depth where they
   are solid; the masks bound it as a distance to each silhouette (recon/mesh.py);
5. marching cubes, largest components, vertices on a view's contour snapped onto the visual hull,
   quadric simplification to the face budget;
6. xatlas UVs, texture baked from the views with a depth test and view-angle weights, unseen texels
   by a smooth fill from the colours seen around them;
   dilated islands (recon/texture.py); the fine surface of step 5 (before simplification) baked into a
   tangent-space normal map, ambient occlusion into an ORM texture (recon/asset_maps.py, issue 26);
7. GLB written atomically (recon/glb.py) plus a job.json-style record.

Every tuned number comes from one `ReconConfig` (recon/config.py); `ReconOptions` is its front for the
pipeline and the CLI (a preset name plus flat or dotted overrides).
"""

from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from make_your_3d.device import resolve_device
from make_your_3d.errors import BadRequest, BadViews
from make_your_3d.progress import CancelToken, ProgressFn, Reporter
from make_your_3d.recon.camera import Cameras, cameras_for
from make_your_3d.recon.config import PRESETS, ReconConfig, parse_settings, preset_config  # noqa: F401 - parse_settings re-exported (benchmarks)
from make_your_3d.recon.fit import Gaussians, fit_gaussians, init_from_lift, render
from make_your_3d.recon.asset_maps import build_asset
from make_your_3d.recon.glb import write_asset
from make_your_3d.recon.lift import depth_slopes
from make_your_3d.recon.mesh import (DepthView, Silhouette, clean_field, field_to_mesh, keep_largest, silhouettes, simplify,
                                     snap_to_silhouettes, surface_report, tsdf_field)
from make_your_3d.recon.rasterize import cuda_available
from make_your_3d.recon.scene import ViewTargets, mask_tensors, scene_bounds, targets_for
from make_your_3d.recon.texture import ColorSource, UVMesh, bake, unwrap
from make_your_3d.views import ViewSet, load_views

__all__ = ["PRESETS", "ReconConfig", "ReconOptions", "ReconResult", "reconstruct"]

log = logging.getLogger("make_your_3d.recon")


class ReconOptions:
    """The pipeline's and the CLI's front to `ReconConfig`: a preset name, the device, and overrides by
    flat name (`grid_res`, `fuse_size`, `iterations`, ...: `config.FLAT_ALIASES`) or dotted name
    (`lift.contact_px`). None means "the preset's value". `config()` resolves and validates them
    (BadRequest naming a bad key or value); `resolved()` is that config as a JSON-able dict."""

    def __init__(self, preset: str = "default", device: str = "auto", faces: int | None = None,
                 texture_size: int | None = None, seed: int = 0, overrides: dict[str, Any] | None = None,
                 **settings: Any):
        self.preset = preset
        self.device = device
        self.faces = faces
        self.texture_size = texture_size
        self.seed = seed
        self.overrides = {**(overrides or {}), **settings}

    def settings(self) -> dict[str, Any]:
        """Every explicit override (None dropped), the named arguments included."""
        named = {"faces": self.faces, "texture_size": self.texture_size, "seed": self.seed}
        return {k: v for k, v in {**named, **self.overrides}.items() if v is not None}

    def config(self) -> ReconConfig:
        return preset_config(self.preset).with_overrides(self.settings())

    def resolved(self) -> dict:
        return self.config().to_dict()

    def to_dict(self) -> dict:
        return {"preset": self.preset, "device": self.device, "faces": self.faces, "texture_size": self.texture_size,
                "seed": self.seed, "overrides": dict(self.overrides)}

    def __repr__(self) -> str:
        return f"ReconOptions({self.to_dict()!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ReconOptions) and self.to_dict() == other.to_dict()


@dataclass
class ReconResult:
    glb_path: Path
    vertices: int
    faces: int
    timings: dict[str, float]
    record: dict = field(default_factory=dict)

    def mesh_summary(self) -> dict:
        """job.json's `mesh`: the counts and the surface facts (watertight, holes, components, what
        each MeshFix run left)."""
        return {"vertices": self.vertices, "faces": self.faces, **self.record.get("surface", {})}


@dataclass
class _Scene:
    """What step 1-2 know about the views: masks, bounds, targets at the fusion and fitting sizes, the
    lifted depth (V,H,W) at the fusion size (None: nothing lifted) and the initial Gaussians."""

    masks: list[Tensor]
    lo: np.ndarray
    hi: np.ndarray
    fuse: ViewTargets
    fit: ViewTargets
    lifted: Tensor | None
    fit_depth: Tensor | None
    gaussians: Gaussians

    @property
    def size(self) -> float:
        return float(np.max(self.hi - self.lo))


def _versions() -> dict:
    import gsplat
    import skimage
    import trimesh

    from make_your_3d import __version__

    return {"make_your_3d": __version__, "torch": torch.__version__, "gsplat": gsplat.__version__,
            "trimesh": trimesh.__version__, "scikit-image": skimage.__version__, "python": platform.python_version()}


def _view_slopes(normals_world: Tensor, cams: Cameras, cfg) -> Tensor:
    """(H,W,2) depth change per pixel step of an orthographic view, for the fusion's sub-pixel lookups."""
    n_cam = (normals_world @ cams.viewmats[0, :3, :3].T).cpu().numpy()
    gx, gy, _ = depth_slopes(n_cam, float(cams.Ks[0, 0, 0]), float(cams.Ks[0, 1, 1]), cfg)
    return torch.tensor(np.stack([gx, gy], -1), dtype=torch.float32, device=normals_world.device)


def reconstruct(views: ViewSet | str | Path, out_glb: str | Path, options: ReconOptions | ReconConfig | None = None,
                progress: ProgressFn | None = None, cancel: CancelToken | None = None) -> ReconResult:
    """Reconstruct a textured mesh from a views folder (or a loaded ViewSet) and write it as GLB.
    `options`: a ReconOptions (preset + overrides + device) or a ReconConfig (run on the auto device)."""
    options = options if options is not None else ReconOptions()
    cfg = options if isinstance(options, ReconConfig) else options.config()
    device = resolve_device("auto" if isinstance(options, ReconConfig) else options.device)
    viewset = load_views(views) if isinstance(views, (str, Path)) else views
    if not viewset.views:
        raise BadViews("the view set is empty; at least one view is needed.")
    reporter = Reporter("reconstruct", progress, cancel)
    total = cfg.fit.iterations + 5
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)

    with _deterministic():
        reporter.step(0, total, "visual hull")
        with _timed(timings, "init"):  # 1-2. hull, bounds, lifted normals, initial Gaussians
            scene = _init_scene(viewset, cfg, gen, device)
        with _timed(timings, "fit"):  # 3. Gaussians fitted to the views
            g, losses = fit_gaussians(scene.gaussians, scene.fit, cfg.fit, scene.size, gen, reporter, step_offset=0,
                                      total_steps=total, depth_targets=scene.fit_depth)
        reporter.step(cfg.fit.iterations + 1, total, "fusing depth")
        with _timed(timings, "fuse"):  # 4. depth views fused into a field
            depth_views = _depth_views(g, scene, cfg, device)
            tsdf, step, sils = _fuse(depth_views, scene, cfg, device)
        if cfg.surf.enabled:
            with _timed(timings, "surface_fit"):  # 4b. one surface fitted to every view (issue 23)
                tsdf, surf_record = _surface_fit(tsdf, step, scene, cfg, gen, device)
        reporter.step(cfg.fit.iterations + 2, total, "extracting surface")
        with _timed(timings, "mesh"):  # 5. surface
            mesh, raw_faces, repairs, fine = _extract_mesh(tsdf, scene.lo, step, depth_views, sils, cfg)
        reporter.step(cfg.fit.iterations + 3, total, "unwrapping and baking texture")
        with _timed(timings, "uv"):  # 6a. UVs
            uvm = unwrap(mesh, cfg.bake.texture_size, cfg.bake)
        with _timed(timings, "texture"):  # 6b. texture
            full, _ = _full_res_sources(viewset, device)
            texture, tex_stats = bake(uvm, full, cfg.bake.texture_size,
                                      depth_tol=cfg.bake.depth_tol_voxels * step, device=device, cfg=cfg.bake)
        with _timed(timings, "maps"):  # 6c. normal map of the fine surface, occlusion (issue 26)
            asset, maps_record = build_asset(uvm, texture, fine, cfg.bake, scene.size, cfg.seed)
        reporter.step(cfg.fit.iterations + 4, total, "writing GLB")
        with _timed(timings, "write"):  # 7. GLB
            out_glb = write_asset(asset, out_glb)
    timings["total"] = time.perf_counter() - t_all
    timings = {k: round(v, 3) for k, v in timings.items()}
    reporter.step(total, total, "done")
    surface = surface_report(mesh, repairs)
    if not surface["watertight"]:
        log.warning("the reconstructed surface is not watertight: %d holes, %d pieces (see `mesh` in job.json)", surface["holes"],
                    surface["components"])
    record = _record(options, cfg, device, viewset, scene, g, losses, raw_faces, uvm, mesh, tex_stats, timings, surface)
    if cfg.surf.enabled:
        record["surface_fit"] = surf_record
    record["maps"] = maps_record
    return ReconResult(Path(out_glb), int(len(uvm.vertices)), int(len(uvm.faces)), timings, record)


class _timed:
    """Adds the block's wall seconds to timings[name]."""

    def __init__(self, timings: dict[str, float], name: str):
        self.timings, self.name = timings, name

    def __enter__(self):
        self.t = time.perf_counter()

    def __exit__(self, *exc):
        self.timings[self.name] = time.perf_counter() - self.t
        return False


def _init_scene(viewset: ViewSet, cfg: ReconConfig, gen: torch.Generator, device: torch.device) -> _Scene:
    """Steps 1-2: masks, the hull's bounds, targets, normals lifted to depth, the initial Gaussians."""
    masks = mask_tensors(viewset, device)
    lo, hi = scene_bounds(viewset, masks, device, cfg.hull)
    fuse = targets_for(viewset, cfg.fuse.view_size, device)
    g, lifted = init_from_lift(viewset, masks, fuse, lo, hi, cfg, gen, device)
    tg = targets_for(viewset, cfg.fit.render_size, device)
    fit_depth = None
    if lifted is not None:
        fit_depth = lifted if (tg.width, tg.height) == (fuse.width, fuse.height) else \
            torch.nn.functional.interpolate(lifted[:, None], size=(tg.height, tg.width), mode="nearest")[:, 0]
    return _Scene(masks, lo, hi, fuse, tg, lifted, fit_depth, g)


@torch.no_grad()
def _depth_views(g: Gaussians, scene: _Scene, cfg: ReconConfig, device: torch.device
                 ) -> list[DepthView]:
    """Step 4's inputs. Input views: depth lifted from their normals where known (sharp, exact planes),
    else the Gaussians' depth; their masks carve free space."""
    fuse, lifted, fc = scene.fuse, scene.lifted, cfg.fuse
    depth_views: list[DepthView] = []
    for cams, idx in zip(fuse.cams, fuse.groups):
        for j, v in enumerate(idx):
            cam = cams.subset([j])
            _, _, a, d = render(g, cam)
            # the Gaussians' expected depth only where they are solid (else it mixes surfaces)
            d = torch.where(a[0] > fc.solid_alpha, d[0], torch.full_like(d[0], float("nan")))
            slope = None
            if lifted is not None:
                d = torch.where(torch.isfinite(lifted[v]), lifted[v], d)
                if fuse.normal is not None and bool(fuse.has_normal[v]) and cam.model == "ortho":
                    slope = _view_slopes(fuse.normal[v], cam, cfg.lift) * torch.isfinite(lifted[v])[..., None]
            depth_views.append(DepthView(cam, d, fuse.mask[v], fuse.mask[v], slope=slope))
    return depth_views


@torch.no_grad()
def _fuse(depth_views: list[DepthView], scene: _Scene, cfg: ReconConfig, device: torch.device
          ) -> tuple[np.ndarray, float, list[Silhouette]]:
    """Step 4: the truncated signed distance on the grid, its voxel size, and the silhouettes it used."""
    res = cfg.fuse.grid_res
    trunc = cfg.fuse.trunc_voxels * scene.size / (res - 1)
    sils = silhouettes(depth_views, cfg.hull)
    tsdf, step = tsdf_field(depth_views, scene.lo, scene.hi, res, trunc, device, sils=sils, cfg=cfg.fuse)
    return tsdf, step, sils


@torch.no_grad()
def _surface_fit(tsdf: np.ndarray, step: float, scene: _Scene, cfg: ReconConfig, gen: torch.Generator,
                 device: torch.device) -> tuple[np.ndarray, dict]:
    """Step 4b (cfg.surf.enabled): the fused field carved (and optionally refined) by one surface fitted
    to every view (recon/surface_fit.py), warm-started from it. Only where the carving emptied the coarse
    grid does the fused field change (set outside, or the fitted distance where that is larger): the
    fused field keeps its resolution everywhere the views agree with it."""
    from make_your_3d.recon.surface_fit import Grid, fit_surface, sample_grid, silhouette_guard, view_residual

    lo = torch.tensor(scene.lo, dtype=torch.float32, device=device)
    hi = torch.tensor(scene.hi, dtype=torch.float32, device=device)
    init = Grid(torch.tensor(tsdf, dtype=torch.float32, device=device), lo, step)
    with torch.enable_grad():
        fitted, removed, record = fit_surface(init, scene.fuse, cfg.surf, gen, box=(lo, hi))
    trunc = cfg.fuse.trunc_voxels * step  # the fused field is in units of its truncation
    out = tsdf.copy()
    ny, nz = tsdf.shape[1:]
    jj, kk = torch.meshgrid(torch.arange(ny, device=device), torch.arange(nz, device=device), indexing="ij")
    for i in range(tsdf.shape[0]):  # one x slab at a time: the fine grid is large
        pts = lo + step * torch.stack([torch.full_like(jj, i), jj, kk], -1).reshape(-1, 3).float()
        gone = sample_grid(removed.values[None], pts, removed.lo, removed.step)[:, 0] > 0.5
        if not bool(gone.any()):
            continue
        d = (sample_grid(fitted.values[None], pts, fitted.lo, fitted.step)[:, 0] / trunc).clamp(-1, 1)
        slab = torch.tensor(out[i].reshape(-1), device=device)
        slab = torch.where(gone, torch.maximum(slab, d).clamp_min(1e-3), slab)  # carved: outside
        out[i] = slab.reshape(ny, nz).cpu().numpy()
    before = torch.tensor(tsdf < 0, device=device)
    carved = torch.tensor(out < 0, device=device)
    after, restored = silhouette_guard(before, carved, lo, step, scene.fuse, cfg.surf)
    back = (after & ~carved).cpu().numpy()
    out[back] = tsdf[back]  # the guard at the fused grid's resolution (thin parts finer than the coarse grid)
    record["carved_fine_voxels"] = int((out > 0).sum() - (tsdf > 0).sum())
    record["restored_fine_voxels"] = restored
    if record["carved_fine_voxels"] == 0:
        return out, record
    # accepted only if the carved surface renders closer to the views than the fused one (the data term)
    weights = torch.tensor(record["view_weights"][0], device=device) if record["view_weights"] else None
    residual = []
    for candidate in (tsdf, out):
        m = field_to_mesh(clean_field(candidate, cfg.mesh.smooth_sigma), scene.lo, step)
        residual.append(view_residual(torch.tensor(m.vertices, dtype=torch.float32, device=device),
                                      torch.tensor(m.faces, device=device), scene.fuse, cfg.surf, weights))
    record["view_residual"] = {"fused": round(residual[0], 5), "carved": round(residual[1], 5)}
    record["accepted"] = residual[1] < residual[0]
    return (out if record["accepted"] else tsdf), record


def _extract_mesh(tsdf: np.ndarray, lo: np.ndarray, step: float, depth_views: list[DepthView],
                  sils: list[Silhouette], cfg: ReconConfig):
    """Step 5: marching cubes, the largest parts, contour snapping, simplification; also the raw face
    count, the MeshFix outcomes of the simplification and the fine surface (before it: the normal map's)."""
    try:
        mesh = field_to_mesh(clean_field(tsdf, cfg.mesh.smooth_sigma), lo, step)
    except ValueError:
        raise BadViews("no surface could be reconstructed from these views (check the masks and cameras).") from None
    mesh = snap_to_silhouettes(keep_largest(mesh, cfg.mesh.keep_fraction), depth_views, step, sils=sils, cfg=cfg.mesh)
    raw_faces = len(mesh.faces)
    fine = mesh
    mesh, repairs = simplify(mesh, cfg.mesh.faces, cfg.mesh)
    return mesh, raw_faces, repairs, fine


def _record(options, cfg: ReconConfig, device: torch.device, viewset: ViewSet, scene: _Scene, g: Gaussians,
            losses: list[float], raw_faces: int, uvm: UVMesh, mesh, tex_stats: dict, timings: dict, surface: dict) -> dict:
    """The job.json-style record: the options as given, the whole resolved config, what happened."""
    return {
        "stage": "reconstruct",
        "options": options.to_dict() if isinstance(options, ReconOptions) else None,
        "resolved": cfg.to_dict(),
        "device": str(device),
        "rasterizer": "gsplat-cuda" if device.type == "cuda" and cuda_available() else "torch",
        "views": len(viewset.views),
        "image_size": list(viewset.image_size),
        "bounds": [scene.lo.round(5).tolist(), scene.hi.round(5).tolist()],
        "gaussians": g.n,
        "loss_first": round(losses[0], 6) if losses else None,
        "loss_last": round(float(np.mean(losses[-10:])), 6) if losses else None,
        "raw_faces": raw_faces,
        "vertices": int(len(uvm.vertices)),
        "faces": int(len(uvm.faces)),
        "watertight": bool(mesh.is_watertight),
        "surface": surface,  # closed and manifold, holes, pieces, each MeshFix outcome
        "texture": {"size": cfg.bake.texture_size,
                    **{k: round(v, 4) if isinstance(v, float) else v for k, v in tex_stats.items()}},
        "timings": timings,
        "versions": _versions(),
    }


def _full_res_sources(viewset: ViewSet, device: torch.device) -> tuple[list[ColorSource], list[list[int]]]:
    """Every view at full resolution as a bake source."""
    W, H = viewset.image_size
    cams, groups = cameras_for(viewset, W, H, device)
    out: list[ColorSource] = []
    for c, idx in zip(cams, groups):
        for j, v in enumerate(idx):
            col = torch.tensor(viewset.views[v].color, dtype=torch.float32, device=device) / 255.0
            out.append(ColorSource(c.subset([j]), col[..., :3], col[..., 3]))
    return out, groups


class _deterministic:
    """Deterministic torch algorithms for the duration of a reconstruction (restored afterwards)."""

    def __enter__(self):
        self._prev = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True, warn_only=True)
        return self

    def __exit__(self, *exc):
        torch.use_deterministic_algorithms(self._prev)
        return False
