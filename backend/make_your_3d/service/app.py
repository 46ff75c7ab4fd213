"""The versioned JSON API under /v1 (FastAPI). See briefs/DESIGN "Local service" for the contract.

Every error body is `{"error": {"code", "message"}}` with a sentence that says what to do; tracebacks
only go to the log. Input is checked (body size, JSON shape, image decode, subject, prompts) before
a job is written to the store, and the store is written before the client is answered.

Order of checks, cheapest first: the `Guard` middleware refuses a foreign Host or Origin (DNS
rebinding) and a missing token before any body byte is read; field lengths are checked by the
schema before any text is normalised; the image header before its pixels. Event streams wait on a
change notification from the store and read it in the thread pool; health touches no lock.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import ipaddress
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from fastapi import APIRouter, BackgroundTasks, Depends, FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, create_model
from starlette.exceptions import HTTPException as StarletteHTTPException

from make_your_3d import __version__
from make_your_3d.errors import (STATUS_FOR_CODE, BadHost, BadImage, BadOrigin, BadPrompt, BadRequest, Forbidden, Make3DError,
                                 NotFound, Unauthorized, WeightsBroken, WeightsMissing)
from make_your_3d.models.registry import ROLES, is_tiny
from make_your_3d.pipeline.presets import JOB_OVERRIDES
from make_your_3d.pipeline.request import (MAX_IMAGE_BYTES, GenerateRequest, check_job_memory, prompt_too_long,
                                           validate_request)
from make_your_3d.job_params import JOB_PARAMS, PRESET_NAMES, Param, variant_seeds
from make_your_3d.service.store import Job, JobSpec, JobStore
from make_your_3d.service.users import UserStore
from make_your_3d.service.worker import Worker, classify_exception

log = logging.getLogger("make_your_3d.service")

# The biggest image, base64-encoded, plus room for the prompts and JSON punctuation.
MAX_IMAGE_B64_CHARS = (MAX_IMAGE_BYTES + 2) // 3 * 4
MAX_BODY_BYTES = MAX_IMAGE_B64_CHARS + 256 * 1024
HEARTBEAT_S = 5.0  # an event stream repeats the record this often without changes

MAX_DATA_URL_PREFIX = 128  # "data:image/png;base64," before the base64 text
MAX_REPORTED_ERRORS = 20
DEFAULT_PAGE = 50
MAX_PAGE = 500
MAX_QUEUED_JOBS = 500  # waiting jobs the backend accepts (serve --config max_queued_jobs); more is queue_full
MAX_ECHO_CHARS = 80  # of an id, a file name or a path repeated back in an error sentence
# /v1/models hashes the required files smaller than this against the checksums recorded at fetch
# time (configs, tokenizers, small weights: milliseconds); larger ones get the size and header checks.
MODELS_HASH_BELOW = 64 * 2**20
PUBLIC_PATHS = frozenset({"/v1/health"})
_PROMPT_FIELDS = {"prompt": "prompt", "negative_prompt": "negative prompt", "subject": "subject description"}

_FILE_TYPES = {".glb": "model/gltf-binary", ".gltf": "model/gltf+json", ".png": "image/png", ".json": "application/json",
               ".jpg": "image/jpeg", ".txt": "text/plain; charset=utf-8", ".obj": "text/plain; charset=utf-8"}


# ---------------------------------------------------------------------------------------------
# Request and response models
# ---------------------------------------------------------------------------------------------
# A job's own sampling settings on top of its preset: built from pipeline/presets.py JOB_OVERRIDES, the
# one table of which knobs a job may set and their ranges (validate_job_overrides checks the same).
JobOverrides = create_model(
    "JobOverrides",
    __config__=ConfigDict(extra="forbid", strict=True),
    **{name: ((int if kind is int else float) | None, Field(None, ge=lo, le=hi)) for name, (kind, lo, hi) in JOB_OVERRIDES.items()},
)


def _overrides(value: Any) -> dict | None:
    """JobOverrides (or its dict) -> the set values only; None when there are none."""
    if value is None:
        return None
    data = value.model_dump(exclude_none=True) if isinstance(value, BaseModel) else {k: v for k, v in dict(value).items() if v is not None}
    return data or None


def _pydantic_field(param: Param, *, keep_default: bool = True) -> tuple[Any, Any]:
    """A pydantic (annotation, Field) for one job_params.Param: the request schema's one source."""
    base: Any = str if param.kind == "string" else int
    if param.choices is not None:
        base = Literal[param.choices]  # type: ignore[valid-type]
    annotation = base | None if param.nullable or not keep_default else base
    default = (... if param.required else param.default) if keep_default else None
    return annotation, Field(default, description=param.description, ge=param.minimum, le=param.maximum, max_length=param.max_length)


