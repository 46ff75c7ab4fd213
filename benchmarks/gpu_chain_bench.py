"""The whole chain at the published model sizes on one GPU: seconds per stage, peak memory, and the
three re-run scenarios artists make, through the project's real `Generator`.

    python benchmarks/gpu_chain_bench.py [--preset default] [--sizes published|tiny] [--device cuda]
        [--steps-scale 0.1] [--precision auto] [--models DIR] [--work DIR] [--json PATH]

Weights are random (speed does not depend on their values): `models/random_set.py` writes every role
at its published configuration (`--sizes published`) or at toy sizes (`--sizes tiny`, for a CPU test
of this script). Three `Generator.run` calls share one Generator and one stage cache:

    new subject   prompt A, seed 0   every stage runs
    new prompt    prompt B, seed 0   subject_views + identity come from the cache
    new seed      prompt B, seed 1   ... + edited_views + subject_prior come from the cache

`--steps-scale s` runs the diffusion and optimisation stages at s times the preset's step counts
(identity_steps, prior_steps, sd_steps, mv_steps, normal_steps; each at least a few steps) so the run
fits a short GPU lease; reconstruction runs in full. Each stage's full-step time is then estimated
linearly: measured seconds + (full steps - steps run) x the median seconds per step, read from the
stage's progress events (on CUDA each event synchronises first, so the gaps are GPU time). The
printout says which figures are measured and which are estimated.

On CUDA a warm-up run (one step per stage, small reconstruction) loads every model and compiles the
kernels first; its seconds are reported as the cold start. Peak memory per stage is
`torch.cuda.max_memory_allocated`, reset whenever the progress events move to another stage.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SCENARIOS = (
    ("new subject", "wearing a red scarf", 0),
    ("new prompt", "made of gold", 0),
    ("new seed", "made of gold", 1),
)
TARGET_S = {"new subject": 60.0, "new prompt": 25.0, "new seed": 10.0}
TARGET_PEAK_GB = {"default": 12.0, "lowvram": 8.0}
# Step fields scaled by --steps-scale, with the fewest steps a scaled run keeps (>= 2 gaps between
# progress events, so a per-step time can be measured).
STEP_FIELDS = {"identity_steps": 3, "prior_steps": 3, "sd_steps": 4, "mv_steps": 3, "normal_steps": 2}
# Sizes of the tiny set: the tests' preset overrides minus their step counts (scaled here instead)
# and minus their guidance (the preset's own is kept, so the same batch layout runs).
TINY_KEYS = ("mv_size", "sd_size", "lora_rank", "recon_preset", "recon", "faces", "texture_size")
WARMUP_STEPS = {"identity_steps": 1, "prior_steps": 1, "sd_steps": 2, "mv_steps": 1, "normal_steps": 1}
SUBSTAGES = {"edited_normals": "edited_views"}  # a child reporter's stage -> the job stage it runs in
NUM_VIEWS = 6


def step_totals(preset) -> dict[str, int]:
    """Steps each stage reports in its progress events (`total`), from the preset's step fields."""
    edits = max(1, int(preset.sd_steps * preset.edit_strength))
    return {
        "subject_views": preset.mv_steps,
        "identity": preset.identity_steps,
        "edited_views": math.ceil(NUM_VIEWS / preset.edit_batch) * edits,  # one img2img call per edit_batch views
        "edited_normals": math.ceil(NUM_VIEWS / preset.normal_batch) * preset.normal_steps,
        "subject_prior": preset.prior_steps,
        "front_view": edits,
        "multiview": preset.mv_steps,
    }


def scaled_steps(preset, scale: float) -> dict[str, int]:
    """The step fields of a scaled run: round(full x scale), at least STEP_FIELDS' minimum, at most full."""
    out = {}
    for name, least in STEP_FIELDS.items():
        full = int(getattr(preset, name))
        out[name] = full if scale >= 1 else min(full, max(least, round(full * scale)))
    return out


@dataclass
class Event:
    stage: str
    step: int
    total: int
    t: float


