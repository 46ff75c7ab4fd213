"""`make-your-3d serve`: the process the Blender add-on starts and talks to.

Binds loopback (anything else needs --allow-remote), picks a free port for --port 0, writes the
state file (url, token, pid, version; mode 0600, atomically) only once it accepts requests, and
removes it on exit. Exits when --parent-pid is gone or after --idle-timeout idle seconds.

Start-up refuses a data folder it cannot write and a state file that names another live backend
(`busy`), moves a damaged job database aside and rebuilds the job list from the job folders, and
removes what a killed run left: temporary job folders (under the data-folder lock) and the
half-built entries of the per-user stage cache whose building process is gone. The data folder is
private (0700, umask 077).
Against slow or idle clients: a request head must arrive within `header_timeout_s`, connections
are capped (`limit_concurrency`) and the soft open-files limit is raised to allow that many.

`--allow-remote` makes it the remote listener (a studio's GPU box), on any address including
loopback: HTTPS only (the operator's certificate or one generated into DATA/tls/, its SHA-256
fingerprint printed for artists to pin), per-user tokens (service/users.py) instead of the state
file's token, each user seeing only their own jobs, Host names limited to the certificate's, and
the same size limits and slow-client protections, the TLS handshake included.
"""

from __future__ import annotations

import errno
import asyncio
import functools
import ipaddress
import json
import logging
import logging.handlers
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from make_your_3d import __version__
from make_your_3d.errors import BadRequest, BindFailed, Busy, DataUnwritable, FarmUnavailable
from make_your_3d.files import atomic_write_bytes
from make_your_3d.job_params import FACES_RANGE, TEXTURE_SIZES
from make_your_3d.paths import default_cache_dir, default_data_dir, resolve_models_dir
from make_your_3d.pipeline.cache import StageCache
from make_your_3d.process import pid_alive
from make_your_3d.service.app import MAX_QUEUED_JOBS, Activity, RemoteAccess, create_app
from make_your_3d.service.farm_config import FarmConfig
from make_your_3d.service.inputs import InputStore
from make_your_3d.service.store import Job, JobSpec, JobStore
from make_your_3d.service.tls import TlsConfig, TlsFiles, ensure_tls, machine_names
from make_your_3d.service.users import UserStore
from make_your_3d.service.worker import GeneratorLike, Worker

log = logging.getLogger("make_your_3d.service")

CONFIG_KEYS = ("overrides", "progress_interval_s", "header_timeout_s", "max_job_memory_gib", "max_queued_jobs", "farm")
HEADER_TIMEOUT_S = 10.0  # a request line and headers must arrive within this (slowloris)
MAX_CONNECTIONS = 2048  # uvicorn's limit_concurrency, lowered when the open-files limit is lower
OPEN_FILES_WANTED = 8192
MAX_HEAD_BYTES = 64 * 1024  # h11's limit on a request line plus headers
JOB_MEMORY_SHARE = 0.75  # of physical memory, the default per-job memory budget


