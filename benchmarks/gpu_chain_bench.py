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

Off CUDA (issue 24's memory run: `--device cpu --one-step --scenarios 1`): a 20 ms sampler of the process's
resident memory keyed by the progress events' stage gives each stage's in-chain peak and what was loaded
then, `ru_maxrss` the whole; the run stops itself, after writing what it measured to --json, when the
machine's available memory falls under --reserve-gb. `memory_bench.py --report --chain` turns the result
into table rows.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import signal
import statistics
import sys
import tempfile
import threading
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
# --one-step: one step per loop, as benchmarks/memory_bench.py runs each stage (peak memory does not
# depend on the step count; sd_steps 2 at strength 0.8 is one img2img step), and a short reconstruction
# (its buffers do not depend on the iterations either). No per-step time can be read from one step.
ONE_STEP = {"identity_steps": 1, "prior_steps": 1, "sd_steps": 2, "mv_steps": 1, "normal_steps": 1, "identity_augment_pool": 1}
ONE_STEP_RECON_ITERATIONS = 30
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


class RssWatch:
    """Off CUDA: a 20 ms sampler of this process's resident memory, keyed by the stage of the latest
    progress event (each stage's peak, what was loaded then, the load average when the stage began),
    and the machine's guard: when its available memory falls under `reserve_gb` the partial results go
    to `on_stop` and the process kills itself (memory_bench's watcher, inside the one process the chain
    must run in, as in the service)."""

    def __init__(self, host, reserve_gb: float, on_stop, every_s: float = 0.02):
        import psutil

        self.proc, self.host, self.reserve_gb, self.on_stop, self.every_s = psutil.Process(), host, reserve_gb, on_stop, every_s
        self.vm = psutil.virtual_memory
        self.stage, self.last_event = "setup", None
        self.peaks: dict[str, dict] = {}
        self.load_at_start: dict[str, list[float]] = {}
        self.min_available_gb: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def progress(self, p) -> None:
        stage = SUBSTAGES.get(p.stage, p.stage)
        if stage not in self.load_at_start:
            self.load_at_start[stage] = [round(x, 2) for x in os.getloadavg()]
        self.stage, self.last_event = stage, f"{p.stage} {p.step}/{p.total} {p.message}".strip()

    def _loop(self) -> None:
        while not self._stop.is_set():
            rss, avail = self.proc.memory_info().rss, self.vm().available
            self.min_available_gb = round(min(avail / 1e9, self.min_available_gb or 1e9), 2)
            row = self.peaks.setdefault(self.stage, {"peak_rss_gb": 0.0})
            if rss / 1e9 > row["peak_rss_gb"]:
                row.update(peak_rss_gb=round(rss / 1e9, 3), models=sorted(self.host._loaded), event=self.last_event)
            if avail < self.reserve_gb * 1e9:
                try:
                    self.on_stop(f"stopped in {self.stage} at {rss / 1e9:.1f} GB resident: the machine had {avail / 1e9:.1f} GB "
                                 f"available (reserve {self.reserve_gb} GB); last event: {self.last_event}")
                finally:  # whatever the report did, the machine comes first
                    os.kill(os.getpid(), signal.SIGKILL)
            self._stop.wait(self.every_s)

    def __enter__(self) -> "RssWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


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
    if args.one_step:
        run_steps = {k: ONE_STEP[k] for k in STEP_FIELDS}
        recon = {**base.get("recon", {}), "iterations": ONE_STEP_RECON_ITERATIONS}
        overrides = {**base, **ONE_STEP, "recon": recon}
    else:
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

    import psutil

    available_at_start = round(psutil.virtual_memory().available / 1e9, 2)  # what the planner saw, about
    load_at_start = [round(x, 2) for x in os.getloadavg()]
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

    run_totals = step_totals(run_preset)
    full_totals = run_totals if args.one_step else step_totals(full)  # a memory run extrapolates nothing
    scenarios = {}
    watch = None
    header = lambda: {"benchmark": "gpu_chain_bench", "date": str(date.today()), "preset": args.preset, "sizes": args.sizes,
                      "device": str(device), "dtype": str(dtype).removeprefix("torch."), "one_step": args.one_step,
                      "available_at_start_gb": available_at_start, "load_avg_at_start": load_at_start}
    if not cuda and args.reserve_gb > 0:
        def on_stop(note: str) -> None:  # the watcher's last word before the process kills itself
            print(note, file=sys.stderr, flush=True)
            if args.json:
                partial = {**header(), "scenarios": scenarios, "stopped": note, "rss_by_stage": watch.peaks,
                           "load_at_stage_start": watch.load_at_start, "ru_maxrss_gb": ru_maxrss_gb()}
                write_json(args.json, partial)
        watch = RssWatch(gen.host, args.reserve_gb, on_stop).__enter__()
    for name, prompt, seed in SCENARIOS[:args.scenarios]:
        rec = Recorder(cuda)
        if watch is not None:  # each scenario's own per-stage peaks (cached stages report one event)
            watch.peaks, watch.load_at_start, watch.stage = {}, {}, "setup"
        progress = rec if watch is None else (lambda p, rec=rec: (rec(p), watch.progress(p)))
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        request = GenerateRequest(image=image, prompt=prompt, subject="a toy bear", seed=seed, preset=args.preset)
        t0 = time.perf_counter()
        try:
            result = gen.run(request, work / f"out-{args.preset}" / name.replace(" ", "_"), progress=progress)
        except Exception as exc:  # a one-shot GPU lease: keep what the events measured, go on
            rec.close_stage()
            scenarios[name] = failed_scenario(exc, rec, cuda)
            if watch is not None:
                scenarios[name]["rss_by_stage"] = dict(watch.peaks)
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
            if watch is not None:
                row["rss"] = watch.peaks.get(record["name"])  # resident memory: peak within the stage, models loaded then
                row["load_avg_at_start"] = watch.load_at_start.get(record["name"])
            row["released"] = record.get("released")
            stages[record["name"]] = row
        other = job["timings"]["total"] - sum(r["measured_s"] for r in stages.values())  # preprocessing + outputs
        scenarios[name] = {
            "cached_stages": job["cached_stages"],
            "measured_s": job["timings"]["total"],
            "wall_s": wall,
            "estimated_s": sum(r["estimated_s"] for r in stages.values()) + other,
            "peak_gb": max(rec.peaks.values(), default=0) / 1e9 if cuda else None,
            "ru_maxrss_gb": ru_maxrss_gb(),  # the process's peak so far (this scenario and all before it)
            "batches": job["batches"],  # what the memory planner chose (job.json)
            "stages": stages,
        }
        if watch is not None:
            scenarios[name]["min_available_gb"] = watch.min_available_gb
    if watch is not None:
        watch.__exit__()
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
        "one_step": args.one_step,
        "extrapolated": not args.one_step and any(run_steps[k] != getattr(full, k) for k in STEP_FIELDS),
        "available_at_start_gb": available_at_start,
        "load_avg_at_start": load_at_start,
        "reserve_gb": None if cuda else args.reserve_gb,
        "ru_maxrss_gb": ru_maxrss_gb(),
        "segmenter": not args.no_segmenter,
        "setup_s": setup_s,
        "models_reused": reuse,
        "warmup_s": warmup_s,
        "stages_order": list(STAGES),
        "scenarios": scenarios,
        "versions": _versions(),
    }


