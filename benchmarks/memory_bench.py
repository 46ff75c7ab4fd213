"""Peak memory of every stage of a preset, each stage in its own process, at the published model sizes.

Why one process per stage: a process's peak resident memory (`ru_maxrss`) only grows, so the peak of
a stage is only its own when nothing ran before it in that process. Each child process loads only
the models its stage declares, builds the stage from the cached results of the stages before it
(the previous children wrote them: the chain runs once, stage by stage, so the upstream inputs are
real outputs of the previous stages at the same sizes, not synthetic stand-ins) and reports:

- `peak_rss_gb`: `ru_maxrss` of the child (the whole process: torch, weights, activations);
- `base_rss_gb`: resident memory after imports, before the stage (torch and the libraries);
- `resident_at_peak`: which models were loaded and the last progress event when a 20 ms sampler
  saw the highest resident memory (what was in memory at the peak);
- `cuda_peak_gb`: `torch.cuda.max_memory_allocated` when the stage ran on CUDA.

Weights are the random published-size set of `models/random_set.py` (fp16 on disk, as published);
step counts are cut to one step per loop (peak memory does not depend on the step count), the
identity stage's augmentation pool to 1 (its encodes are kept as 4x64x64 latents: a few KiB each),
and the reconstruction's iterations to 30 (its buffers do not depend on them either).

The parent watches the machine: a child is stopped (and its row says so) when the machine's
available memory falls under `--reserve-gb`, so a stage that does not fit never takes the shared
machine down. Run with one thread: `OMP_NUM_THREADS=1 python benchmarks/memory_bench.py ...`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGE_ORDER = ("subject", "subject_views", "identity", "edited_views", "subject_prior", "front_view", "multiview", "reconstruct")
# One step per loop: peak memory does not depend on how many there are. sd_steps 2 at strength 0.8 is one img2img step.
MEMORY_STEPS = {"identity_steps": 1, "prior_steps": 1, "sd_steps": 2, "mv_steps": 1, "normal_steps": 1, "identity_augment_pool": 1}
RECON_ITERATIONS = 30
REQUEST = {"prompt": "wearing a red scarf", "subject": "a toy bear", "seed": 0}


def overrides(precision: str, recon_preset_iterations: int = RECON_ITERATIONS) -> dict:
    return {**MEMORY_STEPS, "precision": precision, "recon": {"iterations": recon_preset_iterations}}


# --- the child: one stage ------------------------------------------------------------------------

class Sampler:
    """Samples this process's resident memory every `every_s`; keeps what was loaded at the highest."""

    def __init__(self, host, every_s: float = 0.02):
        import psutil

        self.proc, self.host, self.every_s = psutil.Process(), host, every_s
        self.peak, self.at_peak, self.last_event = 0, {}, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def progress(self, p) -> None:
        self.last_event = f"{p.stage} {p.step}/{p.total} {p.message}".strip()

    def _loop(self) -> None:
        while not self._stop.is_set():
            rss = self.proc.memory_info().rss
            if rss > self.peak:
                self.peak = rss
                self.at_peak = {"models": sorted(self.host._loaded), "event": self.last_event}
            self._stop.wait(self.every_s)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_child(args) -> dict:
    import psutil
    import torch

    from make_your_3d.pipeline.generate import Generator
    from make_your_3d.pipeline.request import GenerateRequest

    # The memory planner (memory.batches_for) decides once per job, from the free memory at its start;
    # here the parent read it once per chain (--free-gb) so that every stage process of the chain
    # plans alike (its batches are in the stage keys). Without --planner: each preset as configured.
    import make_your_3d.pipeline.generate as generate

    free = int(args.free_gb * 1e9) if args.planner else None
    generate.available_bytes = lambda _device: free
    base = psutil.Process().memory_info().rss
    gen = Generator(args.models, args.cache, args.device, overrides=overrides(args.precision))
    request = GenerateRequest(image=(REPO / "examples" / "toy_bear.png").read_bytes(), preset=args.preset, **REQUEST)
    batches = gen._plan(request, None)[-1]  # what the memory planner chose for this machine's free memory (job.json's "batches")
    if args.views_from and args.stage == "reconstruct":  # another chain's multiview result under this preset's key (same shapes)
        import shutil

        target = gen.cache.path("multiview", gen.stage_keys(request)["multiview"])
        if not target.exists():
            shutil.copytree(args.views_from, target)
    cuda = gen.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with Sampler(gen.host) as sampler:
        gen.run_stage(request, args.stage, progress=sampler.progress)
    seconds = time.perf_counter() - t0
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {
        "preset": args.preset, "precision": args.precision, "stage": args.stage, "status": "ok",
        "peak_rss_gb": round(maxrss / 1e9, 3), "sampled_peak_gb": round(sampler.peak / 1e9, 3), "base_rss_gb": round(base / 1e9, 3),
        "resident_at_peak": sampler.at_peak, "seconds": round(seconds, 1),
        "cuda_peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 3) if cuda else None,
        "batches": batches,
    }


