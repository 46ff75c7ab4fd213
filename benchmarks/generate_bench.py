"""Generator benchmark: seconds per stage for a first run and for the re-runs artists make.

    python benchmarks/generate_bench.py [--models DIR] [--preset fast] [--device auto] [--repeats 3]

Runs on the real weights when --models holds them, else on a fresh tiny set with tiny sizes (the
figures then measure orchestration and caching, not model speed). Prints a Markdown table of the
median seconds per stage over --repeats fresh caches, and the speed-up of each re-run over the first run.
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from make_your_3d.models.registry import ROLES
from make_your_3d.models.tiny import write_tiny_set
from make_your_3d.pipeline.generate import REQUIRED_ROLES, STAGES, TEST_OVERRIDES, Generator
from make_your_3d.pipeline.request import GenerateRequest

REPO = Path(__file__).resolve().parents[1]
SCENARIOS = (
    ("first run", "wearing a red scarf", 0),
    ("new prompt", "made of gold", 0),
    ("new seed", "made of gold", 1),
    ("same inputs", "made of gold", 1),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models")
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gen-bench-"))
    models = Path(args.models) if args.models else None
    overrides = None
    if models is None or not all(ROLES[r].complete(models) for r in REQUIRED_ROLES):
        models = write_tiny_set(work / "tiny", seed=0)
        overrides = TEST_OVERRIDES
    image = (REPO / "examples" / "toy_bear.png").read_bytes()
    results: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in SCENARIOS}
    for rep in range(args.repeats):
        gen = Generator(models, work / f"cache{rep}", args.device, overrides=overrides)
        for name, prompt, seed in SCENARIOS:
            req = GenerateRequest(image=image, prompt=prompt, subject="a toy bear", seed=seed, preset=args.preset)
            t0 = time.perf_counter()
            res = gen.run(req, work / f"out{rep}" / name.replace(" ", "_"))
            timings = dict(res.timings)
            timings["wall"] = time.perf_counter() - t0
            timings["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
            if torch.cuda.is_available():
                timings["peak_vram_gib"] = torch.cuda.max_memory_allocated() / 2**30
            results[name].append(timings)
    medians = {name: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for name, runs in results.items()}
    first = medians["first run"]["wall"]
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() and args.device != "cpu" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    print(f"Generator, preset {args.preset}, {'tiny model set' if overrides else 'real weights'}, {device}, {date.today()}, median of {args.repeats}")
    print()
    vram = "peak_vram_gib" in medians["first run"]
    print("| scenario | " + " | ".join(STAGES) + " | total s | speed-up vs first | peak RSS GiB |" + (" peak VRAM GiB |" if vram else ""))
    print("|---" * (len(STAGES) + 4 + vram) + "|")
    for name, m in medians.items():
        cells = " | ".join(f"{m[s]:.2f}" for s in STAGES)
        extra = f" {m['peak_vram_gib']:.2f} |" if vram else ""
        print(f"| {name} | {cells} | {m['wall']:.2f} | {first / m['wall']:.1f}x | {m['peak_rss_gib']:.2f} |{extra}")


if __name__ == "__main__":
    main()