# A generation request (one job per variant, seeds seed, seed+1, ...): the fields of job_params.JOB_PARAMS,
# plus how the image travels and the job's own sampling overrides.
JobCreate = create_model(
    "JobCreate",
    __config__=ConfigDict(extra="forbid", strict=True),
    __doc__="A generation request; one job per variant, seeds seed, seed+1, ...",
    image_png_b64=(str, Field(description="base64 of the subject image file (PNG, JPEG or WebP), at most 32 MiB",
                              max_length=MAX_IMAGE_B64_CHARS + MAX_DATA_URL_PREFIX)),
    **{p.name: _pydantic_field(p) for p in JOB_PARAMS},
    overrides=(JobOverrides | None, None),
)

# A re-run: the same fields, each optional; absent fields keep the original job's values (seed null:
# a new random seed; prompt, negative prompt and preset null: keep).
JobRerun = create_model(
    "JobRerun",
    __config__=ConfigDict(extra="forbid", strict=True),
    __doc__="Fields to change for a re-run; absent fields keep the original job's values.",
    **{p.name: _pydantic_field(p, keep_default=False) for p in JOB_PARAMS if p.name != "variants"},
    overrides=(JobOverrides | None, None),
)


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


class JobRequestOut(BaseModel):
    prompt: str
    negative_prompt: str
    subject: str | None
    seed: int
    preset: str
    faces: int | None
    texture_size: int | None
    overrides: dict[str, int | float] | None = None


class JobRecord(BaseModel):
    id: str
    group: str
    status: Literal["queued", "running", "done", "failed", "cancelled", "interrupted"]
    stage: str | None
    step: int
    total: int
    message: str
    elapsed_s: float | None
    eta_s: float | None
    error: ErrorDetail | None
    files: list[str]
    request: JobRequestOut
    created_at: str
    cached_stages: list[str]


class JobList(BaseModel):
    jobs: list[JobRecord] = Field(description="one page of jobs, oldest first")
    next: int | None = Field(description="pass as `before` for the next older page; null on the last page")


class Created(BaseModel):
    ids: list[str]
    group: str
    seeds: list[int] = Field(description="each job's seed, in the order of `ids` (drawn here when the request had none)")


class Schema(BaseModel):
    version: str
    job_params: dict[str, Any] = Field(description="JSON schema of POST /v1/jobs's body")
    stages: list[dict[str, Any]] = Field(description="the stages in run order: name, label (for people), substages")
    presets: list[str]


class Health(BaseModel):
    status: str
    version: str


class RoleState(BaseModel):
    name: str
    title: str
    licence: str
    complete: bool = Field(description="every required file is present and none is damaged")
    missing: list[str]
    damaged: list[str] = Field(description="present but truncated, longer than its header says, or not matching the size or "
                                           "checksum recorded at fetch time: run `make-your-3d models fetch --role NAME` again")


class ModelsState(BaseModel):
    models_dir: str
    tiny: bool
    complete: bool
    roles: list[RoleState]


class GroupCancelled(BaseModel):
    group: str
    cancelled: list[str] = Field(description="queued jobs of the group, now cancelled")
    stopping: list[str] = Field(description="the group's running job, asked to stop at its next check (then `cancelled`)")
    finished: list[str] = Field(description="jobs of the group that had already ended (left as they were)")


class Unloaded(BaseModel):
    unloaded: bool
    deferred: bool = Field(description="true: a job is running; the models are freed when it ends")


class Stopping(BaseModel):
    stopping: bool


_ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 403, 404, 413, 422, 429, 500)}


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------
def error_response(code: str, message: str, status: int | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status or STATUS_FOR_CODE.get(code, 400), headers=headers)


def error_for(exc: Make3DError) -> JSONResponse:
    status = exc.status if exc.code == type(exc).code else STATUS_FOR_CODE.get(exc.code, 400)
    headers = {"WWW-Authenticate": "Bearer"} if exc.code == Unauthorized.code else None
    return error_response(exc.code, exc.message, status, headers)


class BodyTooLarge(StarletteHTTPException):
    """Raised while reading a body past the limit. An HTTPException so FastAPI passes it through."""

    def __init__(self, limit: int):
        super().__init__(413, f"The request is larger than {limit // 2**20} MiB. Use a smaller image (at most {MAX_IMAGE_BYTES // 2**20} MiB).")


