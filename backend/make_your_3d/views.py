"""The views contract (design: "Multi-view contract"): cameras.json + RGBA colour and normal PNGs.

`load_views` validates everything a reconstruction relies on and names the file and field at
fault; `save_views` writes the same format. Normals are world-space, RGB = (n + 1) / 2.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from make_your_3d.errors import BadViews

CAMERAS_FILE = "cameras.json"


@dataclass
class View:
    name: str
    color: np.ndarray  # (H, W, 4) uint8, straight RGB, alpha = foreground mask
    c2w: np.ndarray  # (4, 4) float64, camera-to-world, OpenCV axes
    normal: np.ndarray | None = None  # (H, W, 4) uint8, RGB = (n_world + 1) / 2, same alpha
    projection: str = "orthographic"
    ortho_size: tuple[float, float] | None = (2.0, 2.0)
    K: np.ndarray | None = None  # (3, 3) pixels, perspective only

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        return self.color.shape[1], self.color.shape[0]

    @property
    def mask(self) -> np.ndarray:
        return self.color[..., 3] >= 128

    def normals_world(self) -> np.ndarray | None:
        """(H, W, 3) float32 unit normals in world space, or None."""
        if self.normal is None:
            return None
        n = self.normal[..., :3].astype(np.float32) / 255.0 * 2.0 - 1.0
        return n / np.clip(np.linalg.norm(n, axis=-1, keepdims=True), 1e-6, None)


@dataclass
class ViewSet:
    views: list[View]
    world: str = "gltf"
    extras: dict = field(default_factory=dict)

    @property
    def image_size(self) -> tuple[int, int]:
        return self.views[0].size


def encode_normals(normals: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """World unit normals (H, W, 3) float + alpha (H, W) uint8 -> (H, W, 4) uint8 PNG pixels."""
    rgb = np.clip(np.round((normals + 1.0) * 0.5 * 255.0), 0, 255).astype(np.uint8)
    return np.concatenate([rgb, alpha[..., None].astype(np.uint8)], axis=-1)


def save_views(folder: str | Path, viewset: ViewSet) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for view in viewset.views:
        rec: dict = {"name": view.name, "color": f"color_{view.name}.png"}
        Image.fromarray(view.color, "RGBA").save(folder / rec["color"])
        if view.normal is not None:
            rec["normal"] = f"normal_{view.name}.png"
            Image.fromarray(view.normal, "RGBA").save(folder / rec["normal"])
        rec["c2w"] = np.asarray(view.c2w, dtype=float).tolist()
        rec["projection"] = view.projection
        if view.projection == "orthographic":
            rec["ortho_size"] = [float(s) for s in view.ortho_size]
        else:
            rec["K"] = np.asarray(view.K, dtype=float).tolist()
        records.append(rec)
    doc = {"world": viewset.world, "image_size": list(viewset.image_size), "views": records, **viewset.extras}
    (folder / CAMERAS_FILE).write_text(json.dumps(doc, indent=2))
    return folder


def _read_png(path: Path, where: str) -> np.ndarray:
    if not path.is_file():
        raise BadViews(f"{where}: file {path.name} does not exist in {path.parent}.")
    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(im.convert("RGBA"))
    except Exception as exc:  # PIL raises many types for broken files
        raise BadViews(f"{where}: {path.name} is not a readable image ({exc}).") from None


def _matrix(value, shape: tuple[int, int], where: str) -> np.ndarray:
    try:
        m = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise BadViews(f"{where} must be a {shape[0]}x{shape[1]} matrix of numbers.") from None
    if m.shape != shape:
        raise BadViews(f"{where} must be a {shape[0]}x{shape[1]} matrix, got shape {list(m.shape)}.")
    if not np.all(np.isfinite(m)):
        raise BadViews(f"{where} contains NaN or infinite values.")
    return m


def _check_rigid(c2w: np.ndarray, where: str) -> None:
    r = c2w[:3, :3]
    if not np.allclose(r.T @ r, np.eye(3), atol=1e-3) or not math.isclose(np.linalg.det(r), 1.0, abs_tol=1e-3):
        raise BadViews(f"{where}: the rotation part is not a rotation (it must be orthonormal with determinant +1).")
    if not np.allclose(c2w[3], [0, 0, 0, 1], atol=1e-6):
        raise BadViews(f"{where}: the last row must be [0, 0, 0, 1].")


def load_views(folder: str | Path) -> ViewSet:
    """Read and validate a views folder; every error names the file and the field."""
    folder = Path(folder)
    cam_path = folder / CAMERAS_FILE
    if not cam_path.is_file():
        raise BadViews(f"{cam_path} does not exist: a views folder needs cameras.json.")
    try:
        doc = json.loads(cam_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadViews(f"{cam_path.name} is not valid JSON ({exc}).") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("views"), list):
        raise BadViews(f"{cam_path.name}: field 'views' must be a list of views.")
    if not doc["views"]:
        raise BadViews(f"{cam_path.name}: field 'views' is empty; at least one view is needed.")
    views: list[View] = []
    for i, rec in enumerate(doc["views"]):
        where = f"{cam_path.name} views[{i}]"
        if not isinstance(rec, dict):
            raise BadViews(f"{where} must be an object.")
        name = str(rec.get("name", f"view{i}"))
        where = f"{cam_path.name} views[{i}] ({name})"
        if "color" not in rec:
            raise BadViews(f"{where}: field 'color' is missing.")
        color = _read_png(folder / str(rec["color"]), f"{where}.color")
        normal = None
        if rec.get("normal") is not None:
            normal = _read_png(folder / str(rec["normal"]), f"{where}.normal")
            if normal.shape != color.shape:
                raise BadViews(f"{where}.normal: size {normal.shape[1]}x{normal.shape[0]} differs from the colour image's {color.shape[1]}x{color.shape[0]}.")
        if "c2w" not in rec:
            raise BadViews(f"{where}: field 'c2w' is missing.")
        c2w = _matrix(rec["c2w"], (4, 4), f"{where}.c2w")
        _check_rigid(c2w, f"{where}.c2w")
        projection = rec.get("projection", "orthographic")
        view = View(name=name, color=color, normal=normal, c2w=c2w, projection=projection)
        if projection == "orthographic":
            size = rec.get("ortho_size")
            if not (isinstance(size, list) and len(size) == 2 and all(isinstance(s, (int, float)) and s > 0 for s in size)):
                raise BadViews(f"{where}.ortho_size must be two positive numbers [width, height] in world units.")
            view.ortho_size = (float(size[0]), float(size[1]))
        elif projection == "perspective":
            view.ortho_size = None
            view.K = _matrix(rec.get("K"), (3, 3), f"{where}.K")
        else:
            raise BadViews(f"{where}.projection: unknown projection {projection!r}; use 'orthographic' or 'perspective'.")
        if not view.mask.any():
            raise BadViews(f"{where}.color: the alpha mask of {rec['color']} is empty; every view must show the subject.")
        if views and view.size != views[0].size:
            raise BadViews(f"{where}.color: size {view.size[0]}x{view.size[1]} differs from the first view's {views[0].size[0]}x{views[0].size[1]}; all views must be the same size.")
        views.append(view)
    extras = {k: v for k, v in doc.items() if k not in ("world", "image_size", "views")}
    return ViewSet(views=views, world=str(doc.get("world", "gltf")), extras=extras)
