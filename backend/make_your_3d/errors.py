"""Errors a user can act on: a stable code plus a sentence that says what to do next.

The CLI prints `message`, the service returns `{code, message}` with the class's HTTP `status`;
neither shows a traceback. Every code the service can answer with is a class here, and
`STATUS_FOR_CODE` (the error table) is built from them, so a code and its status live in one place.
"""

from __future__ import annotations


class Make3DError(Exception):
    """Base for every error meant for the user. `code` is stable (the API and add-on match on it)."""

    code = "internal"
    status = 500

    def __init__(self, message: str, *, code: str | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


# --- bad input (4xx) -------------------------------------------------------------------------
class BadRequest(Make3DError):
    code = "bad_request"
    status = 400


class BadImage(Make3DError):
    code = "bad_image"
    status = 400


class DecompressionBomb(BadImage):
    """An image whose header claims far more pixels than any photo: refused before decoding."""

    code = "decompression_bomb"
    status = 400


class NoSubject(Make3DError):
    code = "no_subject"
    status = 400


class BadPrompt(Make3DError):
    code = "bad_prompt"
    status = 400


class BadViews(Make3DError):
    code = "bad_views"
    status = 400


class Unauthorized(Make3DError):
    code = "unauthorized"
    status = 401


class Forbidden(Make3DError):
    """A user token on the remote listener asked for an operator's action (shutdown, unload)."""

    code = "forbidden"
    status = 403


class BadHost(Make3DError):
    """A Host header that is not a loopback name (DNS rebinding)."""

    code = "bad_host"
    status = 403


class BadOrigin(Make3DError):
    """A browser request from a foreign web page (Origin not loopback)."""

    code = "bad_origin"
    status = 403


class NotFound(Make3DError):
    code = "not_found"
    status = 404


class MethodNotAllowed(Make3DError):
    code = "method_not_allowed"
    status = 405


class InputMissing(Make3DError):
    code = "input_missing"
    status = 409


class Cancelled(Make3DError):
    code = "cancelled"
    status = 409

    def __init__(self, message: str = "The job was cancelled."):
        super().__init__(message)


class Interrupted(Make3DError):
    code = "interrupted"
    status = 409


class TooLarge(Make3DError):
    code = "too_large"
    status = 413


class QueueFull(Make3DError):
    """More jobs waiting than the backend accepts; the client should wait or cancel some."""

    code = "queue_full"
    status = 429


class TooHeavy(Make3DError):
    """A valid request whose estimated memory exceeds what this machine can give a job."""

    code = "too_heavy"
    status = 422


# --- the machine or its files (5xx) ----------------------------------------------------------
class WeightsMissing(Make3DError):
    code = "weights_missing"
    status = 503


class WeightsBroken(WeightsMissing):
    """Weight files that exist but are truncated or unreadable."""

    code = "weights_broken"
    status = 503


class OutOfMemory(Make3DError):
    code = "out_of_memory"
    status = 503


class Busy(Make3DError):
    """Another backend owns the data folder or the state file."""

    code = "busy"
    status = 503


class DiskFull(Make3DError):
    code = "disk_full"
    status = 507


class DataUnwritable(Make3DError):
    code = "data_unwritable"
    status = 500


class OutputUnwritable(Make3DError):
    """A folder a job writes (output, job folder, stage cache) cannot be written: found before any model loads."""

    code = "output_unwritable"
    status = 500


class BindFailed(Make3DError):
    code = "bind_failed"
    status = 500


class WorkerLost(Make3DError):
    """A farm job whose Ray worker was lost more times than the farm retries a job (farm.py)."""

    code = "worker_lost"
    status = 503


class FarmUnavailable(Make3DError):
    """`serve --ray` could not reach the Ray cluster, or Ray is not installed."""

    code = "farm_unavailable"
    status = 503


def _table() -> dict[str, int]:
    table = {Make3DError.code: Make3DError.status}
    todo = list(Make3DError.__subclasses__())
    while todo:
        cls = todo.pop()
        table[cls.code] = cls.status
        todo += cls.__subclasses__()
    return table


STATUS_FOR_CODE: dict[str, int] = _table()