def step_time(events: list[Event], total: int) -> tuple[float | None, int]:
    """Median seconds between consecutive step events of one stage and the number of gaps used.

    Only events reporting `total` count: a stage's own "starting"/"reused from cache" marks
    (total 1) precede model loading and set-up, which are no step's time.
    """
    times = [e.t for e in events if e.total == total]
    gaps = [b - a for a, b in zip(times, times[1:])]
    return (statistics.median(gaps) if gaps else None), len(gaps)


@dataclass
class Recorder:
    """Progress callback: timestamps every event and keeps each stage's peak GPU memory."""

    cuda: bool
    events: list[Event] = field(default_factory=list)
    peaks: dict[str, int] = field(default_factory=dict)
    _stage: str | None = None

    def __call__(self, p) -> None:
        if self.cuda:
            torch.cuda.synchronize()  # the gap to the previous event is then the GPU's time too
        now = time.perf_counter()
        if p.stage != self._stage:
            self.close_stage()
            self._stage = p.stage
        self.events.append(Event(p.stage, int(p.step), int(p.total), now))

    def close_stage(self) -> None:
        if self._stage is not None and self.cuda:
            peak = torch.cuda.max_memory_allocated()
            self.peaks[self._stage] = max(self.peaks.get(self._stage, 0), peak)
            torch.cuda.reset_peak_memory_stats()


def estimate_stage(stage: str, seconds: float, cached: bool, events: list[Event], run_totals: dict, full_totals: dict) -> dict:
    """Measured seconds of one job stage and its full-step estimate (see the module docstring)."""
    row = {"measured_s": seconds, "cached": cached, "estimated_s": seconds, "parts": {}}
    if cached:
        return row
    for part in [stage] + [s for s, parent in SUBSTAGES.items() if parent == stage]:
        if part not in run_totals:
            continue
        mine = [e for e in events if e.stage == part]
        observed = sorted({e.total for e in mine if e.total > 1} or {e.total for e in mine})
        per_step, gaps = step_time(mine, run_totals[part])
        info = {"steps_run": run_totals[part], "steps_full": full_totals[part], "s_per_step": per_step, "gaps": gaps}
        if run_totals[part] not in observed:
            info["warning"] = f"progress reported totals {observed}, expected {run_totals[part]}; not extrapolated"
        elif per_step is not None:
            row["estimated_s"] += (full_totals[part] - run_totals[part]) * per_step
        row["parts"][part] = info
    return row


def failed_scenario(exc: Exception, rec: Recorder, cuda: bool) -> dict:
    """A scenario whose run raised: the error, and each stage's span between its first and last event."""
    spans: dict[str, list[float]] = {}
    for e in rec.events:
        spans.setdefault(e.stage, [e.t, e.t])[1] = e.t
    return {
        "error": f"{type(exc).__name__}: {exc}",
        "stage_spans_s": {stage: b - a for stage, (a, b) in spans.items()},
        "last_stage": rec.events[-1].stage if rec.events else None,
        "peak_gb": max(rec.peaks.values(), default=0) / 1e9 if cuda else None,
    }


