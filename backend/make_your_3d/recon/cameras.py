"""Camera poses in the views contract (glTF world: +Y up, subject faces +Z; OpenCV camera axes).

Orthographic projection of world point p: c = w2c @ p, u = (c.x / ortho_w + 1/2) * W,
v = (c.y / ortho_h + 1/2) * H. Perspective: [u, v, 1] ~ K @ c.
"""

from __future__ import annotations

import numpy as np

def look_at(eye: np.ndarray, target: np.ndarray = np.zeros(3), up: np.ndarray = np.array([0.0, 1.0, 0.0])) -> np.ndarray:
    """Camera-to-world 4x4 with OpenCV axes (+x right, +y down, +z forward) looking from eye to target."""
    eye = np.asarray(eye, dtype=np.float64)
    z = np.asarray(target, dtype=np.float64) - eye
    z /= np.linalg.norm(z)
    x = np.cross(z, up)
    if np.linalg.norm(x) < 1e-8:  # looking straight up or down: pick another up
        x = np.cross(z, np.array([0.0, 0.0, -1.0]))
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = x, y, z, eye
    return c2w


def orbit_c2w(azimuth_deg: float, elevation_deg: float = 0.0, radius: float = 3.0) -> np.ndarray:
    """Camera on a sphere around the origin: azimuth 0 is the front (+Z), 90 is +X, elevation up is +Y."""
    az, el = np.radians(azimuth_deg), np.radians(elevation_deg)
    eye = radius * np.array([np.cos(el) * np.sin(az), np.sin(el), np.cos(el) * np.cos(az)])
    return look_at(eye)


def w2c(c2w: np.ndarray) -> np.ndarray:
    return np.linalg.inv(c2w)


def project_orthographic(points: np.ndarray, c2w: np.ndarray, ortho_size: tuple[float, float], image_size: tuple[int, int]) -> np.ndarray:
    """World points (N, 3) -> pixel coordinates (N, 2) and camera depth (N,), stacked as (N, 3)."""
    cam = (w2c(c2w) @ np.c_[points, np.ones(len(points))].T).T[:, :3]
    w, h = image_size
    u = (cam[:, 0] / ortho_size[0] + 0.5) * w
    v = (cam[:, 1] / ortho_size[1] + 0.5) * h
    return np.stack([u, v, cam[:, 2]], axis=1)
