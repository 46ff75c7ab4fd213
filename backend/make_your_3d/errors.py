"""Errors a user can act on: a stable code plus a sentence that says what to do next.

The CLI prints `message`, the service returns `{code, message}`; neither shows a traceback.
"""

from __future__ import annotations


class Make3DError(Exception):
    """Base for every error meant for the user. `code` is stable (the API and add-on match on it)."""

    code = "internal"

    def __init__(self, message: str, *, code: str | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


class WeightsMissing(Make3DError):
    code = "weights_missing"


class BadImage(Make3DError):
    code = "bad_image"


class NoSubject(Make3DError):
    code = "no_subject"


class BadPrompt(Make3DError):
    code = "bad_prompt"


class BadViews(Make3DError):
    code = "bad_views"


class BadRequest(Make3DError):
    code = "bad_request"


class OutOfMemory(Make3DError):
    code = "out_of_memory"


class DiskFull(Make3DError):
    code = "disk_full"


class Cancelled(Make3DError):
    code = "cancelled"

    def __init__(self, message: str = "The job was cancelled."):
        super().__init__(message)
