"""`serve --ray`: the job store, API and SQLite state stay in the serving process; jobs run on Ray
actors, one per GPU, each with warm models and its own stage cache.

Ray does the distributed part: it places one actor per unit of the configured resource
(`num_gpus=1` on a real farm), starts them on whatever nodes have one, moves bytes between
processes and machines (job results, cached stages) through its object store, and reports a lost
actor as `RayActorError`. What stays here is the local service's own machinery: one `Worker`
(service/worker.py) per actor, on the same store, each claiming the next job its actor should take
and running it through a `FarmSlot`, the generator that forwards the job to the actor.

Which job a worker takes (`Farm._claim`), in queue order, skipping:
- a job whose subject stages (those that do not read the seed) are being built on another worker
  right now: the variants of one click wait for them, then run in parallel on every free worker;
- a job whose subject another *idle* worker holds in its cache: that worker takes it.
A job whose subject a *busy* worker holds is taken by a free one, and the cached stages move first
from the holder's cache to the taker's through Ray's object store (FarmWorker.export_entries /
import_entries; measured against a shared folder in benchmarks/farm_bench.py).

A worker lost mid-job (its process or node gone): the job goes back to the queue in its place
and runs again on another worker, reusing what that worker's cache holds; after
`max_attempts` starts it fails (worker_lost). The lost worker's slot starts a new actor, which
Ray places when a GPU is free. With every node gone no actor is ready, nothing is claimed, and
queued jobs stay queued until nodes return.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from make_your_3d.files import replace_dir
from make_your_3d.errors import Cancelled, FarmUnavailable, Make3DError, WorkerLost
from make_your_3d.pipeline.cache import digest
from make_your_3d.pipeline.request import GenerateRequest, GenerateResult
from make_your_3d.pipeline.stages import STAGE_SPECS
from make_your_3d.progress import CancelToken, Progress, ProgressFn
from make_your_3d.service.farm_actor import FarmWorker
from make_your_3d.service.farm_config import FarmConfig
from make_your_3d.service.inputs import InputStore
from make_your_3d.service.store import Job, JobStore
from make_your_3d.service.worker import MIN_FREE_BYTES, Requeue, Worker

log = logging.getLogger("make_your_3d.farm")

SEED_STAGES = frozenset(s.name for s in STAGE_SPECS if "seed" in s.request_fields)  # once one runs, the shared stages are built
ACTOR_CONCURRENCY = 8  # threads per actor: the job, and polls, cancels, exports, imports beside it
RPC_TIMEOUT_S = 30.0  # a poll or cancel call that takes longer than this is treated as unanswered
_LOST = (RayActorError,)


def affinity_keys(job: Job) -> tuple[str, str]:
    """(subject key, edit key) of a job: what its seed-independent stages depend on, from the
    request alone. Jobs with the same subject key share the subject, subject_views and identity
    stages; with the same edit key also edited_views and subject_prior. Only a routing hint: the
    stage cache's own keys decide what is reused."""
    spec = job.spec
    subject = digest([job.image_sha256, spec.subject, spec.preset, spec.overrides])
    return subject, digest([subject, spec.prompt, spec.negative_prompt])


def connect(config: FarmConfig) -> bool:
    """Join the Ray cluster (or start one for "auto"); True when this call started Ray."""
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "configure_logging": False, "log_to_driver": False}
    if config.address == "auto":
        if config.resource != "GPU":
            kwargs["resources"] = {config.resource: float(config.workers or 1)}
        if config.object_store_bytes:
            kwargs["object_store_memory"] = int(config.object_store_bytes)
        kwargs["address"] = "local"
    elif config.address.startswith("ray://"):
        kwargs = {"address": config.address}  # Ray Client takes no local-instance options
    else:
        kwargs["address"] = config.address
    try:
        ray.init(**kwargs)
    except Exception as exc:  # noqa: BLE001 - connection errors come in many types
        raise FarmUnavailable(
            f"Could not reach the Ray cluster at {config.address} ({type(exc).__name__}: {str(exc)[:200]}). "
            "Start it (`ray start --head` on the head node) or pass --ray auto."
        ) from None
    return True


