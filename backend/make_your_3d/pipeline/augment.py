"""Augmentations for the identity-aware stage: the adapter should learn the subject, not one framing.

Random background colour, random resized crop, horizontal flip (every Wonder3D view keeps its
direction word under a flip: left and right are both "side"), mild colour jitter. Deterministic for
a numpy Generator.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageEnhance

from make_your_3d.pipeline.preprocess import composite


def augment(rgba: Image.Image, rng: np.random.Generator, size: int) -> Image.Image:
    """One random augmentation of a subject view (RGBA) -> RGB image of `size`."""
    grey = int(rng.integers(200, 256))
    tint = rng.integers(-12, 13, size=3)
    background = tuple(int(np.clip(grey + t, 0, 255)) for t in tint)
    image = composite(rgba, background)
    w, h = image.size
    scale = rng.uniform(0.85, 1.0)
    cw, ch = int(w * scale), int(h * scale)
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    image = image.crop((x0, y0, x0 + cw, y0 + ch)).resize((size, size), Image.BICUBIC)
    if rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.9, 1.1))
    image = ImageEnhance.Contrast(image).enhance(rng.uniform(0.9, 1.1))
    image = ImageEnhance.Color(image).enhance(rng.uniform(0.9, 1.1))
    return image


def to_tensor(images: list[Image.Image]):
    """RGB PIL images -> float tensor (B, 3, H, W) in [-1, 1], the VAE's input range."""
    import torch

    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1.0 for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()