@dataclass
class ServeOptions:
    models_dir: Path
    data_dir: Path
    state_file: Path
    host: str = "127.0.0.1"
    port: int = 0
    allow_remote: bool = False
    parent_pid: int | None = None
    idle_timeout_s: float | None = None
    preset: str = "default"
    device: str = "auto"
    overrides: dict[str, Any] = field(default_factory=dict)
    progress_interval_s: float = 0.5
    header_timeout_s: float = HEADER_TIMEOUT_S
    max_job_memory_bytes: int | None = None  # None: JOB_MEMORY_SHARE of physical memory
    max_queued_jobs: int = MAX_QUEUED_JOBS
    # the stage cache jobs build in: one per user, shared with `generate` and `demo`
    cache_dir: Path = field(default_factory=default_cache_dir)
    farm: FarmConfig | None = None  # --ray: jobs run on Ray workers (service/farm.py); None: this process's worker
    # the remote listener (allow_remote): the operator's certificate and key (None: DATA/tls/, generated
    # once) and further names clients use for this machine (DNS names, addresses behind NAT)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    public_names: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def load_config(path: Path) -> dict[str, Any]:
    """Read a `serve --config` JSON file: {"overrides": {preset key: value}, "progress_interval_s": s}."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadRequest(f"The config file {path} does not exist.") from None
    except (OSError, ValueError) as exc:
        raise BadRequest(f"The config file {path} is not readable JSON ({exc}). Fix it or leave --config out.") from None
    if not isinstance(data, dict):
        raise BadRequest(f"The config file {path} must hold a JSON object like {{\"overrides\": {{...}}}}.")
    unknown = sorted(set(data) - set(CONFIG_KEYS))
    if unknown:
        raise BadRequest(f"The config file {path} has unknown keys {unknown}; allowed: {', '.join(CONFIG_KEYS)}.")
    if not isinstance(data.get("overrides", {}), dict):
        raise BadRequest(f"'overrides' in {path} must be an object of preset values.")
    interval = data.get("progress_interval_s", 0.5)
    if not isinstance(interval, (int, float)) or isinstance(interval, bool) or not 0 <= interval <= 60:
        raise BadRequest(f"'progress_interval_s' in {path} must be a number of seconds from 0 to 60.")
    timeout = data.get("header_timeout_s", HEADER_TIMEOUT_S)
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not 0.1 <= timeout <= 600:
        raise BadRequest(f"'header_timeout_s' in {path} must be a number of seconds from 0.1 to 600.")
    memory = data.get("max_job_memory_gib")
    if memory is not None and (not isinstance(memory, (int, float)) or isinstance(memory, bool) or memory <= 0):
        raise BadRequest(f"'max_job_memory_gib' in {path} must be a positive number of GiB.")
    queued = data.get("max_queued_jobs", MAX_QUEUED_JOBS)
    if not isinstance(queued, int) or isinstance(queued, bool) or not 1 <= queued <= 1_000_000:
        raise BadRequest(f"'max_queued_jobs' in {path} must be a whole number from 1 to 1000000.")
    if "farm" in data:
        FarmConfig.from_dict(data["farm"], f"'farm' in {path}")
    return data


def farm_from_args(args: Any, config: dict[str, Any]) -> FarmConfig | None:
    """The farm settings when --ray is given (its address over the config file's), else None."""
    address = getattr(args, "ray", None)
    if not address:
        return None
    return FarmConfig.from_dict({**config.get("farm", {}), "address": address}, "--ray and the config file's farm settings")


def options_from_args(args: Any) -> ServeOptions:
    data_dir = Path(args.data).expanduser() if getattr(args, "data", None) else default_data_dir()
    state_file = Path(args.state_file).expanduser() if getattr(args, "state_file", None) else data_dir / "state.json"
    config = load_config(Path(args.config)) if getattr(args, "config", None) else {}
    if args.port is not None and not 0 <= args.port <= 65535:
        raise BadRequest(f"--port {args.port} is not a port number (0-65535; 0 picks a free one).")
    if args.idle_timeout is not None and args.idle_timeout <= 0:
        raise BadRequest("--idle-timeout must be a positive number of seconds.")
    return ServeOptions(
        models_dir=resolve_models_dir(args.models),
        data_dir=data_dir,
        state_file=state_file,
        host=args.host,
        port=args.port or 0,
        allow_remote=bool(args.allow_remote),
        parent_pid=args.parent_pid,
        idle_timeout_s=args.idle_timeout,
        preset=args.preset,
        device=args.device,
        overrides=dict(config.get("overrides", {})),
        progress_interval_s=float(config.get("progress_interval_s", 0.5)),
        header_timeout_s=float(config.get("header_timeout_s", HEADER_TIMEOUT_S)),
        max_job_memory_bytes=int(config["max_job_memory_gib"] * 2**30) if config.get("max_job_memory_gib") else None,
        max_queued_jobs=int(config.get("max_queued_jobs", MAX_QUEUED_JOBS)),
        farm=farm_from_args(args, config),
        tls_cert=Path(args.tls_cert).expanduser() if getattr(args, "tls_cert", None) else None,
        tls_key=Path(args.tls_key).expanduser() if getattr(args, "tls_key", None) else None,
        public_names=tuple(getattr(args, "public_name", None) or ()),
    )


# ---------------------------------------------------------------------------------------------
# Process plumbing
# ---------------------------------------------------------------------------------------------
def write_state_file(path: Path, state: dict[str, Any]) -> None:
    """Write JSON readable only by this user, atomically (files.atomic_write_bytes, mode 0600)."""
    atomic_write_bytes(path, json.dumps(state).encode("utf-8"), 0o600)


def remove_state_file(path: Path, token: str) -> None:
    """Remove the state file only if it is still ours (a newer backend may have replaced it): it
    holds our token (local) or our instance id (remote, where no token is written)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if isinstance(data, dict) and token in (data.get("token"), data.get("instance")):
        path.unlink(missing_ok=True)


def remove_partial_outputs(jobs_dir: Path) -> None:
    """Delete the temporary folders a killed run left beside the job folders (names start with '.').
    Safe: the data folder lock guarantees no other backend is writing here."""
    if not jobs_dir.is_dir():
        return
    for entry in jobs_dir.iterdir():
        if entry.name.startswith(".") and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
            log.info("removed partial output %s", entry.name)


def remove_leftovers(data_dir: Path, cache_dir: Path) -> None:
    """What a killed run leaves: temporary job output folders (under the data folder lock) and the
    half-built entries of the stage cache the jobs build in (`cache_dir`, the per-user cache shared
    with `generate` and other backends: only entries whose building process is gone are removed)."""
    remove_partial_outputs(data_dir / "jobs")
    for path in StageCache(cache_dir).remove_partial():
        log.info("removed partial cache entry %s/%s", path.parent.name, path.name)


def _job_from_folder(folder: Path) -> Job | None:
    """A finished job rebuilt from its folder's job.json (None when there is none or it is not
    readable): the request, the image digest, the files, the times. Its group is its own id (the
    variants' shared group was only in the database)."""
    try:
        return _parse_job_json(folder, json.loads((folder / "job.json").read_text(encoding="utf-8")), (folder / "job.json").stat().st_mtime)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, OverflowError):
        log.warning("could not read %s; that job is not listed", folder / "job.json")
        return None


