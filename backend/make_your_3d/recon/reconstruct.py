"""Stage 6: views folder -> textured GLB.

1. visual hull of the masks (bounds, and the anchor for step 2);
2. each orthographic view's normals integrated into a depth map (recon/lift.py), its pixels lifted
   to surfels: the Gaussians' initialisation (hull surfels where no view lifts a point);
3. flat Gaussians fitted to colour, mask, normal and lifted-depth targets (gsplat rasterization on
   CUDA, the torch path otherwise; recon/fit.py, recon/rasterize.py);
4. TSDF fusion over the input cameras: lifted depth where known, else the Gaussians' depth where they
   are solid; the masks bound it as a distance to each silhouette (recon/mesh.py); marching cubes;
   largest components; vertices on a view's contour snapped onto the visual hull; quadric
   simplification to the face budget;
5. xatlas UVs, texture baked from the views with a depth test and view-angle weights, unseen texels
   from Gaussian renders (`extra_views=True`), then a smooth fill from the colours seen around them;
   dilated islands (recon/texture.py);
6. GLB written atomically (recon/glb.py) plus a job.json-style record.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from make_your_3d.device import resolve_device
from make_your_3d.errors import BadRequest, BadViews
from make_your_3d.progress import CancelToken, ProgressFn, Reporter
from make_your_3d.recon.fit import FitConfig, fit_gaussians, init_from_lift, render
from make_your_3d.recon.glb import textured_mesh, write_glb
from make_your_3d.recon.mesh import (DepthView, clean_field, field_to_mesh, keep_largest, orbit_cameras, simplify,
                                     silhouettes, snap_to_silhouettes, tsdf_field)
from make_your_3d.recon.rasterize import Cameras, cuda_available
from make_your_3d.recon.scene import mask_tensors, scene_bounds, targets_for
from make_your_3d.recon.texture import ColorSource, bake, unwrap
from make_your_3d.recon.views import ViewSet, load_views

# Knobs per preset; explicit ReconOptions fields override them.
PRESETS: dict[str, dict] = {
    "fast": dict(iterations=100, render_size=96, num_gaussians=6000, views_per_step=2, grid_res=320,
                 fuse_size=256, faces=20000, texture_size=1024),
    "default": dict(iterations=200, render_size=128, num_gaussians=12000, views_per_step=2, grid_res=512,
                    fuse_size=256, faces=40000, texture_size=2048),
    "quality": dict(iterations=600, render_size=192, num_gaussians=25000, views_per_step=3, grid_res=576,
                    fuse_size=512, faces=50000, texture_size=2048),
}


@dataclass
class ReconOptions:
    preset: str = "default"  # fast | default | quality
    device: str = "auto"
    faces: int | None = None  # face budget
    texture_size: int | None = None
    seed: int = 0
    iterations: int | None = None  # Gaussian fitting steps
    render_size: int | None = None  # longest side of the views while fitting
    num_gaussians: int | None = None  # initial surfels on the visual hull
    views_per_step: int | None = None
    grid_res: int | None = None  # TSDF grid cells along the longest side of the box
    fuse_size: int | None = None  # resolution at which normals are integrated and depths fused
    extra_views: bool = False  # fill unseen texels from Gaussian renders of extra cameras (else nearest seen)
    fuse_extra: bool = False  # also fuse their depth (off: expected depth mixes front and back surfels)

    def resolved(self) -> dict:
        if self.preset not in PRESETS:
            raise BadRequest(f"unknown preset {self.preset!r}; use one of {', '.join(PRESETS)}.")
        knobs = dict(PRESETS[self.preset])
        for k in knobs:
            v = getattr(self, k)
            if v is not None:
                knobs[k] = v
        for k in ("faces", "texture_size", "iterations", "render_size", "num_gaussians", "grid_res", "fuse_size"):
            if int(knobs[k]) < (0 if k == "iterations" else 8):
                raise BadRequest(f"option {k} = {knobs[k]} is too small.")
        return knobs


@dataclass
class ReconResult:
    glb_path: Path
    vertices: int
    faces: int
    timings: dict[str, float]
    record: dict = field(default_factory=dict)


def _versions() -> dict:
    import gsplat
    import skimage
    import trimesh

    from make_your_3d import __version__

    return {"make_your_3d": __version__, "torch": torch.__version__, "gsplat": gsplat.__version__,
            "trimesh": trimesh.__version__, "scikit-image": skimage.__version__, "python": platform.python_version()}


def _view_slopes(normals_world: Tensor, cams: Cameras) -> Tensor:
    """(H,W,2) depth change per pixel step of an orthographic view, for the fusion's sub-pixel lookups."""
    from make_your_3d.recon.lift import depth_slopes

    n_cam = (normals_world @ cams.viewmats[0, :3, :3].T).cpu().numpy()
    gx, gy, _ = depth_slopes(n_cam, float(cams.Ks[0, 0, 0]), float(cams.Ks[0, 1, 1]))
    return torch.tensor(np.stack([gx, gy], -1), dtype=torch.float32, device=normals_world.device)


