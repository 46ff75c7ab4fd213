"""Draws examples/toy_bear.png: a shaded toy bear with an alpha mask, made procedurally.

Each part is an ellipsoid shaded by its analytic normal under one light, so the image has the
shading cues a real photo has. Run it again to regenerate the bundled file (deterministic).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

SIZE, SUPER = 320, 2
LIGHT = np.array([-0.4, -0.5, 0.77]) / np.linalg.norm([-0.4, -0.5, 0.77])

# (centre x, centre y, radius x, radius y, depth bias, RGB); later parts are drawn on top.
PARTS = [
    (0.30, 0.25, 0.075, 0.075, 0.0, (120, 72, 40)),  # left ear
    (0.70, 0.25, 0.075, 0.075, 0.0, (120, 72, 40)),  # right ear
    (0.50, 0.66, 0.24, 0.26, 0.0, (139, 90, 52)),  # body
    (0.27, 0.62, 0.07, 0.13, 0.1, (128, 80, 45)),  # left arm
    (0.73, 0.62, 0.07, 0.13, 0.1, (128, 80, 45)),  # right arm
    (0.38, 0.89, 0.09, 0.06, 0.1, (128, 80, 45)),  # left foot
    (0.62, 0.89, 0.09, 0.06, 0.1, (128, 80, 45)),  # right foot
    (0.50, 0.69, 0.14, 0.16, 0.2, (222, 190, 140)),  # belly
    (0.50, 0.36, 0.20, 0.17, 0.3, (150, 98, 58)),  # head
    (0.50, 0.42, 0.08, 0.06, 0.4, (232, 205, 160)),  # muzzle
    (0.50, 0.395, 0.03, 0.022, 0.5, (40, 25, 20)),  # nose
    (0.42, 0.32, 0.022, 0.026, 0.5, (20, 20, 25)),  # left eye
    (0.58, 0.32, 0.022, 0.026, 0.5, (20, 20, 25)),  # right eye
    (0.50, 0.52, 0.16, 0.03, 0.45, (200, 30, 40)),  # red bow tie band
]


def draw() -> Image.Image:
    n = SIZE * SUPER
    ys, xs = np.mgrid[0:n, 0:n] / n
    rgb = np.zeros((n, n, 3))
    alpha = np.zeros((n, n))
    for cx, cy, rx, ry, _, colour in PARTS:
        dx, dy = (xs - cx) / rx, (ys - cy) / ry
        r2 = dx**2 + dy**2
        inside = r2 < 1.0
        nz = np.sqrt(np.clip(1.0 - r2, 0.0, 1.0))
        normal = np.stack([dx, dy, nz], axis=-1)
        normal /= np.linalg.norm(normal, axis=-1, keepdims=True) + 1e-9
        shade = 0.35 + 0.65 * np.clip(normal @ LIGHT, 0.0, 1.0)
        spec = np.clip(normal @ LIGHT, 0.0, 1.0) ** 40 * 0.25
        part = np.clip(np.array(colour) / 255.0 * shade[..., None] + spec[..., None], 0.0, 1.0)
        rgb[inside] = part[inside]
        alpha[inside] = 1.0
    img = np.concatenate([rgb, alpha[..., None]], axis=-1)
    img = img.reshape(SIZE, SUPER, SIZE, SUPER, 4).mean(axis=(1, 3))  # antialias
    straight = img[..., :3] / np.clip(img[..., 3:], 1e-6, None)  # store straight (unpremultiplied) colour
    out = np.concatenate([np.clip(straight, 0, 1), img[..., 3:]], axis=-1)
    return Image.fromarray(np.round(out * 255).astype(np.uint8), "RGBA")


if __name__ == "__main__":
    draw().save(Path(__file__).with_name("toy_bear.png"), optimize=False)
