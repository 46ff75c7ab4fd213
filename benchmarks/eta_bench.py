"""How wrong is the time left the add-on shows? (issue 27, item 2)

    python benchmarks/eta_bench.py [--jobs 10] [--sets 3] [--variants 3] [--json PATH]

Runs a real backend (`make-your-3d serve`) on the tiny model set, submits `--jobs` single jobs (new
prompts and seeds on one subject, as an artist re-runs) and `--sets` sets of `--variants` variants,
and records every job's progress records as they arrive (polled every 0.1 s). Then it replays the
records through two estimators, each learning stage times from the finished jobs' job.json in order,
as the add-on does:

- before: the add-on's progress.py at commit cad2c21 (first-time GPU estimates, a number always);
- after: today's progress.py (measured timings only, "estimating" until then; the clock fill between
  records; a set's total).

At 25, 50 and 75% of each job's running time it compares the shown time left with the true one and
prints the median absolute error (seconds) and how often the estimator said "estimating" instead.
The "before" estimator runs against today's backend (which has a `subject` stage it does not know:
it shows "Preparing" there, as it would have for the time before the first stage).
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BEFORE_COMMIT = "cad2c21"
POINTS = (0.25, 0.5, 0.75)


def load_progress(source: str, name: str):
    """A progress.py (standard library only) loaded from its source text as module `name`."""
    folder = Path(tempfile.mkdtemp(prefix="eta_bench_"))
    path = folder / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


class Backend:
    def __init__(self, models: Path, work: Path):
        state = work / "state.json"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
               "MAKE_YOUR_3D_CACHE": str(work / "cache")}
        self.proc = subprocess.Popen([sys.executable, "-m", "make_your_3d", "serve", "--models", str(models), "--data", str(work / "data"),
                                      "--port", "0", "--state-file", str(state), "--device", "cpu"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + 120
        while not state.exists():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit("the backend did not start")
            time.sleep(0.1)
        info = json.loads(state.read_text())
        self.url, self.token = info["url"], info["token"]

    def call(self, method: str, path: str, body: dict | None = None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            raw = r.read()
        return json.loads(raw)  # every route used here answers JSON (job.json included)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def run_jobs(backend: Backend, image: bytes, n_jobs: int, n_sets: int, variants: int) -> list[dict]:
    """Submit the jobs one request at a time and record each one's records with their arrival time."""
    requests = [dict(prompt=f"change number {i}", seed=i, variants=1) for i in range(n_jobs)]
    requests += [dict(prompt=f"variant set {k}", seed=100 + 10 * k, variants=variants) for k in range(n_sets)]
    out = []
    for body in requests:
        created = backend.call("POST", "/v1/jobs", {"image_png_b64": base64.b64encode(image).decode(), "preset": "fast", **body})
        timeline: dict[str, list] = {job_id: [] for job_id in created["ids"]}
        t0 = time.monotonic()
        while True:
            done = True
            for job_id, records in timeline.items():
                rec = backend.call("GET", f"/v1/jobs/{job_id}")
                if not records or records[-1][1] != rec:
                    records.append((time.monotonic() - t0, rec))
                done &= rec["status"] in ("done", "failed", "cancelled")
            if done:
                break
            time.sleep(0.1)
        jobs = [{"id": i, "records": recs, "job": backend.call("GET", f"/v1/jobs/{i}/files/job.json")} for i, recs in timeline.items()]
        out.append({"variants": body["variants"], "jobs": jobs})
    return out


def _running_span(records) -> tuple[float, float] | None:
    start = next((t for t, r in records if r["status"] == "running"), None)
    end = next((t for t, r in records if r["status"] in ("done", "failed", "cancelled")), None)
    return (start, end) if start is not None and end is not None and end > start else None


