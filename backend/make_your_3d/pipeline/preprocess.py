"""Stage 1: the subject's foreground mask, then crop, recentre, pad to a square and resize.

The mask comes from the image's alpha when it has real transparency, otherwise from the segmenter
(CLIPSeg prompted with the subject description). `prepare_subject` gives every model the same
framing: the subject's longer side is `fill * size` (Wonder3D's setting is 0.75: about 192 px in a
256 px frame), centred, with alpha = mask. Resizing is done on premultiplied colour so transparent
pixels do not bleed dark fringes into the subject's edge.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from make_your_3d.errors import NoSubject, WeightsMissing
from make_your_3d.pipeline.request import check_has_subject, load_image_bytes
from make_your_3d.progress import CancelToken

if TYPE_CHECKING:
    from make_your_3d.pipeline.stages import StageInputs

MIN_SUBJECT_PIXELS = 16  # fewer foreground pixels than this is "no subject"
WONDER3D_FILL = 0.75
SEGMENT_MIN_PEAK = 0.1  # a segmenter whose best pixel is below this found nothing
KEEP_COMPONENT_FRACTION = 0.25  # segmenter blobs smaller than this share of the largest are dropped


def has_transparency(image: Image.Image) -> bool:
    """True when the image carries alpha that is not fully opaque everywhere."""
    if image.mode not in ("RGBA", "LA", "PA") and "transparency" not in image.info:
        return False
    alpha = np.asarray(image.convert("RGBA"))[..., 3]
    return bool(alpha.min() < 255)


def _no_subject(source: str) -> NoSubject:
    return NoSubject(
        f"No subject was found in the image ({source}). Use a photo where the subject is clearly visible, "
        "ideally a PNG with a transparent background."
    )


def _main_components(mask: np.ndarray) -> np.ndarray:
    """Keep the largest connected blob and any blob at least KEEP_COMPONENT_FRACTION of its size."""
    from skimage.measure import label

    labels = label(mask, connectivity=2)
    if labels.max() <= 1:
        return mask
    areas = np.bincount(labels.ravel())
    areas[0] = 0
    keep = np.flatnonzero(areas >= KEEP_COMPONENT_FRACTION * areas.max())
    return np.isin(labels, keep)


def _check(cancel: CancelToken | None) -> None:
    if cancel is not None:
        cancel.check()


def foreground_mask(image: Image.Image, segmenter=None, subject_text: str | None = None, *, cancel: CancelToken | None = None) -> np.ndarray:
    """Boolean (H, W) foreground mask: alpha if the image has transparency, else the segmenter.

    Raises NoSubject for an empty or flat image, WeightsMissing when the image has no transparency
    and no segmenter is given. `cancel` is checked between the passes.
    """
    _check(cancel)
    if has_transparency(image):
        rgba = image.convert("RGBA")
        check_has_subject(rgba)
        mask = np.asarray(rgba)[..., 3] >= 128
        if mask.sum() < MIN_SUBJECT_PIXELS:
            raise _no_subject("its transparency leaves almost nothing visible")
        return mask
    rgb = image.convert("RGB")
    check_has_subject(rgb)
    if segmenter is None:
        raise WeightsMissing(
            "This image has no transparent background, so the background must be removed by the `segmenter` "
            "model role (CLIPSeg), which is not available. Run `make-your-3d models fetch --role segmenter`, "
            "or use a PNG whose background is transparent."
        )
    from make_your_3d.models.segmenter import segment

    _check(cancel)
    prob = segment(segmenter, rgb, subject_text)
    _check(cancel)
    peak = float(prob.max())
    if peak < SEGMENT_MIN_PEAK:
        raise _no_subject(f"the background remover found nothing matching {subject_text or 'the main object'!r}")
    mask = _main_components(prob >= max(0.5 * peak, SEGMENT_MIN_PEAK))
    if mask.sum() < MIN_SUBJECT_PIXELS:
        raise _no_subject("the background remover's mask is empty")
    return mask


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1), end-exclusive, of the True pixels."""
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    return int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1


def _alpha_from(image: Image.Image, mask: np.ndarray | None) -> np.ndarray:
    """float32 alpha in [0, 1]: the given mask (bool or soft), else the image's own alpha."""
    if mask is not None:
        m = np.asarray(mask)
        if m.shape != (image.height, image.width):
            raise ValueError(f"mask shape {m.shape} does not match the image ({image.height}, {image.width})")
        return np.clip(m.astype(np.float32), 0.0, 1.0)
    return np.asarray(image.convert("RGBA"))[..., 3].astype(np.float32) / 255.0


