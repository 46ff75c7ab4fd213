"""What one generation job asks for, and the cheap checks made before a job is accepted.

The service calls `validate_request` before it queues a job, so bad input is a 4xx at once; the
generator calls it again, so the CLI gets the same errors.
"""

from __future__ import annotations

import io
import unicodedata
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image

from make_your_3d.job_params import AUTO_PRESET, FACES_RANGE, MAX_PROMPT_CHARS, MAX_RAW_PROMPT_CHARS, PRESET_NAMES, SEED_MAX, TEXTURE_SIZES
from make_your_3d.errors import BadImage, BadPrompt, BadRequest, DecompressionBomb, NoSubject, TooHeavy

MAX_IMAGE_BYTES = 32 * 1024 * 1024
MAX_IMAGE_SIDE = 8192
MAX_IMAGE_PIXELS = MAX_IMAGE_SIDE * MAX_IMAGE_SIDE
MIN_IMAGE_SIDE = 16
# Decoded images are reduced to this longer side at once: every model works at 512 px or less, and
# an 8192 px image carried through preprocessing as float copies took minutes and gigabytes.
MAX_WORK_SIDE = 2048


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


def _bomb(exc: Exception) -> DecompressionBomb:
    pixels = next((int(w) for w in str(exc).replace("(", " ").split() if w.isdigit()), None)
    claim = f"claims {pixels / 1e6:,.0f} million pixels" if pixels else "claims far more pixels than any photo"
    return DecompressionBomb(
        f"The image {claim}: it looks like a decompression bomb and was not decoded. "
        f"Use a PNG, JPEG or WebP of at most {MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE} pixels."
    )


