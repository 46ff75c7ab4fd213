"""The end-to-end generator: subject image + text edit -> subject.glb (the whole method).

Stages, each cached under the hash of everything it depends on (pipeline/cache.py):

    subject_views   frozen multi-view model on the subject image          (subject only)
    identity        IP-Adapter to_k_ip/to_v_ip fine-tuned on those views   (subject only)
    edited_views    original personalized model edits the six views, plus their normals (+ prompt)
    subject_prior   LoRA on the multi-view cross-domain attention         (+ prompt)
    front_view      fine-tuned personalized model: the edited front view  (+ seed)
    multiview       fine-tuned multi-view model: six colour + normal views (+ seed)
    reconstruct     3D Gaussians -> mesh -> UVs -> texture -> GLB          (+ seed)

So a new prompt on the same subject reuses the first two, a new seed reuses the first four, and
the same inputs again reuse everything. One `Generator` keeps its models loaded between runs.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from make_your_3d import __version__
from make_your_3d.device import resolve_device, resolve_dtype
from make_your_3d.errors import BadRequest, DiskFull, Make3DError, NoSubject, OutOfMemory, WeightsBroken, WeightsMissing
from make_your_3d.models.registry import ROLES, is_tiny
from make_your_3d.pipeline.cache import StageCache, digest, models_fingerprint
from make_your_3d.pipeline.stages import STAGE_SPECS, KeyContext, stage_keys
from make_your_3d.pipeline.identity import IdentityTrainer, load_ip_state, view_prompt
from make_your_3d.pipeline.multiview_views import generate_views
from make_your_3d.pipeline.presets import TEST_OVERRIDES, Preset, resolve_preset  # noqa: F401 - TEST_OVERRIDES re-exported (benchmarks)
from make_your_3d.pipeline.request import GenerateRequest, GenerateResult, validate_request
from make_your_3d.progress import CancelToken, ProgressFn, Reporter
from make_your_3d.recon.glb import job_name, stamp_glb
from make_your_3d.views import ViewSet, load_views, save_views

log = logging.getLogger(__name__)

SUBJECT_SEED = 0  # the seed-independent stages use a fixed seed, so variants and re-runs share them
REQUIRED_ROLES = ("personalized", "ip_adapter", "image_encoder", "multiview", "normal_estimator")
STAGES = tuple(s.name for s in STAGE_SPECS)


@dataclass
class StageRecord:
    name: str
    key: str
    cached: bool
    seconds: float
    peak_gb: float | None = None  # peak CUDA memory allocated during the stage (None off CUDA)


class Generator:
    """Runs the method; keeps models loaded between runs (variants and re-runs are fast)."""

    def __init__(self, models_dir: str | Path, cache_dir: str | Path, device: str = "auto", overrides: dict | None = None):
        self.models_dir = Path(models_dir)
        self.cache = StageCache(cache_dir)
        self.device = resolve_device(device)
        self.overrides = dict(overrides or {})
        self._loaded: dict[str, object] = {}
        self._original_ip: dict[str, torch.Tensor] | None = None

    # --- models -------------------------------------------------------------------------------

    def _load(self, name: str, dtype: torch.dtype, offload: bool = False):
        """A loaded model, built on first use. With `offload` (the lowvram preset) every other
        loaded model is moved to the CPU first, so only the one in use occupies the GPU."""
        key = f"{name}:{dtype}"
        if key not in self._loaded:
            for other in [k for k in self._loaded if k.startswith(f"{name}:")]:
                del self._loaded[other]  # precision changed between presets
            if offload:
                self._evict(keep=None)
            self._loaded[key] = self._build_checked(name, dtype)
        elif offload:
            self._evict(keep=key)
            self._loaded[key].to(self.device)
        return self._loaded[key]

    def _evict(self, keep: str | None) -> None:
        if self.device.type != "cuda":
            return
        for key, model in self._loaded.items():
            if key != keep and hasattr(model, "to") and not key.startswith("segmenter:"):
                model.to("cpu")
        torch.cuda.empty_cache()

    def _build_checked(self, name: str, dtype: torch.dtype):
        """`_build`, with a loader failure on files that are all present reported as damaged weights
        of that role (a truncated or corrupted file fails deep inside safetensors/diffusers)."""
        try:
            return self._build(name, dtype)
        except (WeightsBroken, MemoryError, torch.cuda.OutOfMemoryError):
            raise
        except Exception as exc:
            if isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower():
                raise
            # a loader's own WeightsMissing while every file is present means a damaged file
            if isinstance(exc, Make3DError) and not (isinstance(exc, WeightsMissing) and not ROLES[name].missing(self.models_dir)):
                raise
            raise WeightsBroken(
                f"The {name} model's weights in {ROLES[name].path(self.models_dir)} could not be loaded ({type(exc).__name__}: "
                f"{str(exc)[:200]}). Run `make-your-3d models verify` to find the damaged file, then "
                f"`make-your-3d models fetch --role {name}` to fetch it again."
            ) from exc

    def _build(self, name: str, dtype: torch.dtype):
        if name == "personalized":
            from make_your_3d.models.personalized import ip_adapter_parameters, load_personalized

            pipe = load_personalized(self.models_dir, self.device, dtype)
            self._original_ip = {k: v.detach().clone() for k, v in ip_adapter_parameters(pipe.unet).items()}
            return pipe
        if name == "multiview":
            from make_your_3d.models.multiview import load_multiview

            return load_multiview(ROLES["multiview"].path(self.models_dir), self.device, dtype)
        if name == "normal_estimator":
            from make_your_3d.models.normals import load_normal_estimator

            return load_normal_estimator(ROLES["normal_estimator"].path(self.models_dir), self.device, dtype)
        if name == "segmenter":
            from make_your_3d.models.segmenter import load_segmenter

            return load_segmenter(ROLES["segmenter"].path(self.models_dir), self.device)
        raise KeyError(name)

    def _segmenter(self):
        """The background remover, or None when its role is not installed (it is optional)."""
        if not ROLES["segmenter"].complete(self.models_dir):
            return None
        return self._load("segmenter", torch.float32)

    def _personalized(self, preset: Preset, dtype: torch.dtype, ip_state: dict[str, torch.Tensor] | None = None):
        """The SD 1.5 + IP-Adapter pipeline with either the original or the given adapter weights."""
        pipe = self._load("personalized", dtype, preset.offload)
        load_ip_state(pipe.unet, ip_state if ip_state is not None else self._original_ip)
        return pipe

    def unload(self) -> None:
        """Drop every loaded model and free GPU memory."""
        self._loaded.clear()
        self._original_ip = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # --- the run ------------------------------------------------------------------------------

    def run(
        self,
        request: GenerateRequest,
        out_dir: str | Path,
        progress: ProgressFn | None = None,
        cancel: CancelToken | None = None,
    ) -> GenerateResult:
        """Run every stage (reusing cached ones) and write out_dir atomically."""
        try:
            return self._run(request, Path(out_dir), progress, cancel)
        except torch.cuda.OutOfMemoryError:
            self.unload()
            raise OutOfMemory("The GPU ran out of memory. Pick the lowvram preset, or close other programs using the GPU.") from None
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise DiskFull("The disk is full. Free some space (or choose another output folder) and run the job again.") from None
            raise

    def _run(self, request: GenerateRequest, out_dir: Path, progress: ProgressFn | None, cancel: CancelToken | None) -> GenerateResult:
        started = time.monotonic()
        image = validate_request(request)
        preset = resolve_preset(request.preset, self.models_dir, {**self.overrides, **(request.overrides or {})})
        recon_options = self._recon_options(preset, request)
        recon_config = recon_options.resolved()  # validated here, before any model loads (a BadRequest)
        from make_your_3d.models.personalized import require_roles

        require_roles(self.models_dir, *REQUIRED_ROLES)
        dtype = resolve_dtype(self.device, preset.precision)
        fingerprints = models_fingerprint(self.models_dir, *REQUIRED_ROLES, *(["segmenter"] if ROLES["segmenter"].complete(self.models_dir) else []))
        records: list[StageRecord] = []

        def reporter(stage: str) -> Reporter:
            return Reporter(stage, progress, cancel)

        # Stage 1: preprocess (cheap, not cached): mask, crop, recentre, pad, resize for the models.
        subject_rgba = self._prepare_input(image, request, preset, cancel)
        subject = request.subject
        context = KeyContext(device_type=self.device.type, dtype=str(dtype).removeprefix("torch."), fingerprints=fingerprints, version=__version__,
                             extra={"reconstruct": recon_config})
        keys = stage_keys(request, preset, context)

        def timed_stage(name: str, writer: Callable[[Path, Reporter], None]) -> Path:
            key, inputs = keys[name]
            rep = reporter(name)
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            t0 = time.monotonic()
            hit = self.cache.get(name, key)
            if hit is not None:
                rep.step(1, 1, "reused from cache")
            else:
                rep.step(0, 1, "starting")
            path = hit or self.cache.build(name, key, lambda tmp: writer(tmp, rep), inputs)
            peak = round(torch.cuda.max_memory_allocated(self.device) / 1e9, 3) if self.device.type == "cuda" else None
            records.append(StageRecord(name, key, hit is not None, round(time.monotonic() - t0, 3), peak))
            return path

        # Stages 2-8, in the order of pipeline/stages.py's graph; each key derives from its declaration there.
        views_dir = timed_stage("subject_views", lambda tmp, rep: self._subject_views(subject_rgba, preset, dtype, tmp, rep))
        identity_dir = timed_stage("identity", lambda tmp, rep: self._identity(views_dir, subject, preset, dtype, tmp, rep))
        edits_dir = timed_stage("edited_views", lambda tmp, rep: self._edited_views(views_dir, request, preset, dtype, tmp, rep))
        prior_dir = timed_stage("subject_prior", lambda tmp, rep: self._subject_prior(edits_dir, preset, dtype, tmp, rep))
        front_dir = timed_stage("front_view", lambda tmp, rep: self._front_view(subject_rgba, identity_dir, request, preset, dtype, tmp, rep))
        mv_dir = timed_stage("multiview", lambda tmp, rep: self._multiview(front_dir, prior_dir, request.seed, preset, dtype, tmp, rep))
        recon_dir = timed_stage("reconstruct", lambda tmp, rep: self._reconstruct(mv_dir, recon_options, tmp, progress, cancel))

        # Step 9: the job record and the outputs, published in one rename.
        record = self._job_record(request, image, preset, context, dtype, records, recon_dir)
        files = self._write_outputs(out_dir, image, subject_rgba, front_dir, mv_dir, recon_dir, record, started)
        return GenerateResult(out_dir=out_dir, files=files, cached_stages=record["cached_stages"], timings=record["timings"])

    def _job_record(self, request: GenerateRequest, image: Image.Image, preset: Preset, context: KeyContext, dtype: torch.dtype,
                    records: list[StageRecord], recon_dir: Path) -> dict:
        """job.json: the inputs, every setting (preset, resolved reconstruction config, device,
        dtype), the weights' fingerprints, each stage's key, timing and cache hit, versions."""
        return {
            "version": __version__,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "inputs": {
                "prompt": request.prompt,
                "negative_prompt": request.negative_prompt,
                "subject": request.subject,
                "seed": request.seed,
                "image_sha256": digest(request.image),
                "image_size": list(image.size),
                "image_has_alpha": image.mode == "RGBA",
                "overrides": dict(request.overrides or {}),
            },
            "preset": preset.to_dict(),
            "recon": context.extra["reconstruct"],  # the whole resolved reconstruction config
            "device": str(self.device),
            "dtype": str(dtype).removeprefix("torch."),
            "models": {name: {"repo_id": ROLES[name].repo_id, "fingerprint": fp} for name, fp in context.fingerprints.items()},
            "tiny_models": is_tiny(self.models_dir),
            "stages": [r.__dict__ for r in records],
            "cached_stages": [r.name for r in records if r.cached],
            "timings": {r.name: r.seconds for r in records},
            "mesh": json.loads((recon_dir / "recon.json").read_text()).get("mesh", {}),
            "versions": _versions(),
        }

    # --- stages -------------------------------------------------------------------------------

    def _prepare_input(self, image: Image.Image, request: GenerateRequest, preset: Preset, cancel: CancelToken | None = None) -> Image.Image:
        from make_your_3d.pipeline.preprocess import foreground_mask, has_transparency, prepare_subject

        segmenter = None if has_transparency(image) else self._segmenter()
        mask = foreground_mask(image, segmenter, request.subject, cancel=cancel)
        return prepare_subject(image, preset.mv_size, preset.subject_fill, mask=None if has_transparency(image) else mask, cancel=cancel)

    def _subject_views(self, subject_rgba: Image.Image, preset: Preset, dtype: torch.dtype, tmp: Path, rep: Reporter) -> None:
        from make_your_3d.pipeline.subject_prior import use_adapter

        mv = self._load("multiview", dtype, preset.offload)
        use_adapter(mv.unet, None, preset.lora_rank)  # the frozen, original model
        save_views(tmp / "views", generate_views(mv, subject_rgba, preset, SUBJECT_SEED, rep))

    def _identity(self, views_dir: Path, subject: str | None, preset: Preset, dtype: torch.dtype, tmp: Path, rep: Reporter) -> None:
        pipe = self._personalized(preset, dtype)
        views = [(v.name, Image.fromarray(v.color, "RGBA")) for v in load_views(views_dir / "views").views]
        trainer = IdentityTrainer(pipe, views, subject, preset.sd_size, preset.identity_lr, preset.identity_batch, SUBJECT_SEED,
                                  augment_pool=preset.identity_augment_pool, lr_schedule=preset.lr_schedule)
        try:
            losses = trainer.train(preset.identity_steps, rep)
            save_file(trainer.state_dict(), str(tmp / "ip_adapter.safetensors"))
        finally:
            load_ip_state(pipe.unet, self._original_ip)  # the loaded model stays the original
        (tmp / "losses.json").write_text(json.dumps(losses))

    def _edited_views(self, views_dir: Path, request: GenerateRequest, preset: Preset, dtype: torch.dtype, tmp: Path, rep: Reporter) -> None:
        """The original personalized model edits each subject view; the normal estimator gives their normals."""
        from make_your_3d.models.normals import camera_normals_to_world, estimate_normals
        from make_your_3d.pipeline.edits import edit_images
        from make_your_3d.pipeline.preprocess import composite
        from make_your_3d.views import View, encode_normals

        source = load_views(views_dir / "views")
        pipe = self._personalized(preset, dtype)
        pipe.set_ip_adapter_scale(preset.ip_scale)
        inputs = [composite(Image.fromarray(v.color, "RGBA")) for v in source.views]
        prompts = [view_prompt(request.subject, v.name, request.prompt) for v in source.views]
        edited = edit_images(pipe, inputs, prompts, request.negative_prompt, size=preset.sd_size, steps=preset.sd_steps,
                             guidance=preset.sd_guidance, strength=preset.edit_strength, seed=SUBJECT_SEED, batch=preset.edit_batch, reporter=rep)
        size = source.image_size
        edited = [im.resize(size, Image.BICUBIC) for im in edited]
        masks = [self._mask_of(im, request.subject, fallback=v.mask) for im, v in zip(edited, source.views)]
        normal_pipe = self._load("normal_estimator", dtype, preset.offload)
        # Marigold at its published processing resolution (768 px for v1-1), as its reference usage:
        # the views are smaller, and the pipeline resizes its output back to their size.
        normals = estimate_normals(normal_pipe, edited, steps=preset.normal_steps, generator=torch.Generator().manual_seed(SUBJECT_SEED),
                                   processing_resolution=preset.normal_resolution, batch=preset.normal_batch, reporter=rep.child("edited_normals"))
        views = []
        for v, im, mask, n_cam in zip(source.views, edited, masks, normals):
            alpha = (mask * 255).astype(np.uint8)
            color = np.concatenate([np.asarray(im.convert("RGB")), alpha[..., None]], axis=-1)
            world = camera_normals_to_world(n_cam, v.c2w)
            views.append(View(v.name, color, v.c2w, encode_normals(world, alpha), v.projection, v.ortho_size, v.K))
        save_views(tmp / "views", ViewSet(views))

    def _subject_prior(self, edits_dir: Path, preset: Preset, dtype: torch.dtype, tmp: Path, rep: Reporter) -> None:
        from make_your_3d.models.multiview_pipeline import world_normals_to_front
        from make_your_3d.pipeline.preprocess import composite
        from make_your_3d.pipeline.subject_prior import SubjectPriorTrainer, adapter_state, encode_normal_image, use_adapter

        edited = load_views(edits_dir / "views")
        mv = self._load("multiview", dtype, preset.offload)
        colors = [composite(Image.fromarray(v.color, "RGBA")) for v in edited.views]
        normals = [encode_normal_image(world_normals_to_front(v.normals_world()), v.mask) for v in edited.views]
        front = next((v for v in edited.views if v.name == "front"), edited.views[0])
        trainer = SubjectPriorTrainer(mv, colors, normals, Image.fromarray(front.color, "RGBA"), preset.lora_rank, preset.prior_lr, SUBJECT_SEED,
                                      lr_schedule=preset.lr_schedule)
        try:
            losses = trainer.train(preset.prior_steps, rep)
            save_file(adapter_state(mv.unet), str(tmp / "lora.safetensors"))
        finally:
            use_adapter(mv.unet, None, preset.lora_rank)
        (tmp / "losses.json").write_text(json.dumps(losses))

    def _front_view(self, subject_rgba: Image.Image, identity_dir: Path, request: GenerateRequest, preset: Preset, dtype: torch.dtype, tmp: Path, rep: Reporter) -> None:
        from make_your_3d.pipeline.edits import edit_images
        from make_your_3d.pipeline.preprocess import composite, prepare_subject

        pipe = self._personalized(preset, dtype, load_file(str(identity_dir / "ip_adapter.safetensors")))
        try:
            pipe.set_ip_adapter_scale(preset.ip_scale)
            [front] = edit_images(pipe, [composite(subject_rgba)], [view_prompt(request.subject, "front", request.prompt)], request.negative_prompt,
                                  size=preset.sd_size, steps=preset.sd_steps, guidance=preset.sd_guidance, strength=preset.edit_strength,
                                  seed=request.seed, reporter=rep)
        finally:
            load_ip_state(pipe.unet, self._original_ip)
        front = front.resize(subject_rgba.size, Image.BICUBIC)
        mask = self._mask_of(front, request.subject, fallback=np.asarray(subject_rgba)[..., 3] >= 128)
        prepare_subject(front, preset.mv_size, preset.subject_fill, mask=mask).save(tmp / "front.png")

    def _multiview(self, front_dir: Path, prior_dir: Path, seed: int, preset: Preset, dtype: torch.dtype, tmp: Path, rep: Reporter) -> None:
        from make_your_3d.pipeline.subject_prior import use_adapter

        mv = self._load("multiview", dtype, preset.offload)
        use_adapter(mv.unet, load_file(str(prior_dir / "lora.safetensors")), preset.lora_rank)
        try:
            with Image.open(front_dir / "front.png") as im:
                front = im.convert("RGBA")
            viewset = generate_views(mv, front, preset, seed, rep)
        finally:
            use_adapter(mv.unet, None, preset.lora_rank)
        save_views(tmp / "views", viewset)

    def _recon_options(self, preset: Preset, request: GenerateRequest):
        """The reconstruction's options; `resolved()` validates them (a bad `recon` key is a bad
        request before any model loads, not a failure at the last stage)."""
        from make_your_3d.recon.reconstruct import ReconOptions

        try:
            return ReconOptions(preset=preset.recon_preset, device=str(self.device), faces=request.faces or preset.faces,
                                texture_size=request.texture_size or preset.texture_size, seed=request.seed, **preset.recon)
        except TypeError as exc:  # a recon key that repeats a named argument (preset, device, ...)
            raise BadRequest(f"Unknown reconstruction setting in the preset's recon overrides ({exc}).") from None

    def _reconstruct(self, mv_dir: Path, options, tmp: Path, progress: ProgressFn | None, cancel: CancelToken | None) -> None:
        from make_your_3d.recon.reconstruct import reconstruct

        result = reconstruct(mv_dir / "views", tmp / "subject.glb", options, progress=progress, cancel=cancel)
        (tmp / "recon.json").write_text(json.dumps({"mesh": {"vertices": result.vertices, "faces": result.faces}, "record": result.record}, default=str))

    def _mask_of(self, image: Image.Image, subject: str | None, fallback: np.ndarray) -> np.ndarray:
        """Foreground of a generated image: the segmenter when installed and confident, else `fallback`
        (img2img keeps the layout, so the source view's mask is a sound stand-in)."""
        from make_your_3d.pipeline.preprocess import foreground_mask

        segmenter = self._segmenter()
        if segmenter is not None:
            try:
                mask = foreground_mask(image.convert("RGB"), segmenter, subject)
                if 0.01 < mask.mean() < 0.95:
                    return mask
            except NoSubject:
                pass
        return np.asarray(fallback, dtype=bool)

    # --- outputs ------------------------------------------------------------------------------

    def _write_outputs(self, out_dir: Path, image: Image.Image, subject_rgba: Image.Image, front_dir: Path, mv_dir: Path,
                       recon_dir: Path, record: dict, started: float) -> list[str]:
        """Everything goes to a temporary sibling first; one rename publishes the finished folder."""
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
        try:
            inputs = record["inputs"]
            stamp_glb(recon_dir / "subject.glb", tmp / "subject.glb", name=job_name(inputs["prompt"], inputs["seed"]),
                      extras={"job": out_dir.name, "prompt": inputs["prompt"], "subject": inputs["subject"], "seed": inputs["seed"],
                              "preset": record["preset"]["name"], "version": record["version"]})
            shutil.copytree(mv_dir / "views", tmp / "views")
            subject_rgba.save(tmp / "input.png")
            shutil.copy2(front_dir / "front.png", tmp / "front_view.png")
            make_preview(subject_rgba, Image.open(front_dir / "front.png"), load_views(tmp / "views")).save(tmp / "preview.png")
            record["timings"]["total"] = round(time.monotonic() - started, 3)
            files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file()) + ["job.json"]
            record["files"] = sorted(files)
            (tmp / "job.json").write_text(json.dumps(record, indent=2, default=str))
            if out_dir.exists():
                trash = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}-{time.monotonic_ns()}")
                os.replace(out_dir, trash)
                os.replace(tmp, out_dir)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.replace(tmp, out_dir)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return sorted(files)


def make_preview(subject: Image.Image, front: Image.Image, views: ViewSet, height: int = 128) -> Image.Image:
    """One strip: input | edited front view | the six colour views, over white."""
    from make_your_3d.pipeline.preprocess import composite

    tiles = [subject, front.convert("RGBA")] + [Image.fromarray(v.color, "RGBA") for v in views.views]
    tiles = [composite(t).resize((height, height), Image.BICUBIC) for t in tiles]
    strip = Image.new("RGB", (height * len(tiles), height), (255, 255, 255))
    for i, tile in enumerate(tiles):
        strip.paste(tile, (i * height, 0))
    return strip


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"make_your_3d": __version__, "python": __import__("sys").version.split()[0]}
    for pkg in ("torch", "diffusers", "transformers", "peft", "gsplat", "xatlas", "trimesh"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def variant_dir(out: Path, prompt: str, seed: int) -> Path:
    """A readable per-variant folder name: the prompt's first words and the seed."""
    words = "".join(c if c.isalnum() else "-" for c in prompt.lower()).strip("-")
    slug = "-".join(w for w in words.split("-") if w)[:40] or "subject"
    return out / f"{slug}-seed{seed}"
