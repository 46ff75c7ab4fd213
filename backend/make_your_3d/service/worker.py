"""The one worker thread that runs queued jobs in order through the Generator.

It keeps the Generator (and so the loaded models) between jobs, gives each job its own
CancelToken, writes progress to the store (throttled), and turns every failure into an error code
plus a sentence for the client, with the traceback going only to the log.

A farm (service/farm.py) runs one Worker per Ray actor on the same store: each with its own
`claim` (which queued job this worker takes) and a generator that runs the job on its actor; a
generator that lost its actor raises `Requeue`, and the job goes back to the queue.
"""

from __future__ import annotations

import errno
import logging
import shutil
import sqlite3
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

from make_your_3d.errors import Cancelled, DiskFull, Make3DError, OutOfMemory
from make_your_3d.pipeline.request import GenerateRequest
from make_your_3d.progress import CancelToken, Progress, ProgressFn
from make_your_3d.service.inputs import InputStore
from make_your_3d.service.store import Job, JobStore

log = logging.getLogger("make_your_3d.service")

# A job writes stage-cache entries and its outputs: refuse to start one with less free space than
# this on the data folder's disk (it would fail part-way, or leave the database unable to commit).
MIN_FREE_BYTES = 512 * 2**20

OOM_MESSAGE = (
    "The GPU ran out of memory during this job. Pick the lowvram preset (or close other programs using the GPU) "
    "and run the job again."
)


class GeneratorLike(Protocol):
    def run(self, request: GenerateRequest, out_dir: Path, progress: ProgressFn | None = None, cancel: CancelToken | None = None) -> Any: ...

    def unload(self) -> None: ...


GeneratorFactory = Callable[[], GeneratorLike]


class Requeue(Exception):
    """Raised by a generator whose job did not fail but must run again elsewhere (its farm worker was
    lost): the job goes back to the queue, in its place, instead of failing. `requeued` is called
    after the store has it queued again (a farm wakes its other workers)."""

    def __init__(self, reason: str, requeued: Callable[[], None] | None = None):
        super().__init__(reason)
        self.reason = reason
        self.requeued = requeued


@dataclass
class _Current:
    job_id: str
    token: CancelToken
    group: str = ""
    last: Progress | None = None
    cancel_requested: Progress | None = None
    steps_after_cancel: int = 0
    cancel_requested_flag: bool = False