class FarmSlot:
    """One actor (one GPU) seen from the serving process: the generator its Worker runs jobs with.
    Starts its actor (again after a loss) and says whether it is ready, without blocking."""

    def __init__(self, farm: "Farm", index: int):
        self.farm = farm
        self.index = index
        self.actor: Any = None
        self.name = ""
        self.info: dict[str, Any] = {}
        self._ready_ref: Any = None
        self._ready = False
        self._generation = 0

    # -- the actor ---------------------------------------------------------------------------------
    def _start(self) -> None:
        cfg = self.farm.config
        self._generation += 1
        self.name = f"mk3d-worker-{self.index}.{self._generation}"
        options: dict[str, Any] = {"num_cpus": cfg.worker_cpus, "max_concurrency": ACTOR_CONCURRENCY, "max_restarts": 0}
        if cfg.resource == "GPU":
            options["num_gpus"] = 1
        else:
            options["resources"] = {cfg.resource: 1}
        if cfg.env_vars:
            options["runtime_env"] = {"env_vars": dict(cfg.env_vars)}
        self.actor = self.farm.actor_class.options(name=self.name, namespace=self.farm.namespace, **options).remote(
            str(self.farm.models_dir), cfg.cache_dir, self.farm.device, self.farm.overrides, self.index)
        self._ready_ref = self.actor.info.remote()
        self._ready = False
        log.info("farm worker %s requested (%s)", self.name, cfg.resource)

    def ready(self) -> bool:
        """Whether the actor is up (its models load on its first job); starts one if there is none."""
        if self.actor is None:
            self._start()
        if self._ready:
            return True
        done, _ = ray.wait([self._ready_ref], timeout=0)
        if not done:
            return False  # still starting, or waiting for a GPU to become free in the cluster
        try:
            self.info = ray.get(done[0])
        except Exception as exc:  # noqa: BLE001 - the actor could not start (or died while starting)
            log.warning("farm worker %s did not start (%s); starting another", self.name, type(exc).__name__)
            self.drop()
            return False
        self._ready = True
        log.info("farm worker %s ready on %s (pid %s, %s, cache %s)", self.name, self.info.get("host"), self.info.get("pid"),
                 self.info.get("device"), self.info.get("cache_dir"))
        self.farm.wake()
        return True

    def drop(self, kill: bool = False) -> None:
        """Forget the actor (lost); the next `ready` starts another."""
        actor, self.actor, self._ready = self.actor, None, False
        if kill and actor is not None:
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001 - already gone
                pass

    def alive(self) -> bool:
        """Whether the ready actor still answers (an idle actor's death is seen only when asked);
        a dead one is dropped, so the next `ready` starts another."""
        if self.actor is None or not self._ready:
            return False
        if self._answers():
            return True
        log.warning("farm worker %s does not answer; starting another", self.name)
        self.drop()
        self.farm.slot_lost(self.index)
        return False

    def _answers(self) -> bool:
        try:
            ray.get(self.actor.info.remote(), timeout=RPC_TIMEOUT_S)
            return True
        except Exception:  # noqa: BLE001 - gone, or not answering
            return False

    def unload(self) -> None:
        if self.actor is not None and self._ready:
            self.actor.unload.remote()

    # -- one job (GeneratorLike.run) ---------------------------------------------------------------
    def run(self, request: GenerateRequest, out_dir: Path, progress: ProgressFn | None = None, cancel: CancelToken | None = None) -> GenerateResult:
        job_id = Path(out_dir).name
        try:
            return self._run(job_id, request, Path(out_dir), progress, cancel)
        except _LOST as exc:
            return self._lost(job_id, exc)
        finally:
            self.farm.job_ended(self.index)

    def _run(self, job_id: str, request: GenerateRequest, out_dir: Path, progress: ProgressFn | None, cancel: CancelToken | None) -> GenerateResult:
        actor = self.actor
        moved = self._move_cache(request)
        self.farm.store.record_event(job_id, "worker", {"worker": self.name, "host": self.info.get("host"), **moved})
        ref = actor.run.remote(job_id, request)
        cancel_sent = False
        subject_built = False
        while True:
            done, _ = ray.wait([ref], timeout=self.farm.config.poll_s)
            if cancel is not None and cancel.cancelled and not cancel_sent:
                actor.cancel.remote(job_id)
                cancel_sent = True
            for record in self._poll(actor, job_id):
                if not subject_built and record["stage"] in SEED_STAGES:
                    subject_built = True
                    self.farm.subject_built(self.index)
                if progress is not None:
                    progress(Progress(**record))
            if done:
                break
        outcome = ray.get(ref)
        if outcome["status"] == "cancelled":
            raise Cancelled()
        if outcome["status"] == "failed":
            err = outcome["error"]
            raise Make3DError(err["message"], code=err["code"])
        self.farm.subject_built(self.index)
        files = write_files_atomically(out_dir, outcome["files"])
        return GenerateResult(out_dir=out_dir, files=files, cached_stages=outcome["cached_stages"], timings=outcome.get("timings", {}))

    def _poll(self, actor: Any, job_id: str) -> list[dict]:
        try:
            return ray.get(actor.poll.remote(job_id), timeout=RPC_TIMEOUT_S)
        except GetTimeoutError:
            return []

    def _move_cache(self, request: GenerateRequest) -> dict[str, Any]:
        """Bring the subject's cached stages from the worker the farm chose as their source (if any)
        into this worker's cache, through Ray's object store (actor to actor: the bytes do not pass
        through the serving process). A failed move is only a slower job."""
        source = self.farm.take_source(self.index)
        if source is None:
            return {}
        t0 = time.monotonic()
        try:
            got = ray.get(self.actor.import_entries.remote(source.actor.export_entries.remote(request)), timeout=600)
        except _LOST:
            if not self._answers():
                raise
            log.info("the cache move from %s to %s failed: the source is gone", source.name, self.name)
            return {"moved_from": source.name, "moved": [], "move_error": "source lost"}
        except (RayTaskError, GetTimeoutError) as exc:
            log.info("the cache move from %s to %s failed (%s)", source.name, self.name, type(exc).__name__)
            return {"moved_from": source.name, "moved": [], "move_error": type(exc).__name__}
        return {"moved_from": source.name, "moved": got["stages"], "moved_bytes": got["bytes"], "move_s": round(time.monotonic() - t0, 4)}

    def _lost(self, job_id: str, exc: BaseException) -> GenerateResult:
        """The actor died under a job: requeue it, or fail it after `max_attempts` losses (an idle
        actor's death is found before a job is given to it: `alive` in the claim)."""
        name = self.name
        self.drop()
        self.farm.slot_lost(self.index)
        attempts = self.farm.count_attempt(job_id)
        log.warning("farm worker %s was lost during job %s (%s); attempt %d of %d", name, job_id, type(exc).__name__, attempts,
                    self.farm.config.max_attempts)
        if attempts >= self.farm.config.max_attempts:
            raise WorkerLost(f"The farm lost the worker running this job {attempts} times (last: {name}). Check the Ray cluster "
                             "(`ray status`) and the workers' logs, then re-run the job.") from None
        raise Requeue(f"its farm worker {name} was lost; it runs again on another worker", self.farm.wake)