# EXIF orientation -> the transpose that shows the image upright (PIL.ImageOps.exif_transpose's table).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SIDEWAYS = (5, 6, 7, 8)  # orientations that swap width and height
_HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation (1 when absent or unreadable). Phone cameras store portrait photos
    sideways with this tag; every viewer turns them upright, so we must too."""
    try:
        value = im.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # a damaged EXIF block is not a reason to refuse the photo
        return 1
    return value if value in _UPRIGHT else 1


def _to_8bit(im: Image.Image, target: str) -> Image.Image:
    """A 16-bit or 32-bit greyscale image (modes I;16*, I, F) scaled to 8 bits. Pillow's convert
    clips these at 255, which turns a 16-bit photo white (and then "no subject"). Scaled in bands
    of rows, so an 8192 px image needs no full-size float copy."""
    arr = np.asarray(im)
    top = float(arr.max()) if arr.size else 0.0
    if im.mode.startswith("I;16") or (im.mode == "I" and top > 255) or (im.mode == "F" and top > 255):
        scale = 1.0 / 257.0  # 65535 -> 255
    elif im.mode == "F" and top <= 1.0:
        scale = 255.0  # a float image in 0..1
    else:
        scale = 1.0
    grey = np.empty(arr.shape, np.uint8)
    for y in range(0, arr.shape[0], 256):
        grey[y:y + 256] = np.clip(np.rint(arr[y:y + 256].astype(np.float32) * scale), 0, 255)
    out = Image.fromarray(grey, "L")
    if target != "RGBA":
        return out.convert(target)
    transparent = im.info.get("transparency")
    alpha = (arr != transparent) if isinstance(transparent, (int, float)) else np.ones(arr.shape, bool)
    out = out.convert("RGBA")
    out.putalpha(Image.fromarray(alpha.astype(np.uint8) * 255, "L"))
    return out


def load_image_bytes(data: bytes, max_side: int = MAX_WORK_SIDE) -> Image.Image:
    """Decode an uploaded image with size limits, upright (EXIF orientation applied), in 8 bits per
    channel, reduced to at most `max_side` pixels on its longer side; raises BadImage (or
    DecompressionBomb) with a sentence a user understands.

    The header is checked before any pixel is decoded; a JPEG is then decoded at a reduced scale
    (`draft`), other formats are reduced straight after decoding, before any copy is made. The
    orientation is applied last, to the reduced image (the size limits are the same either way
    round, and the reduction box is square); sizes in messages are the upright ones.
    """
    if not data:
        raise BadImage("The image is empty (0 bytes). Pick a PNG, JPEG or WebP photo of the subject.")
    if len(data) > MAX_IMAGE_BYTES:
        raise BadImage(f"The image is {len(data) / 2**20:.0f} MiB; the limit is {MAX_IMAGE_BYTES // 2**20} MiB. Resize it and try again.")
    with warnings.catch_warnings():
        # Pillow warns above Image.MAX_IMAGE_PIXELS and raises above twice that; both are bombs
        # here (our own side limit is lower), so the warning is an error too.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as probe:
                fmt = probe.format
                width, height = probe.size
                # JPEG and WebP carry EXIF in the header; a PNG's may follow the pixels (not read here)
                if fmt in ("JPEG", "WEBP") and _orientation(probe) in _SIDEWAYS:
                    width, height = height, width
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise _bomb(exc) from None
        except Exception:
            raise BadImage("The file is not a readable image. Pick a PNG, JPEG or WebP photo of the subject.") from None
        if fmt not in ("PNG", "JPEG", "WEBP"):
            raise BadImage(f"Images in {fmt} format are not supported. Use PNG, JPEG or WebP.")
        if max(width, height) > MAX_IMAGE_SIDE or width * height > MAX_IMAGE_PIXELS:
            raise BadImage(f"The image is {width}x{height} pixels; the limit is {MAX_IMAGE_SIDE} on each side. Resize it and try again.")
        if min(width, height) < MIN_IMAGE_SIDE:
            raise BadImage(f"The image is {width}x{height} pixels; it must be at least {MIN_IMAGE_SIDE} on each side.")
        try:
            with Image.open(io.BytesIO(data)) as im:
                alpha = "A" in im.getbands() or "transparency" in im.info
                target = "RGBA" if alpha else "RGB"
                if im.format == "JPEG":
                    im.draft("RGB", (max_side, max_side))  # the decoder scales by 1/2, 1/4 or 1/8
                im.load()
                upright = _UPRIGHT.get(_orientation(im))
                if im.mode in ("RGB", "RGBA", "L", "LA"):
                    im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS, reducing_gap=3.0)  # premultiplied for alpha
                    out = im.convert(target)
                else:
                    out = _to_8bit(im, target) if im.mode in _HIGH_BIT_MODES else im.convert(target)
                    out.thumbnail((max_side, max_side), Image.Resampling.LANCZOS, reducing_gap=3.0)
                return out.transpose(upright) if upright is not None else out
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise _bomb(exc) from None
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


_ZWJ = "\u200d"
_VS16 = "\ufe0f"
_BLACK_FLAG = "\U0001F3F4"


def _emoji_side(ch: str) -> bool:
    """Whether `ch` can sit next to a zero-width joiner inside an emoji sequence."""
    return ch == _VS16 or (ord(ch) > 0x2000 and unicodedata.category(ch) in ("So", "Sk"))


def strip_format_chars(text: str) -> str:
    """Drop Unicode format characters (category Cf: zero-width spaces, bidi overrides, soft hyphens,
    BOMs), which are invisible in the prompt field and change what the text encoder sees. Kept: a
    zero-width joiner between two emoji (the people, flag and profession emoji need it) and the
    tag characters of a subdivision flag after its black flag."""
    if all(unicodedata.category(ch) != "Cf" for ch in text):
        return text
    out: list[str] = []
    for i, ch in enumerate(text):
        if unicodedata.category(ch) != "Cf":
            out.append(ch)
        elif ch == _ZWJ and out and i + 1 < len(text) and _emoji_side(out[-1]) and _emoji_side(text[i + 1]):
            out.append(ch)
        elif 0xE0020 <= ord(ch) <= 0xE007F and out and (out[-1] == _BLACK_FLAG or 0xE0020 <= ord(out[-1]) <= 0xE007F):
            out.append(ch)
    return "".join(out)


def prompt_too_long(field_name: str, length: int | None = None) -> BadPrompt:
    """The one sentence for text over the limit. It names only MAX_PROMPT_CHARS: the longer
    MAX_RAW_PROMPT_CHARS is an internal early cut-off, not a limit a user can aim for."""
    count = f" ({length} characters)" if length is not None else ""
    return BadPrompt(f"The {field_name} is longer than {MAX_PROMPT_CHARS} characters{count}; shorten it to at most {MAX_PROMPT_CHARS}.")


def clean_prompt(text: str, field_name: str = "prompt", *, required: bool = True) -> str:
    if not isinstance(text, str):
        raise BadPrompt(f"The {field_name} must be text.")
    if len(text) > MAX_RAW_PROMPT_CHARS:  # before any O(n) pass over it
        raise prompt_too_long(field_name, len(text))
    if any(unicodedata.category(ch) in ("Cc", "Cs") and ch not in "\t\n" for ch in text):
        raise BadPrompt(f"The {field_name} contains control characters; type plain text.")
    text = unicodedata.normalize("NFC", strip_format_chars(text)).strip()
    if required and not text:
        raise BadPrompt(f"The {field_name} is empty. Describe the change, e.g. \"wearing a red scarf\".")
    if len(text) > MAX_PROMPT_CHARS:
        raise prompt_too_long(field_name, len(text))
    return text


# --- memory a job needs -------------------------------------------------------------------------
# The reconstruction is the stage whose memory grows with the request (faces, texture size). Its peak
# at a reconstruction preset's own faces and texture is measured (pipeline/memory.py `recon_peak_gb`:
# default 9.7 GB, its 512-point fused grid; fast 3.9 GB, 320 points; BENCHMARKS.md "Peak memory per
# stage"): that is the base. Only what a request asks beyond the preset's faces and texture is added,
# with the per-texel and per-face costs below (the bake's per-texel buffers: positions, barycentrics,
# accumulators, fill indices, ~120 B/texel; xatlas and the fill per face), calibrated on one CPU run
# (faces 500000, texture 4096). Fewer faces or a smaller texture do not lower it: the peak is the
# surface extraction on the grid, which they do not change.
_BYTES_PER_TEXEL = 120
_BYTES_PER_FACE = 1536
# Used only where no reconstruction figure is measured at all (an empty table): the earlier base,
# calibrated on that one run (it underestimates the grids measured since).
_RECON_BASE_BYTES = {"fast": int(0.8 * 2**30), "default": int(1.2 * 2**30), "quality": int(1.6 * 2**30)}
# The presets a too-heavy request is pointed to, lightest reconstruction last (their recon presets).
_SUGGEST = ("default", "lowvram")


def _recon_defaults(recon_preset: str) -> tuple[int, int]:
    from make_your_3d.recon.config import PRESETS as RECON_PRESETS

    config = RECON_PRESETS.get(recon_preset, RECON_PRESETS["quality"])  # as estimate_job_memory reads an unknown name
    return int(config.mesh.faces), int(config.bake.texture_size)


def estimate_job_memory(recon_preset: str, faces: int | None, texture_size: int | None) -> int:
    """Estimated peak bytes of a job's reconstruction: the measured peak of `recon_preset` at its own
    faces and texture, plus what the faces and texture asked for add beyond those."""
    from make_your_3d.pipeline.memory import GB, recon_peak_gb
    from make_your_3d.recon.config import PRESETS as RECON_PRESETS

    preset = recon_preset if recon_preset in RECON_PRESETS else "quality"
    default_faces, default_texture = _recon_defaults(preset)
    faces = faces or default_faces
    texture_size = texture_size or default_texture
    grow = _BYTES_PER_TEXEL * max(0, texture_size**2 - default_texture**2) + _BYTES_PER_FACE * max(0, faces - default_faces)
    peak = recon_peak_gb(preset)
    if peak is not None:
        return int(peak[0] * GB) + grow
    return _RECON_BASE_BYTES[preset] + _BYTES_PER_TEXEL * default_texture**2 + _BYTES_PER_FACE * default_faces + grow


def check_job_memory(recon_preset: str, faces: int | None, texture_size: int | None, budget_bytes: int) -> None:
    """Refuse (TooHeavy) a request whose estimated reconstruction memory is over `budget_bytes`, with a
    sentence saying what fits: the preset's own face count and texture size, or a lighter preset."""
    from make_your_3d.pipeline.presets import PRESETS

    need = estimate_job_memory(recon_preset, faces, texture_size)
    if need <= budget_bytes:
        return
    head = (f"This job's reconstruction would need about {need / 1e9:.1f} GB of memory (faces {faces or 'default'}, texture "
            f"{texture_size or 'default'}, {recon_preset} reconstruction); this backend allows {budget_bytes / 1e9:.1f} GB per job.")
    if (faces or texture_size) and estimate_job_memory(recon_preset, None, None) <= budget_bytes:
        default_faces, default_texture = _recon_defaults(recon_preset)
        raise TooHeavy(f"{head} Lower the face count or the texture size (this preset's own: {default_faces} faces, {default_texture} px).")
    for name in _SUGGEST:
        other = PRESETS[name].recon_preset
        if other == recon_preset:
            continue
        other_need = estimate_job_memory(other, faces, texture_size)
        if other_need <= budget_bytes:
            raise TooHeavy(f"{head} Pick the {name} preset (its reconstruction: about {other_need / 1e9:.1f} GB).")
    lightest = min(estimate_job_memory(PRESETS[name].recon_preset, None, None) for name in _SUGGEST)
    raise TooHeavy(f"{head} No preset's reconstruction fits (the lightest needs about {lightest / 1e9:.1f} GB at its own faces and "
                   "texture): raise the backend's per-job memory budget, or run on a machine with more memory.")


