"""Supervision of the backend service process (standard library only; no bpy).

The add-on launches `python -m make_your_3d serve --port 0 --state-file F --parent-pid <blender>`
with the bundled backend source first on PYTHONPATH, sends its output to a log file, and learns
the URL and bearer token from the state file the service writes when it is ready. `--parent-pid`
makes the service exit with Blender even if the add-on never gets to stop it.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .client import ApiError, Client, Endpoint

ADDON_DIR = Path(__file__).resolve().parent


class BackendError(Exception):
    """The backend could not be started or reached; the message says what to do."""


@dataclass(frozen=True)
class BackendConfig:
    python: str
    models_dir: str
    data_dir: Path
    state_file: Path
    log_file: Path
    port: int = 0
    device: str = "auto"
    precision: str = "auto"
    parent_pid: int | None = None
    source_root: Path | None = None
    config_file: str = ""  # the artist's own `serve --config` JSON (optional)


@dataclass(frozen=True)
class BackendInfo:
    url: str
    token: str
    pid: int
    version: str
    fingerprint: str = ""  # a remote backend's certificate fingerprint (the pin)

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(self.url, self.token, self.fingerprint)


@dataclass(frozen=True)
class BackendState:
    status: str  # stopped | starting | running | crashed
    message: str
    info: BackendInfo | None = None


def bundled_backend_root(addon_dir: Path = ADDON_DIR) -> Path | None:
    """The folder holding `backend/make_your_3d` (and pyproject.toml): `backend_src/` inside the
    built extension, or the repository root when the add-on runs from a checkout."""
    for root in (addon_dir / "backend_src", addon_dir.parent):
        if (root / "backend" / "make_your_3d" / "__main__.py").is_file():
            return root
    return None


def venv_python(venv_dir: Path) -> Path:
    return venv_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def python_problem(python: str) -> str | None:
    """Why this interpreter cannot run the backend, or None."""
    if not python:
        return "No backend Python is set: press Install backend in Preferences > Add-ons > Make-Your-3D, or pick a Python"
    path = Path(python).expanduser()
    if not path.is_file():
        return f"Backend Python {path} does not exist: fix it in Preferences > Add-ons > Make-Your-3D"
    if os.name != "nt" and not os.access(path, os.X_OK):
        return f"Backend Python {path} is not executable"
    return None


# Modules the backend cannot start or run a job without (their import names).
REQUIRED_MODULES = ("torch", "diffusers", "transformers", "safetensors", "fastapi", "uvicorn", "platformdirs", "PIL",
                    "trimesh", "xatlas")


def missing_modules(python: str, env: dict[str, str] | None = None, timeout: float = 30.0) -> list[str] | None:
    """Which of REQUIRED_MODULES `python` cannot find (found by import machinery, not imported, so it
    takes a fraction of a second). None when the interpreter cannot be run at all."""
    code = ("import importlib.util as u, json, sys; mods = sys.argv[1:]; "
            "print(json.dumps([m for m in mods if u.find_spec(m) is None]))")
    try:
        out = subprocess.run([python, "-c", code, *REQUIRED_MODULES], capture_output=True, text=True, timeout=timeout,
                             env=env, stdin=subprocess.DEVNULL, creationflags=0x08000000 if os.name == "nt" else 0)
        found = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None
    return [str(m) for m in found] if isinstance(found, list) else None


def packages_problem(python: str, missing: list[str] | None) -> str | None:
    if missing is None:
        return f"Backend Python {python} does not run: pick another Python, or press Install Backend in Preferences > Add-ons > Make-Your-3D"
    if missing:
        names = ", ".join("pillow" if m == "PIL" else m for m in missing)
        return (f"Backend Python lacks packages ({names}): press Install Backend in Preferences > Add-ons > Make-Your-3D, "
                "or pick a Python that has them")
    return None


def missing_module_in_log(text: str) -> str | None:
    """The package a crashed backend could not import, from its log."""
    import re

    found = re.findall(r"No module named '([\w.]+)'", text)
    return found[-1].split(".")[0] if found else None


_ERROR_WORDS = ("Error", "ERROR", "Exception", "Traceback", "Killed", "Segmentation fault", "Aborted", "out of memory", "CRITICAL")


def last_error_line(text: str) -> str | None:
    """The last line of a backend log that reports a failure (an exception's last line, an ERROR log
    line, the kernel's "Killed"), never a progress bar or an INFO line; None when there is none."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if not line or "%|" in line or "it/s]" in line or line.startswith("--- starting backend"):
            continue
        if any(word in line for word in _ERROR_WORDS) and not line.startswith("Traceback"):
            return line[:300]
    return None


def exit_reason(code: int | None) -> str:
    """What an exit code says, in words: a negative code is the signal that ended the process."""
    if code is None:
        return "it stopped answering"
    if code < 0:
        import signal

        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        cause = " (the system's out-of-memory handler or a kill command)" if name == "SIGKILL" else ""
        return f"it was killed by {name}{cause}"
    return f"it exited with code {code}"


def read_state_file(path: Path) -> BackendInfo | None:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return BackendInfo(url=str(data["url"]), token=str(data["token"]), pid=int(data["pid"]), version=str(data.get("version", "")))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if os.name == "nt":
        import ctypes

        handle = ctypes.windll.kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return False
        code = ctypes.c_ulong()
        ctypes.windll.kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        ctypes.windll.kernel32.CloseHandle(handle)
        return code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def merged_config_path(cfg: BackendConfig) -> Path:
    return cfg.state_file.with_name("serve_config.json")


def write_serve_config(cfg: BackendConfig) -> Path | None:
    """The `serve --config` file: the artist's config file plus the precision preference
    (a preset override). None when there is nothing to say."""
    data: dict = {}
    if cfg.config_file:
        try:
            data = json.loads(Path(cfg.config_file).expanduser().read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise BackendError(f"Cannot read the backend config file {cfg.config_file}: {exc}") from None
        if not isinstance(data, dict):
            raise BackendError(f"The backend config file {cfg.config_file} must hold a JSON object")
    if cfg.precision and cfg.precision != "auto":
        data.setdefault("overrides", {})["precision"] = cfg.precision
    if not data:
        return None
    path = merged_config_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data), encoding="utf-8")
    tmp.replace(path)
    return path


