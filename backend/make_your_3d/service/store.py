"""Durable job store: one SQLite database (WAL) under the data directory.

Every change is committed before the HTTP client is answered, so a crash or `kill -9` loses no
job record. On open, jobs that were `running` become `interrupted` (they can be re-run) and queued
jobs stay queued, in order. A database that is not readable SQLite is moved aside (with a
timestamp) and a new one started. A terminal state whose commit fails (a full disk) is kept in
memory, answered from there, and written when a retry succeeds, so a job never stays `running`.
Listeners registered with `subscribe` are called after every change (event streams wait on them).
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from make_your_3d.errors import DataUnwritable, QueueFull

log = logging.getLogger("make_your_3d.service")

SCHEMA_VERSION = 2  # 2: jobs.owner (the remote listener's user; NULL for the local token)
STATUSES = ("queued", "running", "done", "failed", "cancelled", "interrupted")
TERMINAL = frozenset({"done", "failed", "cancelled", "interrupted"})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    grp TEXT NOT NULL,
    status TEXT NOT NULL,
    stage TEXT,
    step INTEGER NOT NULL DEFAULT 0,
    total INTEGER NOT NULL DEFAULT 0,
    message TEXT NOT NULL DEFAULT '',
    eta_s REAL,
    error_code TEXT,
    error_message TEXT,
    files TEXT NOT NULL DEFAULT '[]',
    cached_stages TEXT NOT NULL DEFAULT '[]',
    request TEXT NOT NULL,
    image_sha256 TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    owner TEXT
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, seq);
CREATE INDEX IF NOT EXISTS jobs_group ON jobs(grp, seq);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_job ON events(job_id, seq);
"""


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class JobSpec:
    """What one queued job asks for (one variant); the image itself lives in the input store."""

    prompt: str
    negative_prompt: str
    subject: str | None
    seed: int
    preset: str
    faces: int | None
    texture_size: int | None
    overrides: dict | None = None  # presets.JOB_OVERRIDES keys

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "subject": self.subject,
            "seed": self.seed,
            "preset": self.preset,
            "faces": self.faces,
            "texture_size": self.texture_size,
            "overrides": dict(self.overrides) if self.overrides else None,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "JobSpec":
        return cls(**{k: data.get(k) for k in ("prompt", "negative_prompt", "subject", "seed", "preset", "faces", "texture_size",
                                               "overrides")})


@dataclass
class Job:
    """A row of the jobs table; `record()` is the API's job record."""

    seq: int
    id: str
    group: str
    status: str
    stage: str | None
    step: int
    total: int
    message: str
    eta_s: float | None
    error: dict[str, str] | None
    files: list[str]
    cached_stages: list[str]
    spec: JobSpec
    image_sha256: str
    created_at: float
    started_at: float | None
    finished_at: float | None
    owner: str | None = None  # the remote user who submitted it; None: the local token's

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def elapsed_s(self, now: float | None = None) -> float | None:
        if self.started_at is None:
            return None
        end = self.finished_at if self.finished_at is not None else (now if now is not None else time.time())
        return round(max(0.0, end - self.started_at), 3)

    def record(self, now: float | None = None) -> dict[str, Any]:
        return {
            "id": self.id,
            "group": self.group,
            "status": self.status,
            "stage": self.stage,
            "step": self.step,
            "total": self.total,
            "message": self.message,
            "elapsed_s": self.elapsed_s(now),
            "eta_s": self.eta_s if self.status == "running" else None,
            "error": self.error,
            "files": list(self.files),
            "request": self.spec.to_dict(),
            "created_at": _iso(self.created_at),
            "cached_stages": list(self.cached_stages),
        }


