"""Quality presets: every number a run depends on, in one table, printed into job.json."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from make_your_3d.errors import BadRequest
from make_your_3d.models.registry import is_tiny


# Learning-rate schedules of both optimisations (pipeline/training.py). "constant_with_warmup" is
# Wonder3D's stage-2 schedule (configs/train/stage2-joint-6views-lvis.yaml: lr 5e-5, 100 warmup steps).
LR_SCHEDULES = ("constant", "cosine", "linear", "constant_with_warmup")


@dataclass(frozen=True)
class Preset:
    name: str
    # multi-view model. Sampling settings follow one published Wonder3D source per preset (see
    # MV_SAMPLING_SOURCES); the default is its Gradio demo's: DDIM, 50 steps, guidance 1, eta 1.
    mv_size: int = 256
    mv_steps: int = 50
    mv_guidance: float = 1.0
    mv_eta: float = 1.0  # DDIM eta
    mv_scheduler: str = "ddim"
    subject_fill: float = 0.75  # subject's longer side / frame (about 192 px in 256)
    # personalized model (SD 1.5 + IP-Adapter)
    sd_size: int = 512
    sd_steps: int = 30
    sd_guidance: float = 7.5
    edit_strength: float = 0.8  # img2img strength: keeps the view's pose, lets the edit through
    ip_scale: float = 0.7
    edit_batch: int = 6  # the six views' img2img: images per call (each view keeps its own seeded noise)
    # identity-aware optimisation (IP-Adapter to_k_ip / to_v_ip)
    identity_steps: int = 200
    identity_lr: float = 1e-4
    identity_batch: int = 2
    identity_augment_pool: int = 8  # augmentations per view, each VAE/CLIP-encoded once; 0: a fresh one per draw, encoded every step
    # subject-prior optimisation (LoRA on the cross-domain attention)
    prior_steps: int = 200
    prior_lr: float = 1e-4
    lora_rank: int = 8
    lr_schedule: str = "constant"  # both optimisations' learning rate over their steps: constant, cosine or linear (to 0)
    # normal estimator
    normal_steps: int = 4
    # Marigold processing size, set explicitly to prs-eth/marigold-normals-v1-1's published
    # `default_processing_resolution` (models/published_configs/normal_estimator/model_index.json) rather than
    # left to whatever checkpoint is installed; 0: native, None: the installed checkpoint's default
    normal_resolution: int | None = 768
    normal_batch: int = 6  # Marigold rows per UNet call (the six edited views in one)
    # reconstruction
    recon_preset: str = "default"
    recon: dict = field(default_factory=dict)  # explicit ReconOptions overrides
    faces: int | None = None
    texture_size: int | None = None
    # device
    precision: str = "auto"  # auto (fp16 on CUDA, fp32 on CPU), fp32, fp16, bf16
    offload: bool = False  # keep only the model in use on the GPU

    def __post_init__(self) -> None:
        for name, least in (("edit_batch", 1), ("normal_batch", 1), ("identity_augment_pool", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise BadRequest(f"Preset setting {name} must be a whole number of at least {least}, not {value!r}.")
        if self.lr_schedule not in LR_SCHEDULES:
            raise BadRequest(f"Preset setting lr_schedule must be one of {', '.join(LR_SCHEDULES)}, not {self.lr_schedule!r}.")

    def with_overrides(self, overrides: dict | None) -> "Preset":
        if not overrides:
            return self
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise BadRequest(f"Unknown preset setting(s): {', '.join(unknown)}. Known: {', '.join(sorted(known))}.")
        return replace(self, **overrides)

    def to_dict(self) -> dict:
        return asdict(self)


# Where each preset's multi-view sampling settings come from (xxlong0/Wonder3D d894f82). The
# published settings disagree with each other, so each preset follows one source exactly.
MV_SAMPLING_SOURCES: dict[str, str] = {
    "fast": "README.md example: num_inference_steps=20, guidance_scale=1.0, eta left at the pipeline default 0.0",
    "default": "gradio_app_mv.py defaults: steps slider 50, guidance slider 1, eta 1.0 from "
               "configs/mvdiffusion-joint-ortho-6views.yaml pipe_validation_kwargs",
    "quality": "configs/mvdiffusion-joint-ortho-6views.yaml via test_mvdiffusion_seq.py: the pipeline's default 50 steps, "
               "the config's second validation guidance scale 3.0, eta 1.0",
    "lowvram": "as default",
}

PRESETS: dict[str, Preset] = {
    "fast": Preset("fast", mv_steps=20, mv_guidance=1.0, mv_eta=0.0, sd_steps=20, identity_steps=80, prior_steps=80, recon_preset="fast"),
    "default": Preset("default"),
    "quality": Preset("quality", mv_steps=50, mv_guidance=3.0, sd_steps=40, identity_steps=400, prior_steps=400, lora_rank=16, recon_preset="quality"),
    "lowvram": Preset("lowvram", identity_batch=1, edit_batch=1, normal_batch=1, offload=True, recon_preset="fast"),  # auto precision: fp16 on CUDA
}

# Tiny sizes for the tiny model set: the whole chain in seconds on a CPU (tests, CI, the service's
# `--config` in tests). Real architectures, toy resolutions and step counts.
TEST_OVERRIDES: dict = {
    "mv_size": 64,
    "mv_steps": 2,
    "mv_guidance": 3.0,  # the guided batch layout runs end to end in the tests
    "sd_size": 32,
    "sd_steps": 2,
    "identity_steps": 3,
    "identity_batch": 2,
    "identity_augment_pool": 2,  # the pool path runs in the chain tests, at no more encodes than 3 steps x batch 2
    "prior_steps": 3,
    "lora_rank": 2,
    "normal_steps": 1,
    "normal_resolution": 0,  # native: the tiny views are small, and the CPU has no half-precision antialiased resize
    "recon_preset": "fast",
    "recon": {"iterations": 8, "render_size": 32, "num_gaussians": 500, "grid_res": 24, "fuse_size": 32},
    "faces": 600,
    "texture_size": 256,
}


def get_preset(name: str, overrides: dict | None = None) -> Preset:
    if name not in PRESETS:
        raise BadRequest(f"Unknown preset {name!r}; use one of {', '.join(PRESETS)}.")
    return PRESETS[name].with_overrides(overrides)


# The sampling knobs one job may set for itself (the add-on's Advanced panel, the API's `overrides`):
# key -> (type, lowest, highest). Everything else is the preset's or the server's business.
JOB_OVERRIDES: dict[str, tuple[type, float, float]] = {
    "mv_steps": (int, 1, 200),
    "mv_guidance": (float, 0.0, 30.0),
    "sd_steps": (int, 1, 200),
    "sd_guidance": (float, 0.0, 30.0),
    "edit_strength": (float, 0.05, 1.0),
    "ip_scale": (float, 0.0, 2.0),
}


def validate_job_overrides(raw: dict | None) -> dict:
    """A job's own overrides, checked: known keys, right types, in range. Raises BadRequest."""
    if not raw:
        return {}
    if not isinstance(raw, dict):
        raise BadRequest("overrides must be an object like {\"mv_steps\": 30, \"ip_scale\": 0.6}.")
    unknown = sorted(set(raw) - set(JOB_OVERRIDES))
    if unknown:
        raise BadRequest(f"Unknown override(s): {', '.join(map(str, unknown))}. A job may set {', '.join(JOB_OVERRIDES)}.")
    clean: dict = {}
    for key, value in raw.items():
        kind, lo, hi = JOB_OVERRIDES[key]
        ok_type = isinstance(value, int) if kind is int else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok_type or not lo <= value <= hi:
            what = "a whole number" if kind is int else "a number"
            raise BadRequest(f"Override {key} must be {what} from {lo:g} to {hi:g}, not {value!r}.")
        clean[key] = kind(value)
    return clean


def resolve_preset(name: str, models_dir: str | Path | None, overrides: dict | None = None) -> Preset:
    """THE rule for what a run uses: the named preset, plus TEST_OVERRIDES when `models_dir` holds a
    tiny set (its toy models only work at toy sizes: the multi-view model is 64 px, not 256), plus
    the caller's explicit `overrides` on top. `generate`, `demo` and `serve` all go through here, so
    a tiny set behaves the same whichever way it is run and needs no config file."""
    merged: dict = {}
    if models_dir is not None and is_tiny(Path(models_dir)):
        merged.update(TEST_OVERRIDES)
    merged.update(overrides or {})
    return get_preset(name, merged)
