"""HTTP client for the Make-Your-3D service (urllib only; safe to use from worker threads).

It never touches bpy. Every failure becomes an `ApiError` with a stable `code` and a sentence the
panel can show as is: the service's own `{"error": {code, message}}`, or `unreachable` / `timeout`
when the backend cannot be reached.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

TERMINAL = frozenset({"done", "failed", "cancelled", "interrupted"})


class ApiError(Exception):
    """An error the artist can act on: `code` (the service's codes plus unreachable/timeout) and `message`."""

    def __init__(self, code: str, message: str, status: int | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


@dataclass(frozen=True)
class Endpoint:
    url: str
    token: str


class Client:
    """One backend endpoint; methods map 1:1 onto the service's /v1 routes."""

    def __init__(self, endpoint: Endpoint, timeout: float = 10.0):
        self.endpoint = endpoint
        self.timeout = timeout

    # -- plumbing ---------------------------------------------------------------------------
    def _open(self, method: str, path: str, body: dict | None = None, timeout: float | None = None):
        data = None if body is None else json.dumps(body).encode("utf-8")
        req = urllib.request.Request(self.endpoint.url.rstrip("/") + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.endpoint.token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            return urllib.request.urlopen(req, timeout=timeout or self.timeout)
        except urllib.error.HTTPError as exc:
            raise _api_error_from_http(exc) from None
        except (socket.timeout, TimeoutError):
            raise ApiError("timeout", f"The backend at {self.endpoint.url} did not answer in time; it may be busy or stuck (see its log).") from None
        except (urllib.error.URLError, ConnectionError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ApiError("unreachable", f"Cannot reach the backend at {self.endpoint.url} ({reason}); start it in Preferences > Add-ons > Make-Your-3D.") from None

    def _json(self, method: str, path: str, body: dict | None = None, timeout: float | None = None) -> Any:
        with self._open(method, path, body, timeout) as resp:
            raw = resp.read()
        try:
            return json.loads(raw.decode("utf-8"))
        except ValueError:
            raise ApiError("bad_response", f"The backend sent a reply that is not JSON for {path}.") from None

    # -- routes -----------------------------------------------------------------------------
    def health(self, timeout: float = 2.0) -> dict:
        return self._json("GET", "/v1/health", timeout=timeout)

    def schema(self) -> dict:
        """The request schema, the stage list with labels and the presets (GET /v1/schema)."""
        return self._json("GET", "/v1/schema")

    def models(self) -> dict:
        return self._json("GET", "/v1/models")

    def submit(self, payload: dict) -> dict:
        return self._json("POST", "/v1/jobs", payload, timeout=max(self.timeout, 30.0))

    def job(self, job_id: str) -> dict:
        return self._json("GET", f"/v1/jobs/{job_id}")

    def jobs(self) -> list[dict]:
        return list(self._json("GET", "/v1/jobs").get("jobs", []))

    def cancel(self, job_id: str) -> dict:
        return self._json("POST", f"/v1/jobs/{job_id}/cancel", {})

    def rerun(self, job_id: str, changes: dict) -> dict:
        return self._json("POST", f"/v1/jobs/{job_id}/rerun", changes)

    def file(self, job_id: str, name: str) -> bytes:
        with self._open("GET", f"/v1/jobs/{job_id}/files/{name}", timeout=max(self.timeout, 60.0)) as resp:
            return resp.read()

    def download(self, job_id: str, name: str, dest: Path) -> Path:
        """Write a job file atomically (temp name, then rename) so a half download is never imported."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        tmp.write_bytes(self.file(job_id, name))
        tmp.replace(dest)
        return dest

    def unload(self) -> dict:
        return self._json("POST", "/v1/unload", {})

    def shutdown(self) -> dict:
        return self._json("POST", "/v1/shutdown", {}, timeout=5.0)

    def events(self, job_id: str, read_timeout: float = 15.0) -> Iterator[dict]:
        """Server-sent events of one job: yields each record; ends after a terminal status."""
        with self._open("GET", f"/v1/jobs/{job_id}/events", timeout=read_timeout) as resp:
            buf: list[str] = []
            for raw in resp:
                line = raw.decode("utf-8").rstrip("\r\n")
                if line.startswith("data:"):
                    buf.append(line[5:].lstrip())
                elif not line and buf:
                    record = json.loads("\n".join(buf))
                    buf = []
                    yield record
                    if record.get("status") in TERMINAL:
                        return


def _api_error_from_http(exc: urllib.error.HTTPError) -> ApiError:
    try:
        err = json.loads(exc.read().decode("utf-8"))["error"]
        return ApiError(str(err["code"]), str(err["message"]), exc.code)
    except Exception:  # a proxy or a crash page: still say something useful
        return ApiError("http_error", f"The backend answered HTTP {exc.code} ({exc.reason}); see its log.", exc.code)


def watch_job(
    client: Client,
    job_id: str,
    on_record: Callable[[dict], None],
    stop: threading.Event,
    poll_interval: float = 0.5,
    give_up_after: float = 20.0,
    alive: Callable[[], bool] | None = None,
) -> dict | None:
    """Follow one job until it ends: stream its events, fall back to polling when the stream drops.

    Returns the terminal record, or None when stopped, when the backend stayed unreachable for
    `give_up_after` seconds, or at once when `alive()` says its process is gone (the caller tells
    those apart; the service keeps the job, so it can be picked up again after a restart).
    """
    last: dict | None = None
    unreachable_since: float | None = None
    use_stream = True
    while not stop.is_set():
        try:
            if use_stream:
                for record in client.events(job_id):
                    unreachable_since = None
                    last = record
                    on_record(record)
                    if record.get("status") in TERMINAL or stop.is_set():
                        return record if record.get("status") in TERMINAL else None
            record = client.job(job_id)
            unreachable_since = None
            if record != last:
                last = record
                on_record(record)
            if record.get("status") in TERMINAL:
                return record
        except ApiError as exc:
            if exc.code in {"not_found", "unauthorized"}:
                raise
            if exc.code == "unreachable":
                unreachable_since = unreachable_since or time.monotonic()
                if time.monotonic() - unreachable_since > give_up_after or (alive is not None and not alive()):
                    return None
            use_stream = exc.code != "http_error" and exc.status not in (404, 405, 501)
        except (ValueError, OSError):
            pass  # a broken event line or a dropped stream: poll once, then stream again
        stop.wait(poll_interval)
    return None