def _row_to_job(row: sqlite3.Row) -> Job:
    error = {"code": row["error_code"], "message": row["error_message"] or ""} if row["error_code"] else None
    return Job(
        seq=row["seq"],
        id=row["id"],
        group=row["grp"],
        status=row["status"],
        stage=row["stage"],
        step=row["step"],
        total=row["total"],
        message=row["message"],
        eta_s=row["eta_s"],
        error=error,
        files=json.loads(row["files"]),
        cached_stages=json.loads(row["cached_stages"]),
        spec=JobSpec.from_dict(json.loads(row["request"])),
        image_sha256=row["image_sha256"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        owner=row["owner"],
    )


def new_id() -> str:
    return uuid.uuid4().hex[:16]


class JobStore:
    """Thread-safe access to the job database. Each public method is one committed transaction."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._version = 0
        self._listeners: list[Callable[[], None]] = []
        self._pending: dict[str, dict[str, Any]] = {}  # terminal states not yet committed, by job id
        self.moved_aside: Path | None = None
        try:
            self._db = self._open()
        except sqlite3.OperationalError as exc:  # permissions, a folder in its place, a locked file
            raise DataUnwritable(
                f"The job database {self.path} cannot be opened ({exc}). Check that the data folder is writable by you, "
                "or pass another --data folder."
            ) from None
        except sqlite3.DatabaseError as exc:  # not a database, or a damaged one
            self.moved_aside = self._move_aside(str(exc))
            self._db = self._open()

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
        db.row_factory = sqlite3.Row
        try:
            with self._lock:
                db.execute("PRAGMA journal_mode=WAL")
                # FULL: a committed job survives power loss as well as a killed process.
                db.execute("PRAGMA synchronous=FULL")
                db.execute("PRAGMA foreign_keys=ON")
                problems = [r[0] for r in db.execute("PRAGMA quick_check").fetchall()]
                if problems != ["ok"]:
                    raise sqlite3.DatabaseError(f"integrity check failed: {'; '.join(problems[:3])}")
                db.executescript(_SCHEMA)
                columns = {r[1] for r in db.execute("PRAGMA table_info(jobs)")}
                if "owner" not in columns:  # a database from before per-user tokens: its jobs are the local token's
                    db.execute("ALTER TABLE jobs ADD COLUMN owner TEXT")
                db.execute("CREATE INDEX IF NOT EXISTS jobs_owner ON jobs(owner, seq)")
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except BaseException:
            db.close()
            raise
        if os.name != "nt":
            for suffix in ("", "-wal", "-shm"):
                try:
                    os.chmod(f"{self.path}{suffix}", 0o600)
                except OSError:
                    pass
        return db

    def _move_aside(self, reason: str) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 0
        while target.exists():
            n += 1
            target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
        os.replace(self.path, target)
        for suffix in ("-wal", "-shm"):
            side = Path(f"{self.path}{suffix}")
            if side.exists():
                os.replace(side, Path(f"{target}{suffix}"))
        log.warning("the job database %s is damaged (%s); moved it to %s and started an empty one (the old file is kept "
                    "for recovery)", self.path, reason, target)
        return target

    # -- plumbing --------------------------------------------------------------------------------
    def close(self) -> None:
        if self._pending:
            self.flush_pending()
        with self._lock:
            if self._pending:
                log.error("could not record the final state of job(s) %s (disk full?); they will show as interrupted at the next start",
                          ", ".join(self._pending))
            self._db.close()

    def _tx(self) -> "_Tx":
        return _Tx(self)

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Call `listener()` (from the writing thread, outside the store lock) after every change."""
        self._listeners.append(listener)

    def _notify(self) -> None:
        self._version += 1
        for listener in list(self._listeners):
            try:
                listener()
            except Exception:  # a listener must never break a write
                log.debug("store listener failed", exc_info=True)

    @property
    def version(self) -> int:
        """Increments on every change."""
        return self._version

    def _event(self, job_id: str, kind: str, data: dict[str, Any]) -> None:
        self._db.execute("INSERT INTO events(job_id, at, kind, data) VALUES (?, ?, ?, ?)", (job_id, time.time(), kind, json.dumps(data)))

    # -- startup ---------------------------------------------------------------------------------
    def recover(self) -> list[str]:
        """Mark jobs left `running` by a crash as `interrupted`; returns their ids. Queued stay queued."""
        with self._tx() as db:
            ids = [r["id"] for r in db.execute("SELECT id FROM jobs WHERE status='running' ORDER BY seq")]
            now = time.time()
            for job_id in ids:
                db.execute(
                    "UPDATE jobs SET status='interrupted', finished_at=?, eta_s=NULL, error_code='interrupted', error_message=?, "
                    "message=? WHERE id=?",
                    (now, "The backend stopped while this job was running. Re-run it.", "interrupted", job_id),
                )
                self._event(job_id, "status", {"status": "interrupted"})
            return ids

    def restore(self, jobs: list[Job]) -> list[str]:
        """Insert finished jobs rebuilt from elsewhere (their job folders, after the database was
        lost), in the order given, skipping ids already known; one transaction. Returns the ids added."""
        added = []
        with self._tx() as db:
            for j in jobs:
                cur = db.execute(
                    "INSERT OR IGNORE INTO jobs(id, grp, status, stage, step, total, message, files, cached_stages, request, image_sha256, "
                    "created_at, started_at, finished_at, error_code, error_message) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (j.id, j.group, j.status, j.stage, j.step, j.total, j.message, json.dumps(j.files), json.dumps(j.cached_stages),
                     json.dumps(j.spec.to_dict()), j.image_sha256, j.created_at, j.started_at, j.finished_at,
                     j.error["code"] if j.error else None, j.error["message"] if j.error else None),
                )
                if cur.rowcount:
                    self._event(j.id, "status", {"status": j.status, "restored": True})
                    added.append(j.id)
        return added

    def ids(self) -> set[str]:
        """Every job id in the database."""
        with self._lock:
            return {r["id"] for r in self._db.execute("SELECT id FROM jobs")}

    # -- writes ----------------------------------------------------------------------------------
    def add_jobs(self, specs: list[JobSpec], image_sha256: str, group: str | None = None, *, max_queued: int | None = None,
                 owner: str | None = None) -> list[Job]:
        """Queue one job per spec (in order) in one transaction, owned by `owner`; returns them. With `max_queued`,
        refuse (QueueFull, nothing written) when the queue would then hold more waiting jobs; the
        count and the insert are one transaction, so two requests cannot both slip under it."""
        group = group or new_id()
        now = time.time()
        ids = []
        with self._tx() as db:
            if max_queued is not None:
                waiting = db.execute("SELECT COUNT(*) FROM jobs WHERE status='queued'").fetchone()[0]
                if waiting + len(specs) > max_queued:
                    room = max(0, max_queued - waiting)
                    raise QueueFull(
                        f"{waiting} jobs are already waiting and the backend queues at most {max_queued} "
                        f"({room} more now, {len(specs)} asked for). Wait for some to finish, or cancel a group of "
                        "jobs (POST /v1/groups/{group}/cancel), then submit again."
                    )
            for spec in specs:
                job_id = new_id()
                db.execute(
                    "INSERT INTO jobs(id, grp, status, message, request, image_sha256, created_at, owner) "
                    "VALUES (?, ?, 'queued', 'queued', ?, ?, ?, ?)",
                    (job_id, group, json.dumps(spec.to_dict()), image_sha256, now, owner),
                )
                self._event(job_id, "status", {"status": "queued"})
                ids.append(job_id)
        return [self.get(i) for i in ids]  # type: ignore[misc]

    def claim_next(self) -> Job | None:
        """Atomically move the oldest queued job to `running` and return it."""
        with self._tx() as db:
            row = db.execute("SELECT id FROM jobs WHERE status='queued' ORDER BY seq LIMIT 1").fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET status='running', started_at=?, message='starting', step=0, total=0, stage=NULL WHERE id=?",
                (time.time(), row["id"]),
            )
            self._event(row["id"], "status", {"status": "running"})
        return self.get(row["id"])

    def claim(self, job_id: str) -> Job | None:
        """Atomically move queued job `job_id` to `running` and return it (None: not queued any more).
        A farm picks which queued job a worker takes (cache affinity) and claims it by id."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE jobs SET status='running', started_at=?, message='starting', step=0, total=0, stage=NULL "
                "WHERE id=? AND status='queued'",
                (time.time(), job_id),
            )
            if not cur.rowcount:
                return None
            self._event(job_id, "status", {"status": "running"})
        return self.get(job_id)

    def requeue(self, job_id: str, reason: str) -> bool:
        """Put a running job back in the queue, in its old place (its worker was lost; it runs again
        from its start, reusing what the stage cache holds); False if it is not running."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE jobs SET status='queued', started_at=NULL, stage=NULL, step=0, total=0, eta_s=NULL, message=? "
                "WHERE id=? AND status='running'",
                (f"queued again: {reason}", job_id),
            )
            if cur.rowcount:
                self._event(job_id, "status", {"status": "queued", "requeued": reason})
            return bool(cur.rowcount)

    def queued(self, limit: int = 1000) -> list[Job]:
        """The oldest `limit` queued jobs, in queue order."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs WHERE status='queued' ORDER BY seq LIMIT ?", (limit,)).fetchall()
            return [self._overlay(_row_to_job(r)) for r in rows]

    def cancel_queued(self, job_id: str) -> bool:
        """Cancel a job that has not started; False if it is not queued."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE jobs SET status='cancelled', finished_at=?, message='cancelled', error_code='cancelled', error_message=? "
                "WHERE id=? AND status='queued'",
                (time.time(), "The job was cancelled before it started.", job_id),
            )
            if cur.rowcount:
                self._event(job_id, "status", {"status": "cancelled"})
            return bool(cur.rowcount)

    def cancel_queued_group(self, group: str) -> list[str]:
        """Cancel every job of `group` that has not started, in one transaction; returns their ids."""
        with self._tx() as db:
            ids = [r["id"] for r in db.execute("SELECT id FROM jobs WHERE grp=? AND status='queued' ORDER BY seq", (group,))]
            if ids:
                db.execute(
                    "UPDATE jobs SET status='cancelled', finished_at=?, message='cancelled', error_code='cancelled', error_message=? "
                    "WHERE grp=? AND status='queued'",
                    (time.time(), "The job was cancelled before it started.", group),
                )
                db.executemany("INSERT INTO events(job_id, at, kind, data) VALUES (?, ?, 'status', ?)",
                               [(i, time.time(), json.dumps({"status": "cancelled"})) for i in ids])
            return ids

    def progress(self, job_id: str, stage: str, step: int, total: int, message: str, eta_s: float | None, *, log_event: bool) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET stage=?, step=?, total=?, message=?, eta_s=? WHERE id=? AND status='running'",
                (stage, step, total, message, eta_s, job_id),
            )
            if log_event:
                self._event(job_id, "progress", {"stage": stage, "step": step, "total": total, "message": message})

    def record_event(self, job_id: str, kind: str, data: dict[str, Any]) -> None:
        with self._tx():
            self._event(job_id, kind, data)

    def note(self, job_id: str, message: str) -> None:
        """Set a running job's message (e.g. "cancel requested") without touching its progress."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET message=? WHERE id=? AND status='running'", (message, job_id))

    def finish(
        self,
        job_id: str,
        status: str,
        *,
        files: list[str] | None = None,
        cached_stages: list[str] | None = None,
        error: dict[str, str] | None = None,
        message: str | None = None,
    ) -> None:
        """Record a terminal state. Never raises for a failing database: the state is then kept in
        memory (reads answer from it) and written by `flush_pending`."""
        assert status in TERMINAL, status
        update = {"status": status, "finished_at": time.time(), "files": list(files or []), "cached_stages": list(cached_stages or []),
                  "error": dict(error) if error else None, "message": message if message is not None else status}
        with self._lock:
            self._pending[job_id] = update
        if self._write_final(job_id, update):
            return
        log.warning("could not record job %s as %s (the database write failed); kept in memory, retrying", job_id, status)
        self._notify()

    def _write_final(self, job_id: str, u: dict[str, Any]) -> bool:
        try:
            with self._tx() as db:
                db.execute(
                    "UPDATE jobs SET status=?, finished_at=?, eta_s=NULL, files=?, cached_stages=?, error_code=?, error_message=?, message=? "
                    "WHERE id=?",
                    (u["status"], u["finished_at"], json.dumps(u["files"]), json.dumps(u["cached_stages"]),
                     u["error"]["code"] if u["error"] else None, u["error"]["message"] if u["error"] else None, u["message"], job_id),
                )
                self._event(job_id, "status", {"status": u["status"], "error": u["error"]})
        except (sqlite3.Error, OSError):
            log.debug("final write of job %s failed", job_id, exc_info=True)
            return False
        with self._lock:
            if self._pending.get(job_id) is u:
                del self._pending[job_id]
        return True

    def pending_writes(self) -> int:
        """How many terminal states are held in memory, not yet in the database."""
        with self._lock:
            return len(self._pending)

    def flush_pending(self) -> int:
        """Retry the terminal states held in memory; returns how many are still unwritten."""
        with self._lock:
            todo = list(self._pending.items())
        for job_id, update in todo:
            if self._write_final(job_id, update):
                log.info("recorded job %s as %s after an earlier failed write", job_id, update["status"])
        return self.pending_writes()

    def _overlay(self, job: Job) -> Job:
        u = self._pending.get(job.id)
        if u is None:
            return job
        return replace(job, status=u["status"], finished_at=u["finished_at"], eta_s=None, files=list(u["files"]),
                       cached_stages=list(u["cached_stages"]), error=u["error"], message=u["message"])

    # -- reads -----------------------------------------------------------------------------------
    def get(self, job_id: str) -> Job | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
            return self._overlay(_row_to_job(row)) if row else None

    def list(self, status: str | None = None) -> list[Job]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs ORDER BY seq").fetchall()
            jobs = [self._overlay(_row_to_job(r)) for r in rows]
        return jobs if status is None else [j for j in jobs if j.status == status]

    def page(self, limit: int, before: int | None = None, owner: str | None = None) -> tuple[list[Job], int | None]:
        """The newest `limit` jobs older than cursor `before` (a seq), oldest first, and the cursor
        of the next older page (None when there is none). With `owner`, only that user's jobs."""
        where, params = ["1=1"], []
        if before is not None:
            where.append("seq < ?")
            params.append(before)
        if owner is not None:
            where.append("owner = ?")
            params.append(owner)
        with self._lock:
            rows = self._db.execute(f"SELECT * FROM jobs WHERE {' AND '.join(where)} ORDER BY seq DESC LIMIT ?", (*params, limit + 1)).fetchall()
            jobs = [self._overlay(_row_to_job(r)) for r in rows[:limit]]
        jobs.reverse()
        return jobs, (jobs[0].seq if len(rows) > limit and jobs else None)

    def group(self, group: str) -> list[Job]:
        """The jobs of one group (one request's variants), oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs WHERE grp=? ORDER BY seq", (group,)).fetchall()
            return [self._overlay(_row_to_job(r)) for r in rows]

    def has_pending(self) -> bool:
        """Whether a job is queued or running (the idle timer waits for them)."""
        with self._lock:
            rows = self._db.execute("SELECT id FROM jobs WHERE status IN ('queued','running')").fetchall()
            return any(r["id"] not in self._pending for r in rows)

    def events(self, job_id: str) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT at, kind, data FROM events WHERE job_id=? ORDER BY seq", (job_id,)).fetchall()
        return [{"at": r["at"], "kind": r["kind"], **json.loads(r["data"])} for r in rows]


class _Tx:
    """`with store._tx() as db:` one IMMEDIATE transaction under the store lock; notifies waiters."""

    def __init__(self, store: JobStore):
        self.store = store

    def __enter__(self) -> sqlite3.Connection:
        self.store._lock.acquire()
        try:
            self.store._db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self.store._lock.release()
            raise
        return self.store._db

    def __exit__(self, exc_type, exc, tb) -> None:
        committed = False
        try:
            if exc_type is None:
                try:
                    self.store._db.execute("COMMIT")
                except BaseException:
                    try:
                        self.store._db.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass
                    raise
                committed = True
            else:
                self.store._db.execute("ROLLBACK")
        finally:
            self.store._lock.release()
        if committed:
            self.store._notify()
