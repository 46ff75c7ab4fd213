"""The one camera module of recon/: poses, intrinsics, projection and unprojection, pixel sampling.

Conventions (the views contract, docs/DESIGN.md): glTF world (+Y up, the subject faces +Z); cameras
have OpenCV axes (+x right, +y down, +z forward); `viewmats` are world-to-camera. Pixel (i, j) covers
[i, i + 1) x [j, j + 1): its centre is at i + 0.5 (the same in gsplat, xatlas bakes and
`grid_sample(align_corners=False)`).

- orthographic ("ortho"): c = w2c @ p, u = (c.x / ortho_w + 1/2) * W = fx * c.x + cx with
  fx = W / ortho_w, cx = W / 2 (gsplat's "ortho" model);
- perspective ("pinhole"): [u, v, 1] ~ K @ c.

Every other module projects, unprojects and samples through these functions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


# ----------------------------------------------------------------------------------------- poses

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


# ---------------------------------------------------------------------------------- intrinsics

@dataclass
class Cameras:
    """A batch of cameras sharing one projection model and image size."""

    viewmats: Tensor  # (C, 4, 4) world-to-camera, OpenCV axes
    Ks: Tensor  # (C, 3, 3)
    width: int
    height: int
    model: str  # "ortho" or "pinhole"

    def __len__(self) -> int:
        return int(self.viewmats.shape[0])

    def subset(self, idx: list[int] | Tensor) -> "Cameras":
        return Cameras(self.viewmats[idx], self.Ks[idx], self.width, self.height, self.model)

    @property
    def c2w(self) -> Tensor:
        return torch.linalg.inv(self.viewmats)


def view_K(projection: str, width: int, height: int, ortho_size: tuple[float, float] | None, K: np.ndarray | None) -> np.ndarray:
    """Intrinsics for a contract view, in gsplat's convention for its camera model."""
    if projection == "orthographic":
        ow, oh = ortho_size
        return np.array([[width / ow, 0.0, width / 2.0], [0.0, height / oh, height / 2.0], [0.0, 0.0, 1.0]])
    return np.asarray(K, dtype=np.float64)


def model_of(projection: str) -> str:
    """The contract's projection name -> the rasterizer's camera model."""
    return "ortho" if projection == "orthographic" else "pinhole"


def cameras_for(viewset, width: int, height: int, device: torch.device) -> tuple[list[Cameras], list[list[int]]]:
    """Rasterizer cameras for every view, rescaled to (width, height), grouped by camera model."""
    W0, H0 = viewset.image_size
    sx, sy = width / W0, height / H0
    groups: dict[str, list[int]] = {}
    for i, v in enumerate(viewset.views):
        groups.setdefault(model_of(v.projection), []).append(i)
    out, idxs = [], []
    for model, idx in groups.items():
        vms, Ks = [], []
        for i in idx:
            v = viewset.views[i]
            K = view_K(v.projection, W0, H0, v.ortho_size, v.K).copy()
            K[0] *= sx
            K[1] *= sy
            vms.append(np.linalg.inv(v.c2w))
            Ks.append(K)
        out.append(Cameras(torch.tensor(np.stack(vms), dtype=torch.float32, device=device),
                           torch.tensor(np.stack(Ks), dtype=torch.float32, device=device), width, height, model))
        idxs.append(idx)
    return out, idxs


def view_camera(view, device: torch.device, dtype: torch.dtype = torch.float32) -> Cameras:
    """One contract view's camera at its full image size."""
    W, H = view.size
    K = view_K(view.projection, W, H, view.ortho_size, view.K)
    return Cameras(torch.tensor(np.linalg.inv(view.c2w), dtype=dtype, device=device)[None],
                   torch.tensor(K, dtype=dtype, device=device)[None], W, H, model_of(view.projection))


def projection_matrix(view) -> np.ndarray:
    """3x4 matrix taking homogeneous world points to homogeneous pixel coordinates of a contract view
    (orthographic: the last row is [0, 0, 0, 1], so the division is by one)."""
    W, H = view.size
    K = view_K(view.projection, W, H, view.ortho_size, view.K)
    w2c = np.linalg.inv(view.c2w)[:3]
    if view.projection == "orthographic":
        return np.vstack([K[:2, :2] @ w2c[:2] + np.c_[np.zeros((2, 3)), K[:2, 2]], [0, 0, 0, 1.0]])
    return K @ w2c


# --------------------------------------------------------------------- projection / unprojection

def to_camera(points, w2c):
    """Points (..., 3) into camera coordinates with a (4,4) world-to-camera (numpy or torch)."""
    return points @ w2c[:3, :3].T + w2c[:3, 3]


def to_world(points_cam, c2w):
    """Camera coordinates (..., 3) to world with a (4,4) camera-to-world, or per camera with a batch (C,4,4)
    and points (C, ..., 3) (numpy or torch)."""
    if c2w.ndim == 3:
        return torch.einsum("cij,chwj->chwi", c2w[:, :3, :3], points_cam) + c2w[:, None, None, :3, 3]
    return points_cam @ c2w[:3, :3].T + c2w[:3, 3]


