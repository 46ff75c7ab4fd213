"""The farm (`serve --ray`, service/farm.py) on a local Ray cluster started by this module: two
worker actors on the CPU, each holding one unit of a declared GPU-like resource, the tiny model set.

The job store, API and SQLite state are in this process, as in `serve`; jobs go through the API
(Starlette's TestClient) and run on the actors. One Ray instance serves the whole file.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
import ray
from starlette.testclient import TestClient

from make_your_3d.pipeline.request import GenerateRequest
from make_your_3d.service.app import create_app
from make_your_3d.service.farm import Farm
from make_your_3d.service.farm_config import FarmConfig
from make_your_3d.service.inputs import InputStore
from make_your_3d.service.store import JobStore
from test_service import job_body, subject_image

TOKEN = "f" * 43
BASE = "http://127.0.0.1:8765"
RESOURCE = "mk3d_gpu"
SHARED = {"subject", "subject_views", "identity", "edited_views", "subject_prior"}


@pytest.fixture(scope="module")
def cluster():
    """A local Ray instance: 2 CPUs, 2 units of the GPU-like resource, a small object store."""
    ray.init(num_cpus=2, resources={RESOURCE: 2}, include_dashboard=False, object_store_memory=96 * 2**20,
             configure_logging=False, log_to_driver=False)
    yield
    ray.shutdown()


class FarmApi:
    """The serving side of `serve --ray`: store, inputs, the farm and the API around them."""

    def __init__(self, root: Path, models: Path):
        self.root = root
        self.models = models
        self.store = JobStore(root / "jobs.sqlite3")
        config = FarmConfig(address="auto", workers=2, resource=RESOURCE, worker_cpus=0, poll_s=0.05, cache_dir=str(root / "farm_cache"))
        self.farm = Farm(self.store, InputStore(root / "inputs"), root / "jobs", config, models_dir=models, device="cpu",
                         progress_interval_s=0.0)
        self.app = create_app(self.store, self.farm, TOKEN, models_dir=models, device="cpu")
        self.farm.start()

    def client(self) -> TestClient:
        return TestClient(self.app, base_url=BASE, headers={"Authorization": f"Bearer {TOKEN}"})

    def wait(self, c: TestClient, job_id: str, statuses: set[str], timeout: float = 300.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rec = c.get(f"/v1/jobs/{job_id}").json()
            if rec["status"] in statuses:
                return rec
            time.sleep(0.05)
        raise AssertionError(f"job {job_id} did not reach {statuses} in {timeout} s: {rec}")

    def workers_of(self, job_id: str) -> list[dict]:
        return [e for e in self.store.events(job_id) if e["kind"] == "worker"]


@pytest.fixture(scope="module")
def farm(cluster, tiny_models, tmp_path_factory):
    api = FarmApi(tmp_path_factory.mktemp("farm"), tiny_models)
    yield api
    api.farm.stop(timeout=30)
    api.store.close()


@pytest.fixture(scope="module")
def local(tiny_models, tmp_path_factory):
    """Local mode's generator (what `serve` without --ray runs), with its own stage cache."""
    from make_your_3d.pipeline.generate import Generator

    return Generator(tiny_models, tmp_path_factory.mktemp("local_cache"), device="cpu")


def _volatile_free(job_json: bytes) -> dict:
    """job.json without what differs between two runs of the same job: times, and which stages the
    run found cached (that depends on what ran before, not on the result)."""
    record = json.loads(job_json)
    for key in ("created_at", "timings", "cached_stages"):
        record.pop(key)
    record["stages"] = [(s["name"], s["key"]) for s in record["stages"]]
    return record


def _digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "job.json"}


def _same_as_local(api: FarmApi, local, job_id: str, tmp: Path) -> None:
    """The farm's result files for `job_id` are byte for byte local mode's for the same request."""
    job = api.store.get(job_id)
    spec = job.spec
    request = GenerateRequest(image=api.farm.inputs.get(job.image_sha256), prompt=spec.prompt, subject=spec.subject,
                              negative_prompt=spec.negative_prompt, seed=spec.seed, preset=spec.preset, faces=spec.faces,
                              texture_size=spec.texture_size, overrides=spec.overrides)
    ref = tmp / job_id  # named by the job id, as the service names job folders (the GLB records it)
    local.run(request, ref)
    got = api.root / "jobs" / job_id
    assert _digests(got) == _digests(ref), job_id
    assert sorted(job.files) == sorted([*_digests(ref), "job.json"])
    assert _volatile_free((got / "job.json").read_bytes()) == _volatile_free((ref / "job.json").read_bytes())


