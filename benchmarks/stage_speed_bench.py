"""Per-stage seconds on the CPU before and after issue 16's encode cache and batched view calls.

    python benchmarks/stage_speed_bench.py chain [--repeats 3] [--json PATH]
    python benchmarks/stage_speed_bench.py identity [--size 128] [--repeats 3] [--json PATH]

`chain`: the whole chain through the real `Generator` on the tiny model set at the `default` preset's
step counts (tiny sizes from TEST_OVERRIDES), "before" and "after" alternating in one process, each
run with an empty stage cache; the median of the repeats per stage. "before" is the code path this
change replaced, selected by preset fields: `identity_augment_pool` 0 (a fresh augmentation per draw,
VAE + CLIP encoded every step) and Marigold in batches of 4; "after" is the `default` preset (a pool
of 8 framings per view encoded once; Marigold's six views in one batch). The six views' img2img was
one call before and is one call after (`edit_batch` 6), so that stage changes by the Marigold batch.

`identity`: the identity stage alone at the *published* widths (SD 1.5 UNet, VAE and text encoder,
the IP-Adapter's ViT-H/14 image encoder; random weights from `models/random_set.py`) at a reduced
image size (`--size`, default 128 px instead of 512; the ViT-H input stays 224 px as published).
Whole stages at that size take many minutes on a CPU, so this times the parts: one training step
with per-step encodes (before), one step from the cached pool (after), one single-image encode
(VAE + ViT-H, the pool's one-off cost), medians of the repeats; the stage's seconds at N steps are
then `N x step` before and `6 x pool x encode + N x step` after.

Run with OMP_NUM_THREADS=1 on a shared machine; each figure is printed with the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "backend"))

import torch  # noqa: E402

DEFAULT_STEPS = ("identity_steps", "prior_steps", "sd_steps", "mv_steps", "normal_steps", "identity_batch", "mv_guidance")
BEFORE = {"identity_augment_pool": 0, "normal_batch": 4, "edit_batch": 6}


def load() -> float:
    return os.getloadavg()[0]


def machine() -> dict:
    return {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def bench_chain(repeats: int, work: Path) -> dict:
    from make_your_3d.models.tiny import write_tiny_set
    from make_your_3d.pipeline.cache import StageCache
    from make_your_3d.pipeline.generate import Generator
    from make_your_3d.pipeline.presets import get_preset
    from make_your_3d.pipeline.request import GenerateRequest

    models = work / "tiny"
    if not models.exists():
        write_tiny_set(models, seed=0)
    default = get_preset("default")
    steps = {k: getattr(default, k) for k in DEFAULT_STEPS}
    after = {k: getattr(default, k) for k in BEFORE}
    image = (REPO / "examples" / "toy_bear.png").read_bytes()
    gen = Generator(models, work / "cache-warm", "cpu", overrides={**steps, **after, "identity_steps": 2, "prior_steps": 2})
    gen.run(GenerateRequest(image=image, prompt="wearing a red scarf", subject="a toy bear", seed=0), work / "warm")  # loads the models
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    for r in range(repeats):
        for label, fields in (("before", BEFORE), ("after", after)):
            gen.overrides = {**steps, **fields}
            gen.cache = StageCache(work / f"cache-{label}-{r}")
            la = load()
            result = gen.run(GenerateRequest(image=image, prompt="wearing a red scarf", subject="a toy bear", seed=0), work / f"{label}-{r}")
            runs[label].append({"timings": result.timings, "load_before": la, "load_after": load()})
            print(f"{label} run {r}: " + ", ".join(f"{k} {v:.2f}" for k, v in result.timings.items()) + f" (load {la:.2f})", flush=True)
    stages = list(runs["after"][0]["timings"])
    table = {s: {label: statistics.median(x["timings"][s] for x in runs[label]) for label in runs} for s in stages}
    return {"mode": "chain", "steps": steps, "before": BEFORE, "after": after, "runs": runs, "median_s": table}


def _median_time(fn, repeats: int) -> tuple[float, list[float], list[float]]:
    times, loads = [], []
    for _ in range(repeats):
        loads.append(load())
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, loads


def bench_identity(repeats: int, size: int, work: Path, pool: int) -> dict:
    from PIL import Image

    from make_your_3d.models.personalized import load_personalized
    from make_your_3d.models.random_set import _write_role
    from make_your_3d.models.registry import ROLES
    from make_your_3d.pipeline.identity import IdentityTrainer

    models = work / "published"
    for role in ("personalized", "image_encoder", "ip_adapter"):
        target = ROLES[role].path(models)
        if not target.exists():
            t0 = time.perf_counter()
            _write_role(role, target, "published", torch.device("cpu"), torch.float16, 100 + len(role))
            print(f"wrote {role} in {time.perf_counter() - t0:.0f} s", flush=True)
    pipe = load_personalized(models, torch.device("cpu"), torch.float32)
    subject = Image.open(REPO / "examples" / "toy_bear.png").convert("RGBA").resize((size, size))
    views = [(name, subject.rotate(a)) for name, a in (("front", 0), ("front_right", 8), ("right", 16), ("back", 24), ("left", -16), ("front_left", -8))]

    def step_of(trainer):
        return lambda: trainer.step(batch := trainer.make_batch(), *trainer.noise_for(batch))

    pipe.unet.train()
    fresh = IdentityTrainer(pipe, views, "a toy bear", size, 1e-4, 2, 0)
    step_of(fresh)()  # warm-up
    before, before_all, before_loads = _median_time(step_of(fresh), repeats)
    cached = IdentityTrainer(pipe, views, "a toy bear", size, 1e-4, 2, 0, augment_pool=1)  # one framing per view: the pool path, cheap to build
    step_of(cached)()
    after, after_all, after_loads = _median_time(step_of(cached), repeats)
    encode, encode_all, encode_loads = _median_time(lambda: cached._encode_one(cached.pool.images[0][0]), repeats)
    pipe.unet.eval()
    projected = {n: {"before_s": n * before, "after_s": 6 * pool * encode + n * after} for n in (80, 200, 400)}
    return {"mode": "identity", "sd_size": size, "pool": pool, "step_before_s": before, "step_after_s": after, "encode_one_s": encode,
            "samples": {"before": before_all, "after": after_all, "encode": encode_all},
            "loads": {"before": before_loads, "after": after_loads, "encode": encode_loads}, "projected": projected}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("chain", "identity"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=128, help="identity mode: sd_size in px")
    parser.add_argument("--pool", type=int, default=8, help="identity mode: pool size used for the projection")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="stage_speed_"))
    work.mkdir(parents=True, exist_ok=True)
    res = bench_chain(args.repeats, work) if args.mode == "chain" else bench_identity(args.repeats, args.size, work, args.pool)
    res["machine"] = machine()
    res["load_end"] = load()
    if res["mode"] == "chain":
        print("\n| stage | before s | after s | after/before |\n|---|---|---|---|")
        for stage, row in res["median_s"].items():
            ratio = row["after"] / row["before"] if row["before"] else float("nan")
            print(f"| {stage} | {row['before']:.2f} | {row['after']:.2f} | {ratio:.2f} |")
    else:
        print(json.dumps({k: res[k] for k in ("sd_size", "step_before_s", "step_after_s", "encode_one_s", "projected")}, indent=1))
    print(f"machine {res['machine']}, load average at the end {res['load_end']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