# --- the parent: every stage, one process each ------------------------------------------------------

def run_stage_process(args, preset: str, precision: str, stage: str, cache: Path) -> dict:
    """One child; stopped when the machine's available memory falls under the reserve."""
    import psutil

    cmd = [sys.executable, __file__, "--child", "--models", str(args.models), "--cache", str(cache), "--device", args.device,
           "--preset", preset, "--precision", precision, "--stage", stage] + (["--planner", "--free-gb", str(args.free_gb)] if args.planner else []) + (
           ["--views-from", str(args.views_from)] if args.views_from else [])
    with tempfile.TemporaryFile() as out:
        child = subprocess.Popen(cmd, stdout=out, stderr=subprocess.PIPE, text=True)
        low = None
        while child.poll() is None:
            avail = psutil.virtual_memory().available
            if avail < args.reserve_gb * 1e9:
                rss = psutil.Process(child.pid).memory_info().rss
                child.kill()
                low = (rss, avail)
                break
            time.sleep(0.1)
        _, err = child.communicate()
        out.seek(0)
        text = out.read().decode()
    if low is not None:
        return {"preset": preset, "precision": precision, "stage": stage, "status": "stopped",
                "note": f"stopped at {low[0] / 1e9:.1f} GB resident: the machine had {low[1] / 1e9:.1f} GB left "
                        f"(reserve {args.reserve_gb} GB), so the stage does not fit next to what else was running"}
    if child.returncode != 0:
        return {"preset": preset, "precision": precision, "stage": stage, "status": "failed", "note": err.strip().splitlines()[-1:]}
    return json.loads(text.strip().splitlines()[-1])


CODES = ("before", "first", "after", "chain")  # main's code; this work's first pass (edits ran in fp32: from_pipe); now; in-chain
# "chain" rows come from one whole-chain process (`gpu_chain_bench.py --one-step --scenarios 1` off CUDA,
# `chain_rows`): each stage's peak is the highest resident memory a 20 ms sampler saw while the progress
# events named that stage, with whatever earlier stages left loaded (what a service job has), not a
# process of its own. They fill only the stages with no per-stage ("after") row of their own.
PRECISIONS = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def chain_rows(res: dict, source: str) -> list[dict]:
    """Rows (memory_bench's format, code "chain") from a gpu_chain_bench result's first scenario."""
    if res.get("sizes") != "published" or res.get("device") != "cpu":
        raise SystemExit(f"{source}: not a published-size CPU run ({res.get('sizes')}, {res.get('device')}): its peaks are not the table's")
    name, sc = next(iter(res["scenarios"].items()))
    rows = []
    for stage in STAGE_ORDER:
        row = (sc.get("stages") or {}).get(stage) or {}
        rss = row.get("rss") or (sc.get("rss_by_stage") or {}).get(stage)
        if not rss:
            continue
        rows.append({"preset": res["preset"], "precision": PRECISIONS[res["dtype"]], "stage": stage, "status": "ok", "code": "chain",
                     "peak_rss_gb": rss["peak_rss_gb"], "resident_at_peak": {"models": rss.get("models"), "event": rss.get("event")},
                     "seconds": row.get("measured_s"), "released": row.get("released"), "batches": sc.get("batches"),
                     "load_avg": row.get("load_avg_at_start"), "date": res["date"], "scenario": name, "source": source,
                     "process_ru_maxrss_gb": sc.get("ru_maxrss_gb") or res.get("ru_maxrss_gb")})
    if "error" in sc or res.get("stopped"):
        stage = sc.get("last_stage") or next(reversed(sc.get("rss_by_stage") or res.get("rss_by_stage") or {"?": 0}))
        rows.append({"preset": res["preset"], "precision": PRECISIONS[res["dtype"]], "stage": stage, "status": "stopped" if res.get("stopped") else "failed",
                     "code": "chain", "note": res.get("stopped") or sc.get("error"), "date": res["date"], "source": source})
    return rows