def project(points: Tensor, cams: Cameras) -> tuple[Tensor, Tensor]:
    """World points (N,3) -> pixel coordinates (N,2) and camera depth (N,) in the first camera."""
    vm, K = cams.viewmats[0], cams.Ks[0]
    c = to_camera(points, vm)
    if cams.model == "ortho":
        uv = c[:, :2] * torch.stack([K[0, 0], K[1, 1]]) + K[:2, 2]
    else:
        uv = (c[:, :2] / c[:, 2:3].clamp_min(1e-6)) @ K[:2, :2].T + K[:2, 2]
    return uv, c[:, 2]


def ortho_pixel(points: np.ndarray, w2c: np.ndarray, K: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The pixel (column, row indices) in which an orthographic view sees each world point (N,3):
    pixel centres at i + 0.5, so the index is the floor of the pixel coordinate."""
    c = to_camera(points, w2c)
    return (np.floor(c[:, 0] * K[0, 0] + K[0, 2]).astype(np.int64),
            np.floor(c[:, 1] * K[1, 1] + K[1, 2]).astype(np.int64))


def pixel_rays(u, v, K):
    """Camera-plane coordinates (x, y) of pixel indices u, v (centres at i + 0.5): orthographic, the
    ray's lateral position; pinhole, its direction over depth. K (3,3) or broadcastable (..., 3, 3)."""
    x = (u + 0.5 - K[..., 0, 2]) / K[..., 0, 0]
    y = (v + 0.5 - K[..., 1, 2]) / K[..., 1, 1]
    return x, y


def unproject(u, v, depth, K, c2w, model: str = "ortho"):
    """World points (..., 3) of pixel indices u, v at camera depth (numpy or torch; a batch of cameras
    when c2w is (C,4,4), K (C,1,1,3,3) and depth (C,H,W))."""
    x, y = pixel_rays(u, v, K)
    if model == "pinhole":
        x, y = x * depth, y * depth
    if isinstance(depth, Tensor):
        pc = torch.stack(torch.broadcast_tensors(x, y, depth), -1)
    else:
        pc = np.stack(np.broadcast_arrays(x, y, depth), -1)
    return to_world(pc, c2w)


def pixel_rays_world(u: Tensor, v: Tensor, cams: Cameras) -> tuple[Tensor, Tensor]:
    """World rays (origins (N,3), unit directions (N,3)) through pixel indices u, v (centres at i + 0.5)
    of the first camera: orthographic, origins on the camera plane (depth 0) and one direction;
    pinhole, the camera centre and a direction per pixel. A point at ray parameter t has camera depth
    t (orthographic) or t times the direction's z (pinhole)."""
    c2w = torch.linalg.inv(cams.viewmats[0])
    K = cams.Ks[0]
    if cams.model == "ortho":
        o = unproject(u.float(), v.float(), torch.zeros_like(u, dtype=torch.float32), K, c2w, "ortho")
        return o, c2w[:3, 2].expand_as(o).contiguous()
    p = unproject(u.float(), v.float(), torch.ones_like(u, dtype=torch.float32), K, c2w, "pinhole")
    o = c2w[:3, 3].expand_as(p).contiguous()
    return o, F.normalize(p - o, dim=-1)


def view_dirs(points: Tensor, cams: Cameras) -> Tensor:
    """Unit direction from the first camera towards each point (N,3), world frame."""
    c2w = torch.linalg.inv(cams.viewmats[0])
    if cams.model == "ortho":
        return c2w[:3, 2].expand_as(points)
    return F.normalize(points - c2w[:3, 3], dim=-1)


def pixel_size(cams: Cameras, z: Tensor) -> Tensor:
    """World size of one pixel at camera depth z (orthographic: constant)."""
    fx = cams.Ks[0, 0, 0]
    return torch.ones_like(z) / fx if cams.model == "ortho" else z.clamp_min(1e-6) / fx


def sample_image(img: Tensor, uv: Tensor, W: int | None = None, H: int | None = None,
                 outside: float | None = 0.0) -> Tensor:
    """Bilinear sample of (H,W,D) at pixel coordinates uv (N,2) (pixel centres at i + 0.5), clamped at the
    border; points off the image read `outside` (None: the border's value)."""
    H = img.shape[0] if H is None else H
    W = img.shape[1] if W is None else W
    grid = torch.stack([uv[:, 0] / W * 2 - 1, uv[:, 1] / H * 2 - 1], -1)[None, None]
    out = F.grid_sample(img.permute(2, 0, 1)[None], grid, mode="bilinear", padding_mode="border", align_corners=False)
    out = out[0, :, 0].T
    if outside is None:
        return out
    inside = (uv[:, 0] >= 0) & (uv[:, 0] <= W) & (uv[:, 1] >= 0) & (uv[:, 1] <= H)
    return torch.where(inside[:, None], out, torch.full_like(out, outside))