def _overlap(a: dict, b: dict) -> bool:
    return a["started_at"] < b["finished_at"] and b["started_at"] < a["finished_at"]


def test_eight_jobs_over_two_workers_match_local_mode(farm, local, tmp_path):
    """Two clicks of four variants each. Fails if a job is lost or fails, if one worker ran them all
    (or nothing ran in parallel), if a variant recomputed the shared subject stages, if progress
    or SSE do not reach the store, or if any result file differs from local mode's (a wrong seed,
    preset or model on a worker, a file dropped or mixed up between jobs)."""
    with farm.client() as c:
        ids = []
        for prompt in ("wearing a red scarf", "made of gold"):
            r = c.post("/v1/jobs", json=job_body(prompt=prompt, subject="a toy", seed=21, variants=4))
            assert r.status_code == 201, r.text
            ids += r.json()["ids"]
        with c.stream("GET", f"/v1/jobs/{ids[0]}/events") as stream:
            events = [json.loads(line[6:]) for line in stream.iter_lines() if line.startswith("data: ")]
        recs = [farm.wait(c, i, {"done", "failed", "cancelled", "interrupted"}) for i in ids]
    assert [r["status"] for r in recs] == ["done"] * 8, [r["error"] for r in recs]
    assert events[-1]["status"] == "done"
    stages = [e["stage"] for e in events if e["status"] == "running" and e["stage"]]
    assert {"subject_views", "multiview", "reconstruct"} <= set(stages), stages

    workers = {i: [e["worker"] for e in farm.workers_of(i)] for i in ids}
    assert all(len(w) == 1 for w in workers.values()), workers
    assert len({w[0] for w in workers.values()}) == 2, f"both workers ran jobs: {workers}"
    for group in (recs[:4], recs[4:]):
        assert not SHARED <= set(group[0]["cached_stages"]), "the first variant of a click builds its shared stages"
        for r in group[1:]:
            assert SHARED <= set(r["cached_stages"]), r["cached_stages"]  # built once per click, moved if needed
    rows = {i: farm.store.get(i) for i in ids}
    times = {i: {"started_at": rows[i].started_at, "finished_at": rows[i].finished_at} for i in ids}
    parallel = [(a, b) for a in ids for b in ids if a < b and workers[a] != workers[b] and _overlap(times[a], times[b])]
    assert parallel, "variants on different workers ran at the same time"

    for job_id in ids:
        _same_as_local(farm, local, job_id, tmp_path)


def test_rerun_of_a_subject_hits_the_cache(farm):
    """A new subject runs on one worker; then two re-runs with new prompts at once: the idle holder
    takes one, the other worker takes the other with the subject's stages moved to it. Fails when
    routing ignores the cache (the re-run on the other worker recomputes the subject stages) or
    when the move does not reach the other worker's cache."""
    image = subject_image(colour=(40, 160, 90))
    with farm.client() as c:
        first = c.post("/v1/jobs", json=job_body(image_png_b64=__import__("base64").b64encode(image).decode(), prompt="wearing a hat",
                                                  subject="a frog", seed=5)).json()["ids"][0]
        assert farm.wait(c, first, {"done", "failed"})["status"] == "done"
        holder = farm.workers_of(first)[0]["worker"]
        reruns = [c.post(f"/v1/jobs/{first}/rerun", json={"prompt": p}).json()["ids"][0] for p in ("made of wood", "made of glass")]
        recs = [farm.wait(c, i, {"done", "failed"}) for i in reruns]
        same = c.post(f"/v1/jobs/{first}/rerun", json={}).json()["ids"][0]
        again = farm.wait(c, same, {"done", "failed"})
    for rec in recs:
        assert rec["status"] == "done", rec["error"]
        assert {"subject", "subject_views", "identity"} <= set(rec["cached_stages"]), rec["cached_stages"]
        assert not {"edited_views", "subject_prior"} & set(rec["cached_stages"]), "a new prompt edits again"
        (ran,) = farm.workers_of(rec["id"])
        assert ran["worker"] == holder or {"subject", "subject_views", "identity"} <= set(ran.get("moved", [])), ran
    assert again["status"] == "done" and set(again["cached_stages"]) == {
        "subject", "subject_views", "identity", "edited_views", "subject_prior", "front_view", "multiview", "reconstruct"}


