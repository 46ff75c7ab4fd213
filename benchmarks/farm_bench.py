"""The farm (`serve --ray`) on this machine with the tiny model set: jobs per hour with 1 and 2
Ray workers against local mode, the Ray path's overhead for one job, and how long moving a cached
stage between two workers takes through Ray's object store against a shared cache folder.

    python benchmarks/farm_bench.py [--reps 5] [--json benchmarks/results/farm_DATE.json]

Everything runs in this process as `serve` runs it (a JobStore, and a local Worker or a Farm on
it); jobs are queued in the store directly (the HTTP layer is the same in both modes) and timed
from queueing to the store's terminal record. The Ray instance is local: 2 CPUs and 2 units of a
declared GPU-like resource ("mk3d_gpu"), so on a 2-core machine the two workers share two cores.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # as the tests: the tiny models' ops are too small for threads
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import ray  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from make_your_3d.pipeline.cache import StageCache  # noqa: E402
from make_your_3d.service.farm import Farm  # noqa: E402
from make_your_3d.service.farm_config import FarmConfig  # noqa: E402
from make_your_3d.service.inputs import InputStore  # noqa: E402
from make_your_3d.service.store import TERMINAL, JobSpec, JobStore  # noqa: E402
from make_your_3d.service.worker import Worker  # noqa: E402

RESOURCE = "mk3d_gpu"
# The identity stage's entry at the published size: to_k_ip and to_v_ip of SD 1.5's 16 cross-attention
# layers (5 of width 320, 5 of 640, 6 of 1280, each 768 wide) in float32: 2 * 768 * 12480 * 4 bytes.
ADAPTER_BYTES = 2 * 768 * (5 * 320 + 5 * 640 + 6 * 1280) * 4
# The subject views' entry at the published size: 6 colour + 6 normal RGBA PNGs of 256 px, taken as
# incompressible (an upper bound: real views compress to about a third of this).
VIEWS_FILES, VIEWS_FILE_BYTES = 12, 256 * 256 * 4


def subject_png(colour: tuple[int, int, int], size: int = 64) -> bytes:
    im = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    d = ImageDraw.Draw(im)
    d.ellipse((size * 0.2, size * 0.15, size * 0.8, size * 0.85), fill=(*colour, 255))
    d.rectangle((size * 0.3, size * 0.45, size * 0.7, size * 0.55), fill=(40, 40, 120, 255))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def spec(prompt: str, seed: int) -> JobSpec:
    return JobSpec(prompt, "", "a toy", seed, "default", None, None, None)


class Mode:
    """A store plus either a local Worker or a Farm of `workers` Ray workers on it."""

    def __init__(self, root: Path, models: Path, workers: int | None):
        self.store = JobStore(root / "jobs.sqlite3")
        self.inputs = InputStore(root / "inputs")
        if workers is None:
            from make_your_3d.pipeline.generate import Generator

            self.runner = Worker(self.store, self.inputs, root / "jobs", lambda: Generator(models, root / "cache", device="cpu"),
                                 progress_interval_s=0.5)
        else:
            config = FarmConfig(workers=workers, resource=RESOURCE, worker_cpus=0, cache_dir=str(root / "farm_cache"))
            self.runner = Farm(self.store, self.inputs, root / "jobs", config, models_dir=models, device="cpu", progress_interval_s=0.5)
        self.runner.start()

    def submit(self, image: bytes, specs: list[JobSpec]) -> list[str]:
        jobs = self.store.add_jobs(specs, self.inputs.put(image))
        self.runner.wake()
        return [j.id for j in jobs]

    def wait(self, ids: list[str], timeout: float = 1800) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            jobs = [self.store.get(i) for i in ids]
            if all(j.status in TERMINAL for j in jobs):
                bad = [(j.id, j.status, j.error) for j in jobs if j.status != "done"]
                assert not bad, bad
                return
            time.sleep(0.01)
        raise TimeoutError(ids)

    def timed(self, image: bytes, specs: list[JobSpec]) -> float:
        t0 = time.monotonic()
        self.wait(self.submit(image, specs))
        return time.monotonic() - t0

    def close(self) -> None:
        self.runner.stop(30)
        self.store.close()


def throughput(models: Path, root: Path, workers: int | None) -> dict:
    """Warm the workers on other subjects, then 8 jobs (2 clicks of 4 variants on a new subject)."""
    mode = Mode(root, models, workers)
    try:
        warm = [mode.submit(subject_png((30 + 40 * i, 200, 90)), [spec("warm up", 1)])[0] for i in range(max(1, workers or 1))]
        mode.wait(warm)
        image = subject_png((200, 60, 40))
        t0 = time.monotonic()
        ids = mode.submit(image, [spec("wearing a red scarf", s) for s in range(21, 25)])
        ids += mode.submit(image, [spec("made of gold", s) for s in range(21, 25)])
        mode.wait(ids)
        wall = time.monotonic() - t0
        return {"workers": workers or "local", "jobs": len(ids), "wall_s": round(wall, 2), "jobs_per_hour": round(len(ids) / wall * 3600)}
    finally:
        mode.close()


def overhead(models: Path, root: Path, reps: int) -> dict:
    """One job at a time, warm: local Worker against a 1-worker farm, alternating, on the same
    requests. `cached`: an identical request (every stage a cache hit: the path itself);
    `new seed`: the seed-dependent stages run."""
    local = Mode(root / "local", models, None)
    farm = Mode(root / "farm", models, 1)
    image = subject_png((120, 80, 200))
    out: dict = {"cached": {"local": [], "farm": []}, "new_seed": {"local": [], "farm": []}}
    try:
        for mode in (local, farm):
            mode.timed(image, [spec("overhead", 1)])  # models loaded, subject stages cached
        for r in range(reps):
            for name, mode in (("local", local), ("farm", farm)):
                out["cached"][name].append(mode.timed(image, [spec("overhead", 1)]))
                out["new_seed"][name].append(mode.timed(image, [spec("overhead", 100 + r)]))
    finally:
        farm.close()
        local.close()
    result = {}
    for kind, runs in out.items():
        med = {k: statistics.median(v) for k, v in runs.items()}
        result[kind] = {"local_s": round(med["local"], 3), "farm_s": round(med["farm"], 3), "overhead_s": round(med["farm"] - med["local"], 3),
                        "ratio": round(med["farm"] / med["local"], 2), "runs": {k: [round(x, 3) for x in v] for k, v in runs.items()}}
    return result


@ray.remote(num_cpus=0, resources={RESOURCE: 1})
class CacheHolder:
    """A worker's stage cache, moved with the same StageCache.export / import_entry the farm uses."""

    def __init__(self, root: str):
        self.cache = StageCache(root)

    def make(self, stage: str, key: str, sizes: list[int], seed: int) -> int:
        rng = np.random.default_rng(seed)

        def write(tmp: Path) -> None:
            for i, n in enumerate(sizes):
                (tmp / f"part{i}.bin").write_bytes(rng.bytes(n))

        self.cache.build(stage, key, write)
        return sum(sizes)

    def export(self, stage: str, key: str) -> dict:
        return {"key": key, "files": self.cache.export(stage, key)}

    def take(self, stage: str, entry: dict) -> float:
        t0 = time.monotonic()
        assert self.cache.import_entry(stage, entry["key"], entry["files"])
        return time.monotonic() - t0

    def publish(self, stage: str, key: str, shared: str) -> None:
        """Shared-folder variant, writer side: the entry copied into the shared cache."""
        import shutil

        target = Path(shared) / stage / key
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{key}.tmp")
            shutil.copytree(self.cache.path(stage, key), tmp)
            os.replace(tmp, target)

    def read_shared(self, stage: str, key: str, shared: str) -> None:
        """Shared-folder variant, reader side: a verified hit in the shared cache (every file's
        sha256 checked, as StageCache.get does) and its files read into memory, as a stage would."""
        path = StageCache(shared).get(stage, key)
        assert path is not None
        for p in path.rglob("*"):
            if p.is_file():
                p.read_bytes()

    def forget(self, stage: str, key: str) -> None:
        import shutil

        shutil.rmtree(self.cache.path(stage, key), ignore_errors=True)


