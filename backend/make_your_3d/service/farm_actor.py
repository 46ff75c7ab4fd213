"""What one farm worker does inside its Ray actor: run jobs on its own warm Generator and cache.

A plain class (service/farm.py wraps it with `ray.remote`), so it imports neither Ray nor, until
it is built inside its actor process, torch. One actor holds one GPU, its models (a Generator
and its ModelHost, kept between jobs) and its own stage cache on its node's disk. The serving
process calls `run` for one job at a time and, from other threads of the same actor, `poll`
(the progress records since the last poll), `cancel` (sets the job's CancelToken), and
`export_entries` / `import_entries` (moving a subject's cached stages to another worker through
Ray's object store). Files never travel through a shared folder: `run` returns the job's result
files as bytes and the serving process writes them into its own job folder.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from make_your_3d.errors import Cancelled, Make3DError
from make_your_3d.pipeline.stages import STAGE_SPECS
from make_your_3d.progress import CancelToken, Progress

log = logging.getLogger("make_your_3d.farm")

# The stages every variant of a subject shares (they do not read the seed): what moves between workers.
SHARED_STAGES = tuple(s.name for s in STAGE_SPECS if "seed" not in s.request_fields)
MAX_BUFFERED_RECORDS = 4096  # progress records kept between two polls (the oldest are dropped beyond)


class _Live:
    """A running job's cancel token and the progress records not yet polled."""

    def __init__(self) -> None:
        self.token = CancelToken()
        self.records: deque[dict] = deque(maxlen=MAX_BUFFERED_RECORDS)
        self.lock = threading.Lock()

    def report(self, p: Progress) -> None:
        with self.lock:
            self.records.append(p.to_dict())

    def drain(self) -> list[dict]:
        with self.lock:
            out = list(self.records)
            self.records.clear()
        return out


class FarmWorker:
    """One worker of the farm: a Generator (warm models, its own stage cache) on one GPU."""

    def __init__(self, models_dir: str, cache_root: str | None, device: str, overrides: dict | None, slot: int):
        from make_your_3d.paths import default_cache_dir
        from make_your_3d.pipeline.generate import Generator  # torch: only inside the actor's process

        user = default_cache_dir()
        root = Path(cache_root) if cache_root else user.with_name(f"{user.name}-farm")  # beside the user's cache, not in it
        self.cache_dir = root / f"slot-{slot}"
        self.generator = Generator(models_dir, self.cache_dir, device=device, overrides=overrides)
        self.generator.cache.remove_partial()  # what a killed worker of this slot left half-built
        self._run_lock = threading.Lock()  # one job at a time: the models are one set
        self._lock = threading.Lock()
        self._jobs: dict[str, _Live] = {}
        self._cancel_early: set[str] = set()  # cancels that arrived before their run started
        self._unload_pending = False
        self.slot = slot

    def info(self) -> dict[str, Any]:
        """Where this worker runs (the serving process logs it and records it on each job)."""
        return {"pid": os.getpid(), "host": socket.gethostname(), "slot": self.slot, "cache_dir": str(self.cache_dir),
                "device": str(self.generator.device)}

    # -- one job -----------------------------------------------------------------------------------
    def run(self, job_id: str, request: Any) -> dict[str, Any]:
        """Run one job to its end. Returns {"status": "done", "files": {name: bytes}, "cached_stages"},
        {"status": "cancelled"} or {"status": "failed", "error": {code, message}}; never raises."""
        from make_your_3d.service.worker import classify_exception

        live = _Live()
        with self._lock:
            self._jobs[job_id] = live
            if job_id in self._cancel_early:
                self._cancel_early.discard(job_id)
                live.token.cancel()
        try:
            with self._run_lock:
                return self._run(job_id, request, live)
        except Cancelled:
            return {"status": "cancelled"}
        except Make3DError as exc:
            if exc.code == "cancelled" and live.token.cancelled:
                return {"status": "cancelled"}
            return {"status": "failed", "error": exc.to_dict()}
        except Exception as exc:  # noqa: BLE001 - every failure must reach the serving process as a code
            known = classify_exception(exc)
            if known is not None:
                return {"status": "failed", "error": known.to_dict()}
            log.exception("farm job %s failed with an unexpected error", job_id)
            return {"status": "failed", "error": {
                "code": "internal",
                "message": "The farm worker hit an unexpected error running this job (details are in its Ray worker log). "
                           "Re-run the job; if it fails again, report the log."}}
        finally:
            with self._lock:
                self._jobs.pop(job_id, None)

    def _run(self, job_id: str, request: Any, live: _Live) -> dict[str, Any]:
        live.token.check()
        tmp = Path(tempfile.mkdtemp(prefix="mk3d-farm-job-"))
        try:
            out = tmp / job_id  # the job's id as the folder name, as in local mode (the GLB records it)
            result = self.generator.run(request, out, progress=live.report, cancel=live.token)
            files = {name: (out / name).read_bytes() for name in result.files}
            return {"status": "done", "files": files, "cached_stages": list(result.cached_stages), "timings": dict(result.timings)}
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            if self._unload_pending:
                self._unload_pending = False
                self.generator.unload()

    def poll(self, job_id: str) -> list[dict]:
        """The progress records of `job_id` since the last poll (Progress.to_dict() each)."""
        with self._lock:
            live = self._jobs.get(job_id)
        return live.drain() if live is not None else []

    def cancel(self, job_id: str) -> bool:
        """Set the job's CancelToken: it stops at its next step. A cancel that comes before its run
        started is kept for it."""
        with self._lock:
            live = self._jobs.get(job_id)
            if live is None:
                self._cancel_early.add(job_id)
                return False
        live.token.cancel()
        return True

    def unload(self) -> bool:
        """Free the models now if idle (True), else after the running job (False)."""
        if self._run_lock.acquire(blocking=False):
            try:
                self.generator.unload()
            finally:
                self._run_lock.release()
            return True
        self._unload_pending = True
        return False

    # -- moving a subject's cached stages --------------------------------------------------------
    def export_entries(self, request: Any) -> dict[str, dict[str, Any]]:
        """The shared stages of `request` this worker has cached: {stage: {"key", "files"}}. Empty
        when it has none (or the request cannot be planned here)."""
        try:
            keys = self.generator.stage_keys(request)
        except Exception:  # noqa: BLE001 - a transfer is an optimisation: nothing to move
            log.warning("could not plan the stage keys to export", exc_info=True)
            return {}
        out = {}
        for stage in SHARED_STAGES:
            files = self.generator.cache.export(stage, keys[stage])
            if files is not None:
                out[stage] = {"key": keys[stage], "files": files}
        return out

    def import_entries(self, entries: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """Put entries exported by another worker into this worker's cache (each checked against
        its own record). Returns the stages imported, their bytes and the seconds it took."""
        t0 = time.monotonic()
        done, size = [], 0
        for stage, entry in entries.items():
            if stage in SHARED_STAGES and self.generator.cache.import_entry(stage, entry["key"], entry["files"]):
                done.append(stage)
                size += sum(len(b) for b in entry["files"].values())
        return {"stages": done, "bytes": size, "seconds": round(time.monotonic() - t0, 4)}