def reconstruct(views: ViewSet | str | Path, out_glb: str | Path, options: ReconOptions | None = None,
                progress: ProgressFn | None = None, cancel: CancelToken | None = None) -> ReconResult:
    """Reconstruct a textured mesh from a views folder (or a loaded ViewSet) and write it as GLB."""
    options = options or ReconOptions()
    knobs = options.resolved()
    viewset = load_views(views) if isinstance(views, (str, Path)) else views
    if not viewset.views:
        raise BadViews("the view set is empty; at least one view is needed.")
    device = resolve_device(options.device)
    reporter = Reporter("reconstruct", progress, cancel)
    total = int(knobs["iterations"]) + 5
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    torch.manual_seed(options.seed)
    gen = torch.Generator(device="cpu").manual_seed(options.seed)

    with _deterministic():
        reporter.step(0, total, "visual hull")
        t = time.perf_counter()
        masks = mask_tensors(viewset, device)
        lo, hi = scene_bounds(viewset, masks, device)
        scene_size = float(np.max(hi - lo))
        centre = (lo + hi) / 2
        cfg = FitConfig(iterations=int(knobs["iterations"]), num_gaussians=int(knobs["num_gaussians"]),
                        views_per_step=int(knobs["views_per_step"]), hull_res=min(96, max(32, int(knobs["grid_res"]) // 2)))
        fuse = targets_for(viewset, int(knobs["fuse_size"]), device)
        g, lifted_depth = init_from_lift(viewset, masks, fuse, lo, hi, cfg, gen, device)
        tg = targets_for(viewset, int(knobs["render_size"]), device)
        fit_depth = None
        if lifted_depth is not None:
            fit_depth = lifted_depth if (tg.width, tg.height) == (fuse.width, fuse.height) else \
                torch.nn.functional.interpolate(lifted_depth[:, None], size=(tg.height, tg.width), mode="nearest")[:, 0]
        timings["init"] = time.perf_counter() - t

        t = time.perf_counter()
        g, losses = fit_gaussians(g, tg, cfg, scene_size, gen, reporter, step_offset=0, total_steps=total,
                                 depth_targets=fit_depth)
        timings["fit"] = time.perf_counter() - t

        reporter.step(cfg.iterations + 1, total, "fusing depth")
        t = time.perf_counter()
        # input views: depth lifted from their normals where known (sharp, exact planes), else the
        # Gaussians' depth; their masks carve free space. Extra orbit views (optional): the Gaussians'
        # depth only, at a lower weight, never carving (a gap between surfels is not free space).
        fuse_depth = lifted_depth
        depth_views: list[DepthView] = []
        extra_sources: list[ColorSource] = []
        with torch.no_grad():
            for cams, idx in zip(fuse.cams, fuse.groups):
                for j, v in enumerate(idx):
                    cam = cams.subset([j])
                    _, _, a, d = render(g, cam)
                    # the Gaussians' expected depth only where they are solid (else it mixes surfaces)
                    d = torch.where(a[0] > 0.9, d[0], torch.full_like(d[0], float("nan")))
                    slope = None
                    if fuse_depth is not None:
                        d = torch.where(torch.isfinite(fuse_depth[v]), fuse_depth[v], d)
                        if fuse.normal is not None and bool(fuse.has_normal[v]) and cam.model == "ortho":
                            slope = _view_slopes(fuse.normal[v], cam) * torch.isfinite(fuse_depth[v])[..., None]
                    depth_views.append(DepthView(cam, d, fuse.mask[v], fuse.mask[v], slope=slope))
            if options.extra_views:
                radius = 0.5 * float(np.linalg.norm(hi - lo)) * 1.05
                orbit = orbit_cameras(centre, radius, min(256, int(knobs["fuse_size"])), (35.0, -35.0), 6, device)
                for j in range(len(orbit)):
                    cam = orbit.subset([j])
                    rgb, _, a, d = render(g, cam)
                    if options.fuse_extra:
                        depth_views.append(DepthView(cam, d[0], a[0], None, weight=0.2, carve=False))
                    extra_sources.append(ColorSource(cam, rgb[0] / a[0, ..., None].clamp_min(1e-4), a[0], 1e-3))
            res = int(knobs["grid_res"])
            trunc = 3.0 * scene_size / (res - 1)
            sils = silhouettes(depth_views)
            tsdf, step = tsdf_field(depth_views, lo, hi, res, trunc, device, sils=sils)
        timings["fuse"] = time.perf_counter() - t

        reporter.step(cfg.iterations + 2, total, "extracting surface")
        t = time.perf_counter()
        try:
            mesh = field_to_mesh(clean_field(tsdf), lo, step)
        except ValueError:
            raise BadViews("no surface could be reconstructed from these views (check the masks and cameras).") from None
        mesh = snap_to_silhouettes(keep_largest(mesh), depth_views, step, sils=sils)
        raw_faces = len(mesh.faces)
        mesh = simplify(mesh, int(knobs["faces"]))
        timings["mesh"] = time.perf_counter() - t

        reporter.step(cfg.iterations + 3, total, "unwrapping and baking texture")
        t = time.perf_counter()
        size = int(knobs["texture_size"])
        uvm = unwrap(mesh, size)
        timings["uv"] = time.perf_counter() - t
        t = time.perf_counter()
        full, groups = _full_res_sources(viewset, device)
        texture, tex_stats = bake(uvm, full + extra_sources, size, depth_tol=2.0 * step, device=device)
        timings["texture"] = time.perf_counter() - t

        reporter.step(cfg.iterations + 4, total, "writing GLB")
        t = time.perf_counter()
        out_glb = write_glb(textured_mesh(uvm, texture), out_glb)
        timings["write"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_all
    timings = {k: round(v, 3) for k, v in timings.items()}
    reporter.step(total, total, "done")

    record = {
        "stage": "reconstruct",
        "options": asdict(options),
        "resolved": knobs,
        "device": str(device),
        "rasterizer": "gsplat-cuda" if device.type == "cuda" and cuda_available() else "torch",
        "views": len(viewset.views),
        "image_size": list(viewset.image_size),
        "bounds": [lo.round(5).tolist(), hi.round(5).tolist()],
        "gaussians": g.n,
        "loss_first": round(losses[0], 6) if losses else None,
        "loss_last": round(float(np.mean(losses[-10:])), 6) if losses else None,
        "raw_faces": raw_faces,
        "vertices": int(len(uvm.vertices)),
        "faces": int(len(uvm.faces)),
        "watertight": bool(mesh.is_watertight),
        "texture": {"size": size, **{k: round(v, 4) if isinstance(v, float) else v for k, v in tex_stats.items()}},
        "timings": timings,
        "versions": _versions(),
    }
    return ReconResult(Path(out_glb), int(len(uvm.vertices)), int(len(uvm.faces)), timings, record)


def _full_res_sources(viewset: ViewSet, device: torch.device) -> tuple[list[ColorSource], list[list[int]]]:
    from make_your_3d.recon.scene import cameras_for

    W, H = viewset.image_size
    cams, groups = cameras_for(viewset, W, H, device)
    out: list[ColorSource] = []
    for c, idx in zip(cams, groups):
        for j, v in enumerate(idx):
            col = torch.tensor(viewset.views[v].color, dtype=torch.float32, device=device) / 255.0
            out.append(ColorSource(c.subset([j]), col[..., :3], col[..., 3], 1.0))
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


def run_cli(args) -> int:
    """`make-your-3d reconstruct VIEWS_DIR --out OUT.glb ...`: writes OUT.glb and OUT.json."""
    knobs = {k: getattr(args, k) for k in ("iterations", "render_size", "num_gaussians", "views_per_step", "grid_res",
                                            "fuse_size") if getattr(args, k, None) is not None}
    opts = ReconOptions(preset=args.preset, device=args.device, faces=args.faces, texture_size=args.texture_size,
                        seed=args.seed, **knobs)

    def show(p) -> None:
        if p.step == p.total or p.step % 50 == 0 or not p.message.startswith("fitting"):
            eta = f", eta {p.eta_s:.0f}s" if p.eta_s is not None else ""
            print(f"[{p.stage}] {p.step}/{p.total} {p.message} ({p.elapsed_s:.1f}s{eta})", flush=True)

    result = reconstruct(args.views, args.out, opts, progress=show)
    rec_path = Path(args.out).with_suffix(".json")
    tmp = rec_path.with_name(f".{rec_path.name}.tmp")
    tmp.write_text(json.dumps(result.record, indent=2))
    tmp.replace(rec_path)
    print(f"wrote {result.glb_path} ({result.vertices} vertices, {result.faces} faces) in {result.timings['total']:.1f}s")
    return 0