def estimate(module, times, record: dict, since: float, new: bool) -> float | None:
    """The time left `module` shows for one record, `since` seconds after it arrived."""
    preset = record["request"]["preset"]
    eta = record.get("eta_s")
    if new:
        expect = times.expectation(preset)
        return module.job_progress(record["stage"] or "", record["step"], record["total"], eta, expect.seconds, expect.plan,
                                   measured=expect.measured, since_s=since).eta_s
    return module.job_progress(record["stage"] or "", record["step"], record["total"], eta, times.seconds(preset)).eta_s


def replay(module, runs: list[dict], work: Path, new: bool) -> dict:
    """Errors of one estimator at 25/50/75% of every job, learning stage times job by job."""
    times = module.StageTimes(work / f"stage_times_{'after' if new else 'before'}.json")
    errors, estimating, first = [], 0, []
    set_errors, set_estimating = [], 0
    for n, run in enumerate(runs):
        spans = [_running_span(j["records"]) for j in run["jobs"]]
        for job, span in zip(run["jobs"], spans):
            if span is None:
                continue
            start, end = span
            for frac in POINTS:
                t = start + frac * (end - start)
                t_rec, rec = [(tr, r) for tr, r in job["records"] if tr <= t][-1]
                left = estimate(module, times, rec, t - t_rec, new) if rec["status"] == "running" else None
                if left is None:
                    estimating += 1
                else:
                    errors.append(abs(left - (end - t)))
                if n == 0:  # the first job in a fresh user folder: nothing learned yet
                    first.append(None if left is None else round(abs(left - (end - t)), 2))
        if new and run["variants"] > 1 and all(spans):
            set_start, last = min(s[0] for s in spans), max(s[1] for s in spans)
            for frac in POINTS:
                t = set_start + frac * (last - set_start)
                states = []
                for job in run["jobs"]:
                    t_rec, rec = [(tr, r) for tr, r in job["records"] if tr <= t][-1]
                    left = estimate(module, times, rec, t - t_rec, new) if rec["status"] == "running" else None
                    states.append((rec["status"], left))
                total = module.set_seconds_left(states, times.expectation(run["jobs"][0]["records"][-1][1]["request"]["preset"]))
                if total is None:
                    set_estimating += 1
                else:
                    set_errors.append(abs(total - (last - t)))
        for job in run["jobs"]:  # the add-on learns when a job's files arrive
            times.learn(job["records"][-1][1]["request"]["preset"], job["job"])
    out = {"median_abs_error_s": round(statistics.median(errors), 2) if errors else None,
           "p90_abs_error_s": round(statistics.quantiles(errors, n=10)[-1], 2) if len(errors) > 1 else None,
           "max_abs_error_s": round(max(errors), 2) if errors else None,
           "first_job_errors_s": first, "estimates": len(errors), "estimating": estimating}
    if new:
        out["set_median_abs_error_s"] = round(statistics.median(set_errors), 2) if set_errors else None
        out["set_estimates"], out["set_estimating"] = len(set_errors), set_estimating
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=10)
    parser.add_argument("--sets", type=int, default=3)
    parser.add_argument("--variants", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "backend"))
    from make_your_3d.models.tiny import write_tiny_set

    work = Path(tempfile.mkdtemp(prefix="eta_bench_"))
    models = write_tiny_set(work / "models", seed=0)
    backend = Backend(models, work)
    try:
        runs = run_jobs(backend, (REPO / "examples" / "toy_bear.png").read_bytes(), args.jobs, args.sets, args.variants)
    finally:
        backend.stop()
    before = load_progress(subprocess.run(["git", "-C", str(REPO), "show", f"{BEFORE_COMMIT}:blender_addon/progress.py"],
                                          capture_output=True, text=True, check=True).stdout, "progress_before")
    after = load_progress((REPO / "blender_addon" / "progress.py").read_text(), "progress_after")
    result = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d"), "load_average": os.getloadavg(),
        "jobs": sum(len(r["jobs"]) for r in runs), "seconds_per_job": [round(_running_span(j["records"])[1] - _running_span(j["records"])[0], 2)
                                                                      for r in runs for j in r["jobs"] if _running_span(j["records"])],
        "before": replay(before, runs, work, new=False), "after": replay(after, runs, work, new=True),
    }
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