def classify_exception(exc: BaseException) -> Make3DError | None:
    """Map out-of-memory and disk-full failures (anywhere in the cause chain) to their user errors."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, (OutOfMemory, DiskFull)):
            return cur
        text = str(cur).lower()
        if isinstance(cur, MemoryError) or type(cur).__name__ == "OutOfMemoryError" or (
            isinstance(cur, RuntimeError) and ("out of memory" in text or "cuda error: out of memory" in text)
        ):
            return OutOfMemory(OOM_MESSAGE)
        if (isinstance(cur, OSError) and cur.errno in (errno.ENOSPC, errno.EDQUOT)) or (
            isinstance(cur, sqlite3.Error) and "disk is full" in text
        ):
            return DiskFull("The disk holding the backend's data folder is full. Free some space and run the job again.")
        cur = cur.__cause__ or cur.__context__
    return None


def _free_accelerator_memory() -> None:
    torch = sys.modules.get("torch")
    if torch is None:
        return
    try:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # best effort only
        log.debug("empty_cache failed", exc_info=True)


class Worker:
    """Runs jobs one at a time. Thread-safe `cancel`, `unload`, `wake` and `stop`."""

    def __init__(
        self,
        store: JobStore,
        inputs: InputStore,
        jobs_dir: Path,
        factory: GeneratorFactory,
        *,
        progress_interval_s: float = 0.5,
        min_free_bytes: int = MIN_FREE_BYTES,
        claim: Callable[[], Job | None] | None = None,
        name: str = "make3d-worker",
    ):
        self.store = store
        self.min_free_bytes = min_free_bytes
        self.inputs = inputs
        self.jobs_dir = Path(jobs_dir)
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self._factory = factory
        self._progress_interval = progress_interval_s
        self._generator: GeneratorLike | None = None
        self._gen_lock = threading.Lock()  # held while a job runs or models (un)load
        self._lock = threading.Lock()  # guards _current and _stopping
        self._current: _Current | None = None
        self._stopping = False
        self._unload_pending = False
        self._wake = threading.Event()
        self._claim = claim or store.claim_next  # which queued job this worker takes next (a farm's policy)
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.last_activity = time.monotonic()

    # -- control ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    @property
    def busy(self) -> bool:
        with self._lock:
            return self._current is not None

    @property
    def models_loaded(self) -> bool:
        return self._generator is not None

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued job at once, or signal the running one (it stops within one step)."""
        with self._lock:
            if self.store.cancel_queued(job_id):
                return True
            cur = self._current
            if cur is not None and cur.job_id == job_id and not cur.token.cancelled:
                self._signal(cur)
                return True
        return False

    def cancel_group(self, group: str) -> tuple[list[str], list[str]]:
        """Cancel every job of `group`: the queued ones at once (one transaction), and signal the
        running one if it belongs to the group. Returns (cancelled ids, stopping ids). Under the
        worker lock, so the worker cannot claim a job of the group in between."""
        with self._lock:
            cancelled = self.store.cancel_queued_group(group)
            cur = self._current
            stopping = []
            if cur is not None and cur.group == group and not cur.token.cancelled:
                self._signal(cur)
                stopping.append(cur.job_id)
        if cancelled:
            log.info("cancelled %d queued job(s) of group %s", len(cancelled), group)
        return cancelled, stopping

    def _signal(self, cur: _Current) -> None:
        """Ask the running job to stop at its next check (call under self._lock)."""
        cur.cancel_requested = cur.last
        cur.cancel_requested_flag = True
        cur.token.cancel()
        self.store.note(cur.job_id, "cancel requested; stopping at the next step")
        log.info("cancel requested for running job %s", cur.job_id)

    def unload(self) -> bool:
        """Free the models now if idle (True), else after the running job (False)."""
        if self._gen_lock.acquire(blocking=False):
            try:
                self._unload_locked()
            finally:
                self._gen_lock.release()
            return True
        self._unload_pending = True
        return False

    def request_stop(self) -> None:
        """Ask the loop to stop after the current step (`stop` also waits for it)."""
        with self._lock:
            self._stopping = True
            if self._current is not None:
                self._current.token.cancel()
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the current step: the running job becomes `interrupted`, the queue stays."""
        self.request_stop()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("worker did not stop within %.0f s; the running job will be marked interrupted at next start", timeout)

    # -- internals -------------------------------------------------------------------------------
    def _unload_locked(self) -> None:
        self._unload_pending = False
        gen, self._generator = self._generator, None
        if gen is not None:
            try:
                gen.unload()
            finally:
                _free_accelerator_memory()
            log.info("models unloaded")

    def _free_bytes(self) -> int | None:
        try:
            return shutil.disk_usage(self.jobs_dir).free
        except OSError:
            return None

    def _refuse_for_space(self, free: int) -> bool:
        """Fail the next queued job with disk_full (without running it); False when none is queued."""
        job = self.store.claim_next()
        if job is None:
            return False
        err = DiskFull(
            f"The disk holding {self.jobs_dir.parent} has only {free / 2**20:.0f} MiB free; a job needs at least "
            f"{self.min_free_bytes / 2**20:.0f} MiB. Free some space and re-run the job."
        )
        log.warning("job %s not started: %s", job.id, err.message)
        self.store.finish(job.id, "failed", error=err.to_dict(), message=err.message)
        return True

    def _loop(self) -> None:
        while True:
            self._wake.clear()
            if self.store.pending_writes():
                self.store.flush_pending()
            with self._lock:
                if self._stopping:
                    return
                free = self._free_bytes()
                if free is not None and free < self.min_free_bytes:
                    try:
                        refused = self._refuse_for_space(free)
                    except Exception:
                        log.exception("could not read the job queue")
                        refused = False
                    if refused:
                        continue
                    job = None
                else:
                    try:
                        job = self._claim()
                    except Exception:
                        log.exception("could not read the job queue")
                        job = None
                if job is not None:
                    self._current = _Current(job.id, CancelToken(), job.group)
                    current = self._current
            if job is None:
                self._wake.wait(1.0)
                continue
            try:
                with self._gen_lock:
                    self._run(job, current)
                    if self._unload_pending:
                        self._unload_locked()
            except Exception:  # the store itself failed; keep the worker alive
                log.exception("worker failed to record job %s", job.id)
            finally:
                with self._lock:
                    self._current = None
                self.last_activity = time.monotonic()

    def _generator_instance(self) -> GeneratorLike:
        if self._generator is None:
            t0 = time.monotonic()
            self._generator = self._factory()
            log.info("generator ready in %.1f s", time.monotonic() - t0)
        return self._generator

    def _progress_fn(self, job: Job, cur: _Current) -> ProgressFn:
        state = {"stage": None, "written": 0.0}

        def report(p: Progress) -> None:
            cur.last = p
            if cur.cancel_requested_flag:
                cur.steps_after_cancel += 1
            now = time.monotonic()
            new_stage = p.stage != state["stage"]
            if new_stage or p.step >= p.total or now - state["written"] >= self._progress_interval:
                state["stage"] = p.stage
                state["written"] = now
                message = p.message or f"{p.stage} {p.step}/{p.total}"
                self.store.progress(job.id, p.stage, p.step, p.total, message, p.eta_s, log_event=new_stage)
            self.last_activity = now

        return report

    def _run(self, job: Job, cur: _Current) -> None:
        log.info("job %s started (seed %s, preset %s)", job.id, job.spec.seed, job.spec.preset)
        t0 = time.monotonic()
        try:
            request = GenerateRequest(
                image=self.inputs.get(job.image_sha256),
                prompt=job.spec.prompt,
                subject=job.spec.subject,
                negative_prompt=job.spec.negative_prompt,
                seed=job.spec.seed,
                preset=job.spec.preset,
                faces=job.spec.faces,
                texture_size=job.spec.texture_size,
                overrides=job.spec.overrides,
            )
            cur.token.check()
            gen = self._generator_instance()
            result = gen.run(request, self.jobs_dir / job.id, progress=self._progress_fn(job, cur), cancel=cur.token)
        except Cancelled:
            self._finish_cancelled(job, cur)
            return
        except Requeue as exc:
            if cur.cancel_requested_flag:  # the user cancelled it while its worker was lost: do not run it again
                self._finish_cancelled(job, cur)
                return
            log.warning("job %s goes back to the queue: %s", job.id, exc.reason)
            self.store.requeue(job.id, exc.reason)
            if exc.requeued is not None:
                exc.requeued()
            return
        except Make3DError as exc:
            if cur.token.cancelled and exc.code == "cancelled":
                self._finish_cancelled(job, cur)
                return
            log.warning("job %s failed: [%s] %s", job.id, exc.code, exc.message)
            if exc.code == "out_of_memory":
                _free_accelerator_memory()
            self.store.finish(job.id, "failed", error=exc.to_dict(), message=exc.message)
            return
        except BaseException as exc:  # noqa: BLE001 - every failure must reach the client as a code
            known = classify_exception(exc)
            if known is not None:
                log.warning("job %s failed: [%s] %s (%s)", job.id, known.code, known.message, exc)
                if known.code == "out_of_memory":
                    _free_accelerator_memory()
                self.store.finish(job.id, "failed", error=known.to_dict(), message=known.message)
            else:
                log.exception("job %s failed with an unexpected error", job.id)
                err = {
                    "code": "internal",
                    "message": "The backend hit an unexpected error running this job (details are in the backend log). "
                    "Re-run the job; if it fails again, report the log.",
                }
                self.store.finish(job.id, "failed", error=err, message=err["message"])
            if not isinstance(exc, Exception):
                raise
            return
        files = sorted(str(f).replace("\\", "/") for f in result.files)
        cached = list(getattr(result, "cached_stages", []) or [])
        self.store.finish(job.id, "done", files=files, cached_stages=cached, message="done")
        log.info("job %s done in %.1f s (cached: %s)", job.id, time.monotonic() - t0, ", ".join(cached) or "none")

    def _finish_cancelled(self, job: Job, cur: _Current) -> None:
        last = cur.last
        where = f" at {last.stage} step {last.step}/{last.total}" if last else " before its first step"
        if self._stopping and not cur.cancel_requested_flag:
            msg = "The backend was stopped while this job was running. Re-run it."
            self.store.finish(job.id, "interrupted", error={"code": "interrupted", "message": msg}, message=f"interrupted{where}")
            log.info("job %s interrupted by shutdown%s", job.id, where)
            return
        if last is not None:
            self.store.progress(job.id, last.stage, last.step, last.total, last.message, None, log_event=False)
        self.store.record_event(job.id, "cancelled", {"steps_after_request": cur.steps_after_cancel, "stage": last.stage if last else None,
                                                      "step": last.step if last else None})
        self.store.finish(job.id, "cancelled", error={"code": "cancelled", "message": "The job was cancelled."}, message=f"cancelled{where}")
        log.info("job %s cancelled%s (%d steps after the request)", job.id, where, cur.steps_after_cancel)