def table_rows(rows: list[dict]) -> dict:
    """MEASURED_PEAK_GB from the rows: "after" rows that measured their preset as configured, then
    "chain" rows (as configured) for the stages that have none."""
    table: dict = {}
    for code in ("after", "chain"):
        for r in rows:
            if r["code"] == code and r["status"] == "ok" and as_configured(r):
                dtype = {"bf16": "bfloat16", "fp32": "float32"}[r["precision"]]
                table.setdefault(("cpu", dtype), {}).setdefault(r["preset"], {}).setdefault(r["stage"], r["peak_rss_gb"])
    return table


def as_configured(row: dict) -> bool:
    """Whether a row measured its preset as configured: not a batched stage that the memory planner
    ran one model at a time or with lowered batches (those rows are the planner's, not the preset's
    figure, and stay out of MEASURED_PEAK_GB)."""
    from make_your_3d.pipeline.memory import BATCHED_STAGE
    from make_your_3d.pipeline.presets import get_preset

    b = row.get("batches") or {}
    if row["stage"] != BATCHED_STAGE or not b:
        return True
    preset = get_preset(row["preset"])
    return b.get("one_model_at_a_time", preset.offload) == preset.offload and (b["edit_batch"], b["normal_batch"]) == (preset.edit_batch, preset.normal_batch)


def report(rows: list[dict]) -> str:
    """The Markdown table (stage x preset x precision, before -> first -> after) and `MEASURED_PEAK_GB`
    of pipeline/memory.py, built from the "after" rows that measured their preset as configured."""
    def one(r: dict) -> str:
        if r["status"] != "ok":
            return f"{r['code']} {r['status']}"
        text = f"{r['code']} {r['peak_rss_gb']:.2f}"
        if not as_configured(r):
            b = r["batches"]
            text += f" (planner: {'one model at a time, ' if b.get('one_model_at_a_time') else ''}batches {b['edit_batch']}/{b['normal_batch']})"
        return text

    def cell(preset: str, precision: str, stage: str) -> str:
        got = [r for r in rows if (r["preset"], r["precision"], r["stage"]) == (preset, precision, stage) and r["code"] in CODES]
        ok = {r["code"] for r in got if r["status"] == "ok"}
        got = [r for r in got if r["status"] == "ok" or r["code"] not in ok]  # a stopped run that was rerun: the rerun
        return ", ".join(one(r) for r in sorted(got, key=lambda r: CODES.index(r["code"]))) or "not run"

    combos = sorted({(r["preset"], r["precision"]) for r in rows}, key=lambda c: (c[1], c[0]))
    lines = ["| stage | " + " | ".join(f"{p} {q}" for p, q in combos) + " |", "|---" * (len(combos) + 1) + "|"]
    for stage in STAGE_ORDER:
        lines.append(f"| {stage} | " + " | ".join(cell(p, q, stage) for p, q in combos) + " |")
    def largest(p: str, q: str) -> str:
        got = [r["peak_rss_gb"] for r in rows if (r["preset"], r["precision"], r["code"]) == (p, q, "after") and r["status"] == "ok" and as_configured(r)]
        return f"{max(got):.2f}" if got else "none"

    lines.append("| **largest of its own rows (after, as configured)** | " + " | ".join(largest(p, q) for p, q in combos) + " |")
    table = table_rows(rows)

    def largest_in_table(p: str, q: str) -> str:
        got = table.get(("cpu", {"bf16": "bfloat16", "fp32": "float32"}[q]), {}).get(p, {})
        return f"{max(got.values()):.2f} ({max(got, key=got.get)})" if got else "none"

    lines.append("| **largest in the backend's table (after, then chain)** | " + " | ".join(largest_in_table(p, q) for p, q in combos) + " |")
    after = {(r["precision"], r["preset"], r["stage"]) for r in rows if r["code"] == "after" and r["status"] == "ok" and as_configured(r)}
    in_chain: dict = {}
    for (kind, dtype), presets in table.items():
        for preset, stages in presets.items():
            got = tuple(s for s in stages if (PRECISIONS[dtype], preset, s) not in after)
            if got:
                in_chain.setdefault((kind, dtype), {})[preset] = got
    return ("\n".join(lines) + "\n\n" + backend_view(table, in_chain) + "\n\n" + row_list(rows) + "\n\nMEASURED_PEAK_GB = "
            + repr(table) + "\nIN_CHAIN = " + repr(in_chain))