def run_bench(args) -> dict:
    from make_your_3d.device import resolve_device, resolve_dtype
    from make_your_3d.models.random_set import RANDOM_MARKER, write_random_set
    from make_your_3d.pipeline.generate import STAGES, Generator, _versions
    from make_your_3d.pipeline.presets import TEST_OVERRIDES, get_preset
    from make_your_3d.pipeline.request import GenerateRequest

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu-chain-bench-"))
    models = Path(args.models) if args.models else work / f"models-{args.sizes}"
    weights_dtype = torch.float16 if args.sizes == "published" else torch.float32

    base = {k: TEST_OVERRIDES[k] for k in TINY_KEYS} if args.sizes == "tiny" else {}
    if args.precision != "auto":
        base["precision"] = args.precision
    full = get_preset(args.preset, base)
    run_steps = scaled_steps(full, args.steps_scale)
    overrides = {**base, **run_steps}
    run_preset = get_preset(args.preset, overrides)
    dtype = resolve_dtype(device, run_preset.precision)

    marker = models / RANDOM_MARKER
    wanted = {"sizes": args.sizes, "dtype": str(weights_dtype).removeprefix("torch.")}
    written = json.loads(marker.read_text()) if marker.is_file() else {}
    reuse = all(written.get(k) == v for k, v in wanted.items()) and ("segmenter" in written.get("roles", [])) == (not args.no_segmenter)
    t0 = time.perf_counter()
    if not reuse:
        # Hashing 8 GB of random weights buys nothing here; without checksums.json the stage cache
        # fingerprints a role by its files' sizes and times (pipeline/cache.py).
        write_random_set(models, sizes=args.sizes, device=device, dtype=weights_dtype, segmenter=not args.no_segmenter,
                         checksums=args.sizes == "tiny")
    setup_s = time.perf_counter() - t0

    image = (REPO / "examples" / "toy_bear.png").read_bytes()
    gen = Generator(models, work / f"cache-{args.preset}", str(device), overrides=overrides)
    warmup_s = None
    if args.warmup == "on" or (args.warmup == "auto" and cuda):
        gen.overrides = {**overrides, **WARMUP_STEPS, "recon": dict(TEST_OVERRIDES["recon"])}
        t0 = time.perf_counter()
        gen.run(GenerateRequest(image=image, prompt="warm-up", subject="a toy bear", seed=99, preset=args.preset), work / "out-warmup")
        if cuda:
            torch.cuda.synchronize()
        warmup_s = time.perf_counter() - t0
        gen.overrides = overrides

    run_totals, full_totals = step_totals(run_preset), step_totals(full)
    scenarios = {}
    for name, prompt, seed in SCENARIOS:
        rec = Recorder(cuda)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        request = GenerateRequest(image=image, prompt=prompt, subject="a toy bear", seed=seed, preset=args.preset)
        t0 = time.perf_counter()
        try:
            result = gen.run(request, work / f"out-{args.preset}" / name.replace(" ", "_"), progress=rec)
        except Exception as exc:  # a one-shot GPU lease: keep what the events measured, go on
            rec.close_stage()
            scenarios[name] = failed_scenario(exc, rec, cuda)
            print(f"{name}: FAILED ({scenarios[name]['error']})", file=sys.stderr, flush=True)
            continue
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        rec.close_stage()
        job = json.loads((result.out_dir / "job.json").read_text())
        stages = {}
        for record in job["stages"]:
            row = estimate_stage(record["name"], record["seconds"], record["cached"], rec.events, run_totals, full_totals)
            subs = [record["name"]] + [s for s, parent in SUBSTAGES.items() if parent == record["name"]]
            row["peak_gb"] = max((rec.peaks.get(s, 0) for s in subs), default=0) / 1e9 if cuda else None
            stages[record["name"]] = row
        other = job["timings"]["total"] - sum(r["measured_s"] for r in stages.values())  # preprocessing + outputs
        scenarios[name] = {
            "cached_stages": job["cached_stages"],
            "measured_s": job["timings"]["total"],
            "wall_s": wall,
            "estimated_s": sum(r["estimated_s"] for r in stages.values()) + other,
            "peak_gb": max(rec.peaks.values(), default=0) / 1e9 if cuda else None,
            "stages": stages,
        }
    return {
        "benchmark": "gpu_chain_bench",
        "date": str(date.today()),
        "preset": args.preset,
        "sizes": args.sizes,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else f"CPU {platform.machine()}, {torch.get_num_threads()} threads",
        "dtype": str(dtype).removeprefix("torch."),
        "steps_scale": args.steps_scale,
        "run_steps": run_steps,
        "full_steps": {k: int(getattr(full, k)) for k in STEP_FIELDS},
        "extrapolated": any(run_steps[k] != getattr(full, k) for k in STEP_FIELDS),
        "segmenter": not args.no_segmenter,
        "setup_s": setup_s,
        "models_reused": reuse,
        "warmup_s": warmup_s,
        "stages_order": list(STAGES),
        "scenarios": scenarios,
        "versions": _versions(),
    }


