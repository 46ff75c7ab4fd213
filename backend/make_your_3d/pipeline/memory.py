"""How much memory each stage of a preset needs, measured, and what follows from it: whether a job
fits the device, which preset `auto` picks, and how many images one batched call may hold.

The figures are peak resident memory at the published model sizes, each preset as configured (default:
both edited-views models resident, batches of 6): of one process running one stage
(`benchmarks/memory_bench.py`, rows in `benchmarks/results/memory_2026-12-05.json` and
`memory_2026-12-06.json`, `memory_2026-12-06b.json`), or, for fp32's
later stages, the peak within the stage of one process running the whole chain as a service job does
(`benchmarks/gpu_chain_bench.py --one-step --scenarios 1`, `benchmarks/results/memory_chain_fp32_2026-12-05.json`;
IN_CHAIN names them: they include what earlier stages left loaded). Table in BENCHMARKS.md "Peak memory per stage". They were measured on the CPU, where they are RAM; for Apple's GPU (unified
memory) the CPU bf16 figures stand in for fp16 (same bytes per weight and activation); CUDA has no
figures until a GPU run measures them (PROXY says why). `fast` runs the same model-stage shapes as
`default` (fewer steps), so it shares default's figures for those, and lowvram's reconstruction;
`quality` shares default's where it changes only step counts (SAME_SHAPES). The reconstruction's figure is at its preset's default faces and texture size (`request.estimate_job_memory` is the
separate per-request check of the faces and texture asked for). Where a precision has no figure for a
stage, the planner and the release of models before a stage estimate it from bf16 (ESTIMATE_FROM);
the admission check and `auto` use measured figures only.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from make_your_3d.errors import TooHeavy

GB = 1e9

# (device kind the figures were measured on, dtype) -> preset -> stage -> peak GB (decimal).
# Filled by `benchmarks/memory_bench.py --report benchmarks/results/memory_2026-12-05.json
# benchmarks/results/memory_2026-12-06.json benchmarks/results/memory_2026-12-06b.json
# --chain benchmarks/results/memory_chain_fp32_2026-12-05.json`:
# its "after" rows measured as configured (the first row of a cell), then the whole fp32 chain's in-chain
# peaks for the stages with no row of their own (IN_CHAIN). fast's stages are all default's but its
# reconstruction (SAME_SHAPES). lowvram (bf16), quality (bf16 and fp32) and lowvram (fp32) ran their model
# stages stage by stage, so they have a row for each (the reconstruction: per request where none).
MEASURED_PEAK_GB: dict[tuple[str, str], dict[str, dict[str, float]]] = {
    ("cpu", "bfloat16"): {
        "default": {"subject": 0.473, "subject_views": 4.122, "identity": 6.109, "edited_views": 9.624, "subject_prior": 7.292,
                    "front_view": 5.471, "multiview": 4.126, "reconstruct": 9.713},
        "lowvram": {"subject": 0.476, "subject_views": 4.124, "identity": 5.197, "edited_views": 6.07, "subject_prior": 7.295,
                    "front_view": 5.614, "multiview": 4.127, "reconstruct": 3.871},
        "quality": {"subject": 0.473, "subject_views": 4.157, "identity": 6.094, "edited_views": 9.538, "subject_prior": 7.245,
                    "front_view": 5.62, "multiview": 4.165, "reconstruct": 12.693},
    },
    ("cpu", "float32"): {
        "default": {"subject": 0.473, "subject_views": 6.561, "identity": 16.915, "edited_views": 16.315,
                    "subject_prior": 14.066, "front_view": 16.128, "multiview": 15.781, "reconstruct": 15.706},
        "lowvram": {"subject": 0.475, "subject_views": 6.544, "identity": 9.597, "edited_views": 9.444, "subject_prior": 13.976,
                    "front_view": 9.009, "multiview": 6.523},
        "quality": {"subject": 0.474, "subject_views": 7.011, "identity": 11.629, "edited_views": 16.049, "subject_prior": 14.056,
                    "front_view": 9.008, "multiview": 7.095},
    },
}

# The figures above that are in-chain peaks (`memory_bench.py --report --chain`: one whole-chain process,
# as a service job runs, `gpu_chain_bench.py --one-step --scenarios 1`): the highest resident memory while
# the progress events named the stage, with whatever earlier stages left loaded. The others are each
# stage in a process of its own (only its models). An in-chain figure is the larger of the two kinds, and
# default's fp32 cells keep it: it is what a service job of default holds (measured, third session: the same
# subject_prior, front_view and multiview computations in processes of their own, lowvram's fp32 rows, peak
# at 13.98, 9.01 and 6.52 GB against 14.07, 16.13 and 15.78 in the chain; fourth session: quality's fp32
# identity and edited views, default's computations, at 11.63 and 16.05 against 16.92 and 16.32). A preset
# that shares a stage with an in-chain figure and releases alike keeps the larger (`stage_peaks`). The reconstruction computes in float32 whatever the
# job's precision, so its fp32 per-stage figure is the bf16 process's on the same views (11.46 GB on the
# fp32 chain's, code "views-of-fp32-chain" in memory_2026-12-05.json): no run of its own needed, and the
# in-chain 15.71 GB stays.
IN_CHAIN: dict[tuple[str, str], dict[str, tuple[str, ...]]] = {
    ("cpu", "float32"): {"default": ("identity", "edited_views", "subject_prior", "front_view", "multiview", "reconstruct")},
}

# Which measured figures stand for a device kind and precision. Apple's GPU shares the process's
# memory, so the CPU's resident figures stand for it. CUDA has none yet: VRAM holds only the models
# on the card (lowvram keeps the others in RAM), so process RSS would refuse jobs that fit; with no
# entry nothing is refused there until `memory_bench.py` runs on a GPU (its cuda_peak_gb column).
PROXY: dict[tuple[str, str], tuple[str, str]] = {
    ("cpu", "bfloat16"): ("cpu", "bfloat16"),
    ("cpu", "float16"): ("cpu", "bfloat16"),
    ("cpu", "float32"): ("cpu", "float32"),
    ("mps", "float16"): ("cpu", "bfloat16"),
    ("mps", "bfloat16"): ("cpu", "bfloat16"),
    ("mps", "float32"): ("cpu", "float32"),
}
# Stages a preset runs with exactly another preset's shapes (none of the preset fields they read
# differ, and with one stage per process offloading changes nothing): they share its figures.
# fast: every model stage is default's (fewer steps only), its reconstruction lowvram's (both run the
# fast reconstruction preset on the same six 256 px views; it loads no model); lowvram: all but
# identity and edited_views (its batch sizes), which are measured on their own; quality: its subject,
# identity, edited views and front view read only step counts that differ (sd_steps, identity_steps),
# while its guidance 3 doubles the multi-view UNet's batch (subject_views, multiview) and its LoRA
# rank 16 changes subject_prior and multiview, so those three are measured on their own.
SAME_SHAPES: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "fast": (("default", ("subject", "subject_views", "identity", "edited_views", "subject_prior", "front_view", "multiview")),
             ("lowvram", ("reconstruct",))),
    "lowvram": (("default", ("subject", "subject_views", "subject_prior", "front_view", "multiview")),),
    "quality": (("default", ("subject", "identity", "edited_views", "front_view")),),
}
# The preset fields that change how long a stage runs or what it computes but no tensor's shape, so
# no peak: step counts, learning rates and their schedule, DDIM's eta (noise amount), the img2img strength and
# the IP-Adapter scale (a factor). Every stage in SAME_SHAPES reads, of the fields where the two presets
# differ, only these (tests/test_memory_budget.py checks it against the stages' declared fields). Not here:
# guidance (1.0 runs one batch, anything else the guided batch of twice the rows), sizes, batches,
# the LoRA rank, the reconstruction preset.
SHAPE_FREE_FIELDS = ("mv_steps", "sd_steps", "identity_steps", "prior_steps", "normal_steps", "identity_lr", "prior_lr",
                     "lr_schedule", "mv_eta", "edit_strength", "ip_scale")
FALLBACK_ORDER = ("default", "lowvram")  # what `auto` tries, first that fits
MODEL_STAGES = ("subject", "subject_views", "identity", "edited_views", "subject_prior", "front_view", "multiview")  # the model stages
BATCHED_STAGE = "edited_views"  # the stage whose batch sizes are chosen from free memory, and the largest


@dataclass(frozen=True)
class Need:
    gb: float
    stage: str


@dataclass(frozen=True)
class Figure:
    """One stage's figure for a preset: its GB, the preset whose row it is (the preset itself, or the
    one it shares the stage with, `SAME_SHAPES`), and whether that row was measured in a whole chain."""
    gb: float
    source: str
    in_chain: bool


def stage_figures(device_kind: str, dtype: str, preset: str) -> dict[str, Figure] | None:
    """The measured per-stage figures standing for `preset` on this device and precision, each with where
    it comes from (`memory_bench.py --report` prints them), or None."""
    from make_your_3d.pipeline.presets import PRESETS

    where = PROXY.get((device_kind, dtype), ("", ""))
    table, in_chain = MEASURED_PEAK_GB.get(where, {}), IN_CHAIN.get(where, {})

    def shared(like: str, stage: str) -> bool:
        # An in-chain figure holds what the earlier stages of `like`'s chain left loaded, which its
        # release of models decides (offload: one model at a time): it stands for a preset only
        # where that is the same (fast for default, not lowvram).
        if stage not in table.get(like, {}):
            return False
        return stage not in in_chain.get(like, ()) or (preset in PRESETS and like in PRESETS and PRESETS[preset].offload == PRESETS[like].offload)

    figures = {s: Figure(table[like][s], like, s in in_chain.get(like, ()))
               for like, stages in SAME_SHAPES.get(preset, ()) for s in stages if shared(like, s)}
    for stage, gb in table.get(preset, {}).items():
        # A preset's own per-stage figure holds only the stage's models; where it shares a stage with a
        # preset whose figure is in-chain (and releases alike), a job holds that much too: the larger stands.
        borrowed = figures.get(stage)
        if borrowed is None or not borrowed.in_chain or gb >= borrowed.gb:
            figures[stage] = Figure(gb, preset, stage in in_chain.get(preset, ()))
    return figures or None


def stage_peaks(device_kind: str, dtype: str, preset: str) -> dict[str, float] | None:
    """The measured per-stage peaks (GB) standing for `preset` on this device and precision, or None."""
    figures = stage_figures(device_kind, dtype, preset)
    return {s: f.gb for s, f in figures.items()} if figures else None


def job_need(device_kind: str, dtype: str, preset: str) -> Need | None:
    """The largest stage of a job of `preset` (None: not measured for this device and precision).
    Figures that miss a model stage are incomplete and count as not measured (their largest would
    be a floor, not the job's need: a preset whose own multi-view shapes were never measured would borrow
    nothing for them), with one exception: where
    the preset's own two-model edited views are missing but every other model stage was measured,
    the memory planner runs them one model at a time when both do not fit (`batches_for`), so the
    least it needs there is lowvram's measured one-model figure. The reconstruction may be missing
    (fast in fp32): `request.estimate_job_memory` checks it per request."""
    peaks = stage_peaks(device_kind, dtype, preset)
    missing = set(MODEL_STAGES) - set(peaks or {})
    if not peaks or missing - {BATCHED_STAGE}:
        return None
    if missing:
        one = (stage_peaks(device_kind, dtype, "lowvram") or {}).get(BATCHED_STAGE)
        if one is None:
            return None
        peaks = {**peaks, f"{BATCHED_STAGE} (one model at a time)": one}
    stage = max(peaks, key=peaks.get)
    return Need(peaks[stage], stage)


def recon_peak_gb(recon_preset: str) -> tuple[float, str] | None:
    """The reconstruction's peak GB at `recon_preset`'s own grid, faces and texture size, and where it
    comes from. Measured: the largest reconstruct figure of the presets that run this reconstruction
    preset, in any precision (the stage loads no model and computes in float32 whatever the job's
    precision). Not measured (a preset nobody ran): a straight line in the fused grid's point count (grid_res
    cubed: its peak is the surface extraction on that grid) through the measured presets, least
    squares, never under the largest measured figure of a smaller grid. None: nothing measured."""
    from make_your_3d.pipeline.presets import PRESETS
    from make_your_3d.recon.config import PRESETS as RECON_PRESETS

    measured: dict[str, float] = {}
    for table in MEASURED_PEAK_GB.values():
        for preset, stages in table.items():
            if "reconstruct" in stages and preset in PRESETS:
                recon = PRESETS[preset].recon_preset
                measured[recon] = max(measured.get(recon, 0.0), stages["reconstruct"])
    if recon_preset in measured:
        return measured[recon_preset], "measured"
    if recon_preset not in RECON_PRESETS or not measured:
        return None
    points = {name: RECON_PRESETS[name].fuse.grid_res ** 3 for name in [*measured, recon_preset]}
    want = points[recon_preset]
    smaller = [gb for name, gb in measured.items() if points[name] <= want]
    if len(measured) < 2:
        (name, gb), = measured.items()
        return max(gb, gb * want / points[name]) if want >= points[name] else gb, f"estimated: {name}'s figure x grid points"
    xs, ys = [points[n] for n in measured], list(measured.values())
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / (sum((x - mx) ** 2 for x in xs) or 1)
    line = my + slope * (want - mx)
    return max([line, *smaller]), f"estimated: linear in grid points through {', '.join(sorted(measured))}"


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's malloc_trim, or None (another C library or system: nothing to call)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def return_freed_memory() -> bool:
    """Hand the memory the process has freed back to the system (glibc's `malloc_trim(0)`); False where
    there is nothing to call. Why: glibc keeps freed blocks under its mmap threshold in the process's
    heap, and that threshold grows to 32 MB once large blocks are freed, so most weight and activation
    tensors land there. Measured at the published sizes in fp32 (BENCHMARKS.md "Peak memory per stage"):
    a chain held 17 GB resident at the start of front_view with no model loaded, and the
    reconstruction then ran out of room on top of it; one fp32 multi-view model plus the personalized
    model loaded and released left 3.55 GB resident, 0.59 GB after this call (0.09 s)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def available_bytes(device) -> int | None:
    """Memory a job may use on `device` now: free VRAM on CUDA, what the GPU may still allocate of the
    unified memory on Apple's GPU, available RAM on the CPU (None: cannot tell)."""
    import torch

    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "mps":
        return int(torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory())
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _where(device_kind: str) -> str:
    return {"cuda": "of GPU memory", "mps": "of the Mac's unified memory"}.get(device_kind, "of RAM")


def check_fits(device_kind: str, dtype: str, preset: str, budget_bytes: int) -> None:
    """Refuse (TooHeavy) a job of `preset` whose largest measured stage does not fit `budget_bytes`,
    with a sentence naming a preset that fits (or saying none does)."""
    need = job_need(device_kind, dtype, preset)
    if need is None or need.gb * GB <= budget_bytes:
        return
    have = f"{budget_bytes / GB:.1f} GB {_where(device_kind)}"
    precision = dtype.replace("float", "fp").replace("bfp16", "bf16")
    head = f"The {preset} preset needs about {need.gb:.1f} GB at its largest stage ({need.stage}) in {precision}; this machine can give it {have}."
    for other in FALLBACK_ORDER[FALLBACK_ORDER.index(preset) + 1 if preset in FALLBACK_ORDER else 0:]:
        other_need = job_need(device_kind, dtype, other)
        if other != preset and other_need is not None and other_need.gb * GB <= budget_bytes:
            raise TooHeavy(f"{head} Pick the {other} preset (about {other_need.gb:.1f} GB), or close other programs.")
        if other != preset and other_need is None:  # not measured in this precision: not known not to fit
            raise TooHeavy(f"{head} Pick the {other} preset (it holds one model at a time; its peak in {precision} is not measured), "
                           "or close other programs.")
    raise TooHeavy(f"{head} No preset fits: close other programs using the memory, or run on a machine with more.")


def resolve_preset_name(name: str, device, precision_of, ram_budget_bytes: int | None = None, tiny: bool = False) -> str:
    """`name`, or for "auto" the preset that fits `device` (a tiny set's toy sizes always fit: default).
    `precision_of(preset_name)` gives a preset's precision setting (after overrides)."""
    from make_your_3d.device import resolve_dtype
    from make_your_3d.job_params import AUTO_PRESET

    if name != AUTO_PRESET:
        return name
    if tiny:
        return FALLBACK_ORDER[0]
    dtype = str(resolve_dtype(device, precision_of(FALLBACK_ORDER[0]))).removeprefix("torch.")
    return pick_preset(device.type, dtype, capacity_bytes(device, ram_budget_bytes))


def pick_preset(device_kind: str, dtype: str, budget_bytes: int | None) -> str:
    """What `auto` runs: the first of FALLBACK_ORDER whose largest measured stage fits (default when
    nothing is known about the budget or the figures)."""
    if budget_bytes is None:
        return FALLBACK_ORDER[0]
    for preset in FALLBACK_ORDER:
        need = job_need(device_kind, dtype, preset)
        if need is None or need.gb * GB <= budget_bytes:
            return preset
    return FALLBACK_ORDER[-1]


BATCH_FIELDS = ("edit_batch", "normal_batch")

# The planner's figures for a precision whose batched stage was not measured, from a measured one:
# dtype -> (measured dtype, factor). float32 from bfloat16 x 2 (every weight and activation takes
# twice the bytes; the ~0.3 GB of libraries doubled too, so the estimate errs high). Default's fp32 stages
# are measured now (in-chain: 16.3 GB for the edited views against 19.2 estimated), lowvram's too
# (9.44 GB for its edited views against 12.1 estimated); quality's fp32 stages after subject_views are not.
# Only `batches_for` and `stage_need_gb` use estimates; the admission check (`check_fits`) and `auto`
# use measured figures alone.
ESTIMATE_FROM: dict[str, tuple[str, float]] = {"float32": ("bfloat16", 2.0)}


def batched_figure(device_kind: str, dtype: str, preset: str) -> tuple[float | None, str]:
    """`preset`'s peak GB for the batched stage at its own batches, and where it comes from
    ("measured", "estimated: bfloat16 x 2.0", or "" with None when neither is known)."""
    measured = (stage_peaks(device_kind, dtype, preset) or {}).get(BATCHED_STAGE)
    if measured is not None:
        return measured, "measured"
    if dtype in ESTIMATE_FROM:
        other, factor = ESTIMATE_FROM[dtype]
        base = (stage_peaks(device_kind, other, preset) or {}).get(BATCHED_STAGE)
        if base is not None:
            return base * factor, f"estimated: {other} x {factor:g}"
    return None, ""


def stage_need_gb(device_kind: str, dtype: str, preset: str, stage: str) -> float | None:
    """`preset`'s peak GB for any `stage`: measured, else estimated from another precision (ESTIMATE_FROM),
    else None. Only the release of loaded models before a stage (`Generator._make_room`) uses this: an
    fp32 job whose stages are not all measured must still drop the models a stage does not need
    (the multi-view model before the edited views), or the chain runs out of memory there."""
    measured = (stage_peaks(device_kind, dtype, preset) or {}).get(stage)
    if measured is not None or dtype not in ESTIMATE_FROM:
        return measured
    other, factor = ESTIMATE_FROM[dtype]
    base = (stage_peaks(device_kind, other, preset) or {}).get(stage)
    return None if base is None else base * factor


def row_gb(device_kind: str, dtype: str) -> float | None:
    """Extra GB each further image adds to a batched edited_views call (SD img2img rows and Marigold
    rows together) on top of the stage at batch 1: (default's peak at batch 6 - lowvram's at batch 1)
    / 5, an upper bound (default's figure also holds the second model). None: unknown."""
    one, _ = batched_figure(device_kind, dtype, "lowvram")
    six, _ = batched_figure(device_kind, dtype, "default")
    if one is None or six is None:
        return None
    return max(0.0, (six - one) / 5)


def choose_batch(asked: int, one_gb: float, per_row_gb: float, free_bytes: int) -> int:
    """The largest batch up to `asked` whose stage fits `free_bytes` (at least 1)."""
    best = 1
    for b in range(1, asked + 1):
        if (one_gb + (b - 1) * per_row_gb) * GB <= free_bytes:
            best = b
    return best


def batches_for(device_kind: str, dtype: str, preset, free_bytes: int | None) -> dict:
    """How the batched stage (the edited views) runs in the device's free memory: the edit and normal
    batch sizes and whether its two models are held one at a time. Returns {"edit_batch": n,
    "normal_batch": n, "one_model_at_a_time": bool, "why": ...} (job.json's "batches").

    A preset that keeps both models loaded (default, fast, quality) keeps doing so when its measured
    peak for the stage fits `free_bytes`. When it does not, the stage holds one model at a time
    (the personalized model is dropped before the normal estimator loads, as lowvram does), and the
    batches are lowered from the one-model figures until that fits: a job then runs slower (the
    models load again) instead of running out of memory."""
    asked = {f: getattr(preset, f) for f in BATCH_FIELDS}
    one, one_source = batched_figure(device_kind, dtype, "lowvram")
    per_row = row_gb(device_kind, dtype)
    both, both_source = (None, "") if preset.offload else batched_figure(device_kind, dtype, preset.name)
    if free_bytes is None or one is None or per_row is None or (both is None and not preset.offload):
        return {**asked, "one_model_at_a_time": preset.offload, "why": "the preset's (no figures or free memory for this device)"}
    free = f"{free_bytes / GB:.1f} GB free"
    if both is not None and both * GB <= free_bytes:
        return {**asked, "one_model_at_a_time": False, "why": f"the preset's: both models fit {free} ({both:.1f} GB, {both_source})"}
    chosen = {f: choose_batch(n, one, per_row, free_bytes) for f, n in asked.items()}
    held = "one model at a time (the preset's)" if preset.offload else f"one model at a time: both models need {both:.1f} GB ({both_source})"
    sizes = "the preset's batches fit" if chosen == asked else (
        f"batches lowered from the preset's {asked}: {one:.1f} GB at batch 1 ({one_source}) + {per_row:.2f} GB per image")
    return {**chosen, "one_model_at_a_time": True, "why": f"{held}; {sizes} ({free})"}


def capacity_bytes(device, ram_budget_bytes: int | None = None) -> int | None:
    """What a job may use on `device` at most: the card's VRAM on CUDA, the share of unified memory
    macOS lets the GPU have on Apple Silicon, the per-job RAM budget (else physical RAM) on the CPU.
    The admission check uses this (free memory comes and goes; the batch choice uses that instead)."""
    import torch

    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    if device.type == "mps":
        return int(torch.mps.recommended_max_memory())
    if ram_budget_bytes is not None:
        return ram_budget_bytes
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def device_budget(device_name: str, precision: str, ram_budget_bytes: int | None = None) -> tuple[str, str, int | None]:
    """(device kind, dtype name, capacity in bytes) of the device a backend started with `device_name` runs on."""
    from make_your_3d.device import resolve_device, resolve_dtype

    device = resolve_device(device_name)
    return device.type, str(resolve_dtype(device, precision)).removeprefix("torch."), capacity_bytes(device, ram_budget_bytes)
