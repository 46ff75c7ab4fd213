"""How long a job will take, said before it starts. Standard library only: the CLI imports it and the
Blender add-on loads this same file by path from the bundled backend (blender_addon/runtime.py,
`load_backend_module`), as it does cuda_builds.py.

Why: on a CPU one real multi-view step takes about half a minute and the default preset runs
hundreds of network passes, so a job takes hours, while nothing said so before issue 28.

Where the numbers come from (benchmarks/BENCHMARKS.md):
- work per stage: the FLOP count of the `default` preset (`benchmarks/flop_floor.py`, torch's flop
  counter on the published configs), scaled to a preset by its step counts and batch;
- CPU speed, measured: one multi-view UNet step at the published size (12 rows, 2.91 TFLOP) took
  27.72 s on the 2-core x86-64 VM (`multiview_unet_bench.py`, fp32), 9.5 s per TFLOP;
- GPU speed, NOT measured (no GPU was lent yet): the FLOP floor at 40% of an H100's bf16 peak, a
  lower bound for any card; real cards, RTX ones included, will take longer.
Reconstruction is not in the FLOP count; its CPU time (tens of seconds) is small beside the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

WARN_SECONDS = 15 * 60
# TFLOP per stage at the `default` preset (flop_floor.py, 2026-11-27)
DEFAULT_TFLOP = {"subject_views": 153.5, "identity": 735.0, "edited_views": 274.8, "subject_prior": 1257.8,
                 "front_view": 44.2, "multiview": 153.5}
# what each stage's work scales with: preset fields (guided multi-view sampling doubles the rows)
STAGE_SCALE = {"subject_views": ("mv_steps", "mv_rows"), "multiview": ("mv_steps", "mv_rows"),
               "identity": ("identity_steps", "identity_batch"), "subject_prior": ("prior_steps",),
               "edited_views": ("sd_steps",), "front_view": ("sd_steps",)}
DEFAULT_STEPS = {"mv_steps": 50, "mv_rows": 1, "identity_steps": 200, "identity_batch": 2, "prior_steps": 200, "sd_steps": 30}
# the presets' step fields (pipeline/presets.py PRESETS; tests/test_estimate.py keeps the two equal)
PRESET_STEPS = {
    "fast": {"mv_steps": 20, "mv_rows": 1, "identity_steps": 80, "identity_batch": 2, "prior_steps": 80, "sd_steps": 20},
    "default": dict(DEFAULT_STEPS),
    "quality": {"mv_steps": 50, "mv_rows": 2, "identity_steps": 400, "identity_batch": 2, "prior_steps": 400, "sd_steps": 40},
    "lowvram": {"mv_steps": 50, "mv_rows": 1, "identity_steps": 200, "identity_batch": 1, "prior_steps": 200, "sd_steps": 30},
}
CPU_S_PER_TFLOP = 27.72 / 2.91  # measured (see above)
GPU_S_PER_TFLOP = 1.0 / (0.4 * 989.0)  # NOT measured: 40% of an H100's bf16 dense peak, a lower bound


@dataclass(frozen=True)
class Estimate:
    seconds: float
    measured: bool  # True where the device's speed was measured (the CPU), False for the GPU bound
    text: str  # what to show before the job
    warn: bool  # over WARN_SECONDS: show plainly and offer the fast preset


def work_tflop(steps: dict) -> float:
    """TFLOP of a new subject's stages for these step fields."""
    total = 0.0
    for stage, tflop in DEFAULT_TFLOP.items():
        factor = 1.0
        for key in STAGE_SCALE[stage]:
            factor *= float(steps[key]) / float(DEFAULT_STEPS[key])
        total += tflop * factor
    return total


def duration_text(seconds: float) -> str:
    if seconds < 90:
        return f"about {max(1, round(seconds))} s"
    if seconds < 90 * 60:
        return f"about {round(seconds / 60)} min"
    return f"about {seconds / 3600:.1f} h"


def estimate(preset: str, device_kind: str) -> Estimate | None:
    """The expected duration of a new subject (stages reused from the cache are faster) with `preset`
    on `device_kind` ("cpu" or "cuda"); None for a preset or device without figures (e.g. "mps")."""
    steps = PRESET_STEPS.get(preset)
    if steps is None or device_kind not in ("cpu", "cuda"):
        return None  # no figures for this preset or device (Apple's GPU was never measured)
    cpu = device_kind == "cpu"
    seconds = work_tflop(steps) * (CPU_S_PER_TFLOP if cpu else GPU_S_PER_TFLOP)
    where = ("on a CPU (measured on 2 cores; more cores are faster)" if cpu
             else "on the GPU at the very least (a FLOP bound, never measured on a GPU)")
    text = f"Expected duration: {duration_text(seconds)} {where} for a new subject with the {preset} preset"
    warn = seconds > WARN_SECONDS
    if warn:
        fast = work_tflop(PRESET_STEPS["fast"]) * (CPU_S_PER_TFLOP if cpu else GPU_S_PER_TFLOP)
        text += (f". That is over 15 minutes: the fast preset takes {duration_text(fast)}" if preset != "fast"
                 else ". That is over 15 minutes")
        if cpu:
            text += "; an NVIDIA GPU is far faster (make-your-3d doctor says whether one is usable)"
    return Estimate(seconds=seconds, measured=cpu, text=text + ".", warn=warn)