def _fmt(x, spec=".2f") -> str:
    return "-" if x is None else format(x, spec)


def print_report(res: dict) -> None:
    print(f"Whole chain, preset {res['preset']}, {res['sizes']} sizes (random weights), {res['device_name']}, {res['dtype']}, {res['date']}")
    if res["extrapolated"]:
        runs = ", ".join(f"{k} {res['run_steps'][k]}/{res['full_steps'][k]}" for k in STEP_FIELDS)
        print(f"Steps scaled by {res['steps_scale']} ({runs}). 'estimate' columns are EXTRAPOLATED linearly to the full step counts:")
        print("measured s + (full steps - steps run) x median s/step from the progress events. Reconstruction runs in full.")
    else:
        print("Full step counts: every figure is measured.")
    print(f"Model set: {'reused' if res['models_reused'] else 'written'} in {res['setup_s']:.1f} s; "
          f"cold start (warm-up run: loads + kernel builds): {_fmt(res['warmup_s'], '.1f')} s")
    print()
    print("| scenario | cached stages | measured s | estimate at full steps s | target s | peak GB |")
    print("|---|---|---|---|---|---|")
    for name, sc in res["scenarios"].items():
        target = TARGET_S.get(name)
        if "error" in sc:
            print(f"| {name} | FAILED in {sc['last_stage']}: {sc['error'][:120]} | | | | {_fmt(sc['peak_gb'])} |")
            continue
        print(f"| {name} | {len(sc['cached_stages'])} | {sc['measured_s']:.2f} | {sc['estimated_s']:.2f} | {_fmt(target, '.0f')} | {_fmt(sc['peak_gb'])} |")
    limit = TARGET_PEAK_GB.get(res["preset"])
    if limit is not None:
        print(f"\nPeak memory target for {res['preset']}: {limit:.0f} GB (torch.cuda.max_memory_allocated, 10^9 bytes).")
    first = res["scenarios"][SCENARIOS[0][0]].get("stages")
    if first is None:
        print(flush=True)
        return
    print()
    print("| stage (new subject) | measured s | steps run/full | s/step | estimate s | peak GB |")
    print("|---|---|---|---|---|---|")
    for stage in res["stages_order"]:
        row = first.get(stage)
        if row is None:
            continue
        parts = row["parts"].values()
        steps = ", ".join(f"{p['steps_run']}/{p['steps_full']}" for p in parts) or "-"
        per = ", ".join(_fmt(p["s_per_step"], ".3f") for p in parts) or "-"
        print(f"| {stage} | {row['measured_s']:.2f} | {steps} | {per} | {row['estimated_s']:.2f} | {_fmt(row['peak_gb'])} |")
        for p in parts:
            if "warning" in p:
                print(f"  WARNING {stage}: {p['warning']}")
    print(flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="default")
    parser.add_argument("--sizes", choices=("published", "tiny"), default="published")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps-scale", type=float, default=0.1)
    parser.add_argument("--precision", default="auto", choices=("auto", "fp16", "bf16", "fp32"))
    parser.add_argument("--models", help="model set folder: reused when it holds a random set of these sizes, else written")
    parser.add_argument("--work", help="folder for the cache and outputs (default: a new temporary folder)")
    parser.add_argument("--warmup", choices=("auto", "on", "off"), default="auto", help="auto: on for CUDA")
    parser.add_argument("--no-segmenter", action="store_true", help="leave the optional CLIPSeg background remover out")
    parser.add_argument("--json", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if not 0 < args.steps_scale <= 1:
        parser.error("--steps-scale must be in (0, 1]")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    res = run_bench(args)
    print_report(res)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2, default=str) + "\n")
    return res


if __name__ == "__main__":
    result = main(sys.argv[1:])
    sys.exit(1 if any("error" in sc for sc in result["scenarios"].values()) else 0)