def prepare_subject(
    image: Image.Image,
    size: int,
    fill: float = WONDER3D_FILL,
    mask: np.ndarray | None = None,
    background: tuple[int, int, int] = (255, 255, 255),
    *,
    cancel: CancelToken | None = None,
) -> Image.Image:
    """RGBA `size` x `size` image: the subject cropped to its bounding box, centred, its longer side
    `fill * size` pixels, alpha = mask (the image's own alpha when `mask` is None), and `background`
    as the colour under fully transparent pixels.

    Without a mask the image must have transparency (use `foreground_mask` with a segmenter first).
    """
    if not 0.0 < fill <= 1.0:
        raise ValueError(f"fill must be in (0, 1], got {fill}")
    if size < 8:
        raise ValueError(f"size must be at least 8 pixels, got {size}")
    _check(cancel)
    if mask is None:
        mask = foreground_mask(image, cancel=cancel)  # alpha-based; raises for images without transparency
        alpha = _alpha_from(image, None)
    else:
        alpha = _alpha_from(image, mask)
    _check(cancel)
    fg = np.asarray(mask) > (0.5 if np.asarray(mask).dtype != bool else 0)
    if fg.sum() < MIN_SUBJECT_PIXELS:
        raise _no_subject("the foreground mask is empty")
    x0, y0, x1, y1 = _bbox(fg)
    rgb = np.asarray(image.convert("RGB"))[y0:y1, x0:x1].astype(np.float32) / 255.0  # crop, then the float copy
    a = np.clip(alpha[y0:y1, x0:x1], 0.0, 1.0)
    h, w = a.shape
    scale = fill * size / max(h, w)
    nw, nh = max(1, min(size, round(w * scale))), max(1, min(size, round(h * scale)))
    # Premultiply, resize, un-premultiply: colour where alpha is 0 must not leak into the edge.
    premul = np.concatenate([rgb * a[..., None], a[..., None]], axis=-1)
    _check(cancel)
    resized = np.stack(
        [np.asarray(Image.fromarray(np.ascontiguousarray(premul[..., c], dtype=np.float32)).resize((nw, nh), Image.Resampling.BICUBIC)) for c in range(4)],
        axis=-1,
    )
    resized = np.clip(resized, 0.0, 1.0)
    out_a = resized[..., 3]
    bg = np.asarray(background, dtype=np.float32) / 255.0
    safe = np.where(out_a > 1e-4, out_a, 1.0)
    out_rgb = np.where(out_a[..., None] > 1e-4, np.clip(resized[..., :3] / safe[..., None], 0.0, 1.0), bg)
    canvas = np.zeros((size, size, 4), dtype=np.float32)
    canvas[..., :3] = bg
    ox, oy = (size - nw) // 2, (size - nh) // 2
    canvas[oy : oy + nh, ox : ox + nw, :3] = out_rgb
    canvas[oy : oy + nh, ox : ox + nw, 3] = out_a
    return Image.fromarray(np.round(canvas * 255.0).astype(np.uint8), mode="RGBA")


def composite(rgba: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Straight-alpha RGBA over a flat background colour -> RGB."""
    arr = np.asarray(rgba.convert("RGBA"), dtype=np.float32) / 255.0
    a = arr[..., 3:4]
    bg = np.asarray(background, dtype=np.float32) / 255.0
    out = arr[..., :3] * a + bg * (1.0 - a)
    return Image.fromarray(np.round(out * 255.0).astype(np.uint8), mode="RGB")


def subject_from_bytes(
    data: bytes,
    size: int,
    segmenter=None,
    subject_text: str | None = None,
    fill: float = WONDER3D_FILL,
    background: tuple[int, int, int] = (255, 255, 255),
    cancel: CancelToken | None = None,
) -> Image.Image:
    """Uploaded image bytes -> the framed RGBA subject (decode, mask, crop, recentre, resize)."""
    image = load_image_bytes(data)
    mask = foreground_mask(image, segmenter, subject_text, cancel=cancel)
    # With transparency, keep the image's soft alpha (mask=None); otherwise use the segmenter's mask.
    return prepare_subject(image, size, fill, mask=None if has_transparency(image) else mask, background=background, cancel=cancel)


def run_subject(inputs: "StageInputs", out: Path) -> None:
    """Stage subject: the job's image as every model sees it (`input.png`): masked (its alpha, else the
    segmenter prompted with the subject description), cropped, centred at `subject_fill` of the
    multi-view model's frame."""
    image, preset = inputs.request.image, inputs.preset
    transparent = has_transparency(image)
    segmenter = None if transparent else inputs.models.segmenter()
    mask = foreground_mask(image, segmenter, inputs.request.subject, cancel=inputs.cancel)
    subject = prepare_subject(image, preset.mv_size, preset.subject_fill, mask=None if transparent else mask, cancel=inputs.cancel)
    subject.save(out / "input.png")


def generated_mask(image: Image.Image, segmenter, subject_text: str | None, fallback: np.ndarray) -> np.ndarray:
    """Foreground of a generated image: the segmenter when installed and confident, else `fallback`
    (img2img keeps the layout, so the source view's mask is a sound stand-in)."""
    if segmenter is not None:
        try:
            mask = foreground_mask(image.convert("RGB"), segmenter, subject_text)
            if 0.01 < mask.mean() < 0.95:
                return mask
        except NoSubject:
            pass
    return np.asarray(fallback, dtype=bool)
