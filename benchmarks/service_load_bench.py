"""Health latency of the local service under client load (issue 15); prints a table.

Three processes, so the clients' own work does not run on the server's event loop:
  server   the service's app on uvicorn with the settings `make-your-3d serve` uses (request-head
           timeout, connection limit, raised open-files limit), a job store with 151 jobs (one
           running, whose progress a ticker thread updates at 2 Hz like a real job, the rest
           queued) and no worker, so no model runs;
  load     an asyncio client holding 150 event streams plus 20 clients polling GET /v1/jobs/{id}
           (every 50 ms), or 1,100 idle sockets that send nothing (reopened when the server's
           head timeout closes them);
  sampler  this process: GET /v1/health over one keep-alive connection, timing each answer.

Run: PYTHONPATH=backend python benchmarks/service_load_bench.py [--seconds 8]
(PYTHONPATH pointing at an older tree's backend measures that tree's service the same way.)
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

TOKEN = "bench-" + "x" * 37


def _raise_nofile(n: int = 8192) -> None:
    try:
        import resource
    except ImportError:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = n if hard == resource.RLIM_INFINITY else min(n, hard)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


# ---------------------------------------------------------------------------------------------
# server process
# ---------------------------------------------------------------------------------------------
def run_server(data: Path, port_file: Path, jobs: int) -> None:
    import uvicorn

    from make_your_3d.service.app import create_app
    from make_your_3d.service.inputs import InputStore
    from make_your_3d.service.server import bind_socket
    from make_your_3d.service.store import JobSpec, JobStore
    from make_your_3d.service.worker import Worker

    try:
        from make_your_3d.service.server import (HEADER_TIMEOUT_S, MAX_HEAD_BYTES, connection_limit, head_timeout_protocol,
                                                 raise_open_files_limit)

        limit = connection_limit(raise_open_files_limit())
        hardening = dict(limit_concurrency=limit, http=head_timeout_protocol(HEADER_TIMEOUT_S), h11_max_incomplete_event_size=MAX_HEAD_BYTES)
    except ImportError:  # a tree from before issue 15 (for a same-machine baseline): serve's old settings
        limit, hardening = None, {}

    store = JobStore(data / "jobs.sqlite3")
    spec = JobSpec("bench", "", None, 0, "fast", None, None)
    ids = [j.id for j in store.add_jobs([spec] * jobs, "0" * 64)]
    running = store.claim_next()
    worker = Worker(store, InputStore(data / "inputs"), data / "jobs", lambda: None)  # never started: no job runs
    app = create_app(store, worker, TOKEN, models_dir=data / "models")
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off", ws="none", timeout_keep_alive=30, **hardening)
    sock = bind_socket("127.0.0.1", 0)

    def ticker() -> None:
        step = 0
        while True:
            step += 1
            store.progress(running.id, "multiview", step % 50, 50, f"step {step % 50}/50", 10.0, log_event=False)
            time.sleep(0.5)

    threading.Thread(target=ticker, daemon=True).start()
    port_file.write_text(json.dumps({"port": sock.getsockname()[1], "ids": ids, "limit": limit}))
    uvicorn.Server(config).run(sockets=[sock])


# ---------------------------------------------------------------------------------------------
# load process
# ---------------------------------------------------------------------------------------------
async def _sse(port: int, job_id: str, stop: float, counts: dict) -> None:
    while time.monotonic() < stop:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"GET /v1/jobs/{job_id}/events HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode())
            await writer.drain()
            while time.monotonic() < stop:
                chunk = await asyncio.wait_for(reader.read(65536), timeout=max(0.1, stop - time.monotonic()))
                if not chunk:
                    break
                counts["sse_bytes"] += len(chunk)
            writer.close()
        except (OSError, asyncio.TimeoutError):
            await asyncio.sleep(0.1)


async def _poller(port: int, job_id: str, stop: float, counts: dict) -> None:
    req = f"GET /v1/jobs/{job_id} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode()
    while time.monotonic() < stop:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            while time.monotonic() < stop:
                writer.write(req)
                await writer.drain()
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
                await reader.readexactly(length)
                counts["polls"] += 1
                await asyncio.sleep(0.05)
            writer.close()
        except (OSError, asyncio.IncompleteReadError, StopIteration, ValueError):
            counts["poll_errors"] += 1
            await asyncio.sleep(0.1)


async def _idle(port: int, stop: float, counts: dict) -> None:
    while time.monotonic() < stop:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            counts["idle_open"] += 1
            data = await asyncio.wait_for(reader.read(1), timeout=max(0.1, stop - time.monotonic()))
            if not data:
                counts["idle_closed_by_server"] += 1
            writer.close()
        except asyncio.TimeoutError:
            pass
        except OSError:
            counts["idle_errors"] += 1
            await asyncio.sleep(0.2)


def run_load(port: int, ids: list[str], mode: str, seconds: float, sse: int, polls: int, idle: int) -> None:
    _raise_nofile(idle + 1024)

    async def main() -> dict:
        counts = {"sse_bytes": 0, "polls": 0, "poll_errors": 0, "idle_open": 0, "idle_closed_by_server": 0, "idle_errors": 0}
        stop = time.monotonic() + seconds
        if mode == "streams":
            tasks = [_sse(port, ids[i % len(ids)], stop, counts) for i in range(sse)]
            tasks += [_poller(port, ids[i % len(ids)], stop, counts) for i in range(polls)]
        else:
            tasks = [_idle(port, stop, counts) for _ in range(idle)]
        await asyncio.gather(*tasks)
        return counts

    print(json.dumps(asyncio.run(main())), flush=True)


# ---------------------------------------------------------------------------------------------
# sampler (main)
# ---------------------------------------------------------------------------------------------
def _connect(port: int) -> http.client.HTTPConnection:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.connect()
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no Nagle/delayed-ACK stalls in the timing
    return conn


def sample_health(port: int, seconds: float) -> list[float]:
    times = []
    conn = _connect(port)
    stop = time.monotonic() + seconds
    while time.monotonic() < stop:
        t0 = time.perf_counter()
        try:
            conn.request("GET", "/v1/health")
            resp = conn.getresponse()
            resp.read()
            ok = resp.status == 200
        except (OSError, http.client.HTTPException):
            ok = False
            conn.close()
            try:
                conn = _connect(port)
            except OSError:
                pass
        times.append(time.perf_counter() - t0 if ok else float("nan"))
        time.sleep(0.02)
    conn.close()
    return times


def _pct(values: list[float], q: float) -> float:
    ok = sorted(v for v in values if v == v)
    if not ok:
        return float("nan")
    return ok[min(len(ok) - 1, int(round(q * (len(ok) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=8.0, help="sampling time per scenario")
    ap.add_argument("--sse", type=int, default=150)
    ap.add_argument("--polls", type=int, default=20)
    ap.add_argument("--idle", type=int, default=1100)
    ap.add_argument("--_server", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--_load", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._server:
        run_server(Path(args._server[0]), Path(args._server[1]), jobs=args.sse + 1)
        return 0
    if args._load:
        cfg = json.loads(args._load)
        run_load(cfg["port"], cfg["ids"], cfg["mode"], cfg["seconds"], args.sse, args.polls, args.idle)
        return 0

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory(prefix="svc-bench-") as tmp:
        data, port_file = Path(tmp) / "data", Path(tmp) / "port.json"
        data.mkdir()
        server = subprocess.Popen([sys.executable, __file__, "--_server", str(data), str(port_file), "--sse", str(args.sse)], env=env)
        try:
            deadline = time.monotonic() + 60
            while not port_file.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            info = json.loads(port_file.read_text())
            port, ids = info["port"], info["ids"]
            rows = [("idle server", "-", sample_health(port, args.seconds))]
            for mode, label in (("streams", f"{args.sse} SSE streams + {args.polls} pollers"), ("idle", f"{args.idle} idle sockets")):
                load_cfg = json.dumps({"port": port, "ids": ids, "mode": mode, "seconds": args.seconds + 3.0})
                load = subprocess.Popen([sys.executable, __file__, "--_load", load_cfg, "--sse", str(args.sse), "--polls", str(args.polls),
                                         "--idle", str(args.idle)], env=env, stdout=subprocess.PIPE, text=True)
                time.sleep(2.0)  # let the clients connect
                times = sample_health(port, args.seconds)
                out, _ = load.communicate(timeout=120)
                rows.append((label, out.strip().splitlines()[-1] if out.strip() else "{}", times))
        finally:
            server.terminate()
            server.wait(30)
    load_avg = os.getloadavg() if hasattr(os, "getloadavg") else ("n/a",)
    print(f"\nservice load benchmark, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs, "
          f"load average {', '.join(f'{x:.2f}' for x in load_avg)}; connection limit {info['limit']}")
    print(f"| scenario | health requests | failed | p50 ms | p99 ms | max ms | client counters |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for label, counters, times in rows:
        failed = sum(1 for t in times if t != t)
        ok = [t for t in times if t == t]
        print(f"| {label} | {len(times)} | {failed} | {_pct(times, 0.5) * 1e3:.1f} | {_pct(times, 0.99) * 1e3:.1f} | "
              f"{(max(ok) if ok else float('nan')) * 1e3:.1f} | {counters} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
