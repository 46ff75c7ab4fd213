"""Long-running helper commands (install the backend, fetch weights) run in a worker thread.

Each task is a list of steps (one subprocess each); its state (step i of n, the last output
line, the error) is read by the UI on the main thread. Output also goes to a log file.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Step:
    title: str
    command: list[str]
    env: dict[str, str] | None = None


@dataclass
class TaskState:
    name: str
    running: bool = False
    step: int = 0
    total: int = 0
    title: str = ""
    line: str = ""
    lines_seen: int = 0
    error: str | None = None
    finished_at: float | None = None
    started_at: float = field(default_factory=time.monotonic)

    @property
    def factor(self) -> float:
        """Progress 0..1: finished steps plus a slow creep inside the current one (pip prints a line per package)."""
        if self.total == 0:
            return 0.0
        inside = 1.0 - 1.0 / (1.0 + self.lines_seen / 40.0)
        return min(1.0, (max(self.step - 1, 0) + (inside if self.running else 1.0)) / self.total)


class SubprocessTask:
    """Runs steps in order in a daemon thread; `state()` is a snapshot safe to read anywhere."""

    def __init__(self, name: str, steps: list[Step], log_file: Path, on_done=None):
        self._state = TaskState(name=name, total=len(steps))
        self._steps = steps
        self._log_file = log_file
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._cancel = threading.Event()
        self._on_done = on_done
        self._thread = threading.Thread(target=self._run, name=f"make_your_3d:{name}", daemon=True)

    @property
    def log_file(self) -> Path:
        return self._log_file

    def start(self) -> "SubprocessTask":
        with self._lock:
            self._state.running = True
        self._thread.start()
        return self

    def state(self) -> TaskState:
        with self._lock:
            return TaskState(**self._state.__dict__)

    def cancel(self) -> None:
        self._cancel.set()
        with self._lock:
            proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _update(self, **kw) -> None:
        with self._lock:
            for key, value in kw.items():
                setattr(self._state, key, value)

    def _run(self) -> None:
        self._log_file.parent.mkdir(parents=True, exist_ok=True)
        error: str | None = None
        with open(self._log_file, "a", encoding="utf-8") as log:
            for i, step in enumerate(self._steps, start=1):
                if self._cancel.is_set():
                    error = "Cancelled"
                    break
                self._update(step=i, title=step.title, line="", lines_seen=0)
                log.write(f"\n--- {step.title}: {' '.join(step.command)}\n")
                log.flush()
                try:
                    proc = subprocess.Popen(step.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=step.env, text=True, errors="replace",
                                            bufsize=1, creationflags=0x08000000 if os.name == "nt" else 0)
                except OSError as exc:
                    error = f"{step.title} failed: could not run {step.command[0]} ({exc})"
                    break
                with self._lock:
                    self._proc = proc
                last = ""
                last_error = ""  # pip and our CLI say what went wrong on an "ERROR:"/"error" line
                assert proc.stdout is not None
                for n, line in enumerate(proc.stdout, start=1):
                    log.write(line)
                    if line.strip():
                        last = line.strip()
                        if last.lower().startswith("error"):
                            last_error = last
                        self._update(line=last[:200], lines_seen=n)
                code = proc.wait()
                log.flush()
                if code != 0:
                    reason = (last_error or last)[:200]
                    error = "Cancelled" if self._cancel.is_set() else f"{step.title} failed (exit code {code}): {reason}; see {self._log_file}"
                    break
        self._update(running=False, error=error, finished_at=time.monotonic())
        if self._on_done is not None:
            self._on_done(self.state())
