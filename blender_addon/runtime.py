"""The add-on's live state while it is enabled: the backend process, worker threads and the event
queue they fill, drained on Blender's main thread.

Threads only talk HTTP and write files; every bpy change happens in `Runtime.drain`, called by a
`bpy.app.timers` function in the UI and directly (synchronously) in background mode and tests.
There is exactly one Runtime, created by register() and shut down by unregister().
"""

from __future__ import annotations

import enum
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import bpy

from .backend import (BackendConfig, BackendError, BackendInfo, BackendProcess, BackendState, build_env, bundled_backend_root,
                      missing_modules, packages_problem, python_problem, venv_python)
from .client import ApiError, Client, Endpoint, normalise_fingerprint, watch_job
from .progress import FALLBACK_PLAN, StagePlan, StageTimes
from .tasks import Step, SubprocessTask

PACKAGE = __package__
# What the add-on keeps of a finished job: the mesh, its thumbnail, its record (device, timings,
# inputs) and the prepared input image (History > Recall loads it when the original is gone).
RESULT_FILES = ("subject.glb", "preview.png", "job.json", "input.png")
REQUIRED_RESULT_FILES = ("subject.glb",)
# Preferences the backend reads only when it starts.
RESTART_FIELDS = ("python", "models_dir", "data_dir", "port", "device", "precision", "config_file")


class EventKind(str, enum.Enum):
    """What a worker thread tells the main thread."""

    SUBMITTED = "submitted"  # the backend accepted jobs: data {ids, group, request}
    RECORD = "record"  # a job's progress record: data {record}
    SYNC = "sync"  # a job record found at (re)connection: data {record}; watch or fetch it
    WANT_FILES = "want_files"  # a job finished: data {files}; the main thread decides to fetch
    FILES = "files"  # a job's files are on disk: data {folder, files, import}
    LOST = "lost"  # contact with a watched job was lost: data {message}
    ERROR = "error"  # a failure to show: data {message, code?}
    INFO = "info"  # a message to show: data {message}
    MODELS = "models"  # the model state changed; redraw
    CANCEL_FAILED = "cancel_failed"  # the backend refused or missed a cancel: the job is no longer "cancelling"


@dataclass(frozen=True)
class Event:
    """A message from a worker thread to the main thread (`jobs.apply_event` handles each kind)."""

    kind: "EventKind"
    job_id: str = ""
    scene: str = ""
    data: dict = field(default_factory=dict)


def addon_prefs(context: bpy.types.Context | None = None):
    context = context or bpy.context
    addon = context.preferences.addons.get(PACKAGE)
    return addon.preferences if addon is not None else None


def remote_settings(prefs) -> tuple[Endpoint | None, str | None]:
    """The remote backend the preferences name, or why they name none usable (None, None: local mode).
    A token travels only over HTTPS (plain HTTP only to this machine, e.g. an SSH tunnel)."""
    if prefs is None or getattr(prefs, "backend_mode", "LOCAL") != "REMOTE":
        return None, None
    from urllib.parse import urlsplit

    url = prefs.remote_url.strip().rstrip("/")
    where = "Preferences > Add-ons > Make-Your-3D > Remote backend"
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        parts.port  # noqa: B018 (raises on a bad port)
    except ValueError:
        return None, f"The remote backend URL {url[:80]!r} is not a URL: set it in {where}"
    if not url:
        return None, f"No remote backend URL: set it (https://HOST:PORT) in {where}"
    if parts.scheme not in ("https", "http") or not host:
        return None, f"The remote backend URL must look like https://HOST:PORT: fix it in {where}"
    if parts.scheme == "http" and host not in ("127.0.0.1", "localhost", "::1"):
        return None, f"A remote backend must be reached over https:// (the token would travel in clear): fix the URL in {where}"
    if not prefs.remote_token.strip():
        return None, f"No user token: paste the one the backend's operator gave you into {where}"
    fingerprint = prefs.remote_fingerprint.strip()
    if fingerprint and not normalise_fingerprint(fingerprint):
        return None, f"The certificate fingerprint is not a SHA-256 fingerprint (64 hex digits, colons allowed): fix it in {where}"
    return Endpoint(url, prefs.remote_token.strip(), fingerprint), None