def ru_maxrss_gb() -> float:
    """The process's peak resident memory so far (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 3)


def write_json(path: str, res: dict) -> None:
    """Atomic: a stopped run's partial results never leave a half-written file."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(res, indent=2, default=str) + "\n")
    os.replace(tmp, out)


def _fmt(x, spec=".2f") -> str:
    return "-" if x is None else format(x, spec)


def print_report(res: dict) -> None:
    print(f"Whole chain, preset {res['preset']}, {res['sizes']} sizes (random weights), {res['device_name']}, {res['dtype']}, {res['date']}")
    if res.get("one_step"):
        print(f"One step per loop ({', '.join(f'{k} {v}' for k, v in ONE_STEP.items())}), reconstruction "
              f"{ONE_STEP_RECON_ITERATIONS} iterations: a memory run; seconds are NOT full-step figures and none are extrapolated.")
    elif res["extrapolated"]:
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
    first = res["scenarios"][SCENARIOS[0][0]]
    if "batches" in first:
        print(f"\nMemory planner (job.json batches): {first['batches']}")
    if first.get("ru_maxrss_gb") is not None and res["device"] == "cpu":
        print(f"Peak resident memory of the process (ru_maxrss): {first['ru_maxrss_gb']:.2f} GB; peak GB below: resident memory within each stage")
    first = first.get("stages")
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
        peak = row["peak_gb"] if row["peak_gb"] is not None else (row.get("rss") or {}).get("peak_rss_gb")
        print(f"| {stage} | {row['measured_s']:.2f} | {steps} | {per} | {row['estimated_s']:.2f} | {_fmt(peak)} |")
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
    parser.add_argument("--scenarios", type=int, default=len(SCENARIOS), choices=range(1, len(SCENARIOS) + 1),
                        help="run only the first N scenarios (1: new subject, every stage)")
    parser.add_argument("--one-step", action="store_true",
                        help="one step per loop and a 30-iteration reconstruction (a memory run; overrides --steps-scale)")
    parser.add_argument("--reserve-gb", type=float, default=1.5,
                        help="off CUDA: stop the run (partial results to --json) when the machine has less available; 0: never")
    args = parser.parse_args(argv)
    if not 0 < args.steps_scale <= 1:
        parser.error("--steps-scale must be in (0, 1]")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    res = run_bench(args)
    print_report(res)
    if args.json:
        write_json(args.json, res)
    return res


if __name__ == "__main__":
    result = main(sys.argv[1:])
    sys.exit(1 if any("error" in sc for sc in result["scenarios"].values()) else 0)
