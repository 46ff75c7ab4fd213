"""The stage graph, declared once: what each cached stage depends on, and the cache key derived from it.

A stage's key must change whenever its output could: its upstream stages' keys, the request fields
and preset fields it reads, the weights it loads, the device kind and dtype it runs in, the package
version, and the source code it runs (a hash of the listed modules' files, so a tuning change in
`recon/` misses the cache even without a version bump). Hand-written key dicts drifted from what
the stages read (the reconstruction's thresholds, the dtype, the version were missing), so here a
stage declares its inputs and `stage_inputs` is the only way a key is made.

Preset fields that cannot change a result are listed in `PRESET_FIELDS_OUTSIDE_KEYS` with the
reason; a test checks that every other field belongs to some stage.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from make_your_3d import __version__
from make_your_3d.pipeline.cache import digest

# Bump a stage's `version` when its output format or meaning changes in a way the code hash would
# not show (e.g. a dependency's behaviour we rely on changed).


@dataclass(frozen=True)
class StageSpec:
    name: str
    what: str  # one line for logs and docs
    upstream: tuple[str, ...] = ()
    request_fields: tuple[str, ...] = ()  # GenerateRequest fields (the image by its sha256)
    preset_fields: tuple[str, ...] = ()  # Preset fields
    models: tuple[str, ...] = ()  # model roles whose weights it reads (fingerprints)
    code: tuple[str, ...] = ()  # modules or packages whose source is part of the key (plus RUNNER_CODE)
    uses_segmenter: bool = False  # masks come from the optional segmenter when it is installed
    version: int = 1


STAGE_SPECS: tuple[StageSpec, ...] = (
    StageSpec(
        "subject_views", "frozen multi-view model on the subject image",
        request_fields=("image",),
        preset_fields=("mv_size", "mv_steps", "mv_guidance", "mv_eta", "mv_scheduler", "subject_fill"),
        models=("multiview",),
        code=("make_your_3d.models", "make_your_3d.pipeline.preprocess", "make_your_3d.pipeline.multiview_views", "make_your_3d.views"),
        uses_segmenter=True,
    ),
    StageSpec(
        "identity", "IP-Adapter to_k_ip/to_v_ip fine-tuned on the subject views",
        upstream=("subject_views",),
        request_fields=("subject",),
        preset_fields=("sd_size", "identity_steps", "identity_lr", "identity_batch", "identity_augment_pool", "lr_schedule"),
        models=("personalized", "ip_adapter", "image_encoder"),
        code=("make_your_3d.models", "make_your_3d.pipeline.identity", "make_your_3d.pipeline.augment"),
    ),
    StageSpec(
        "edited_views", "original personalized model edits the six views; their normals",
        upstream=("subject_views",),
        request_fields=("subject", "prompt", "negative_prompt"),
        preset_fields=("sd_size", "sd_steps", "sd_guidance", "edit_strength", "ip_scale", "normal_steps", "normal_resolution",
                       "edit_batch", "normal_batch"),  # batch sizes change the floats' summation order (last bits)
        models=("personalized", "ip_adapter", "image_encoder", "normal_estimator"),
        code=("make_your_3d.models", "make_your_3d.pipeline.edits", "make_your_3d.pipeline.identity", "make_your_3d.pipeline.preprocess", "make_your_3d.views"),
        uses_segmenter=True,
    ),
    StageSpec(
        "subject_prior", "LoRA on the multi-view cross-domain attention",
        upstream=("edited_views",),
        preset_fields=("mv_size", "prior_steps", "prior_lr", "lora_rank", "lr_schedule"),
        models=("multiview",),
        code=("make_your_3d.models", "make_your_3d.pipeline.subject_prior", "make_your_3d.pipeline.preprocess"),
    ),
    StageSpec(
        "front_view", "fine-tuned personalized model renders the edited front view",
        upstream=("identity",),
        request_fields=("image", "subject", "prompt", "negative_prompt", "seed"),
        preset_fields=("sd_size", "sd_steps", "sd_guidance", "edit_strength", "ip_scale", "mv_size", "subject_fill"),
        models=("personalized", "ip_adapter", "image_encoder"),
        code=("make_your_3d.models", "make_your_3d.pipeline.edits", "make_your_3d.pipeline.identity", "make_your_3d.pipeline.preprocess"),
        uses_segmenter=True,
    ),
    StageSpec(
        "multiview", "fine-tuned multi-view model: six colour + normal views",
        upstream=("front_view", "subject_prior"),
        request_fields=("seed",),
        preset_fields=("mv_size", "mv_steps", "mv_guidance", "mv_eta", "mv_scheduler", "lora_rank"),
        models=("multiview",),
        code=("make_your_3d.models", "make_your_3d.pipeline.subject_prior", "make_your_3d.pipeline.multiview_views", "make_your_3d.views"),
    ),
    StageSpec(
        "reconstruct", "3D Gaussians -> mesh -> UVs -> texture -> GLB",
        upstream=("multiview",),
        request_fields=("seed", "faces", "texture_size"),
        preset_fields=("recon_preset", "recon", "faces", "texture_size"),
        code=("make_your_3d.recon",),
    ),
)

STAGES: dict[str, StageSpec] = {s.name: s for s in STAGE_SPECS}

# Every stage's body is a method of `pipeline.generate.Generator`, so its source is in every key.
RUNNER_CODE = ("make_your_3d.pipeline.generate",)

# Preset fields no stage key needs, and why.
PRESET_FIELDS_OUTSIDE_KEYS: dict[str, str] = {
    "name": "a label; the values it stands for are keyed one by one",
    "precision": "keyed as the resolved dtype (auto differs by device)",
    "offload": "where models wait between uses; results are the same",
}

# GenerateRequest fields no stage key needs, and why.
REQUEST_FIELDS_OUTSIDE_KEYS: dict[str, str] = {
    "preset": "a name; keyed as the resolved preset's values",
    "extras": "free-form client metadata (not read by any stage)",
    "overrides": "per-job preset overrides; applied to the preset first, so keyed as its values",
}


@dataclass(frozen=True)
class KeyContext:
    """What every key shares: the run's device kind and dtype, the package version, the weights."""

    device_type: str
    dtype: str
    fingerprints: dict[str, str] = field(default_factory=dict)  # role -> fingerprint (segmenter when installed)
    version: str = __version__
    extra: dict[str, Any] = field(default_factory=dict)  # per-stage resolved settings, e.g. {"reconstruct": {...}}