def user_dir() -> Path:
    """Per-user folder for the venv, the state file and logs (Blender's extension user folder)."""
    try:
        path = bpy.utils.extension_path_user(PACKAGE, create=True)
    except (ValueError, AttributeError):  # running as a legacy add-on from a checkout
        path = bpy.utils.user_resource("DATAFILES", path="make_your_3d", create=True)
    return Path(path)


class Runtime:
    """The add-on's link to its backend: the process, worker threads and the queue of their events.
    `apply_event` (jobs.apply_event) applies one event to bpy data on the main thread; it is handed
    in, so this module never imports the job flow that uses it."""

    def __init__(self, base_dir: Path, apply_event: Callable[["Runtime", Event], None]):
        self.base_dir = base_dir
        self._apply_event = apply_event
        self._stage_plan: StagePlan = FALLBACK_PLAN
        self.fill_second = -1  # the wall-clock second the running bars were last moved on (jobs.refresh_running)
        self._record_seen: dict[str, float] = {}  # job id -> time.monotonic() its last record arrived (main thread)
        self.backend = BackendProcess()
        self.events: queue.Queue[Event] = queue.Queue()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._watchers: dict[str, threading.Thread] = {}
        self._models: dict | None = None
        self._models_error: str | None = None
        self._pending = 0
        self.install_task: SubprocessTask | None = None
        self.fetch_task: SubprocessTask | None = None
        self.selftest_task: SubprocessTask | None = None
        self.selftest_report = ""  # the self-test's verdict line (pass/fail, seconds, peak memory)
        self._previews = None
        self._last_backend_status = ""
        self._adopted = False
        self.stage_times = StageTimes(base_dir / "stage_times.json")
        self._python_checks: dict[tuple[str, int], str | None] = {}
        self._cache_info: dict | None = None
        self._last_cfg: BackendConfig | None = None  # what the backend was last started with (read by worker threads)
        self._gpu_kind: str | None = None  # "cuda" or "cpu" once nvidia-smi was asked (job_estimate)
        self._gpu_probe_started = False
        # the Remote backend preference, copied on the main thread (configure_remote) for worker threads
        self._remote_mode = False
        self._remote: Endpoint | None = None
        self._remote_problem: str | None = None
        self._remote_checked = ""  # what the last connection test said

    # -- paths and configuration (main thread) ------------------------------------------------
    @property
    def state_file(self) -> Path:
        return self.base_dir / "backend_state.json"

    @property
    def log_file(self) -> Path:
        return self.base_dir / "backend.log"

    @property
    def venv_dir(self) -> Path:
        return self.base_dir / "venv"

    def python_for(self, prefs) -> str:
        if prefs is not None and prefs.python_path:
            return bpy.path.abspath(prefs.python_path)
        managed = venv_python(self.venv_dir)
        return str(managed) if managed.is_file() else ""

    def data_dir_for(self, prefs) -> Path:
        if prefs is not None and prefs.data_dir:
            return Path(bpy.path.abspath(prefs.data_dir))
        return self.base_dir / "data"

    def results_dir(self, prefs, job_id: str) -> Path:
        return self.data_dir_for(prefs) / "blender_results" / job_id

    def backend_config(self, prefs) -> BackendConfig:
        return BackendConfig(
            python=self.python_for(prefs),
            models_dir=bpy.path.abspath(prefs.models_dir) if prefs is not None and prefs.models_dir else "",
            data_dir=self.data_dir_for(prefs),
            state_file=self.state_file,
            log_file=self.log_file,
            port=int(prefs.port) if prefs is not None else 0,
            device=prefs.device if prefs is not None else "auto",
            precision=prefs.precision if prefs is not None else "auto",
            parent_pid=os.getpid(),
            source_root=bundled_backend_root(),
            config_file=bpy.path.abspath(prefs.config_file) if prefs is not None and prefs.config_file else "",
        )

    def python_problem(self, prefs) -> str | None:
        """Why the backend Python cannot run the backend: missing, not executable, or lacking packages.
        The package check runs the interpreter once per path and modification time (cached)."""
        python = self.python_for(prefs)
        problem = python_problem(python)
        if problem:
            return problem
        try:
            stamp = (python, os.stat(python).st_mtime_ns)
        except OSError:
            stamp = (python, 0)
        if stamp not in self._python_checks:
            cfg = self.backend_config(prefs)
            self._python_checks[stamp] = packages_problem(python, missing_modules(python, build_env(cfg)))
        return self._python_checks[stamp]

    def restart_needed(self, prefs) -> bool:
        """True when preferences changed since the running backend started (device, models, port...)."""
        started = self.backend.started_config
        if started is None or prefs is None:
            return False
        now = self.backend_config(prefs)
        return any(getattr(started, f) != getattr(now, f) for f in RESTART_FIELDS)

    # -- the remote backend ------------------------------------------------------------------
    def configure_remote(self, prefs) -> None:
        """Copy the Remote backend preference (main thread: it reads bpy data) for the worker threads.
        A changed endpoint loads its schema, models and this user's jobs in a thread."""
        endpoint, problem = remote_settings(prefs)
        mode = prefs is not None and getattr(prefs, "backend_mode", "LOCAL") == "REMOTE"
        with self._lock:
            changed = endpoint != self._remote
            self._remote_mode, self._remote, self._remote_problem = mode, endpoint, problem
            if changed:
                self._remote_checked = ""
        if changed and endpoint is not None:
            self._spawn(lambda: self._after_connect(Client(endpoint)), "remote")

    @property
    def remote(self) -> Endpoint | None:
        with self._lock:
            return self._remote if self._remote_mode else None

    def backend_label(self) -> str:
        """What the history records as where a job ran: 'local' or the remote URL."""
        remote = self.remote
        return remote.url if remote is not None else "local"

    def test_remote(self) -> None:
        """Preferences > Test Connection: health, then the token (GET /v1/jobs), pinned as every request."""
        remote = self.remote

        def work() -> None:
            if remote is None:
                return
            try:
                client = Client(remote)
                version = client.health(timeout=10.0).get("version", "?")
                count = len(client.jobs())
                text = f"Connected to {remote.url} (backend {version}); {count} job(s) of yours there"
            except ApiError as exc:
                text = exc.message
                self.events.put(Event(EventKind.ERROR, data={"message": text, "code": exc.code}))
            else:
                self.events.put(Event(EventKind.INFO, data={"message": text}))
            with self._lock:
                self._remote_checked = text

        self._spawn(work, "remote-test")

    @property
    def remote_checked(self) -> str:
        with self._lock:
            return self._remote_checked

    # -- state read by the UI -----------------------------------------------------------------
    def backend_state(self) -> BackendState:
        with self._lock:
            mode, remote, problem = self._remote_mode, self._remote, self._remote_problem
        if mode:  # the remote backend is someone else's process: "running" as far as the add-on can act
            if remote is None:
                return BackendState("stopped", problem or "The remote backend is not set up")
            return BackendState("running", f"Remote backend at {remote.url}",
                                BackendInfo(remote.url, remote.token, 0, "", remote.fingerprint))
        if not self._adopted:
            self._adopted = True
            self.backend.adopt(self.state_file)
        return self.backend.state()

    def remote_problem(self) -> str | None:
        """Why the Remote backend preference cannot be used (None: it can, or local mode)."""
        with self._lock:
            return self._remote_problem if self._remote_mode else None

    @property
    def models(self) -> dict | None:
        with self._lock:
            return self._models

    @property
    def models_error(self) -> str | None:
        with self._lock:
            return self._models_error

    @property
    def pending(self) -> int:
        with self._lock:
            return self._pending

    def client(self) -> Client:
        st = self.backend_state()  # the remote backend's endpoint in remote mode
        if st.info is None:
            raise ApiError("unreachable", "The backend is not running; start it in Preferences > Add-ons > Make-Your-3D.")
        return Client(st.info.endpoint)

    # -- backend lifecycle ----------------------------------------------------------------------
    def start_backend(self, prefs) -> None:
        """Start the service (returns at once) and, once it answers, load model state and job status."""
        problem = self.python_problem(prefs)
        if problem:
            raise BackendError(problem)
        cfg = self.backend_config(prefs)
        self.backend.start(cfg)
        self._last_cfg = cfg
        self._spawn(self._after_ready, "ready")

    def stop_backend(self) -> None:
        self.backend.stop()
        with self._lock:
            self._models = None

    def _ready_client(self, timeout: float = 180.0) -> Client:
        remote = self.remote
        if remote is not None:
            return Client(remote)
        problem = self.remote_problem()
        if problem:
            raise BackendError(problem)
        info = self.backend.wait_ready(timeout=timeout, stop=self._stop)
        return Client(info.endpoint)

    def _after_ready(self) -> None:
        try:
            client = self._ready_client()
        except BackendError as exc:
            self.events.put(Event(EventKind.INFO, data={"message": str(exc)}))
            return
        self._after_connect(client)
        if self._last_cfg is not None:
            self._cache_run(self._last_cfg, "info")  # the cache size shows without a click

    def _after_connect(self, client: Client) -> None:
        """What the add-on learns from a backend it (re)connects to: stages, weights, jobs."""
        self._load_schema(client)
        self._load_models(client)
        self._sync_jobs(client)

    def _load_models(self, client: Client) -> None:
        try:
            models = client.models()
            err = None
        except ApiError as exc:
            models, err = None, exc.message
        with self._lock:
            self._models, self._models_error = models, err
        self.events.put(Event(EventKind.MODELS))

    def _load_schema(self, client: Client) -> None:
        """The backend's stage list (names, labels, sub-stages) for the progress bars; a backend that
        does not publish one keeps the fallback."""
        try:
            plan = StagePlan.from_schema(client.schema().get("stages"))
        except (ApiError, AttributeError):
            plan = None
        with self._lock:
            self._stage_plan = plan or FALLBACK_PLAN

    def stage_plan(self) -> StagePlan:
        with self._lock:
            return self._stage_plan

    def refresh_models(self) -> None:
        self._spawn(lambda: self._load_models(self._ready_client(10.0)), "models")

    def _sync_jobs(self, client: Client) -> None:
        """After a (re)start: refresh every job the history knows from the service's records."""
        try:
            records = client.jobs()
        except ApiError as exc:
            self.events.put(Event(EventKind.INFO, data={"message": exc.message}))
            return
        for record in records:
            self.events.put(Event(EventKind.SYNC, job_id=str(record.get("id")), data={"record": record}))

    def sync(self) -> None:
        self._spawn(lambda: self._sync_jobs(self._ready_client(10.0)), "sync")

    # -- jobs -----------------------------------------------------------------------------------
    def submit(self, scene_name: str, payload: dict, prefs, local: dict | None = None) -> None:
        """Start the backend if needed, POST the job(s), then follow each one (all in a thread).
        `local`: what the history keeps beside the request (e.g. the image datablock's name)."""
        self.configure_remote(prefs)
        if self.remote_problem():
            raise BackendError(self.remote_problem())
        local = {**(local or {}), "backend": self.backend_label()}
        if self.remote is None and self.backend.state().status not in ("running", "starting"):
            self.start_backend(prefs)
        with self._lock:
            self._pending += 1
        self._spawn(lambda: self._submit(scene_name, payload, dict(local or {})), "submit")

    def _submit(self, scene_name: str, payload: dict, local: dict) -> None:
        try:
            client = self._ready_client()
            reply = client.submit(payload)
            request = {**{k: v for k, v in payload.items() if k != "image_png_b64"}, **local}
            self.events.put(Event(EventKind.SUBMITTED, scene=scene_name, data={"ids": list(reply["ids"]), "group": reply.get("group", ""),
                                                                              "seeds": list(reply.get("seeds") or []), "request": request}))
            for job_id in reply["ids"]:
                self.watch(job_id)
        except (ApiError, BackendError) as exc:
            self.events.put(Event(EventKind.ERROR, scene=scene_name, data={"message": getattr(exc, "message", str(exc)), "code": getattr(exc, "code", "backend")}))
        finally:
            with self._lock:
                self._pending -= 1

    def rerun(self, scene_name: str, job_id: str, changes: dict, request: dict, prefs=None) -> None:
        """Start the backend if it is down (as Generate does), then ask it to re-run the job."""
        if prefs is not None:
            self.configure_remote(prefs)
        request = {**request, "backend": self.backend_label()}
        if prefs is not None and self.remote is None and self.backend.state().status not in ("running", "starting"):
            self.start_backend(prefs)
        with self._lock:
            self._pending += 1

        def work() -> None:
            try:
                reply = self._ready_client().rerun(job_id, changes)
                self.events.put(Event(EventKind.SUBMITTED, scene=scene_name, data={"ids": list(reply["ids"]), "group": reply.get("group", ""),
                                                                                  "seeds": list(reply.get("seeds") or []), "request": {**request, **changes}}))
                for new_id in reply["ids"]:
                    self.watch(new_id)
            except (ApiError, BackendError) as exc:
                self.events.put(Event(EventKind.ERROR, scene=scene_name, data={"message": getattr(exc, "message", str(exc))}))
            finally:
                with self._lock:
                    self._pending -= 1

        self._spawn(work, "rerun")

    def cancel(self, job_id: str) -> None:
        def work() -> None:
            try:
                self.events.put(Event(EventKind.RECORD, job_id=job_id, data={"record": self.client().cancel(job_id)}))
            except ApiError as exc:
                self.events.put(Event(EventKind.ERROR, data={"message": exc.message}))
                self.events.put(Event(EventKind.CANCEL_FAILED, job_id=job_id))

        self._spawn(work, "cancel")

    def watch(self, job_id: str) -> None:
        with self._lock:
            thread = self._watchers.get(job_id)
            if thread is not None and thread.is_alive():
                return
            thread = threading.Thread(target=self._watch, args=(job_id,), name=f"make_your_3d:watch:{job_id}", daemon=True)
            self._watchers[job_id] = thread
        thread.start()

    def _backend_alive(self) -> bool:
        if self.remote is not None:
            return True  # another machine's process: only its answers tell (watch_job gives up after 20 s without)
        return self.backend.state().status in ("running", "starting")

    def _watch(self, job_id: str) -> None:
        try:
            client = self.client()
            final = watch_job(client, job_id, lambda r: self.events.put(Event(EventKind.RECORD, job_id=job_id, data={"record": r})), self._stop,
                              alive=self._backend_alive)
        except ApiError as exc:
            self.events.put(Event(EventKind.LOST, job_id=job_id, data={"message": exc.message}))
            return
        if final is None and not self._stop.is_set():
            self.events.put(self._lost_event(job_id))
            return
        if final is None:
            return
        if final.get("status") == "done":
            self.events.put(Event(EventKind.WANT_FILES, job_id=job_id, data={"files": list(final.get("files") or [])}))

    def _lost_event(self, job_id: str) -> Event:
        """What losing a job's backend means: a crash (its process is gone: the job is interrupted, and
        the reason is the backend's) or a backend that is alive but not answering (still running there)."""
        if self.remote is not None:
            return Event(EventKind.LOST, job_id=job_id, data={
                "crashed": False, "message": f"The remote backend at {self.remote.url} has not answered for 20 s; the job continues "
                                             "there. Refresh the history to follow it again"})
        st = self.backend.state()
        if st.status in ("crashed", "stopped"):
            return Event(EventKind.LOST, job_id=job_id, data={"crashed": True, "message": st.message})
        return Event(EventKind.LOST, job_id=job_id, data={
            "crashed": False, "message": "The backend is running but has not answered for 20 s (busy?); the job continues there. "
                                         "Refresh the history to follow it again"})

    def download(self, job_id: str, folder: Path, files: list[str], then_import: bool) -> None:
        """Fetch subject.glb and preview.png into `folder` (thread), then tell the main thread."""

        def work() -> None:
            try:
                client = self.client()
                got = {}
                for name in RESULT_FILES:
                    if not files or name in files:
                        try:
                            got[name] = str(client.download(job_id, name, folder / name))
                        except ApiError:
                            if name in REQUIRED_RESULT_FILES:
                                raise
                self.events.put(Event(EventKind.FILES, job_id=job_id, data={"folder": str(folder), "files": got, "import": then_import}))
            except (ApiError, OSError) as exc:
                self.events.put(Event(EventKind.ERROR, job_id=job_id, data={"message": getattr(exc, "message", str(exc))}))

        self._spawn(work, "download")

    def _spawn(self, fn: Callable[[], None], name: str) -> threading.Thread:
        def guarded() -> None:
            try:
                fn()
            except (ApiError, BackendError) as exc:
                self.events.put(Event(EventKind.ERROR, data={"message": getattr(exc, "message", str(exc))}))
            except Exception as exc:  # a worker must never die silently
                self.events.put(Event(EventKind.ERROR, data={"message": f"Internal error in {name}: {exc!r}"}))

        thread = threading.Thread(target=guarded, name=f"make_your_3d:{name}", daemon=True)
        thread.start()
        return thread

    # -- helper commands --------------------------------------------------------------------------
    def install_backend(self, base_python: str) -> SubprocessTask:
        """Create the managed venv and pip-install the bundled backend into it."""
        import shutil
        import tempfile

        root = bundled_backend_root()
        if root is None:
            raise BackendError("The bundled backend source is missing from the add-on; reinstall the extension")
        staging = Path(tempfile.mkdtemp(prefix="make_your_3d_src_"))
        for name in ("pyproject.toml", "README.md", "LICENSE"):
            if (root / name).is_file():
                shutil.copy2(root / name, staging / name)
        if not (staging / "README.md").exists():
            (staging / "README.md").write_text("Make-Your-3D backend\n", encoding="utf-8")
        shutil.copytree(root / "backend" / "make_your_3d", staging / "backend" / "make_your_3d",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "tests"))
        py = str(venv_python(self.venv_dir))
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONHOME", "PYTHONPATH", "PYTHONEXECUTABLE")}
        cuda_builds = load_cuda_builds(root)
        gpu = cuda_builds.query_gpu()
        choice = cuda_builds.choose(gpu) if gpu is not None else None
        steps = install_steps(base_python, py, str(staging), str(self.venv_dir), env, gpu, choice)
        # no build for this card or driver: say what to do (the install goes on with pip's default torch)
        advice = f" {choice.message}" if choice is not None and choice.build is None else ""

        def done(st) -> None:
            # the last step prints which torch build went in (CUDA x.y or CPU) or the GPU check's result
            self._python_checks.clear()
            self.events.put(Event(EventKind.INFO, data={"message": (st.error or f"Backend installed: {st.line}") + advice}))

        self.install_task = SubprocessTask("install", steps, self.base_dir / "install.log", on_done=done).start()
        return self.install_task

    def fetch_models(self, prefs) -> SubprocessTask:
        cfg = self.backend_config(prefs)
        cmd = [cfg.python, "-m", "make_your_3d", "models", "fetch"]
        if cfg.models_dir:
            cmd += ["--models", cfg.models_dir]
        if prefs is not None and prefs.hf_token:
            cmd += ["--token", prefs.hf_token]
        self.fetch_task = SubprocessTask("fetch", [Step("Download model weights", cmd, build_env(cfg))], self.base_dir / "fetch.log",
                                         on_done=self._fetch_done).start()
        return self.fetch_task

    @property
    def cache_info(self) -> dict | None:
        with self._lock:
            return self._cache_info

    def cache_command(self, prefs, action: str) -> None:
        """`make-your-3d cache info|clear --json` with the backend's Python (thread); the answer
        (path, bytes, entries) lands in `cache_info`, a failure in the panel's message."""
        self._cache_run(self.backend_config(prefs), action)

    def _cache_run(self, cfg: BackendConfig, action: str) -> None:
        """The thread behind cache_command; takes a config, never bpy data (safe off the main thread)."""
        cmd = [cfg.python, "-m", "make_your_3d", "cache", action, "--json"]
        env = build_env(cfg)

        def work() -> None:
            import json
            import subprocess

            out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, stdin=subprocess.DEVNULL,
                                 creationflags=0x08000000 if os.name == "nt" else 0)
            if out.returncode != 0:
                last = (out.stderr.strip().splitlines() or ["no output"])[-1]
                self.events.put(Event(EventKind.ERROR, data={"message": f"Cache {action} failed: {last}"}))
                return
            info = json.loads(out.stdout.strip().splitlines()[-1])
            message = None
            if action == "clear":
                message = f"Cleared the stage cache: {info.get('entries', 0)} stage result(s), {format_bytes(int(info.get('bytes', 0)))}"
                info = {**info, "bytes": 0, "entries": 0, "stages": {}}
            with self._lock:
                self._cache_info = info
            if message:  # after the new info is in place: whoever reads the message sees it
                self.events.put(Event(EventKind.INFO, data={"message": message}))
            self.events.put(Event(EventKind.MODELS))

        self._spawn(work, f"cache-{action}")

    def test_device(self, prefs) -> SubprocessTask:
        """`make-your-3d doctor --selftest` on the preferences' device and precision (about a minute, no
        weights needed): whether the backend works on this machine, before any download."""
        cfg = self.backend_config(prefs)
        cmd = [cfg.python, "-m", "make_your_3d", "doctor", "--selftest", "--device", cfg.device, "--precision", cfg.precision]
        log = self.base_dir / "selftest.log"
        self.selftest_report = ""

        def done(st) -> None:
            try:
                text = log.read_text(encoding="utf-8", errors="replace")
            except OSError:
                text = ""
            lines = [x for x in text.splitlines() if x.startswith("Self-test on")]
            detail = text.split(lines[-1], 1)[1].strip().splitlines()[0].strip() if lines else ""
            self.selftest_report = (f"{lines[-1]} {detail}" if lines else (st.error or "The self-test did not report"))[:300]
            self.events.put(Event(EventKind.INFO, data={"message": self.selftest_report}))

        self.selftest_task = SubprocessTask("selftest", [Step("Test the device", cmd, build_env(cfg))], log, on_done=done).start()
        return self.selftest_task

    def _fetch_done(self, st) -> None:
        self.events.put(Event(EventKind.INFO, data={"message": st.error or "Model weights fetched"}))
        if self.backend.state().status == "running":
            self._load_models(self.client())

    # -- main thread --------------------------------------------------------------------------------
    def previews(self):
        if self._previews is None:
            import bpy.utils.previews

            self._previews = bpy.utils.previews.new()
        return self._previews

    def preview_icon(self, item) -> int:
        """Icon id of a job's preview.png (0 when there is none yet)."""
        if not item.folder:
            return 0
        path = Path(item.folder) / "preview.png"
        coll = self.previews()
        if item.job_id in coll:
            return coll[item.job_id].icon_id
        if not path.is_file():
            return 0
        return coll.load(item.job_id, str(path), "IMAGE").icon_id

    def forget_preview(self, job_id: str) -> None:
        if self._previews is not None and job_id in self._previews:
            del self._previews[job_id]

    def drain(self, max_items: int | None = None) -> int:
        """Apply queued worker events to bpy data; main thread only. Returns how many were applied."""
        n = 0
        while max_items is None or n < max_items:
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                break
            self._apply_event(self, event)
            n += 1
        return n

    def saw_record(self, job_id: str) -> None:
        self._record_seen[job_id] = time.monotonic()

    def since_record(self, job_id: str) -> float:
        """Seconds since the job's last record arrived (0 when none has this session)."""
        seen = self._record_seen.get(job_id)
        return time.monotonic() - seen if seen is not None else 0.0

    def wait_until(self, predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
        """Drain until `predicate()` holds (background mode and tests, where no timers run)."""
        deadline = time.monotonic() + timeout
        while True:
            self.drain()
            if predicate():
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(interval)

    def job_estimate(self, preset: str, device_pref: str, last_device: str = ""):
        """estimate.py's expected duration for the panel, or None while the device kind is unknown.
        The kind: the last job's device, else the preference, else whether nvidia-smi answers (asked
        once, in a thread: draw must not wait on a subprocess)."""
        kind = last_device.split(":")[0]  # "cuda:0" -> "cuda"; "mps" has no figures (estimate returns None)
        if not kind and device_pref != "auto":
            kind = device_pref
        if not kind:
            with self._lock:
                kind = self._gpu_kind
                if kind is None and not self._gpu_probe_started:
                    self._gpu_probe_started = True
                    self._spawn(self._probe_gpu, "gpu-probe")
        if not kind:
            return None
        return load_backend_module("estimate.py").estimate(preset, kind)

    def _probe_gpu(self) -> None:
        """What "auto" will pick: CUDA with a card a build fits, Apple's GPU on a Mac, else the CPU."""
        import sys

        gpu = load_cuda_builds().query_gpu()
        usable = gpu is not None and load_cuda_builds().choose(gpu).build is not None
        with self._lock:
            self._gpu_kind = "cuda" if usable else "mps" if sys.platform == "darwin" else "cpu"

    def status_changed(self) -> bool:
        st = self.backend.state().status
        changed = st != self._last_backend_status
        self._last_backend_status = st
        return changed

    def shutdown(self) -> None:
        """Stop threads and the backend this add-on started; free previews."""
        self._stop.set()
        for task in (self.install_task, self.fetch_task, self.selftest_task):
            if task is not None:
                task.cancel()
        if self.backend.state().status in ("running", "starting"):
            self.backend.stop()
        for thread in list(self._watchers.values()):
            thread.join(timeout=2.0)
        if self._previews is not None:
            import bpy.utils.previews

            bpy.utils.previews.remove(self._previews)
            self._previews = None


def format_bytes(n: int) -> str:
    """`n` bytes for the panel, as the backend's `make_your_3d.files.human_bytes` writes them. A copy on
    purpose: the add-on runs in Blender's Python (bpy + standard library) and never imports the backend."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


TORCH_REPORT = ("import importlib; t = importlib.import_module('torch'); print('torch', t.__version__, "
                "'(CUDA ' + t.version.cuda + ' build)' if t.version.cuda else '(CPU-only build)', "
                "'- GPU found' if t.cuda.is_available() else '- no GPU in use')")


def load_backend_module(filename: str, root: Path | None = None):
    """One of the backend's standard-library-only modules (`cuda_builds.py`, `estimate.py`), loaded by
    path from the bundled backend source: one copy serves the add-on and the backend, while the
    add-on never imports the backend package."""
    import importlib.util
    import sys

    root = root or bundled_backend_root()
    if root is None:
        raise BackendError("The bundled backend source is missing from the add-on; reinstall the extension")
    name = f"_make_your_3d_addon_{Path(filename).stem}"
    if name in sys.modules:  # dataclasses need the module registered while it runs
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, root / "backend" / "make_your_3d" / filename)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_cuda_builds(root: Path | None = None):
    """The backend's CUDA build table (backend/make_your_3d/cuda_builds.py)."""
    return load_backend_module("cuda_builds.py", root)


def install_steps(base_python: str, py: str, source: str, venv: str, env: dict, gpu=None, choice=None) -> list[Step]:
    """Install Backend, step by step. With an NVIDIA GPU (`gpu`, `choice` from cuda_builds), the PyTorch
    CUDA build that fits the card and driver goes in first (the backend's own install then keeps it) and
    the last step runs one small matmul on the GPU; otherwise the last step says which build went in."""
    steps = [
        Step("Create virtual environment", [base_python, "-m", "venv", venv], env),
        Step("Update pip", [py, "-m", "pip", "install", "--upgrade", "pip"], env),
    ]
    build = choice.build if choice is not None else None
    if gpu is not None and build is not None:
        steps.append(Step(f"Install PyTorch {build.spec} for the {gpu.name} (CUDA {build.cuda_text})",
                          [py, "-m", "pip", "install", *build.pip_args], env))
    steps.append(Step("Install backend and dependencies", [py, "-m", "pip", "install", source], env))
    if gpu is not None and build is not None:
        steps.append(Step("Check the GPU", [py, "-c", load_cuda_builds().verify_script(gpu.name, build.tag)], env))
    else:
        steps.append(Step("Check the PyTorch build", [py, "-c", TORCH_REPORT], env))
    return steps


# The one live Runtime while the add-on is enabled (set by register, cleared by unregister).
_CURRENT: dict[str, Runtime] = {}


def get() -> Runtime | None:
    return _CURRENT.get("runtime")


def set_current(runtime: Runtime | None) -> None:
    if runtime is None:
        _CURRENT.pop("runtime", None)
    else:
        _CURRENT["runtime"] = runtime
