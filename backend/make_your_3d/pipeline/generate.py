"""The end-to-end generator: subject image + text edit -> subject.glb (the whole method).

The stages, what each reads and the function that runs it are declared once in pipeline/stages.py;
each result is cached under the hash of everything it reads (pipeline/cache.py):

    subject         the subject cut out, cropped and framed                (subject only)
    subject_views   frozen multi-view model's six views of it              (subject only)
    identity        IP-Adapter to_k_ip/to_v_ip fine-tuned on those views   (subject only)
    edited_views    original personalized model edits the six views, plus their normals (+ prompt)
    subject_prior   LoRA on the multi-view cross-domain attention         (+ prompt)
    front_view      fine-tuned personalized model: the edited front view  (+ seed)
    multiview       fine-tuned multi-view model: six colour + normal views (+ seed)
    reconstruct     3D Gaussians -> mesh -> UVs -> texture -> GLB          (+ seed)

So a new prompt on the same subject reuses the first three, a new seed reuses the first five, and
the same inputs again reuse everything. The models stay loaded between runs in a `ModelHost`,
which lends them to each stage in the state the stage asks for (pipeline/model_host.py): a job
run after others writes what the same job writes alone in a fresh process.
"""

from __future__ import annotations

import errno
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import torch
from PIL import Image

from make_your_3d import __version__
from make_your_3d.device import resolve_device, resolve_dtype
from make_your_3d.errors import DiskFull, OutOfMemory
from make_your_3d.files import check_writable, replace_dir
from make_your_3d.models.registry import ROLES, is_tiny
from make_your_3d.pipeline.cache import StageCache, digest, models_fingerprint
from make_your_3d.pipeline.memory import GB, available_bytes, batches_for, resolve_preset_name, return_freed_memory, stage_need_gb
from make_your_3d.pipeline.model_host import ModelHost, StageModels
from make_your_3d.pipeline.presets import TEST_OVERRIDES, Preset, resolve_preset  # noqa: F401 - TEST_OVERRIDES re-exported (benchmarks)
from make_your_3d.pipeline.reconstruct_stage import recon_options
from make_your_3d.pipeline.request import GenerateRequest, GenerateResult, validate_request
from make_your_3d.pipeline.stages import STAGE_SPECS, STAGES as STAGE_TABLE, KeyContext, build_stage_inputs, stage_keys, stage_seed
from make_your_3d.progress import CancelToken, ProgressFn, Reporter
from make_your_3d.recon.glb import job_name, stamp_glb
from make_your_3d.views import ViewSet, load_views

log = logging.getLogger(__name__)

REQUIRED_ROLES = ("personalized", "ip_adapter", "image_encoder", "multiview", "normal_estimator")
STAGES = tuple(s.name for s in STAGE_SPECS)


@dataclass
class StageRecord:
    name: str
    key: str
    cached: bool
    seconds: float
    peak_gb: float | None = None  # peak CUDA memory allocated during the stage (None off CUDA)
    released: list[str] | None = None  # models dropped before the stage so that only its own were loaded