def backend_view(table: dict, in_chain: dict) -> str:
    """Every preset (fast included) x precision: the figure the backend uses for each stage with that table,
    and where it comes from: the preset's own row, another preset's (`memory.SAME_SHAPES`), an in-chain peak,
    or the reconstruction's per-request figure (`memory.recon_peak_gb`); then the job's need (`job_need`)."""
    from make_your_3d.pipeline import memory
    from make_your_3d.pipeline.presets import PRESETS

    saved = memory.MEASURED_PEAK_GB, memory.IN_CHAIN
    memory.MEASURED_PEAK_GB, memory.IN_CHAIN = table, in_chain  # this report's rows, not the module's copy
    try:
        combos = [(p, q) for q in ("bfloat16", "float32") for p in PRESETS]
        lines = ["| stage (backend's figure, GB) | " + " | ".join(f"{p} {PRECISIONS[q]}" for p, q in combos) + " |",
                 "|---" * (len(combos) + 1) + "|"]
        for stage in STAGE_ORDER:
            cells = []
            for p, q in combos:
                figures = memory.stage_figures("cpu", q, p) or {}
                if stage == "reconstruct" and stage not in figures:
                    got = memory.recon_peak_gb(PRESETS[p].recon_preset)
                    cells.append(f"{got[0]:.2f} (per request)" if got else "none")
                elif stage not in figures:
                    cells.append("none")
                else:
                    f = figures[stage]
                    cells.append(f"{f.gb:.2f}{'' if f.source == p else ' = ' + f.source}{' in-chain' if f.in_chain else ''}")
            lines.append(f"| {stage} | " + " | ".join(cells) + " |")
        needs = []
        for p, q in combos:
            need = memory.job_need("cpu", q, p)
            needs.append(f"{need.gb:.2f} ({need.stage})" if need else "not measured")
        lines.append("| **job's need (`job_need`: its largest stage)** | " + " | ".join(needs) + " |")
        return "\n".join(lines)
    finally:
        memory.MEASURED_PEAK_GB, memory.IN_CHAIN = saved


