"""What one generation job asks for, and the cheap checks made before a job is accepted.

The service calls `validate_request` before it queues a job, so bad input is a 4xx at once; the
generator calls it again, so the CLI gets the same errors.
"""

from __future__ import annotations

import io
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from make_your_3d.errors import BadImage, BadPrompt, BadRequest, NoSubject

MAX_IMAGE_BYTES = 32 * 1024 * 1024
MAX_IMAGE_SIDE = 8192
MIN_IMAGE_SIDE = 16
MAX_PROMPT_CHARS = 500
PRESETS = ("fast", "default", "quality", "lowvram")


@dataclass
class GenerateRequest:
    image: bytes  # the subject image file as uploaded (PNG, JPEG or WebP)
    prompt: str  # the text edit, e.g. "wearing a red scarf"
    subject: str | None = None  # short description of the subject; None means a generic word
    negative_prompt: str = ""
    seed: int = 0
    preset: str = "default"
    faces: int | None = None
    texture_size: int | None = None
    extras: dict = field(default_factory=dict)
    overrides: dict | None = None  # the job's own sampling settings (presets.JOB_OVERRIDES), on top of the preset


@dataclass
class GenerateResult:
    out_dir: Path
    files: list[str]  # names relative to out_dir
    cached_stages: list[str]
    timings: dict[str, float]


def load_image_bytes(data: bytes) -> Image.Image:
    """Decode an uploaded image with size limits; raises BadImage with a sentence a user understands."""
    if not data:
        raise BadImage("The image is empty (0 bytes). Pick a PNG, JPEG or WebP photo of the subject.")
    if len(data) > MAX_IMAGE_BYTES:
        raise BadImage(f"The image is {len(data) / 2**20:.0f} MiB; the limit is {MAX_IMAGE_BYTES // 2**20} MiB. Resize it and try again.")
    try:
        with Image.open(io.BytesIO(data)) as probe:
            fmt = probe.format
            width, height = probe.size
    except Exception:
        raise BadImage("The file is not a readable image. Pick a PNG, JPEG or WebP photo of the subject.") from None
    if fmt not in ("PNG", "JPEG", "WEBP"):
        raise BadImage(f"Images in {fmt} format are not supported. Use PNG, JPEG or WebP.")
    if max(width, height) > MAX_IMAGE_SIDE:
        raise BadImage(f"The image is {width}x{height} pixels; the limit is {MAX_IMAGE_SIDE} on each side. Resize it and try again.")
    if min(width, height) < MIN_IMAGE_SIDE:
        raise BadImage(f"The image is {width}x{height} pixels; it must be at least {MIN_IMAGE_SIDE} on each side.")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return im.convert("RGBA") if ("A" in im.getbands() or "transparency" in im.info) else im.convert("RGB")
    except Exception:
        raise BadImage("The image file is damaged (it could not be decoded completely). Re-export it and try again.") from None


def check_has_subject(image: Image.Image) -> None:
    """Fail fast on images that cannot contain a subject: empty alpha, or one flat colour."""
    arr = np.asarray(image)
    if image.mode == "RGBA" and (arr[..., 3] >= 128).sum() < 16:
        raise NoSubject("The image's alpha channel is empty: there is no subject to reconstruct. Use a photo where the subject is visible.")
    rgb = arr[..., :3].reshape(-1, 3).astype(np.float32)
    if image.mode == "RGBA":
        rgb = rgb[arr[..., 3].reshape(-1) >= 128]
    if rgb.std(axis=0).max() < 2.0:
        raise NoSubject("The image is a single flat colour: there is no subject in it. Use a photo of the subject.")


def clean_prompt(text: str, field_name: str = "prompt", *, required: bool = True) -> str:
    if not isinstance(text, str):
        raise BadPrompt(f"The {field_name} must be text.")
    text = unicodedata.normalize("NFC", text).strip()
    if any(unicodedata.category(ch) in ("Cc", "Cs") and ch not in "\t\n" for ch in text):
        raise BadPrompt(f"The {field_name} contains control characters; type plain text.")
    if required and not text:
        raise BadPrompt(f"The {field_name} is empty. Describe the change, e.g. \"wearing a red scarf\".")
    if len(text) > MAX_PROMPT_CHARS:
        raise BadPrompt(f"The {field_name} is {len(text)} characters; keep it under {MAX_PROMPT_CHARS}.")
    return text


def validate_request(request: GenerateRequest) -> Image.Image:
    """Check every field; returns the decoded image. Raises a Make3DError subclass on bad input."""
    request.prompt = clean_prompt(request.prompt)
    request.negative_prompt = clean_prompt(request.negative_prompt or "", "negative prompt", required=False)
    if request.subject is not None:
        request.subject = clean_prompt(request.subject, "subject description", required=False) or None
    if request.preset not in PRESETS:
        raise BadRequest(f"Unknown preset {request.preset!r}; use one of {', '.join(PRESETS)}.")
    if not isinstance(request.seed, int) or not 0 <= request.seed < 2**32:
        raise BadRequest("The seed must be a whole number from 0 to 4294967295.")
    if request.faces is not None and not 500 <= request.faces <= 500_000:
        raise BadRequest("The face budget must be between 500 and 500000.")
    if request.texture_size is not None and request.texture_size not in (256, 512, 1024, 2048, 4096):
        raise BadRequest("The texture size must be 256, 512, 1024, 2048 or 4096.")
    from make_your_3d.pipeline.presets import validate_job_overrides

    request.overrides = validate_job_overrides(request.overrides) or None
    image = load_image_bytes(request.image)
    check_has_subject(image)
    return image
