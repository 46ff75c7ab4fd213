"""HTTP client for the Make-Your-3D service (urllib only; safe to use from worker threads).

It never touches bpy. Every failure becomes an `ApiError` with a stable `code` and a sentence the
panel can show as is: the service's own `{"error": {code, message}}`, or `unreachable` / `timeout`
when the backend cannot be reached.

A remote backend (HTTPS) is trusted by the SHA-256 fingerprint of its certificate, which the
operator printed and the artist pasted: the connection compares the certificate it was shown with
that value right after the TLS handshake, before a single byte of the request (and so the token)
is written, and refuses (`fingerprint_mismatch`) on any difference. Without a fingerprint an HTTPS
URL is checked the usual way (a certificate authority and the host name). Downloads are resumable:
a broken one keeps its `.part` file and continues from there with an HTTP Range request.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import socket
import ssl
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


DOWNLOAD_CHUNK = 1 << 20  # bytes read and written at a time; a broken download keeps what arrived


@dataclass(frozen=True)
class Endpoint:
    url: str
    token: str
    fingerprint: str = ""  # SHA-256 of the remote backend's certificate (hex, colons optional); "" for loopback HTTP


def normalise_fingerprint(text: str) -> str:
    """`AB:CD:...`, `abcd...` or `sha256/AB CD ...` -> 64 lower-case hex digits ('' when it is not one)."""
    hexdigits = "".join(ch for ch in text.lower().removeprefix("sha256").strip("/= ") if ch in "0123456789abcdef")
    return hexdigits if len(hexdigits) == 64 else ""


class FingerprintMismatch(OSError):
    """The backend showed a certificate other than the pinned one (raised before anything is sent)."""

    def __init__(self, got: str):
        super().__init__(f"certificate fingerprint {got}")
        self.got = got


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """An HTTPS connection that, once the handshake is done and before the request is written,
    compares the peer certificate's SHA-256 with the pinned one and closes on a difference."""

    pin = ""

    def connect(self) -> None:
        super().connect()
        der = self.sock.getpeercert(binary_form=True) or b""
        got = hashlib.sha256(der).hexdigest()
        if not hmac.compare_digest(got, self.pin):
            self.sock.close()
            self.sock = None
            raise FingerprintMismatch(":".join(got[i:i + 2] for i in range(0, 64, 2)).upper())


class _PinnedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, pin: str):
        # the chain is not checked against certificate authorities: the pin is the trust
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        super().__init__(context=context)
        self._connection = type("PinnedHTTPSConnection", (_PinnedHTTPSConnection,), {"pin": pin})

    def https_open(self, req: urllib.request.Request):
        return self.do_open(self._connection, req, context=self._context)


def _opener(endpoint: Endpoint) -> urllib.request.OpenerDirector:
    pin = normalise_fingerprint(endpoint.fingerprint)
    if endpoint.url.lower().startswith("https://") and endpoint.fingerprint:
        if not pin:
            raise ApiError("bad_fingerprint", "The certificate fingerprint in Preferences > Add-ons > Make-Your-3D > Remote backend is not "
                                              "a SHA-256 fingerprint (64 hex digits, colons allowed); paste the one the backend printed.")
        return urllib.request.build_opener(_PinnedHTTPSHandler(pin))
    return urllib.request.build_opener()