def test_cancel_a_remote_job(farm):
    """Cancel through the API reaches the actor's CancelToken: the job stops part-way, is recorded
    cancelled with no files, and its worker runs the next job. Fails when the cancel is only
    recorded in the store and not forwarded (the actor runs the job to done)."""
    with farm.client() as c:
        for seed in (600, 601, 602):  # a new seed renders; retry only if a tiny job outran the poll
            job_id = c.post("/v1/jobs", json=job_body(prompt="cancel me", subject="a toy", seed=seed)).json()["ids"][0]
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                rec = c.get(f"/v1/jobs/{job_id}").json()
                if rec["status"] not in ("queued", "running") or (rec["status"] == "running" and rec["stage"] in ("multiview", "reconstruct")):
                    break
                time.sleep(0.02)
            rec = c.post(f"/v1/jobs/{job_id}/cancel").json()
            rec = farm.wait(c, job_id, {"cancelled", "done", "failed"}, timeout=120)
            if rec["status"] != "done":
                break
        assert rec["status"] == "cancelled", rec
        assert rec["error"]["code"] == "cancelled" and rec["files"] == []
        assert rec["stage"] in ("multiview", "reconstruct")
        assert not (farm.root / "jobs" / job_id).exists()
        (ran,) = farm.workers_of(job_id)
        after = c.post("/v1/jobs", json=job_body(prompt="cancel me", subject="a toy", seed=seed)).json()["ids"][0]
        assert farm.wait(c, after, {"done", "failed"})["status"] == "done"


def test_worker_killed_mid_job_completes_on_the_other(farm, local, tmp_path):
    """ray.kill on the actor running a job: the job goes back to the queue and finishes on the other
    worker, with local mode's result. Fails when a lost actor fails the job (no retry), leaves it
    running for ever, or retries it on the dead actor."""
    image = subject_image(colour=(90, 90, 200))
    with farm.client() as c:
        job_id = c.post("/v1/jobs", json=job_body(image_png_b64=__import__("base64").b64encode(image).decode(), prompt="wearing boots",
                                                  subject="a robot", seed=8)).json()["ids"][0]
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            rec = c.get(f"/v1/jobs/{job_id}").json()
            if rec["status"] == "running" and rec["stage"] in ("subject_views", "identity"):
                break
            time.sleep(0.02)
        assert rec["status"] == "running", rec
        (ran,) = farm.workers_of(job_id)
        victim = next(s for s in farm.farm.slots if s.name == ran["worker"])
        ray.kill(victim.actor)
        rec = farm.wait(c, job_id, {"done", "failed", "cancelled", "interrupted"})
    assert rec["status"] == "done", rec
    runs = farm.workers_of(job_id)
    assert len(runs) == 2 and runs[1]["worker"] != ran["worker"], runs
    assert any(e["kind"] == "status" and e.get("requeued") for e in farm.store.events(job_id))
    _same_as_local(farm, local, job_id, tmp_path)
    # the killed slot comes back with a new actor
    deadline = time.monotonic() + 120
    while not victim.ready() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert victim.ready() and victim.name != ran["worker"]


@ray.remote(num_cpus=0, resources={RESOURCE: 1})
class _Squatter:
    """Holds one unit of the GPU-like resource: while two of these live, no farm worker can start
    (as when every GPU node of a cluster is gone)."""

    def ping(self) -> int:
        return 1


def test_whole_farm_lost_jobs_stay_queued_and_resume(farm):
    """Every worker gone and no GPU left to start new ones: a new job stays queued (not failed, not
    lost); once GPUs return, new workers start and run it. Fails when a farm with no live worker
    fails or drops the job, or never replaces its dead actors (the job stays queued for ever)."""
    deadline = time.monotonic() + 120
    while not all(s.ready() for s in farm.farm.slots) and time.monotonic() < deadline:
        time.sleep(0.2)
    old = {s.name for s in farm.farm.slots}
    squatters = [_Squatter.remote() for _ in range(2)]  # pending: the workers hold both units
    for slot in farm.farm.slots:
        ray.kill(slot.actor)
    ray.get([q.ping.remote() for q in squatters], timeout=120)  # the freed units went to them
    with farm.client() as c:
        job_id = c.post("/v1/jobs", json=job_body(prompt="after the outage", subject="a toy", seed=77)).json()["ids"][0]
        time.sleep(4.0)
        rec = c.get(f"/v1/jobs/{job_id}").json()
        assert rec["status"] == "queued" and rec["error"] is None, rec
        assert farm.workers_of(job_id) == []
        for q in squatters:
            ray.kill(q)
        rec = farm.wait(c, job_id, {"done", "failed", "cancelled", "interrupted"})
    assert rec["status"] == "done", rec
    (ran,) = farm.workers_of(job_id)
    assert ran["worker"] not in old