def build_command(cfg: BackendConfig, config_path: Path | None = None) -> list[str]:
    cmd = [cfg.python, "-m", "make_your_3d", "serve", "--port", str(cfg.port), "--state-file", str(cfg.state_file),
           "--data", str(cfg.data_dir), "--device", cfg.device]
    if cfg.models_dir:
        cmd += ["--models", str(cfg.models_dir)]
    if cfg.parent_pid:
        cmd += ["--parent-pid", str(cfg.parent_pid)]
    if config_path is not None:
        cmd += ["--config", str(config_path)]
    return cmd


def build_env(cfg: BackendConfig, base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    if cfg.source_root is not None:
        src = str(cfg.source_root / "backend")
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    # Blender's own Python settings must not leak into a different interpreter.
    for key in ("PYTHONHOME", "PYTHONEXECUTABLE"):
        env.pop(key, None)
    return env


def log_tail(path: Path, lines: int = 8) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


class BackendProcess:
    """Start, watch and stop one backend service process (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._cfg: BackendConfig | None = None
        self._info: BackendInfo | None = None
        self._log_fh = None
        self._stopping = False
        self._crash: str | None = None

    @property
    def log_file(self) -> Path | None:
        return self._cfg.log_file if self._cfg else None

    def adopt(self, state_file: Path) -> BackendInfo | None:
        """Reuse a service this add-on started earlier (e.g. before a reload) if it still answers."""
        info = read_state_file(state_file)
        if info is None or not pid_alive(info.pid):
            return None
        try:
            Client(info.endpoint).health(timeout=1.0)
        except ApiError:
            return None
        with self._lock:
            self._info = info
            self._crash = None
        return info

    def start(self, cfg: BackendConfig) -> None:
        """Launch the service; returns at once (use `wait_ready` or `state`)."""
        problem = python_problem(cfg.python)
        if problem:
            raise BackendError(problem)
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                return
            if self._info is not None and pid_alive(self._info.pid):
                return
            cfg.state_file.parent.mkdir(parents=True, exist_ok=True)
            cfg.log_file.parent.mkdir(parents=True, exist_ok=True)
            Path(cfg.data_dir).mkdir(parents=True, exist_ok=True)
            try:
                cfg.state_file.unlink()
            except FileNotFoundError:
                pass
            config_path = write_serve_config(cfg)
            command = build_command(cfg, config_path)
            self._close_log()
            self._log_fh = open(cfg.log_file, "ab")
            self._log_fh.write(f"\n--- starting backend {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(command)}\n".encode())
            self._log_fh.flush()
            kwargs: dict = {}
            if os.name == "nt":
                kwargs["creationflags"] = 0x08000000  # CREATE_NO_WINDOW
            else:
                kwargs["start_new_session"] = True  # Ctrl+C in Blender's terminal must not kill it mid-job
            try:
                self._proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=self._log_fh,
                                              stderr=subprocess.STDOUT, env=build_env(cfg), cwd=str(cfg.data_dir), **kwargs)
            except OSError as exc:
                self._close_log()
                raise BackendError(f"Could not run {cfg.python}: {exc}") from None
            self._cfg = cfg
            self._info = None
            self._crash = None
            self._stopping = False

    def state(self) -> BackendState:
        with self._lock:
            return self._state_locked()

    def _state_locked(self) -> BackendState:
        if self._info is not None:
            alive = self._proc.poll() is None if self._proc is not None else pid_alive(self._info.pid)
            if alive:
                return BackendState("running", f"Running at {self._info.url}", self._info)
            self._info = None
            if not self._stopping:
                self._crash = self._exit_message()
        if self._proc is not None and self._proc.poll() is None:
            info = read_state_file(self._cfg.state_file) if self._cfg else None
            if info is not None and info.pid == self._proc.pid:
                self._info = info
                return BackendState("running", f"Running at {info.url}", info)
            return BackendState("starting", "Starting the backend (loading Python packages)")
        if self._proc is not None and not self._stopping and self._crash is None:
            self._crash = self._exit_message()
        if self._crash:
            return BackendState("crashed", self._crash)
        return BackendState("stopped", "Backend stopped")

    def _exit_message(self) -> str:
        """Why the backend stopped: the exit code or signal, and the log's last error line (not its
        last line, which is often a progress bar)."""
        code = self._proc.poll() if self._proc is not None else None
        tail = log_tail(self._cfg.log_file, 40) if self._cfg else ""
        missing = missing_module_in_log(tail)
        if missing:
            return (f"Backend stopped unexpectedly (exit code {code}): its Python lacks the package '{missing}'. "
                    "Press Install Backend in Preferences > Add-ons > Make-Your-3D")
        error = last_error_line(tail)
        said = f"; its last error: {error}" if error else ""
        return f"Backend stopped unexpectedly (exit code {code}): {exit_reason(code)}{said}. Generate or Re-run starts it again; Open Log shows more"

    @property
    def started_config(self) -> BackendConfig | None:
        """The settings the running backend was started with (None if this add-on did not start it)."""
        with self._lock:
            return self._cfg if self._proc is not None and self._proc.poll() is None else None

    def wait_ready(self, timeout: float = 120.0, stop: threading.Event | None = None) -> BackendInfo:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.state()
            if st.status == "running" and st.info is not None:
                return st.info
            if st.status in ("crashed", "stopped"):
                raise BackendError(st.message)
            if stop is not None and stop.is_set():
                raise BackendError("Stopped waiting for the backend")
            time.sleep(0.1)
        raise BackendError(f"The backend did not become ready in {timeout:.0f} s; see its log")

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the service to shut down, then terminate, then kill; forget its state either way."""
        with self._lock:
            self._stopping = True
            proc, info, cfg = self._proc, self._info, self._cfg
        if info is not None:
            try:
                Client(info.endpoint).shutdown()
            except ApiError:
                pass
        if proc is not None:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        elif info is not None:
            deadline = time.monotonic() + timeout
            while pid_alive(info.pid) and time.monotonic() < deadline:
                time.sleep(0.1)
        with self._lock:
            self._proc = None
            self._info = None
            self._crash = None
            self._close_log()
        if cfg is not None:
            try:
                cfg.state_file.unlink()
            except FileNotFoundError:
                pass

    def _close_log(self) -> None:
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None