def _parse_job_json(folder: Path, record: dict, finished: float) -> Job:
    inputs, preset = record["inputs"], record["preset"]
    recon = record.get("recon") or {}
    faces = (recon.get("mesh") or {}).get("faces")
    texture = (recon.get("bake") or {}).get("texture_size")
    subject = inputs.get("subject")
    overrides = inputs.get("overrides")
    spec = JobSpec(
        prompt=str(inputs.get("prompt") or ""),
        negative_prompt=str(inputs.get("negative_prompt") or ""),
        subject=subject if isinstance(subject, str) else None,
        seed=int(inputs.get("seed") or 0),
        preset=str(preset.get("name") or "default"),
        # the sizes the job ran with, where a request may ask for them (a re-run reproduces the job)
        faces=faces if isinstance(faces, int) and FACES_RANGE[0] <= faces <= FACES_RANGE[1] else None,
        texture_size=texture if texture in TEXTURE_SIZES else None,
        overrides=dict(overrides) if isinstance(overrides, dict) and overrides else None,
    )
    try:
        created = datetime.fromisoformat(str(record.get("created_at"))).timestamp()
    except ValueError:
        created = finished
    total = (record.get("timings") or {}).get("total")
    started = finished - total if isinstance(total, (int, float)) and total >= 0 else None
    files = record.get("files")
    files = sorted(f for f in files if isinstance(f, str)) if isinstance(files, list) else ["job.json"]
    cached = record.get("cached_stages")
    cached = [c for c in cached if isinstance(c, str)] if isinstance(cached, list) else []
    image = inputs["image_sha256"]
    if not isinstance(image, str):
        raise TypeError("image_sha256 is not text")
    return Job(seq=0, id=folder.name, group=folder.name, status="done", stage=None, step=0, total=0, message="done (restored from its folder)",
               eta_s=None, error=None, files=files, cached_stages=cached, spec=spec, image_sha256=image, created_at=created,
               started_at=started, finished_at=finished)


