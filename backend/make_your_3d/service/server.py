"""`make-your-3d serve`: the process the Blender add-on starts and talks to.

Binds loopback (anything else needs --allow-remote), picks a free port for --port 0, writes the
state file (url, token, pid, version; mode 0600, atomically) only once it accepts requests, and
removes it on exit. Exits when --parent-pid is gone or after --idle-timeout idle seconds.
"""

from __future__ import annotations

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
from pathlib import Path
from typing import Any, Callable

import uvicorn

from make_your_3d import __version__
from make_your_3d.errors import BadRequest, Make3DError
from make_your_3d.paths import default_data_dir, resolve_models_dir
from make_your_3d.service.app import Activity, create_app
from make_your_3d.service.inputs import InputStore
from make_your_3d.service.store import JobStore
from make_your_3d.service.worker import GeneratorLike, Worker

log = logging.getLogger("make_your_3d.service")

CONFIG_KEYS = ("overrides", "progress_interval_s")


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
    return data


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
    )


# ---------------------------------------------------------------------------------------------
# Process plumbing
# ---------------------------------------------------------------------------------------------
def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists (without signalling it; os.kill(pid, 0) is not safe on Windows)."""
    if pid <= 0:
        return False
    if os.name == "nt":
        import ctypes

        kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return False
        try:
            code = ctypes.c_ulong()
            kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
            return code.value == 259  # STILL_ACTIVE
        finally:
            kernel32.CloseHandle(handle)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_state_file(path: Path, state: dict[str, Any]) -> None:
    """Write JSON readable only by this user: temp file created 0600 in the same folder, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".state-", suffix=".json", dir=path.parent)
    try:
        os.chmod(tmp, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_state_file(path: Path, token: str) -> None:
    """Remove the state file only if it is still ours (a newer backend may have replaced it)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if isinstance(data, dict) and data.get("token") == token:
        path.unlink(missing_ok=True)


def remove_partial_outputs(jobs_dir: Path) -> None:
    """Delete the temporary folders a killed run left beside the job folders (names start with '.').
    Safe: the data folder lock guarantees no other backend is writing here."""
    if not jobs_dir.is_dir():
        return
    for entry in jobs_dir.iterdir():
        if entry.name.startswith(".") and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
            log.info("removed partial output %s", entry.name)


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
            raise Make3DError(
                f"Another backend (pid {other}) is already using the data folder {self.path.parent}. Stop it, or pass another --data folder.",
                code="busy",
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
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / "serve.log"
    file_handler = logging.handlers.RotatingFileHandler(log_path, maxBytes=5 * 2**20, backupCount=3, encoding="utf-8")
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
    """uvicorn with a hook that runs once the sockets accept connections."""

    def __init__(self, config: uvicorn.Config, on_ready: Callable[[], None]):
        super().__init__(config)
        self._on_ready = on_ready

    def handle_exit(self, sig: int, frame: Any) -> None:
        # Stop gracefully and return, rather than uvicorn's re-raising the signal after shutdown,
        # which would kill the process before the state file is removed and the worker stopped.
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if not self.should_exit:
            self._on_ready()


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if os.name != "nt":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen(128)
        sock.set_inheritable(False)
    except OSError as exc:
        sock.close()
        raise Make3DError(f"Cannot listen on {host}:{port} ({exc.strerror}). Pick another --port, or 0 for a free one.", code="bind_failed") from None
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
    from make_your_3d.paths import default_cache_dir

    cache_dir = default_cache_dir()  # one stage cache per user, shared with `generate` and `demo`

    def factory() -> GeneratorLike:
        from make_your_3d.pipeline.generate import Generator  # heavy (torch); loaded on the first job

        return Generator(opts.models_dir, cache_dir, device=opts.device, overrides=dict(opts.overrides) or None)

    return factory


def serve(opts: ServeOptions) -> int:
    """Run the service until shutdown, a signal, the parent's exit or the idle timeout."""
    if not is_loopback(opts.host) and not opts.allow_remote:
        raise BadRequest(f"Refusing to listen on {opts.host}: only loopback is allowed. Add --allow-remote to expose the backend (the token still applies).")
    opts.data_dir.mkdir(parents=True, exist_ok=True)
    log_path = setup_logging(opts.data_dir)
    lock = DataDirLock(opts.data_dir)
    lock.acquire()
    store: JobStore | None = None
    worker: Worker | None = None
    token = secrets.token_urlsafe(32)
    stop_watch = threading.Event()
    try:
        store = JobStore(opts.data_dir / "jobs.sqlite3")
        remove_partial_outputs(opts.data_dir / "jobs")
        interrupted = store.recover()
        if interrupted:
            log.info("marked %d job(s) interrupted by the last stop: %s", len(interrupted), ", ".join(interrupted))
        worker = Worker(
            store,
            InputStore(opts.data_dir / "inputs"),
            opts.data_dir / "jobs",
            make_generator_factory(opts),
            progress_interval_s=opts.progress_interval_s,
        )
        activity = Activity()
        sock = bind_socket(opts.host, opts.port)
        port = sock.getsockname()[1]
        url_host = _connect_host(opts.host)
        url = f"http://{url_host}:{port}"
        server_ref: list[uvicorn.Server] = []

        def request_shutdown() -> None:
            server_ref[0].should_exit = True

        app = create_app(store, worker, token, models_dir=opts.models_dir, default_preset=opts.preset,
                         on_shutdown=request_shutdown, activity=activity)
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off", ws="none",
                                timeout_graceful_shutdown=5, timeout_keep_alive=30)

        def on_ready() -> None:
            write_state_file(opts.state_file, {"url": url, "token": token, "pid": os.getpid(), "version": __version__})
            log.info("Make-Your-3D backend %s listening on %s:%d as %s (data %s, log %s)", __version__, opts.host, port, url, opts.data_dir,
                     log_path)

        server = _Server(config, on_ready)
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