def row_list(rows: list[dict]) -> str:
    """One line per measured row: when it ran and under what load (the table's cells have no room for it)."""
    lines = []
    for r in sorted(rows, key=lambda r: (r["precision"], r["preset"], STAGE_ORDER.index(r["stage"]) if r["stage"] in STAGE_ORDER else 99, r.get("date") or "")):
        if r["code"] not in CODES:
            continue
        peak = f"{r['peak_rss_gb']:.2f} GB" if r["status"] == "ok" else r["status"]
        load = "/".join(f"{x:.1f}" for x in r["load_avg"]) if r.get("load_avg") else "?"
        lines.append(f"- {r['preset']} {r['precision']} {r['stage']} ({r['code']}): {peak}, {r.get('date') or '?'}, "
                     f"load {load}, {r.get('seconds') if r.get('seconds') is not None else '?'} s")
    return "\n".join(lines)


def machine() -> dict:
    import psutil
    import torch

    return {
        "cpu": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}",
        "ram_gb": round(psutil.virtual_memory().total / 1e9, 1),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", required=True, help="a random published-size model set (models/random_set.py)")
    parser.add_argument("--work", default=None, help="stage caches (one per preset and precision)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--presets", nargs="+", default=["default", "lowvram", "fast", "quality"])
    parser.add_argument("--precisions", nargs="+", default=["bf16", "fp32"])
    parser.add_argument("--stages", nargs="+", default=list(STAGE_ORDER))
    parser.add_argument("--reserve-gb", type=float, default=1.5, help="stop a stage when the machine has less available")
    parser.add_argument("--json", help="append each row to this JSON file as it is measured")
    parser.add_argument("--label", default="after", help="which code the rows measure (before/after a change)")
    parser.add_argument("--planner", action="store_true",
                        help="let the memory planner choose batches and one-model-at-a-time from the machine's free memory "
                             "(default: measure each preset as configured)")
    parser.add_argument("--free-gb", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--report", nargs="+", metavar="JSON",
                        help="print the Markdown table and the backend's table of these results files (their rows together), then exit")
    parser.add_argument("--chain", nargs="+", metavar="JSON",
                        help="with --report: also the first scenario of these gpu_chain_bench results (in-chain peaks, code 'chain')")
    parser.add_argument("--views-from", metavar="DIR",
                        help="a multiview cache entry (six 256 px views) to reconstruct from: copied under the preset's own multiview key, "
                             "so `--stages reconstruct` measures a reconstruction preset without running its model stages")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--preset", help=argparse.SUPPRESS)
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args)))
        return []
    if args.report:
        rows = [row for path in args.report for row in json.loads(Path(path).read_text())]
        for path in args.chain or []:
            rows += chain_rows(json.loads(Path(path).read_text()), Path(path).name)
        print(report(rows))
        return []
    import psutil

    work = Path(args.work or tempfile.mkdtemp(prefix="memory-bench-"))
    rows: list[dict] = []
    out = Path(args.json) if args.json else None
    for precision in args.precisions:
        for preset in args.presets:
            cache = work / f"cache-{preset}-{precision}"
            if args.planner:  # one plan per chain, as one job plans once
                args.free_gb = round(psutil.virtual_memory().available / 1e9 - args.reserve_gb, 1)
            for stage in args.stages:
                load = os.getloadavg()
                row = run_stage_process(args, preset, precision, stage, cache)
                row.update({"code": args.label, "planner_free_gb": args.free_gb if args.planner else None, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "load_avg": [round(x, 2) for x in load],
                            "available_before_gb": round(psutil.virtual_memory().available / 1e9, 1), "machine": machine(),
                            "models": "random published sizes (models/random_set.py, fp16 files)", "steps": MEMORY_STEPS,
                            "recon_iterations": RECON_ITERATIONS})
                if args.views_from and stage == "reconstruct":
                    row["views_from"] = str(args.views_from)
                rows.append(row)
                print(json.dumps({k: row.get(k) for k in ("preset", "precision", "stage", "status", "peak_rss_gb", "seconds", "resident_at_peak", "note")}),
                      flush=True)
                if out:
                    old = json.loads(out.read_text()) if out.is_file() else []
                    out.write_text(json.dumps(old + [row], indent=1) + "\n")
                if row["status"] != "ok":
                    break  # the later stages need this one's result
    return rows


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "backend"))
    main()