def restore_jobs_from_folders(store: JobStore, jobs_dir: Path) -> list[str]:
    """Put back the finished jobs whose folders (with job.json) the database does not know: after a
    damaged database was moved aside (or deleted), the job list is rebuilt from the folders, oldest
    first. Only job.json files are read, and only for unknown folders."""
    if not jobs_dir.is_dir():
        return []
    known = store.ids()
    jobs = []
    for folder in jobs_dir.iterdir():
        if folder.name.startswith(".") or folder.name in known or folder.is_symlink() or not folder.is_dir() or len(folder.name) > 64:
            continue
        job = _job_from_folder(folder)
        if job is not None:
            jobs.append(job)
    jobs.sort(key=lambda j: (j.created_at, j.id))
    return store.restore(jobs)


def prepare_data_dir(data_dir: Path) -> None:
    """Create the data folder private to this user (0700), or raise DataUnwritable saying why."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        if os.name != "nt" and data_dir.stat().st_uid == os.geteuid():
            data_dir.chmod(0o700)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=data_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        raise DataUnwritable(
            f"The data folder {data_dir} cannot be used ({reason}). Make it writable by you, or pass another --data folder."
        ) from None


def check_state_file_free(path: Path) -> None:
    """Refuse (busy) when the state file names another backend that is alive and answering: taking
    the file over would cut Blender off from it, and that backend would delete the file on exit."""
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        pid, url = int(state["pid"]), str(state["url"])
    except (OSError, ValueError, KeyError, TypeError):
        return  # absent or unreadable: nobody to protect
    if pid == os.getpid() or not pid_alive(pid) or not url.startswith(("http://", "https://")):
        return
    import ssl
    import urllib.request

    # health is public and sends no token, so an unverified TLS connection tells us only "alive"
    context = None
    if url.startswith("https://"):
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    try:
        with urllib.request.urlopen(f"{url}/v1/health", timeout=3, context=context) as resp:
            answer = json.loads(resp.read(4096))
    except (OSError, ValueError):
        return  # a stale file whose pid was reused
    if isinstance(answer, dict) and answer.get("status") == "ok":
        raise Busy(
            f"Another backend (pid {pid}, {url}) is running with the state file {path}. Stop it first, or pass another --state-file."
        )


def raise_open_files_limit(wanted: int = OPEN_FILES_WANTED) -> int | None:
    """Raise the soft RLIMIT_NOFILE towards `wanted` (within the hard limit); returns the soft limit."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            log.warning("could not raise the open-files limit from %d to %d", soft, target)
    return None if soft == resource.RLIM_INFINITY else soft


def connection_limit(open_files: int | None) -> int:
    """Connections uvicorn serves at once: below the open-files limit, leaving room for the models,
    the database and the log."""
    if open_files is None:
        return MAX_CONNECTIONS
    return max(32, min(MAX_CONNECTIONS, open_files - 256))


def default_memory_budget() -> int | None:
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None
    return int(total * JOB_MEMORY_SHARE) if total > 0 else None