def test_serve_ray_auto_runs_a_job_end_to_end(tiny_models, tmp_path):
    """The command line: `make-your-3d serve --ray auto` starts Ray inside the backend, runs a job on
    a worker actor over HTTP, and on shutdown stops the worker and Ray and exits 0. Fails when
    --ray is ignored (the job's events name no farm worker) or the farm does not stop cleanly."""
    from test_service import service_config, start_server

    config = {**service_config(), "farm": {"workers": 1, "resource": "mk3d_auto", "worker_cpus": 0}}
    server = start_server(tiny_models, tmp_path / "data", "--ray", "auto", config=config)
    try:
        with server.client() as c:
            job_id = c.post("/v1/jobs", json=job_body(prompt="served by the farm", seed=3)).json()["ids"][0]
            deadline = time.monotonic() + 300
            while (rec := c.get(f"/v1/jobs/{job_id}").json())["status"] not in ("done", "failed") and time.monotonic() < deadline:
                time.sleep(0.1)
            assert rec["status"] == "done", rec
            assert c.get(f"/v1/jobs/{job_id}/files/subject.glb").content[:4] == b"glTF"
    finally:
        code = server.stop(timeout=60)
    assert code == 0, server.output()
    log = (server.data_dir / "logs" / "serve.log").read_text()
    assert "farm of 1 worker(s) on Ray (auto, one mk3d_auto each)" in log and "farm worker mk3d-worker-0.1 ready" in log
    store = JobStore(server.data_dir / "jobs.sqlite3")
    events = store.events(job_id)
    store.close()
    assert [e["worker"] for e in events if e["kind"] == "worker"] == ["mk3d-worker-0.1"]


def test_farm_settings_are_checked_before_ray_starts(tmp_path, monkeypatch):
    """`serve --ray` reads its settings from --ray and the config file's "farm" object, refusing
    unknown keys and bad values with a sentence; without Ray installed it says how to get it.
    Fails when a typo'd setting is silently ignored or a missing Ray surfaces as an ImportError."""
    import importlib.util
    import types

    from make_your_3d.errors import BadRequest, FarmUnavailable
    from make_your_3d.service import server

    cfg = tmp_path / "serve.json"
    cfg.write_text(json.dumps({"farm": {"workers": 3, "resource": RESOURCE, "poll_s": 0.2}}))
    args = types.SimpleNamespace(data=str(tmp_path / "data"), state_file=None, config=str(cfg), port=0, idle_timeout=None, models=str(tmp_path),
                                 host="127.0.0.1", allow_remote=False, parent_pid=None, preset="default", device="cpu", ray="10.0.0.5:6379")
    opts = server.options_from_args(args)
    assert opts.farm == FarmConfig(address="10.0.0.5:6379", workers=3, resource=RESOURCE, poll_s=0.2)
    assert server.options_from_args(types.SimpleNamespace(**{**vars(args), "ray": None})).farm is None
    for bad, word in (({"wokers": 2}, "unknown keys"), ({"workers": 0}, "workers"), ({"poll_s": -1}, "poll_s"), ({"max_attempts": 0}, "max_attempts")):
        cfg.write_text(json.dumps({"farm": bad}))
        with pytest.raises(BadRequest, match=word):
            server.options_from_args(args)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real_find_spec(name, *a))
    store = JobStore(tmp_path / "jobs.sqlite3")
    try:
        with pytest.raises(FarmUnavailable, match=r"make-your-3d\[farm\]"):
            server.make_worker(opts, store)
    finally:
        store.close()


def test_moved_cache_entries_are_checked_on_arrival(tmp_path):
    """A cache entry moved between workers is published only when every file matches the entry's
    own checksums and stays inside the entry. Fails when a flipped byte or a path like ../x in a
    transfer is written into the receiving worker's cache."""
    from make_your_3d.pipeline.cache import StageCache

    source, target = StageCache(tmp_path / "a"), StageCache(tmp_path / "b")
    source.build("identity", "k1", lambda d: (d / "ip_adapter.safetensors").write_bytes(b"weights" * 100))
    files = source.export("identity", "k1")
    assert files is not None and ".complete" in files and source.export("identity", "nope") is None
    damaged = {**files, "ip_adapter.safetensors": b"Weights" + files["ip_adapter.safetensors"][7:]}
    assert not target.import_entry("identity", "k1", damaged) and target.get("identity", "k1") is None
    assert not target.import_entry("identity", "k1", {**files, "../escape.bin": b"x"}) and not (tmp_path / "b" / "identity" / "escape.bin").exists()
    assert target.import_entry("identity", "k1", files)
    got = target.get("identity", "k1")
    assert got is not None and (got / "ip_adapter.safetensors").read_bytes() == b"weights" * 100
    assert not [p for p in (tmp_path / "b" / "identity").iterdir() if p.name.startswith(".")], "no temporary folder left"