def write_files_atomically(out_dir: Path, files: dict[str, bytes]) -> list[str]:
    """A job's result files, written to a temporary sibling of `out_dir` and published in one rename
    (as the local generator publishes its folder). Names must stay inside the folder."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        root = tmp.resolve()
        for name, data in files.items():
            target = (tmp / name).resolve()
            if not target.is_relative_to(root) or target == root:
                raise Make3DError(f"A farm worker returned a file name outside the job folder ({name[:80]!r}).", code="internal")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        replace_dir(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return sorted(files)


class Farm:
    """The Worker-like object the app and server use under `serve --ray`: one `Worker` per actor."""

    def __init__(self, store: JobStore, inputs: InputStore, jobs_dir: Path, config: FarmConfig, *, models_dir: Path, device: str = "auto",
                 overrides: dict | None = None, progress_interval_s: float = 0.5, min_free_bytes: int = MIN_FREE_BYTES):
        config.check()
        self.store = store
        self.inputs = inputs
        self.jobs_dir = Path(jobs_dir)
        self.config = config
        self.models_dir = Path(config.models_dir) if config.models_dir else Path(models_dir)
        self.device = device
        self.overrides = dict(overrides) if overrides else None
        self.namespace = f"make-your-3d-{os.getpid()}-{time.monotonic_ns()}"
        self.started_ray = connect(config)
        count = config.workers or self._cluster_units()
        self.actor_class = ray.remote(FarmWorker)
        self._lock = threading.RLock()
        self._running: dict[int, tuple[str, str, str]] = {}  # slot -> (job id, subject key, edit key)
        self._building: dict[str, int] = {}  # edit key -> slot building its shared stages right now
        self._holders: dict[str, set[int]] = {}  # subject or edit key -> slots whose caches hold its shared stages
        self._source: dict[int, FarmSlot] = {}  # slot -> the slot its next job's cached stages come from
        self._attempts: dict[str, int] = {}
        self.slots = [FarmSlot(self, i) for i in range(count)]
        self.workers = [
            Worker(store, inputs, jobs_dir, (lambda s=slot: s), progress_interval_s=progress_interval_s, min_free_bytes=min_free_bytes,
                   claim=(lambda i=slot.index: self._claim(i)), name=f"make3d-farm-{slot.index}")
            for slot in self.slots
        ]
        log.info("farm of %d worker(s) on Ray (%s, one %s each)", count, config.address, config.resource)

    def _cluster_units(self) -> int:
        units = int(ray.cluster_resources().get(self.config.resource, 0))
        if units < 1:
            raise FarmUnavailable(f"The Ray cluster has no {self.config.resource} resource, so no farm worker can start. Add GPU "
                                  "nodes, or give the number of workers in the farm settings.")
        return units

    # -- the Worker interface the app and server use -------------------------------------------------
    def start(self) -> None:
        for slot in self.slots:
            slot.ready()  # request every actor now: they start (and import torch) while the API comes up
        for w in self.workers:
            w.start()

    def wake(self) -> None:
        for w in self.workers:
            w.wake()

    @property
    def busy(self) -> bool:
        return any(w.busy for w in self.workers)

    @property
    def models_loaded(self) -> bool:
        return any(w.models_loaded for w in self.workers)

    @property
    def last_activity(self) -> float:
        return max(w.last_activity for w in self.workers)

    def cancel(self, job_id: str) -> bool:
        return any(w.cancel(job_id) for w in self.workers)

    def cancel_group(self, group: str) -> tuple[list[str], list[str]]:
        cancelled: list[str] = []
        stopping: list[str] = []
        for w in self.workers:
            c, s = w.cancel_group(group)
            cancelled += c
            stopping += s
        return cancelled, stopping

    def unload(self) -> bool:
        results = [w.unload() for w in self.workers]
        return all(results)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop every worker after its current step (running jobs become interrupted, the queue
        stays), end the actors, and leave Ray if this process started it."""
        for w in self.workers:
            w.request_stop()
        deadline = time.monotonic() + timeout
        for w in self.workers:
            w.stop(max(0.1, deadline - time.monotonic()))
        for slot in self.slots:
            slot.drop(kill=True)
        if self.started_ray:
            ray.shutdown()

    # -- which job a worker takes ----------------------------------------------------------------
    def _idle_holder(self, holders: set[int], me: int) -> int | None:
        for h in sorted(holders):
            if h != me and h not in self._running and self.slots[h].actor is not None and self.slots[h]._ready:
                return h
        return None

    def _claim(self, i: int) -> Job | None:
        """The next job worker `i` should run (claimed in the store), or None."""
        slot = self.slots[i]
        with self._lock:
            self._release(i)
        if not slot.ready():
            return None
        if not self.store.queued(1) or not slot.alive():
            return None
        with self._lock:
            for job in self.store.queued():
                subject, edit = affinity_keys(job)
                builder = self._building.get(edit)
                if builder is not None and builder != i:
                    continue  # its shared stages are being built on another worker: wait for them
                source = None
                for key in (edit, subject):
                    holders = self._holders.get(key, set())
                    if i in holders:
                        break
                    if holders:
                        idle = self._idle_holder(holders, i)
                        if idle is not None:
                            source = -1  # an idle worker holds it: leave the job to that one
                            self.workers[idle].wake()
                        else:
                            source = min(holders)
                        break
                if source == -1:
                    continue
                claimed = self.store.claim(job.id)
                if claimed is None:
                    continue
                self._running[i] = (claimed.id, subject, edit)
                if not self._holders.get(edit):
                    self._building[edit] = i  # the first to build them: the others of this edit wait
                if source is not None:
                    self._source[i] = self.slots[source]
                return claimed
        return None

    def _release(self, i: int) -> None:
        """Worker `i` is between jobs: forget its last job's bookkeeping (under the lock)."""
        running = self._running.pop(i, None)
        self._source.pop(i, None)
        if running is not None and self._building.get(running[2]) == i:
            del self._building[running[2]]
            self.wake()  # jobs held for those stages may run elsewhere now

    def take_source(self, i: int) -> FarmSlot | None:
        with self._lock:
            source = self._source.pop(i, None)
        return source if source is not None and source.actor is not None else None

    def subject_built(self, i: int) -> None:
        """Worker `i`'s job has its shared stages in that worker's cache: record it, let the held jobs go."""
        with self._lock:
            running = self._running.get(i)
            if running is None:
                return
            _job, subject, edit = running
            self._holders.setdefault(subject, set()).add(i)
            self._holders.setdefault(edit, set()).add(i)
            held = self._building.get(edit) == i
            if held:
                del self._building[edit]
        if held:
            self.wake()

    def job_ended(self, i: int) -> None:
        with self._lock:
            self._source.pop(i, None)

    def slot_lost(self, i: int) -> None:
        """Worker `i`'s actor is gone, and its cache with it (a new actor may be on another node)."""
        with self._lock:
            for holders in self._holders.values():
                holders.discard(i)
            self._release(i)
        self.wake()

    def count_attempt(self, job_id: str) -> int:
        with self._lock:
            self._attempts[job_id] = self._attempts.get(job_id, 0) + 1
            return self._attempts[job_id]