class HeadTimeoutH11(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request line and headers have not all
    arrived within `head_timeout_s` of its first byte (or of the connection). uvicorn itself
    times out only idle keep-alive connections, so a client sending headers a byte at a time, or
    nothing at all, would hold its connection for ever."""

    head_timeout_s = HEADER_TIMEOUT_S
    _head_timer: asyncio.TimerHandle | None = None

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timeout)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self._arm()  # (part of) a request head: the clock runs until it is complete
        else:
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def head_timeout_protocol(seconds: float) -> type[HeadTimeoutH11]:
    return type("HeadTimeoutH11", (HeadTimeoutH11,), {"head_timeout_s": float(seconds)})


class DataDirLock:
    """An exclusive lock on DATA/serve.lock: two backends must not share one job queue."""

    def __init__(self, data_dir: Path):
        self.path = data_dir / "serve.lock"
        self._fh: Any = None

    def acquire(self) -> None:
        self._fh = open(self.path, "a+")
        try:
            if os.name == "nt":
                import msvcrt

                self._fh.seek(0)
                msvcrt.locking(self._fh.fileno(), msvcrt.LK_NBLCK, 1)
            else:
                import fcntl

                fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                self._fh.seek(0)
                other = self._fh.read().strip() or "unknown"
            except OSError:  # Windows: the locked byte cannot be read by another process
                other = "unknown"
            self._fh.close()
            self._fh = None
            raise Busy(
                f"Another backend (pid {other}) is already using the data folder {self.path.parent}. Stop it, or pass another --data folder."
            ) from None
        if os.name != "nt":  # flock is advisory: record who holds it for the error message above
            self._fh.seek(0)
            self._fh.truncate()
            self._fh.write(str(os.getpid()))
            self._fh.flush()

    def release(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class _NoTraceback(logging.Formatter):
    """Console lines without tracebacks; the log file keeps them."""

    def format(self, record: logging.LogRecord) -> str:
        record = logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None})
        return super().format(record)


def setup_logging(data_dir: Path) -> Path:
    log_dir = data_dir / "logs"
    log_path = log_dir / "serve.log"
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
        file_handler = logging.handlers.RotatingFileHandler(log_path, maxBytes=5 * 2**20, backupCount=3, encoding="utf-8")
        if os.name != "nt":
            os.chmod(log_dir, 0o700)
            os.chmod(log_path, 0o600)
    except OSError as exc:
        raise DataUnwritable(f"The log file {log_path} cannot be written ({exc.strerror or exc}). Make the data folder writable by you, "
                             "or pass another --data folder.") from None
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    file_handler.setLevel(logging.DEBUG)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(_NoTraceback("%(levelname)s %(message)s"))
    console.setLevel(logging.INFO)
    for name in ("make_your_3d", "uvicorn", "uvicorn.error"):
        lg = logging.getLogger(name)
        lg.handlers = [file_handler, console]
        lg.setLevel(logging.INFO)
        lg.propagate = False
    return log_path


class _Server(uvicorn.Server):
    """uvicorn with a hook that runs once the sockets accept connections, and (TLS) a handshake
    timeout: the head timer starts only once the handshake is done, so without one a client that
    connects and never says hello would hold its connection for asyncio's default 60 s."""

    def __init__(self, config: uvicorn.Config, on_ready: Callable[[], None], handshake_timeout_s: float | None = None):
        super().__init__(config)
        self._on_ready = on_ready
        self._handshake_timeout_s = handshake_timeout_s

    def handle_exit(self, sig: int, frame: Any) -> None:
        # Stop gracefully and return, rather than uvicorn's re-raising the signal after shutdown,
        # which would kill the process before the state file is removed and the worker stopped.
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        loop = asyncio.get_running_loop()
        patched = bool(self.config.is_ssl and self._handshake_timeout_s)
        if patched:  # uvicorn has no setting for it; its create_server call gets one for this start-up only
            loop.create_server = functools.partial(loop.create_server, ssl_handshake_timeout=self._handshake_timeout_s)  # type: ignore[method-assign]
        try:
            await super().startup(sockets=sockets)
        finally:
            if patched:
                del loop.create_server
        if not self.should_exit:
            self._on_ready()


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    # proto IPPROTO_TCP (not 0): asyncio sets TCP_NODELAY only on sockets that say they are TCP, and
    # without it a response written as head + body waits ~40 ms for a delayed ACK (Nagle).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        if os.name != "nt":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen(128)
        sock.set_inheritable(False)
    except OSError as exc:
        sock.close()
        raise BindFailed(f"Cannot listen on {host}:{port} ({exc.strerror}). Pick another --port, or 0 for a free one.") from None
    return sock


def _connect_host(host: str) -> str:
    """The host a local client should dial: loopback for a wildcard bind, brackets for IPv6."""
    bare = host.strip("[]")
    if bare in ("", "0.0.0.0"):
        return "127.0.0.1"
    if bare == "::":
        return "[::1]"
    return f"[{bare}]" if ":" in bare else bare


def _watch(server: uvicorn.Server, opts: ServeOptions, worker: Worker, store: JobStore, activity: Activity, stop: threading.Event) -> None:
    """Ask the server to exit when the parent process is gone or the service has been idle too long."""
    while not stop.wait(0.5):
        if opts.parent_pid is not None and not pid_alive(opts.parent_pid):
            log.info("parent process %d is gone; stopping", opts.parent_pid)
            server.should_exit = True
            return
        if opts.idle_timeout_s is not None:
            idle = time.monotonic() - max(activity.last, worker.last_activity)
            if idle >= opts.idle_timeout_s and not worker.busy and not store.has_pending():
                log.info("idle for %.0f s; stopping", idle)
                server.should_exit = True
                return


def make_generator_factory(opts: ServeOptions) -> Callable[[], GeneratorLike]:
    def factory() -> GeneratorLike:
        from make_your_3d.pipeline.generate import Generator  # heavy (torch); loaded on the first job

        return Generator(opts.models_dir, opts.cache_dir, device=opts.device, overrides=dict(opts.overrides) or None)

    return factory


def make_worker(opts: ServeOptions, store: JobStore) -> Worker:
    """What runs the jobs: this process's one worker, or with --ray the farm of Ray workers (the
    one place that picks; Ray is imported only here, only for --ray)."""
    inputs = InputStore(opts.data_dir / "inputs")
    if opts.farm is None:
        return Worker(store, inputs, opts.data_dir / "jobs", make_generator_factory(opts), progress_interval_s=opts.progress_interval_s)
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise FarmUnavailable("Ray is not installed in the backend's environment. Install the farm extra "
                              "(pip install \"make-your-3d[farm]\") or leave --ray out.")
    from make_your_3d.service.farm import Farm

    return Farm(store, inputs, opts.data_dir / "jobs", opts.farm, models_dir=opts.models_dir, device=opts.device,  # type: ignore[return-value]
                overrides=dict(opts.overrides) or None, progress_interval_s=opts.progress_interval_s)
def remote_hosts(host: str, public_names: tuple[str, ...]) -> frozenset[str]:
    """The Host names the remote listener answers to: this machine's names and addresses (those its
    own name resolves to), the bound address, and the operator's `--public-name`s."""
    names = set(machine_names(host)) | set(public_names)
    try:
        names |= set(socket.gethostbyname_ex(socket.gethostname())[2])
    except OSError:
        pass
    return frozenset(n.strip("[]").lower().rstrip(".") for n in names if n)


def announce_tls(tls: TlsFiles, url: str, users: UserStore, data_dir: Path) -> None:
    """Print what the operator hands to artists: the URL and the certificate fingerprint to pin."""
    made = "generated" if tls.generated else "in use"
    lines = [f"Remote backend at {url} (HTTPS). Certificate {made}: {tls.cert}",
             f"  SHA-256 fingerprint (artists paste it into the add-on's Remote backend preference): {tls.fingerprint}"]
    if not users.list():
        lines.append(f"  No users yet: add one with `make-your-3d users add NAME --data {data_dir}` (it prints the user's token).")
    for line in lines:
        log.info("%s", line)


def serve(opts: ServeOptions) -> int:
    """Run the service until shutdown, a signal, the parent's exit or the idle timeout."""
    if not is_loopback(opts.host) and not opts.allow_remote:
        raise BadRequest(f"Refusing to listen on {opts.host}: only loopback is allowed. Add --allow-remote to expose the backend "
                         "(over HTTPS, with per-user tokens).")
    if not opts.allow_remote and (opts.tls_cert or opts.tls_key or opts.public_names):
        raise BadRequest("--tls-cert, --tls-key and --public-name are for the remote listener: add --allow-remote.")
    if os.name != "nt":
        os.umask(0o077)  # the database, log, inputs and results are this user's alone
    prepare_data_dir(opts.data_dir)
    log_path = setup_logging(opts.data_dir)
    lock = DataDirLock(opts.data_dir)
    try:
        lock.acquire()
    except OSError as exc:
        raise DataUnwritable(f"Cannot create the lock file in {opts.data_dir} ({exc.strerror or exc}). Pass another --data folder.") from None
    try:
        check_state_file_free(opts.state_file)
    except BaseException:
        lock.release()
        raise
    store: JobStore | None = None
    worker: Worker | None = None
    token = secrets.token_urlsafe(32)
    stop_watch = threading.Event()
    try:
        store = JobStore(opts.data_dir / "jobs.sqlite3")
        if store.moved_aside is not None:
            log.warning("the damaged job database was moved to %s; rebuilding the job list from the job folders", store.moved_aside)
        remove_leftovers(opts.data_dir, opts.cache_dir)
        restored = restore_jobs_from_folders(store, opts.data_dir / "jobs")
        if restored:
            log.info("restored %d finished job(s) from their folders (the database did not list them)", len(restored))
        interrupted = store.recover()
        if interrupted:
            log.info("marked %d job(s) interrupted by the last stop: %s", len(interrupted), ", ".join(interrupted))
        worker = make_worker(opts, store)
        activity = Activity()
        tls: TlsFiles | None = None
        remote: RemoteAccess | None = None
        if opts.allow_remote:
            tls = ensure_tls(opts.data_dir, opts.host, opts.tls_cert, opts.tls_key, TlsConfig(extra_names=opts.public_names))
            remote = RemoteAccess(UserStore(opts.data_dir), remote_hosts(opts.host, opts.public_names))
            remote.users.list()  # a damaged users file is a clear error now, not a refused request later
        sock = bind_socket(opts.host, opts.port)
        port = sock.getsockname()[1]
        url_host = _connect_host(opts.host)
        url = f"{'https' if tls else 'http'}://{url_host}:{port}"
        server_ref: list[uvicorn.Server] = []

        def request_shutdown() -> None:
            server_ref[0].should_exit = True

        budget = opts.max_job_memory_bytes or default_memory_budget()
        app = create_app(store, worker, token, models_dir=opts.models_dir, default_preset=opts.preset,
                         on_shutdown=request_shutdown, activity=activity, check_host=is_loopback(opts.host),
                         memory_budget_bytes=budget, overrides=opts.overrides, max_queued_jobs=opts.max_queued_jobs, device=opts.device,
                         remote=remote)
        open_files = raise_open_files_limit()
        limit = connection_limit(open_files)
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off", ws="none",
                                timeout_graceful_shutdown=5, timeout_keep_alive=30, limit_concurrency=limit,
                                http=head_timeout_protocol(opts.header_timeout_s), h11_max_incomplete_event_size=MAX_HEAD_BYTES,
                                # TLS: the handshake timeout is set on asyncio's create_server (see _Server)
                                loop="asyncio" if tls else "auto",
                                ssl_certfile=str(tls.cert) if tls else None, ssl_keyfile=str(tls.key) if tls else None)
        log.info("open-files limit %s, at most %d connections, request heads within %.1f s, job memory budget %s",
                 open_files if open_files is not None else "unlimited", limit, opts.header_timeout_s,
                 f"{budget / 2**30:.1f} GiB" if budget else "none")

        def on_ready() -> None:
            if tls is None:
                state = {"url": url, "token": token, "pid": os.getpid(), "version": __version__}
            else:  # no token: the remote listener takes user tokens only
                state = {"url": url, "instance": token, "fingerprint": tls.fingerprint, "pid": os.getpid(), "version": __version__,
                         "remote": True}
            write_state_file(opts.state_file, state)
            log.info("Make-Your-3D backend %s listening on %s:%d as %s (data %s, log %s)", __version__, opts.host, port, url, opts.data_dir,
                     log_path)
            if tls is not None and remote is not None:
                wildcard = opts.host.strip("[]") in ("", "0.0.0.0", "::")
                public = (opts.public_names[0] if opts.public_names else socket.getfqdn()) if wildcard else url_host
                announce_tls(tls, f"https://{public}:{port}", remote.users, opts.data_dir)

        server = _Server(config, on_ready, handshake_timeout_s=opts.header_timeout_s)
        server_ref.append(server)
        worker.start()
        watcher = threading.Thread(target=_watch, args=(server, opts, worker, store, activity, stop_watch), daemon=True, name="make3d-watch")
        watcher.start()
        server.run(sockets=[sock])
        sock.close()
        return 0
    finally:
        stop_watch.set()
        remove_state_file(opts.state_file, token)
        if worker is not None:
            worker.stop(timeout=15.0)
        if store is not None:
            store.close()
        lock.release()
        log.info("backend stopped")


def run_cli(args: Any) -> int:
    """Entry point of `make-your-3d serve` (see cli.py for the arguments)."""
    return serve(options_from_args(args))