def validate_request(request: GenerateRequest) -> Image.Image:
    """Check every field; returns the decoded image. Raises a Make3DError subclass on bad input."""
    request.prompt = clean_prompt(request.prompt)
    request.negative_prompt = clean_prompt(request.negative_prompt or "", "negative prompt", required=False)
    if request.subject is not None:
        request.subject = clean_prompt(request.subject, "subject description", required=False) or None
    if request.preset not in PRESET_NAMES and request.preset != AUTO_PRESET:
        raise BadRequest(f"Unknown preset {request.preset!r}; use one of {', '.join(PRESET_NAMES)} or {AUTO_PRESET}.")
    if not isinstance(request.seed, int) or not 0 <= request.seed <= SEED_MAX:
        raise BadRequest(f"The seed must be a whole number from 0 to {SEED_MAX}.")
    if request.faces is not None and not FACES_RANGE[0] <= request.faces <= FACES_RANGE[1]:
        raise BadRequest(f"The face budget must be between {FACES_RANGE[0]} and {FACES_RANGE[1]}.")
    if request.texture_size is not None and request.texture_size not in TEXTURE_SIZES:
        raise BadRequest(f"The texture size must be one of {', '.join(map(str, TEXTURE_SIZES))}.")
    from make_your_3d.pipeline.presets import validate_job_overrides

    request.overrides = validate_job_overrides(request.overrides) or None
    image = load_image_bytes(request.image)
    check_has_subject(image)
    return image