def shown(text: str, limit: int = MAX_ECHO_CHARS) -> str:
    """`text` quoted for an error sentence, cut to `limit` characters: a 404 must not echo a
    70,000-character id back."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"


def _field_name(loc: tuple[Any, ...]) -> str:
    # only the leading location is dropped: a body field may itself be called "path" (or "body")
    parts = [str(p) for p in (loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc)]
    return ".".join(parts)


def text_field_error(err: dict[str, Any]) -> Make3DError | None:
    """A text field over its schema length, or not valid Unicode (a lone surrogate), as the same
    error the full check gives (bad_prompt or bad_image), whichever check caught it."""
    kind = err.get("type")
    name = _field_name(tuple(err.get("loc", ())))
    if kind == "string_unicode" and name in _PROMPT_FIELDS:
        return BadPrompt(f"The {_PROMPT_FIELDS[name]} contains control characters (invalid Unicode); type plain text.")
    if kind != "string_too_long":
        return None
    if name in _PROMPT_FIELDS:
        given = err.get("input")
        return prompt_too_long(_PROMPT_FIELDS[name], len(given) if isinstance(given, str) else None)
    if name == "image_png_b64":
        return BadImage(f"The image is larger than {MAX_IMAGE_BYTES // 2**20} MiB. Resize it and try again.")
    return None


def validation_message(errors: list[dict[str, Any]]) -> str:
    """One sentence naming the first bad field and what to do about it."""
    if not errors:
        return "The request is not valid."
    first = {"json_invalid": 0, "extra_forbidden": 1, "string_too_long": 2}  # the most telling problem first
    errors = sorted(errors, key=lambda e: first.get(e.get("type", ""), 3))
    err = errors[0]
    kind = err.get("type", "")
    name = _field_name(tuple(err.get("loc", ())))
    if kind == "json_invalid":
        text = "The request body is not valid JSON (UTF-8). Send a JSON object."
    elif kind == "extra_forbidden":
        text = f"Unknown field {shown(name)}: remove it."
    elif kind == "missing" and name:
        text = f"The field {shown(name)} is required."
    elif kind == "missing":
        text = "The request needs a JSON body."
    elif not name:
        text = "The request body must be a JSON object, sent with 'Content-Type: application/json'."
    else:
        text = f"The field {shown(name)} is invalid: {err.get('msg', 'bad value')}."
    more = len(errors) - 1
    if more > MAX_REPORTED_ERRORS:
        text += f" ({MAX_REPORTED_ERRORS}+ more problems in the request.)"
    elif more:
        text += f" ({more} more problem{'s' if more > 1 else ''} in the request.)"
    return text


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(Make3DError)
    async def _make3d(request: Request, exc: Make3DError) -> JSONResponse:
        if exc.code == "internal":
            log.error("internal error on %s %s: %s", request.method, request.url.path, exc.message)
        return error_for(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        for err in errors:
            known = text_field_error(err)
            if known is not None:
                return error_for(known)
        return error_response("bad_request", validation_message(errors), 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        if status == 404:
            return error_response("not_found", f"There is no route {request.method} {shown(request.url.path)}; see /v1/openapi.json.", 404)
        if status == 405:
            return error_response("method_not_allowed", f"{shown(request.url.path)} does not accept {request.method}; see /v1/openapi.json.",
                                  405)
        if status == 413:
            return error_response("too_large", str(exc.detail), 413)
        if status == 401:
            return error_response("unauthorized", "Send the token from the state file as 'Authorization: Bearer TOKEN'.", 401)
        if status == 400 and exc.detail == "There was an error parsing the body":
            # e.g. bytes that are not UTF-8: the same answer as any other body that is not JSON
            return error_response("bad_request", "The request body is not valid JSON (UTF-8). Send a JSON object.", 422)
        code = "bad_request" if 400 <= status < 500 else "internal"
        detail = exc.detail if isinstance(exc.detail, str) else "The request could not be processed."
        return error_response(code, detail, status)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        known = classify_exception(exc)  # disk full (files or the database), out of memory
        if known is not None:
            log.warning("%s %s failed: [%s] %s (%s)", request.method, request.url.path, known.code, known.message, exc)
            return error_response(known.code, known.message)
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(
            "internal",
            "The backend hit an unexpected error (details are in the backend log). Try again; if it repeats, report the log.",
            500,
        )


def is_loopback_host(host: str) -> bool:
    """`localhost`, `127.x.y.z` or `[::1]`, with or without a port (a Host header's value)."""
    host = host.strip().lower()
    if host.startswith("["):
        name, _, rest = host[1:].partition("]")
        if rest and not (rest.startswith(":") and rest[1:].isdigit()):
            return False
    else:
        name, _, port = host.partition(":")
        if port and not port.isdigit():
            return False
    if name in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def is_loopback_origin(origin: str) -> bool:
    scheme, sep, rest = origin.strip().partition("://")
    return bool(sep) and scheme.lower() in ("http", "https") and "/" not in rest and is_loopback_host(rest)


@dataclass(frozen=True)
class Principal:
    """Who sent a request: `user` None is the local token (every job); a name is a remote user,
    who sees only their own jobs and may not stop or unload the shared backend."""

    user: str | None
    operator: bool


LOCAL_PRINCIPAL = Principal(user=None, operator=True)


@dataclass(frozen=True)
class RemoteAccess:
    """The remote listener's policy (`serve --allow-remote`): per-user tokens from `users`, the
    Host names it answers to (its certificate's names: the bound address, this machine's names,
    `--public-name`), and no requests from web pages at all."""

    users: UserStore
    hosts: frozenset[str]


def host_name(host: str) -> str:
    """A Host header's name without the port, brackets or a trailing dot, lower-case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    if host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


class Guard:
    """ASGI middleware run before routing, so nothing is read or parsed for a request it refuses:
    the Host and Origin checks (DNS rebinding: a web page must not reach the backend through a
    name that resolves to 127.0.0.1), the bearer token (every route but health), the body size
    limit (header and streamed), and the last-activity time for the idle timer. The caller it
    authenticated goes into the request's state as `principal`."""

    def __init__(self, app: Any, limit: int, activity: "Activity", token: str = "", check_host: bool = True,
                 remote: RemoteAccess | None = None):
        self.app = app
        self.limit = limit
        self.activity = activity
        self.token = token.encode("utf-8")
        self.check_host = check_host
        self.remote = remote

    def _principal(self, value: str) -> Principal | None:
        if self.remote is not None:  # the remote listener: user tokens only, never the local one
            user = self.remote.users.authenticate(value)
            return Principal(user=user, operator=False) if user is not None else None
        if not self.token or hmac.compare_digest(value.encode("latin-1"), self.token):
            return LOCAL_PRINCIPAL
        return None

    def _refusal(self, scope: dict) -> Make3DError | None:
        headers: dict[bytes, bytes] = {}
        for key, value in scope.get("headers", ()):
            headers.setdefault(key, value)
        host = headers.get(b"host", b"").decode("latin-1")
        if self.remote is not None:
            if host_name(host) not in self.remote.hosts:
                return BadHost(f"This backend does not answer to {host[:100]!r}. Use the URL its operator gave you, or start it with "
                               "--public-name NAME for that name.")
        elif self.check_host and not is_loopback_host(host):
            return BadHost(f"Requests must be addressed to 127.0.0.1 or localhost, not {host[:100]!r}. "
                           "Use the URL in the backend's state file.")
        origin = headers.get(b"origin")
        if origin is not None and (self.remote is not None or not is_loopback_origin(origin.decode("latin-1"))):
            return BadOrigin("Requests from web pages are refused. Use the Blender add-on or a local client.")
        if scope.get("path") not in PUBLIC_PATHS:
            scheme, _, value = headers.get(b"authorization", b"").decode("latin-1").strip().partition(" ")
            principal = self._principal(value.strip()) if scheme.lower() == "bearer" else None
            if principal is None:
                return Unauthorized("A valid bearer token is required: send the token from the state file as 'Authorization: Bearer TOKEN'."
                                    if self.remote is None else
                                    "A valid user token is required ('Authorization: Bearer TOKEN'): ask the backend's operator for one "
                                    "(`make-your-3d users add NAME`).")
            scope.setdefault("state", {})["principal"] = principal
        return None

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.activity.touch()
        refused = self._refusal(scope)
        if refused is not None:
            await error_for(refused)(scope, receive, send)
            return
        length = None
        for key, value in scope.get("headers", ()):
            if key == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    await error_response("bad_request", "The Content-Length header is not a number.", 400)(scope, receive, send)
                    return
        if length is not None and length > self.limit:
            await error_response("too_large", BodyTooLarge(self.limit).detail, 413)(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            if message.get("type") == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        try:
            await self.app(scope, limited_receive, send)
        finally:
            self.activity.touch()


class ChangeFeed:
    """Wakes event streams when the store changes: the store calls `changed` from whichever thread
    wrote; the waiters are on the event loop. Each change sets the current asyncio.Event and starts
    a new one, so a waiter that took the event before reading the store cannot miss a change."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None

    def current(self) -> asyncio.Event:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._event is None:
            self._loop, self._event = loop, asyncio.Event()
        return self._event

    def changed(self) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self._fire)
        except RuntimeError:  # the loop closed meanwhile
            pass

    def _fire(self) -> None:
        event, self._event = self._event, asyncio.Event()
        if event is not None:
            event.set()


class Activity:
    """When the service last did something (a request or a job); read by the idle-timeout watcher."""

    def __init__(self) -> None:
        self.last = time.monotonic()

    def touch(self) -> None:
        self.last = time.monotonic()


# ---------------------------------------------------------------------------------------------
# App
# ---------------------------------------------------------------------------------------------
def _decode_image(b64: str) -> bytes:
    if len(b64) > MAX_IMAGE_B64_CHARS:
        raise BadImage(f"The image is larger than {MAX_IMAGE_BYTES // 2**20} MiB. Resize it and try again.")
    text = b64.strip()
    if text.startswith("data:") and "," in text[:100]:
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise BadImage("image_png_b64 is not valid base64. Send the image file's bytes base64-encoded.") from None


def required_roles() -> tuple[str, ...]:
    """The roles a job needs (the generator's list; the segmenter is optional for images with alpha)."""
    try:
        from make_your_3d.pipeline.generate import REQUIRED_ROLES
    except ImportError:
        return tuple(ROLES)
    return tuple(REQUIRED_ROLES)


def _check_weights(models_dir: Path, roles: tuple[str, ...]) -> None:
    missing = [name for name in roles if ROLES[name].missing(models_dir)]
    if missing:
        raise WeightsMissing(
            f"Model weights are missing in {models_dir} (roles: {', '.join(missing)}). Run 'make-your-3d models fetch' and try again."
        )
    damaged = {name: ROLES[name].damaged(models_dir) for name in roles}
    damaged = {name: files for name, files in damaged.items() if files}
    if damaged:
        listed = "; ".join(f"{name}: {', '.join(files[:3])}" for name, files in damaged.items())
        first = next(iter(damaged))
        raise WeightsBroken(
            f"Model weight files are damaged (truncated, or not the size recorded when they were fetched) in {models_dir} ({listed}). Run "
            f"'make-your-3d models verify', then 'make-your-3d models fetch --role {first}' for each role named, and try again."
        )


def _clean_spec(spec: JobSpec, image: bytes) -> JobSpec:
    """Run the shared request checks (image decode, subject, prompts, ranges) and keep the cleaned text."""
    req = GenerateRequest(
        image=image,
        prompt=spec.prompt,
        subject=spec.subject,
        negative_prompt=spec.negative_prompt,
        seed=spec.seed,
        preset=spec.preset,
        faces=spec.faces,
        texture_size=spec.texture_size,
        overrides=spec.overrides,
    )
    validate_request(req)
    return JobSpec(req.prompt, req.negative_prompt, req.subject, req.seed, req.preset, req.faces, req.texture_size, req.overrides)


@dataclass
class ServiceContext:
    """What the routes share: the job store and worker, the models folder and the request policy."""

    store: JobStore
    worker: Worker
    models_dir: Path
    default_preset: str
    feed: ChangeFeed
    memory_budget_bytes: int | None
    overrides: dict | None
    max_queued: int = MAX_QUEUED_JOBS
    device: str = "auto"  # the generator's device (serve --device): the measured budgets are per device kind
    _needed: list[tuple[str, ...]] = field(default_factory=list)

    def needed_roles(self) -> tuple[str, ...]:
        """Filled on first use: importing the generator loads torch."""
        if not self._needed:
            self._needed.append(required_roles())
        return self._needed[0]

    def get_job(self, job_id: str, who: Principal = LOCAL_PRINCIPAL) -> Job:
        """The job, if `who` may see it. Another user's job is answered exactly as a job that does
        not exist (404, same sentence): ids must not tell a user what others run."""
        job = self.store.get(job_id)
        if job is None or (who.user is not None and job.owner != who.user):
            raise NotFound(f"There is no job {shown(job_id)}. List jobs with GET /v1/jobs.")
        return job

    def present_files(self, job: Job) -> list[str]:
        """The job's recorded files that are still on disk: a deleted job folder (or file) is not
        listed, so a client never offers a download that would 404."""
        if not job.files:
            return []
        folder = self.worker.jobs_dir / job.id
        if folder.is_symlink() or not folder.is_dir():
            return []
        return [name for name in job.files if (folder / name).is_file()]

    def record(self, job: Job, now: float | None = None) -> dict[str, Any]:
        """The API's job record (the store's, with the files that really exist)."""
        return {**job.record(now), "files": self.present_files(job)}

    def check_memory(self, spec: JobSpec) -> None:
        """Refuse (TooHeavy) a job that would not fit before it starts: its largest stage's measured
        peak against the device's memory (VRAM on CUDA, unified memory on a Mac, the per-job RAM
        budget on the CPU; pipeline/memory.py), and its reconstruction against the RAM budget."""
        from make_your_3d.device import resolve_device
        from make_your_3d.models.registry import is_tiny
        from make_your_3d.pipeline.memory import check_fits, device_budget, resolve_preset_name
        from make_your_3d.pipeline.presets import resolve_preset

        # the preset the job will run with: the generator's rule (auto, tiny sizes, server and job overrides)
        overrides = {**(self.overrides or {}), **(spec.overrides or {})}
        tiny = is_tiny(self.models_dir)
        name = resolve_preset_name(spec.preset, resolve_device(self.device), lambda n: resolve_preset(n, self.models_dir, overrides).precision,
                                   self.memory_budget_bytes, tiny)
        preset = resolve_preset(name, self.models_dir, overrides)
        if not tiny:  # the measured figures are the published sizes'
            kind, dtype, budget = device_budget(self.device, preset.precision, self.memory_budget_bytes)
            if budget is not None:
                check_fits(kind, dtype, preset.name, budget)
        if self.memory_budget_bytes is not None:
            check_job_memory(preset.recon_preset, spec.faces or preset.faces, spec.texture_size or preset.texture_size, self.memory_budget_bytes)

    def queue(self, specs: list[JobSpec], image: bytes, who: Principal = LOCAL_PRINCIPAL) -> Created:
        """Check the first job's memory and the weights, then store every job (owned by `who`) and wake the worker."""
        self.check_memory(specs[0])
        _check_weights(self.models_dir, self.needed_roles())
        digest = self.worker.inputs.put(image)
        jobs = self.store.add_jobs(specs, digest, max_queued=self.max_queued, owner=who.user)
        self.worker.wake()
        log.info("queued %d job(s) in group %s", len(jobs), jobs[0].group)
        return Created(ids=[j.id for j in jobs], group=jobs[0].group, seeds=[j.spec.seed for j in jobs])


def jobs_router(ctx: ServiceContext, **router_args: Any) -> APIRouter:
    """/v1/jobs...: create, list, read, follow, cancel, re-run jobs and fetch their files."""
    api = APIRouter(**router_args)

    @api.post("/jobs", status_code=201, response_model=Created)
    def create_jobs(body: JobCreate, who: Principal = Depends(caller)) -> Created:
        image = _decode_image(body.image_png_b64)
        try:
            seeds = variant_seeds(body.seed, body.variants)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        spec = JobSpec(body.prompt, body.negative_prompt, body.subject, seeds[0], body.preset or ctx.default_preset, body.faces,
                       body.texture_size, _overrides(body.overrides))
        spec = _clean_spec(spec, image)
        return ctx.queue([JobSpec(**{**spec.to_dict(), "seed": seed}) for seed in seeds], image, who)

    @api.get("/jobs", response_model=JobList)
    def list_jobs(limit: int = Query(DEFAULT_PAGE, ge=1, le=MAX_PAGE, description="jobs per page"),
                  before: int | None = Query(None, ge=0, description="the `next` cursor of the previous page"),
                  who: Principal = Depends(caller)) -> dict[str, Any]:
        """The newest jobs first by page; within a page, oldest first (a remote user's own jobs only)."""
        now = time.time()
        jobs, cursor = ctx.store.page(limit, before, owner=who.user)
        return {"jobs": [ctx.record(j, now) for j in jobs], "next": cursor}

    @api.get("/jobs/{job_id}", response_model=JobRecord)
    def job_record(job_id: str, who: Principal = Depends(caller)) -> dict[str, Any]:
        return ctx.record(ctx.get_job(job_id, who))

    @api.get(
        "/jobs/{job_id}/events",
        response_class=StreamingResponse,
        responses={200: {"content": {"text/event-stream": {}}, "description": "one `data: <job record>` event per change"}},
    )
    async def job_events(job_id: str, who: Principal = Depends(caller)) -> StreamingResponse:
        await run_in_threadpool(ctx.get_job, job_id, who)
        return StreamingResponse(_job_stream(ctx, job_id), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @api.post("/jobs/{job_id}/cancel", response_model=JobRecord)
    def cancel(job_id: str, who: Principal = Depends(caller)) -> dict[str, Any]:
        ctx.get_job(job_id, who)
        ctx.worker.cancel(job_id)
        return ctx.record(ctx.get_job(job_id, who))

    @api.post("/jobs/{job_id}/rerun", status_code=201, response_model=Created)
    def rerun(job_id: str, body: JobRerun | None = None, who: Principal = Depends(caller)) -> Created:
        job = ctx.get_job(job_id, who)
        changes = body.model_dump(exclude_unset=True) if body is not None else {}
        spec = job.spec.to_dict()
        for key, value in changes.items():
            if key == "seed" and value is None:
                [value] = variant_seeds(None, 1)
            if key in ("prompt", "negative_prompt", "preset") and value is None:
                continue  # null means "keep"
            if key == "overrides":
                value = _overrides(value)  # null or {}: back to the preset's settings
            spec[key] = value
        image = ctx.worker.inputs.get(job.image_sha256)
        return ctx.queue([_clean_spec(JobSpec.from_dict(spec), image)], image, who)

    @api.get("/jobs/{job_id}/files/{name:path}", response_class=FileResponse,
             responses={200: {"content": {"model/gltf-binary": {}, "image/png": {}, "application/json": {}}}})
    def job_file(job_id: str, name: str, who: Principal = Depends(caller)) -> FileResponse:
        """A result file; HTTP Range requests (and If-Range) are answered with 206, so a client resumes
        a broken download of a large GLB where it stopped."""
        job = ctx.get_job(job_id, who)
        not_found = NotFound(f"Job {job.id} has no file {shown(name)}; its files are listed in GET /v1/jobs/{job.id}.")
        if name not in job.files:
            raise not_found
        jobs_dir = ctx.worker.jobs_dir
        folder = jobs_dir / job.id
        if folder.is_symlink():  # a job folder is always a real folder; a link may point anywhere
            raise not_found
        root = folder.resolve()
        path = (root / name).resolve()
        if root.parent != jobs_dir.resolve() or not path.is_relative_to(root) or not path.is_file():
            raise not_found
        media = _FILE_TYPES.get(path.suffix.lower(), "application/octet-stream")
        return FileResponse(path, media_type=media, filename=path.name)

    return api


def groups_router(ctx: ServiceContext, **router_args: Any) -> APIRouter:
    """/v1/groups/{group}...: act on every job of one request (its variants) at once."""
    api = APIRouter(**router_args)

    @api.post("/groups/{group}/cancel", response_model=GroupCancelled)
    def cancel_group(group: str, who: Principal = Depends(caller)) -> dict[str, Any]:
        """Cancel every job of a group: queued ones at once, the running one at its next check."""
        jobs = [j for j in ctx.store.group(group) if who.user is None or j.owner == who.user]
        if not jobs:
            raise NotFound(f"There is no group {shown(group)}. A job's group is in its record (GET /v1/jobs/{{id}}).")
        cancelled, stopping = ctx.worker.cancel_group(group)
        touched = set(cancelled) | set(stopping)
        finished = [j.id for j in jobs if j.terminal and j.id not in touched]
        return {"group": group, "cancelled": cancelled, "stopping": stopping, "finished": finished}

    return api


def caller(request: Request) -> Principal:
    """Who sent the request (the Guard authenticated it before routing)."""
    principal = getattr(request.state, "principal", None)
    if not isinstance(principal, Principal):  # never reached behind the Guard; refuse rather than assume
        raise Unauthorized("A valid bearer token is required ('Authorization: Bearer TOKEN').")
    return principal


def _operator_only(who: Principal, what: str) -> None:
    if not who.operator:
        raise Forbidden(f"Only the backend's operator may {what}; it is shared by other users. Ask the operator.")


async def _job_stream(ctx: ServiceContext, job_id: str):
    """Server-sent events of one job's record: on every change (a store notification, no polling)
    and at least every HEARTBEAT_S; ends with the terminal record."""
    sent_key = None
    sent_at = 0.0
    while True:
        changed = ctx.feed.current()  # taken before the read: a change after it wakes us
        job = await run_in_threadpool(ctx.store.get, job_id)
        if job is None:
            return
        record = ctx.record(job)
        key = json.dumps({k: v for k, v in record.items() if k != "elapsed_s"}, sort_keys=True)
        now = time.monotonic()
        if key != sent_key or now - sent_at >= HEARTBEAT_S:
            sent_key, sent_at = key, now
            yield f"data: {json.dumps(record)}\n\n".encode("utf-8")
        if job.terminal:
            return
        # a client that goes away cancels this generator (Starlette listens for the disconnect)
        try:
            await asyncio.wait_for(changed.wait(), timeout=max(0.05, HEARTBEAT_S - (time.monotonic() - sent_at)))
        except asyncio.TimeoutError:
            pass


def system_router(ctx: ServiceContext, app: FastAPI, on_shutdown: Callable[[], None] | None, **router_args: Any) -> APIRouter:
    """/v1/models, /v1/unload, /v1/shutdown and the OpenAPI document (all behind the token)."""
    api = APIRouter(**router_args)

    @api.get("/openapi.json", include_in_schema=False)
    def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @api.get("/schema", response_model=Schema)
    def schema() -> Schema:
        """What a client may send and what it will see: the request's JSON schema, the stage list with
        the labels to show, the presets. The add-on reads it instead of spelling these itself."""
        from make_your_3d.pipeline.stages import published_stages

        return Schema(version=__version__, job_params=JobCreate.model_json_schema(), stages=published_stages(), presets=list(PRESET_NAMES))

    @api.get("/models", response_model=ModelsState)
    def models() -> dict[str, Any]:
        models_dir = ctx.models_dir
        roles = []
        for r in ROLES.values():
            missing, damaged = r.missing(models_dir), r.damaged(models_dir, hash_below=MODELS_HASH_BELOW)
            roles.append({"name": r.name, "title": r.title, "licence": r.licence, "complete": not missing and not damaged,
                          "missing": missing, "damaged": damaged})
        need = ctx.needed_roles()
        complete = all(r["complete"] for r in roles if r["name"] in need)
        return {"models_dir": str(models_dir), "tiny": is_tiny(models_dir), "complete": complete, "roles": roles}

    @api.post("/unload", response_model=Unloaded)
    def unload(who: Principal = Depends(caller)) -> dict[str, bool]:
        _operator_only(who, "free the models")
        immediate = ctx.worker.unload()
        return {"unloaded": True, "deferred": not immediate}

    @api.post("/shutdown", response_model=Stopping)
    def shutdown(background: BackgroundTasks, who: Principal = Depends(caller)) -> dict[str, bool]:
        _operator_only(who, "stop the backend")
        log.info("shutdown requested over the API")
        if on_shutdown is not None:
            background.add_task(on_shutdown)
        return {"stopping": True}

    return api


def create_app(
    store: JobStore,
    worker: Worker,
    token: str,
    *,
    models_dir: Path,
    default_preset: str = "default",
    on_shutdown: Callable[[], None] | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    activity: Activity | None = None,
    check_host: bool = True,
    memory_budget_bytes: int | None = None,
    overrides: dict | None = None,
    max_queued_jobs: int = MAX_QUEUED_JOBS,
    device: str = "auto",
    remote: RemoteAccess | None = None,
) -> FastAPI:
    """Build the API around a job store and its worker; `token` guards every route but health.

    `check_host` False (a backend started with --allow-remote) accepts any Host header; the token
    still applies. `memory_budget_bytes` refuses requests whose estimated memory is larger;
    `max_queued_jobs` refuses (queue_full) a request that would queue more waiting jobs. `remote`
    makes this the remote listener: user tokens instead of `token`, each user's own jobs only."""
    activity = activity or Activity()
    ctx = ServiceContext(store, worker, Path(models_dir), default_preset, ChangeFeed(), memory_budget_bytes, overrides, max_queued_jobs, device)
    store.subscribe(ctx.feed.changed)

    bearer = HTTPBearer(auto_error=False, description="the token from the state file, or a user token on the remote listener")

    def require_token(request: Request, creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        # the Guard checked the token before routing; this dependency puts the scheme in the OpenAPI document
        caller(request)

    app = FastAPI(
        title="Make-Your-3D local service",
        version=__version__,
        description="Local backend for the Blender add-on: subject image + text edit -> textured GLB.",
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    install_error_handlers(app)
    app.add_middleware(Guard, limit=max_body_bytes, activity=activity, token=token, check_host=check_host, remote=remote)
    app.state.activity = activity

    public = APIRouter(prefix="/v1")

    @public.get("/health", response_model=Health)
    async def health() -> dict[str, str]:
        # async and lock-free: answered on the event loop even when every pool thread is busy
        return {"status": "ok", "version": __version__}

    guarded = {"prefix": "/v1", "dependencies": [Depends(require_token)], "responses": _ERRORS}
    app.include_router(public)
    app.include_router(jobs_router(ctx, **guarded))
    app.include_router(groups_router(ctx, **guarded))
    app.include_router(system_router(ctx, app, on_shutdown, **guarded))
    return app