@lru_cache(maxsize=None)
def code_fingerprint(modules: tuple[str, ...]) -> str:
    """sha256 over the source files of the given modules/packages (sorted by path).

    Reads only files on disk (no import), so it is cheap and works before any model loads.
    """
    h = hashlib.sha256()
    for name in sorted(modules):
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise ValueError(f"stage code module {name} not found")
        origin = Path(spec.origin)
        files = sorted(origin.parent.rglob("*.py")) if origin.name == "__init__.py" else [origin]
        for path in files:
            h.update(path.name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def _request_value(request, name: str) -> Any:
    value = getattr(request, name)
    return digest(value) if name == "image" else value


def stage_inputs(name: str, request, preset, context: KeyContext, upstream_keys: dict[str, str]) -> dict:
    """Everything stage `name` depends on, as JSON-able data; its cache key is `digest` of this."""
    spec = STAGES[name]
    missing = [u for u in spec.upstream if u not in upstream_keys]
    if missing:
        raise ValueError(f"stage {name} needs the keys of {', '.join(missing)} first")
    inputs = {
        "stage": name,
        "stage_version": spec.version,
        "package_version": context.version,
        "code": code_fingerprint(tuple(spec.code) + RUNNER_CODE),
        "device_type": context.device_type,
        "dtype": context.dtype,
        "upstream": {u: upstream_keys[u] for u in spec.upstream},
        "request": {f: _request_value(request, f) for f in spec.request_fields},
        "preset": {f: getattr(preset, f) for f in spec.preset_fields},
        "models": {m: context.fingerprints[m] for m in spec.models},
    }
    if spec.uses_segmenter:
        inputs["segmenter"] = context.fingerprints.get("segmenter")
    if name in context.extra:
        inputs["resolved"] = context.extra[name]
    return inputs


def stage_keys(request, preset, context: KeyContext) -> dict[str, tuple[str, dict]]:
    """(key, inputs) of every stage in graph order."""
    keys: dict[str, str] = {}
    out: dict[str, tuple[str, dict]] = {}
    for spec in STAGE_SPECS:
        inputs = stage_inputs(spec.name, request, preset, context, keys)
        keys[spec.name] = digest(inputs)
        out[spec.name] = (keys[spec.name], inputs)
    return out