class Client:
    """One backend endpoint; methods map 1:1 onto the service's /v1 routes."""

    def __init__(self, endpoint: Endpoint, timeout: float = 10.0):
        self.endpoint = endpoint
        self.timeout = timeout
        self._opener = _opener(endpoint)

    # -- plumbing ---------------------------------------------------------------------------
    def _open(self, method: str, path: str, body: dict | None = None, timeout: float | None = None, headers: dict | None = None):
        data = None if body is None else json.dumps(body).encode("utf-8")
        req = urllib.request.Request(self.endpoint.url.rstrip("/") + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.endpoint.token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        for key, value in (headers or {}).items():
            req.add_header(key, value)
        try:
            return self._opener.open(req, timeout=timeout or self.timeout)
        except urllib.error.HTTPError as exc:
            raise _api_error_from_http(exc) from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, FingerprintMismatch):
                raise ApiError("fingerprint_mismatch", f"The backend at {self.endpoint.url} showed a certificate with fingerprint "
                                                       f"{exc.reason.got}, not the one in Preferences > Remote backend. Nothing was sent "
                                                       "(not the token). Ask the operator for the right fingerprint; if it was not "
                                                       "changed, someone may be intercepting the connection.") from None
            if isinstance(exc.reason, ssl.SSLCertVerificationError):
                raise ApiError("tls_untrusted", f"The backend at {self.endpoint.url} has a certificate this computer does not trust "
                                                f"({exc.reason.verify_message}). Paste the fingerprint the backend printed into "
                                                "Preferences > Remote backend.") from None
            reason = getattr(exc, "reason", exc)
            raise ApiError("unreachable", f"Cannot reach the backend at {self.endpoint.url} ({reason}); start it in Preferences > Add-ons > Make-Your-3D.") from None
        except (socket.timeout, TimeoutError):
            raise ApiError("timeout", f"The backend at {self.endpoint.url} did not answer in time; it may be busy or stuck (see its log).") from None
        except (urllib.error.URLError, ConnectionError, OSError, http.client.HTTPException) as exc:
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
        """Fetch a job file into `dest`: streamed into `dest.part`, renamed when complete, so a half
        download is never imported. A `.part` left by a broken download is continued with a Range
        request (If-Range on the validator it was started with: a changed file starts over)."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        meta = dest.with_name(dest.name + ".part.json")
        have = tmp.stat().st_size if tmp.is_file() else 0
        try:
            validator = str(json.loads(meta.read_text(encoding="utf-8")).get("validator") or "") if have else ""
        except (OSError, ValueError, AttributeError):
            validator = ""
        headers = {"Range": f"bytes={have}-", "If-Range": validator} if have and validator else {}
        path = f"/v1/jobs/{job_id}/files/{name}"
        try:
            resp = self._open("GET", path, timeout=max(self.timeout, 60.0), headers=headers)
        except ApiError as exc:
            if exc.status != 416:
                raise
            tmp.unlink(missing_ok=True)  # the part is not a prefix of the file any more: start over
            resp = self._open("GET", path, timeout=max(self.timeout, 60.0))
        with resp:
            start, total = _content_range(resp) if resp.status == 206 else (0, _int(resp.headers.get("Content-Length")))
            if resp.status == 206 and start != have:
                raise ApiError("bad_response", f"The backend resumed {name} at byte {start}, not {have}; try again.")
            tag = resp.headers.get("ETag") or resp.headers.get("Last-Modified") or ""
            meta.write_text(json.dumps({"validator": tag}), encoding="utf-8")
            try:
                with open(tmp, "ab" if resp.status == 206 else "wb") as fh:
                    while True:
                        chunk = resp.read(DOWNLOAD_CHUNK)
                        if not chunk:
                            break
                        fh.write(chunk)
            except (socket.timeout, TimeoutError, OSError, http.client.HTTPException) as exc:
                raise ApiError("download_broken", f"The download of {name} broke off ({exc}); downloading it again continues "
                                                  "where it stopped.") from None
        size = tmp.stat().st_size
        if total is not None and size != total:
            raise ApiError("download_broken", f"The download of {name} stopped at {size} of {total} bytes; downloading it again "
                                              "continues where it stopped.")
        tmp.replace(dest)
        meta.unlink(missing_ok=True)
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


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _content_range(resp) -> tuple[int, int | None]:
    """(first byte, total size) of a 206 answer's `Content-Range: bytes A-B/T`."""
    value = (resp.headers.get("Content-Range") or "").strip()
    unit, _, spec = value.partition(" ")
    span, _, total = spec.partition("/")
    first = _int(span.partition("-")[0])
    if unit != "bytes" or first is None:
        raise ApiError("bad_response", f"The backend answered a resumed download with Content-Range {value[:60]!r}.")
    return first, _int(total)


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
