"""The normal estimator against diffusers' `MarigoldNormalsPipeline` (the reference implementation).

1. Frame. Marigold's output frame is documented by diffusers (`MarigoldImageProcessor.
   visualize_normals`: +x right, +y up ("top"), +z facing the observer) and by Marigold's training
   data (Hypersim camera normals flipped to face the camera; Sintel's sky filled with the
   "camera facing" normal (0, 0, 1)). An analytic sphere is rendered per the views contract from
   several poses; the prediction Marigold should give is built *from the image alone* in that
   documented frame (x along +u, y along -v, z towards the viewer), passed through the pipeline's
   own post-processing (`normalize_normals`, `pt_to_numpy`), and our conversion must return the
   sphere's known world normals (and Wonder3D's front-frame normals). Axis-flipped variants fail.
2. Call. Our `estimate_normals` must give what the reference usage of the pipeline
   (`pipe(images, num_inference_steps=..., ensemble_size=..., processing_resolution=...,
   generator=..., output_type="np").prediction`, batch size left at its default) gives, on the
   tiny normal-estimator weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from make_your_3d.models.multiview_pipeline import world_normals_to_front
from make_your_3d.models.normals import (
    MARIGOLD_TO_OPENCV,
    camera_normals_to_opencv,
    camera_normals_to_world,
    estimate_normals,
    load_normal_estimator,
    opencv_normals_to_world,
    write_tiny_normal_estimator,
)
from make_your_3d.recon.camera import orbit_c2w
from make_your_3d.views import View, encode_normals

SIZE = 64
ORTHO = (2.0, 2.0)
CENTER = np.array([0.2, 0.1, -0.15])  # off the origin, so every pose sees the sphere somewhere else
RADIUS = 0.7
POSES = {"front": (0.0, 0.0), "right": (90.0, 0.0), "back": (180.0, 0.0), "front_left": (-45.0, 0.0), "high": (30.0, 25.0)}


def render_sphere(c2w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Orthographic render per the views contract: (mask (H, W), world normals (H, W, 3))."""
    u = (np.arange(SIZE) + 0.5)[None, :].repeat(SIZE, 0)
    v = (np.arange(SIZE) + 0.5)[:, None].repeat(SIZE, 1)
    xc, yc = (u / SIZE - 0.5) * ORTHO[0], (v / SIZE - 0.5) * ORTHO[1]
    center = (np.linalg.inv(c2w) @ np.append(CENTER, 1.0))[:3]
    d2 = (xc - center[0]) ** 2 + (yc - center[1]) ** 2
    mask = d2 < RADIUS**2 * 0.98  # stay off the silhouette, where z is ill-conditioned
    zc = center[2] - np.sqrt(np.clip(RADIUS**2 - d2, 0, None))  # the camera looks along +z: nearest hit
    hit = np.stack([xc, yc, zc, np.ones_like(xc)], -1) @ c2w.T
    return mask, (hit[..., :3] - CENTER) / RADIUS


def marigold_prediction_from_image(c2w: np.ndarray) -> torch.Tensor:
    """What a normal estimator in Marigold's documented frame answers for this view of the sphere,
    from the image alone: x grows with the column u, y against the row v, z towards the viewer."""
    cam = np.linalg.inv(c2w) @ np.append(CENTER, 1.0)  # the views contract's orthographic projection
    u0, v0 = (cam[0] / ORTHO[0] + 0.5) * SIZE, (cam[1] / ORTHO[1] + 0.5) * SIZE
    radius_px = RADIUS / ORTHO[0] * SIZE
    u = (np.arange(SIZE) + 0.5)[None, :].repeat(SIZE, 0)
    v = (np.arange(SIZE) + 0.5)[:, None].repeat(SIZE, 1)
    x, y = (u - u0) / radius_px, -(v - v0) / radius_px
    z = np.sqrt(np.clip(1 - x**2 - y**2, 0, None))
    n = np.stack([x, y, z], 0)
    n[:, x**2 + y**2 >= 1] = np.array([0.0, 0.0, 1.0])[:, None]  # background: "camera facing", as Marigold fills Sintel's sky
    return torch.from_numpy(n).float()[None]  # [1, 3, H, W] like the pipeline's `prediction` before output


def pipeline_output(prediction: torch.Tensor) -> np.ndarray:
    """The reference pipeline's own last steps on a prediction tensor (steps 6 and 10 of `__call__`)."""
    from diffusers import MarigoldNormalsPipeline
    from diffusers.pipelines.marigold import MarigoldImageProcessor

    return MarigoldImageProcessor.pt_to_numpy(MarigoldNormalsPipeline.normalize_normals(prediction.clone()))  # [N, H, W, 3]