def cache_move(root: Path, reps: int) -> dict:
    a = CacheHolder.remote(str(root / "a"))
    b = CacheHolder.remote(str(root / "b"))
    shared = str(root / "shared")
    entries = {"adapter": [ADAPTER_BYTES], "views": [VIEWS_FILE_BYTES] * VIEWS_FILES}
    result = {}
    try:
        for name, sizes in entries.items():
            total = ray.get(a.make.remote(name, "k", sizes, 0))
            store, folder = [], []
            for r in range(reps):
                ray.get(b.forget.remote(name, "k"))
                t0 = time.monotonic()
                ray.get(b.take.remote(name, a.export.remote(name, "k")))
                store.append(time.monotonic() - t0)
                import shutil

                shutil.rmtree(Path(shared) / name, ignore_errors=True)
                t0 = time.monotonic()
                ray.get(a.publish.remote(name, "k", shared))
                ray.get(b.read_shared.remote(name, "k", shared))
                folder.append(time.monotonic() - t0)
            result[name] = {"bytes": total, "object_store_s": round(statistics.median(store), 4), "shared_folder_s": round(statistics.median(folder), 4),
                            "runs": {"object_store": [round(x, 4) for x in store], "shared_folder": [round(x, 4) for x in folder]}}
    finally:
        ray.kill(a)
        ray.kill(b)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from make_your_3d.models.tiny import write_tiny_set

    with tempfile.TemporaryDirectory(prefix="farm-bench-") as tmp:
        root = Path(tmp)
        os.environ["MAKE_YOUR_3D_CACHE"] = str(root / "user_cache")
        models = write_tiny_set(root / "models", seed=0)
        ray.init(num_cpus=2, resources={RESOURCE: 2}, include_dashboard=False, object_store_memory=512 * 2**20, configure_logging=False,
                 log_to_driver=False)
        try:
            report = {
                "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {platform.system()}",
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "load_before": os.getloadavg(),
                "ray": ray.__version__,
                "cache_move": cache_move(root / "move", args.reps),
                "overhead": overhead(models, root / "overhead", args.reps),
                "throughput": [throughput(models, root / f"tp-{w}", w) for w in (None, 1, 2)],
                "load_after": os.getloadavg(),
            }
        finally:
            ray.shutdown()
    print(json.dumps(report, indent=1))
    print("\n| runner | jobs | wall s | jobs/hour |\n| --- | --- | --- | --- |")
    for row in report["throughput"]:
        print(f"| {row['workers']} | {row['jobs']} | {row['wall_s']} | {row['jobs_per_hour']} |")
    for kind, o in report["overhead"].items():
        print(f"one job ({kind}): local {o['local_s']} s, farm {o['farm_s']} s, overhead {o['overhead_s']} s (x{o['ratio']})")
    for name, m in report["cache_move"].items():
        print(f"move {name} ({m['bytes'] / 2**20:.1f} MiB): object store {m['object_store_s']} s, shared folder {m['shared_folder_s']} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
