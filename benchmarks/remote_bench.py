"""What TLS and pinning cost the add-on (issue 25): the local service (HTTP) against the remote
listener (`serve --allow-remote`: HTTPS with a generated certificate, a user token), both real
`make-your-3d serve` processes on loopback, driven by the add-on's own client
(blender_addon/client.py: urllib, one connection per request, the pin checked on each).

  request   GET /v1/jobs/{id} round trips (each a new TCP connection, and a TLS handshake remotely)
  download  a result file of --mib MiB, whole (median MB/s)
  resume    the same file when half of it is already in `.part` (the Range request the add-on
            sends after a broken download), against downloading it whole

The served job is a finished job written into each data folder before the service starts (a
record in the job database and a file of random bytes), so no model runs.

Run: PYTHONPATH=backend python benchmarks/remote_bench.py [--requests 200] [--mib 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def addon_client():
    spec = importlib.util.spec_from_file_location("_bench_addon_client", REPO / "blender_addon" / "client.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def seed_job(data: Path, owner: str | None, mib: int) -> str:
    """A finished job with a `subject.glb` of `mib` MiB of random bytes (seeded)."""
    import numpy as np

    from make_your_3d.service.store import JobSpec, JobStore

    store = JobStore(data / "jobs.sqlite3")
    try:
        spec = JobSpec("bench", "", None, 0, "default", None, None)
        job = store.add_jobs([spec], "0" * 64, owner=owner)[0]
        store.claim_next()
        folder = data / "jobs" / job.id
        folder.mkdir(parents=True)
        (folder / "subject.glb").write_bytes(np.random.default_rng(0).integers(0, 256, mib << 20, dtype=np.uint8).tobytes())
        store.finish(job.id, "done", files=["subject.glb"])
    finally:
        store.close()
    return job.id


def start(models: Path, data: Path, *extra: str) -> tuple[subprocess.Popen, dict]:
    state_file = data.parent / f"{data.name}-state.json"
    cmd = [sys.executable, "-m", "make_your_3d", "serve", "--models", str(models), "--data", str(data), "--port", "0",
           "--state-file", str(state_file), "--device", "cpu", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if state_file.exists():
            return proc, json.loads(state_file.read_text())
        if proc.poll() is not None:
            raise SystemExit(f"serve exited with {proc.returncode}")
        time.sleep(0.05)
    proc.kill()
    raise SystemExit("serve did not start")


def measure(client, job_id: str, requests: int, repeats: int, tmp: Path) -> dict[str, float]:
    for _ in range(5):  # warm both sides (imports, first connection)
        client.job(job_id)
    times = []
    for _ in range(requests):
        t0 = time.perf_counter()
        client.job(job_id)
        times.append(time.perf_counter() - t0)
    whole, resumed = [], []
    dest = tmp / "subject.glb"
    size = 0
    for _ in range(repeats):
        dest.unlink(missing_ok=True)
        t0 = time.perf_counter()
        client.download(job_id, "subject.glb", dest)
        whole.append(time.perf_counter() - t0)
        data = dest.read_bytes()
        size = len(data)
        # half of it left by a "broken" download, with the validator it was started with
        part = tmp / "subject.glb.part"
        part.write_bytes(data[: size // 2])
        validator = json.dumps({"validator": client._open("GET", f"/v1/jobs/{job_id}/files/subject.glb",
                                                          headers={"Range": "bytes=0-0"}).headers.get("ETag")})
        (tmp / "subject.glb.part.json").write_text(validator)
        dest.unlink()
        t0 = time.perf_counter()
        client.download(job_id, "subject.glb", dest)
        resumed.append(time.perf_counter() - t0)
        assert dest.read_bytes() == data, "the resumed download differs"
    return {"request_ms": 1000 * statistics.median(times), "request_p90_ms": 1000 * sorted(times)[int(0.9 * len(times))],
            "download_mb_s": size / 1e6 / statistics.median(whole), "download_s": statistics.median(whole),
            "resume_half_s": statistics.median(resumed)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", metavar="FILE", help="also write the figures here")
    args = ap.parse_args()
    client_mod = addon_client()
    from make_your_3d.models.tiny import write_tiny_set
    from make_your_3d.service.users import UserStore

    with tempfile.TemporaryDirectory(prefix="remote_bench_") as tmp_name:
        tmp = Path(tmp_name)
        models = write_tiny_set(tmp / "models", seed=0)
        local_data, remote_data = tmp / "local", tmp / "remote"
        local_id = seed_job(local_data, None, args.mib)
        remote_id = seed_job(remote_data, "bench", args.mib)
        token = UserStore(remote_data).add("bench")
        local_proc, local_state = start(models, local_data)
        remote_proc, remote_state = start(models, remote_data, "--allow-remote")
        try:
            rows = {}
            for name, state, job_id, ep in (
                ("local HTTP", local_state, local_id, client_mod.Endpoint(local_state["url"], local_state.get("token", ""))),
                ("remote HTTPS, pinned", remote_state, remote_id,
                 client_mod.Endpoint(remote_state["url"], token, remote_state.get("fingerprint", ""))),
            ):
                work = tmp / f"client-{name.split()[0]}"
                work.mkdir()
                rows[name] = measure(client_mod.Client(ep, timeout=60), job_id, args.requests, args.repeats, work)
        finally:
            for proc in (local_proc, remote_proc):
                proc.terminate()
                proc.wait(30)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}, load average {load:.1f}; "
          f"{args.requests} requests, {args.mib} MiB file, {args.repeats} downloads")
    print("| | request median / p90, ms | download whole, MB/s (s) | resume with half present, s |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['request_ms']:.1f} / {r['request_p90_ms']:.1f} | {r['download_mb_s']:.0f} ({r['download_s']:.2f}) "
              f"| {r['resume_half_s']:.2f} |")
    a, b = rows["local HTTP"], rows["remote HTTPS, pinned"]
    print(f"ratios remote/local: request {b['request_ms'] / a['request_ms']:.2f}x, download time {b['download_s'] / a['download_s']:.2f}x; "
          f"resume/whole (remote) {b['resume_half_s'] / b['download_s']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"load_average": load, "args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