def _max_error(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    return float(np.abs(a - b)[mask].max())


@pytest.mark.parametrize("pose", sorted(POSES))
def test_marigold_frame_gives_the_known_world_normals(pose):
    c2w = orbit_c2w(*POSES[pose])
    mask, world = render_sphere(c2w)
    assert mask.sum() > 0.3 * SIZE * SIZE
    pred = pipeline_output(marigold_prediction_from_image(c2w))[0]
    assert _max_error(camera_normals_to_world(pred, c2w), world, mask) < 1e-4
    # Wonder3D's front frame (what the subject-prior stage trains on): for the front view it is
    # Marigold's own frame; for every view it is the world frame of the contract.
    front = world_normals_to_front(camera_normals_to_world(pred, c2w))
    assert _max_error(front, world, mask) < 1e-4
    if pose == "front":
        assert _max_error(front, pred, mask) < 1e-4
    # The generate stage stores them as a normal PNG; decoded, they are the same within 8-bit steps.
    stored = View(pose, np.zeros((SIZE, SIZE, 4), np.uint8), c2w, encode_normals(camera_normals_to_world(pred, c2w), (mask * 255).astype(np.uint8)))
    assert _max_error(stored.normals_world(), world, mask) < 0.01


def test_opencv_frame_is_diffusers_documented_flip():
    """diffusers' own axis flips: Marigold's frame with y and z flipped (`visualize_normals(flip_y,
    flip_z)`) is the OpenCV camera frame our `camera_normals_to_opencv` returns."""
    from diffusers.pipelines.marigold import MarigoldImageProcessor

    c2w = orbit_c2w(*POSES["high"])
    pred_t = marigold_prediction_from_image(c2w)
    pred = pipeline_output(pred_t)[0]
    theirs = np.asarray(MarigoldImageProcessor.visualize_normals(pred_t.clone(), flip_y=True, flip_z=True)[0], dtype=np.int16)
    ours = ((camera_normals_to_opencv(pred) + 1.0) * 0.5 * 255).astype(np.uint8).astype(np.int16)  # their encoding
    assert np.abs(ours - theirs).max() <= 1
    wrong = np.asarray(MarigoldImageProcessor.visualize_normals(pred_t.clone(), flip_z=True)[0], dtype=np.int16)
    assert np.abs(ours - wrong).max() > 100


@pytest.mark.parametrize("flips", [(1, 1, -1), (1, -1, 1), (-1, -1, -1), (1, 1, 1), (-1, 1, 1)])
def test_flipped_axis_variants_are_detected(flips):
    """Each wrong Marigold -> OpenCV matrix misses the known world normals on some pose."""
    wrong = np.diag(np.array(flips, dtype=np.float64))
    assert not np.array_equal(wrong, MARIGOLD_TO_OPENCV)
    errors = []
    for pose in ("front", "right"):
        c2w = orbit_c2w(*POSES[pose])
        mask, world = render_sphere(c2w)
        pred = pipeline_output(marigold_prediction_from_image(c2w))[0]
        errors.append(_max_error(opencv_normals_to_world(pred @ wrong.T, c2w), world, mask))
    assert max(errors) > 0.5, errors


# --- the pipeline call -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def marigold(tmp_path_factory):
    folder = tmp_path_factory.mktemp("marigold") / "normal_estimator"
    write_tiny_normal_estimator(folder, seed=3)
    return load_normal_estimator(folder, "cpu", torch.float32)


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(5)  # a non-square size that is not a multiple of 8: resize, pad and unpad all run
    return [Image.fromarray(rng.integers(0, 256, (28, 44, 3), dtype=np.uint8)) for _ in range(2)]


def _reference(pipe, images, seed: int = 0, **kwargs) -> np.ndarray:
    return pipe(images, generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs).prediction


@pytest.mark.parametrize(
    ("ours_kwargs", "ref_kwargs"),
    [
        ({"steps": 2}, {"num_inference_steps": 2}),
        ({}, {}),  # both at the model's published defaults (steps, processing resolution)
        ({"steps": 2, "ensemble": 3}, {"num_inference_steps": 2, "ensemble_size": 3}),
        ({"steps": 1, "processing_resolution": 48}, {"num_inference_steps": 1, "processing_resolution": 48}),
    ],
)
def test_estimate_normals_is_the_reference_pipeline_call(marigold, ours_kwargs, ref_kwargs):
    images = _images()
    ours = estimate_normals(marigold, images, generator=torch.Generator().manual_seed(0), **ours_kwargs)
    ref = _reference(marigold, images, **ref_kwargs)
    assert ours.shape == ref.shape == (2, 28, 44, 3)  # input resolution, channels last (x, y, z)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)  # batch 2 vs the default 1: float reassociation (seen 2.3e-5)


def test_pipeline_call_wrong_variants_are_detected(marigold):
    images = _images()
    ours = estimate_normals(marigold, images, steps=2, ensemble=3, generator=torch.Generator().manual_seed(0))
    variants = {
        "no ensemble": _reference(marigold, images, num_inference_steps=2),
        "mean reduction": _reference(marigold, images, num_inference_steps=2, ensemble_size=3, ensembling_kwargs={"reduction": "mean"}),
        "other resolution": _reference(marigold, images, num_inference_steps=2, ensemble_size=3, processing_resolution=16),
        "more steps": _reference(marigold, images, num_inference_steps=3, ensemble_size=3),
    }
    for name, wrong in variants.items():
        assert np.abs(ours - wrong).max() > 1e-3, name
    flipped = ours[..., ::-1]  # channels read in the wrong order (z, y, x)
    assert np.abs(ours - flipped).max() > 1e-3