class Generator:
    """Runs the method for one request at a time. `host` (the loaded models) may be shared by
    several generators and outlives any job; everything else a job uses is built per job."""

    def __init__(self, models_dir: str | Path, cache_dir: str | Path, device: str = "auto", overrides: dict | None = None,
                 host: ModelHost | None = None):
        self.models_dir = Path(models_dir)
        self.cache = StageCache(cache_dir)
        self.device = resolve_device(device)
        self.overrides = dict(overrides or {})
        self.host = host if host is not None else ModelHost(self.models_dir, self.device)

    def unload(self) -> None:
        """Drop every loaded model and free GPU memory."""
        self.host.unload()

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

    def _plan(self, request: GenerateRequest, out_dir: Path | None) -> tuple[Image.Image, Preset, torch.dtype, KeyContext, dict, dict]:
        """Step 1: check the request, every folder the job writes (`out_dir`'s parent: None for a stage
        run alone) and resolve every setting and stage key, before any model loads.
        The batch sizes, and whether the models are held one at a time, are chosen here from the
        device's free memory (published sizes only: the figures are theirs; `memory.batches_for`), so
        the edited views' key and job.json carry the ones that ran."""
        image = validate_request(request)
        overrides = {**self.overrides, **(request.overrides or {})}
        name = resolve_preset_name(request.preset, self.device, lambda n: resolve_preset(n, self.models_dir, overrides).precision,
                                   tiny=is_tiny(self.models_dir))
        preset = resolve_preset(name, self.models_dir, overrides)
        dtype = resolve_dtype(self.device, preset.precision)
        if not is_tiny(self.models_dir):
            chosen = batches_for(self.device.type, str(dtype).removeprefix("torch."), preset, available_bytes(self.device))
            preset = replace(preset, edit_batch=chosen["edit_batch"], normal_batch=chosen["normal_batch"],
                             offload=preset.offload or chosen["one_model_at_a_time"])
            batches = chosen
        else:
            batches = {"edit_batch": preset.edit_batch, "normal_batch": preset.normal_batch, "one_model_at_a_time": preset.offload,
                       "why": "the preset's (tiny model set)"}
        recon_config = recon_options(preset, request, str(self.device), stage_seed(STAGE_TABLE["reconstruct"], request.seed)).resolved()
        if out_dir is not None:
            check_writable(out_dir.parent, "output folder")  # every place the job writes, before any model loads
        check_writable(self.cache.root, "stage cache folder")
        from make_your_3d.models.personalized import require_roles

        require_roles(self.models_dir, *REQUIRED_ROLES)
        fingerprints = models_fingerprint(self.models_dir, *REQUIRED_ROLES, *(["segmenter"] if ROLES["segmenter"].complete(self.models_dir) else []))
        context = KeyContext(device_type=self.device.type, dtype=str(dtype).removeprefix("torch."), fingerprints=fingerprints, version=__version__,
                             extra={"reconstruct": recon_config})
        return image, preset, dtype, context, stage_keys(request, preset, context), batches

    def stage_keys(self, request: GenerateRequest) -> dict[str, str]:
        """Every stage's cache key for `request` (checks the request and the weights; loads no model).
        A farm worker exports the entries of these keys to another worker (service/farm.py)."""
        return {name: key for name, (key, _inputs) in self._plan(request, None)[4].items()}

    def run_stage(self, request: GenerateRequest, name: str, progress: ProgressFn | None = None) -> Path:
        """Build stage `name` alone from its upstream stages' cached results (a memory benchmark runs
        each stage in its own process this way); returns its cache folder. Raises when an upstream
        stage is not cached yet."""
        image, preset, dtype, _context, keys, _batches = self._plan(request, None)
        spec = STAGE_TABLE[name]
        dirs: dict[str, Path] = {}
        for up in spec.upstream:
            hit = self.cache.get(up, keys[up][0])
            if hit is None:
                raise RuntimeError(f"stage {name} needs the {up} stage's result in the cache first")
            dirs[up] = hit
        return self.cache.get(name, keys[name][0]) or self._build_stage(spec, keys[name], request, image, preset, dtype, dirs,
                                                                          Reporter(name, progress, None), None, progress)

    def _build_stage(self, spec, key: tuple[str, dict], request: GenerateRequest, image: Image.Image, preset: Preset, dtype: torch.dtype,
                     dirs: dict[str, Path], rep: Reporter, cancel: CancelToken | None, progress: ProgressFn | None) -> Path:
        """Run stage `spec` on its declared inputs into a new cache entry (`key`: its key and key inputs)."""
        models = StageModels(self.host, spec.name, spec.models, spec.uses_segmenter, dtype, preset.offload)
        inputs = build_stage_inputs(spec, request, image, preset, models, dirs, self.device, rep, cancel, progress)
        run = spec.function()
        return self.cache.build(spec.name, key[0], lambda tmp: run(inputs, tmp), key[1])

    def _run(self, request: GenerateRequest, out_dir: Path, progress: ProgressFn | None, cancel: CancelToken | None) -> GenerateResult:
        started = time.monotonic()
        image, preset, dtype, context, keys, batches = self._plan(request, out_dir)

        # Steps 2-8: every stage in graph order, each from the cache or built from its declared inputs.
        dirs: dict[str, Path] = {}
        records: list[StageRecord] = []
        for spec in STAGE_SPECS:
            key = keys[spec.name][0]
            rep = Reporter(spec.name, progress, cancel)
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            t0 = time.monotonic()
            hit = self.cache.get(spec.name, key)
            rep.step(1 if hit else 0, 1, "reused from cache" if hit else "starting")
            if hit is None:
                released = self._make_room(spec, dtype, preset.name)
                hit = self._build_stage(spec, keys[spec.name], request, image, preset, dtype, dirs, rep, cancel, progress)
                records.append(StageRecord(spec.name, key, False, 0.0, released=released))
            else:
                records.append(StageRecord(spec.name, key, True, 0.0))
            dirs[spec.name] = hit
            records[-1].seconds = round(time.monotonic() - t0, 3)
            records[-1].peak_gb = round(torch.cuda.max_memory_allocated(self.device) / 1e9, 3) if self.device.type == "cuda" else None

        return_freed_memory()  # the reconstruction's buffers: a service keeps running between jobs

        # Step 9: the job record and the outputs, published in one rename.
        record = self._job_record(request, image, preset, context, dtype, records, dirs["reconstruct"], batches)
        files = self._write_outputs(out_dir, dirs, record, started)
        return GenerateResult(out_dir=out_dir, files=files, cached_stages=record["cached_stages"], timings=record["timings"])

    def _make_room(self, spec, dtype: torch.dtype, preset_name: str) -> list[str]:
        """Drop the loaded models stage `spec` does not declare when the device's free memory is under
        the stage's measured peak (pipeline/memory.py); otherwise they stay loaded for the later
        stages and jobs that use them (loading is slow). (lowvram drops or moves every model but the
        one in use anyway: `ModelHost.load`.)"""
        return_freed_memory()  # what the stages before freed goes back to the system before free memory is read
        need = stage_need_gb(self.device.type, str(dtype).removeprefix("torch."), preset_name, spec.name)
        free = available_bytes(self.device)
        if is_tiny(self.models_dir) or need is None or free is None or free >= need * GB:
            return []
        released = self.host.release(set(spec.models) | ({"segmenter"} if spec.uses_segmenter else set()))
        return_freed_memory()
        return released

    def _job_record(self, request: GenerateRequest, image: Image.Image, preset: Preset, context: KeyContext, dtype: torch.dtype,
                    records: list[StageRecord], recon_dir: Path, batches: dict) -> dict:
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
                "preset": request.preset,  # as asked ("auto" included); "preset" below is what ran
            },
            "preset": preset.to_dict(),
            "recon": context.extra["reconstruct"],  # the whole resolved reconstruction config
            "device": str(self.device),
            "dtype": str(dtype).removeprefix("torch."),
            "batches": batches,  # edit/normal batch sizes chosen from free memory (also in "preset")
            "models": {name: {"repo_id": ROLES[name].repo_id, "fingerprint": fp} for name, fp in context.fingerprints.items()},
            "tiny_models": is_tiny(self.models_dir),
            "stages": [r.__dict__ for r in records],
            "stage_seeds": {spec.name: stage_seed(spec, request.seed) for spec in STAGE_SPECS},
            "cached_stages": [r.name for r in records if r.cached],
            "timings": {r.name: r.seconds for r in records},
            "mesh": json.loads((recon_dir / "recon.json").read_text()).get("mesh", {}),
            "versions": _versions(),
        }

    # --- outputs ------------------------------------------------------------------------------

    def _write_outputs(self, out_dir: Path, dirs: dict[str, Path], record: dict, started: float) -> list[str]:
        """Everything goes to a temporary sibling first; one rename publishes the finished folder."""
        recon_dir, mv_dir, front_dir = dirs["reconstruct"], dirs["multiview"], dirs["front_view"]
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
        try:
            inputs = record["inputs"]
            with Image.open(dirs["subject"] / "input.png") as im:
                subject_rgba = im.convert("RGBA")
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
            replace_dir(tmp, out_dir)
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
