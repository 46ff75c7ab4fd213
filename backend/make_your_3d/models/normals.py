"""Single-view normal estimator: Marigold normals through diffusers' `MarigoldNormalsPipeline`.

Used by the subject-prior stage to give each edited view a normal map. Loaded only from the models
directory's `normal_estimator` folder (the published Marigold normals v1-1 layout: unet, vae,
text_encoder, tokenizer, scheduler, model_index.json).

Frames. Marigold predicts normals in its own camera frame, documented by diffusers
(`MarigoldImageProcessor.visualize_normals`): +x points right, +y points up, +z points towards the
observer, so a surface facing the camera has normal (0, 0, 1). The views contract uses OpenCV
camera axes (+x right, +y down, +z forward, away from the camera), in which that surface's normal
is (0, 0, -1). `camera_normals_to_opencv` flips y and z; `camera_normals_to_world` then rotates
with a view's camera-to-world matrix, giving the world-space normals the views folder stores.
Marigold's training data agrees (Hypersim camera normals flipped to face the camera, Sintel's sky
filled with the camera-facing (0, 0, 1)). `tests/test_reference_marigold.py` checks this frame
numerically on an analytic sphere seen from several poses (front, side, back, elevated), through
the pipeline's own output steps, and that our call equals the reference usage of the pipeline.

Deliberate differences from the reference usage (`pipe(images, ...)` with defaults):
- `batch_size` is up to `batch` (6 by default: the six edited views in one UNet call) instead
  of 1; the result is the same up to float reassociation (measured 2e-5 on the tiny weights),
  since the initial latents are drawn before batching and the DDIM steps draw no noise;
- the per-step progress bar is replaced by a reporter (progress and cancellation), which the
  pipeline lacks a callback for;
- the returned normals are renormalised once more (a no-op on the pipeline's unit normals that
  guards half-precision output).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from make_your_3d.errors import WeightsMissing
from make_your_3d.models.registry import ROLES
from make_your_3d.models.tokenizer import write_tiny_clip_tokenizer
from make_your_3d.progress import Reporter

ROLE = "normal_estimator"

# Marigold's camera frame expressed in OpenCV camera axes: y and z flip (a 180 degree turn about x).
MARIGOLD_TO_OPENCV = np.diag([1.0, -1.0, -1.0])


def load_normal_estimator(
    folder: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, offload: bool = False
):
    """A `MarigoldNormalsPipeline` from a local folder; WeightsMissing names any missing or damaged file.

    `offload=True` (the low-VRAM preset, CUDA only) keeps each sub-model on the CPU until it runs.
    """
    from diffusers import MarigoldNormalsPipeline

    from make_your_3d.models.fetch import check_weight_files

    folder = Path(folder)
    role = ROLES[ROLE]
    missing = [rel for rel in role.required if not (folder / rel).is_file()]
    if missing:
        raise WeightsMissing(
            f"The normal estimator ({role.title}) is incomplete in {folder}: missing {', '.join(missing)}. "
            f"Run `make-your-3d models fetch --role {ROLE}`."
        )
    check_weight_files(folder, [rel for rel in role.required if rel.endswith(".safetensors")], ROLE)
    try:
        pipe = MarigoldNormalsPipeline.from_pretrained(folder, dtype=dtype, use_safetensors=True, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise WeightsMissing(
            f"The normal estimator in {folder} could not be loaded ({exc}). "
            f"Run `make-your-3d models fetch --role {ROLE}` again."
        ) from exc
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
        module.eval()
    device = torch.device(device)
    if offload and device.type == "cuda":
        pipe.enable_model_cpu_offload(device=device)
        return pipe
    return pipe.to(device)


@contextmanager
def _step_reports(pipe, reporter: Reporter | None, total: int, label: str) -> Iterator[None]:
    """Route the pipeline's per-step progress bar to `reporter` (progress + cancel at each step).

    MarigoldNormalsPipeline has no step callback; it iterates its timesteps through
    `self.progress_bar(...)`, so an instance-level replacement sees every denoising step.
    """
    if reporter is None:
        yield
        return
    counter = {"done": 0}

    def progress_bar(iterable=None, total=None, desc=None, leave=True):  # noqa: ARG001 - pipeline signature
        if iterable is None:
            raise ValueError("the normal estimator's progress hook expects an iterable")
        is_steps = desc is not None and "step" in desc.lower()
        for item in iterable:
            yield item
            if is_steps:
                counter["done"] += 1
                reporter.step(counter["done"], n_total, label)

    n_total = total
    pipe.progress_bar = progress_bar
    try:
        yield
    finally:
        del pipe.progress_bar


def estimate_normals(
    pipe,
    images: Sequence[Image.Image],
    steps: int | None = None,
    ensemble: int = 1,
    generator: torch.Generator | None = None,
    processing_resolution: int | None = None,
    batch: int = 6,
    reporter: Reporter | None = None,
) -> np.ndarray:
    """Unit normals (N, H, W, 3) float32 in Marigold's camera frame (+x right, +y up, +z to the viewer).

    `steps`/`processing_resolution` default to the model's published defaults (4 steps, 768 px for
    v1-1). All images must share one size. `batch` caps the rows per UNet call (the lowvram preset
    uses 1). `reporter.step` runs once per denoising step (progress and cancellation). Use
    `camera_normals_to_world(normals[i], c2w)` for world-space normals.
    """
    if not images:
        raise ValueError("estimate_normals needs at least one image")
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    rgb = [im.convert("RGB") for im in images]
    sizes = {im.size for im in rgb}
    if len(sizes) != 1:
        raise ValueError(f"estimate_normals needs images of one size, got {sorted(sizes)}")
    n_steps = int(steps if steps is not None else pipe.default_denoising_steps or 0)
    members = len(rgb) * max(1, ensemble)
    batch = max(1, min(members, batch))
    total = -(-members // batch) * n_steps  # the pipeline denoises ceil(members / batch) batches
    if pipe.device.type == "cpu" and pipe.dtype in (torch.float16, torch.bfloat16):
        normals = _half_precision_on_cpu(pipe, rgb, steps, ensemble, processing_resolution, batch, generator, reporter, total)
    else:  # the pipeline's own call, pre- and post-processing included: the reference path
        with _step_reports(pipe, reporter, total, "estimating normals"):
            out = pipe(rgb, num_inference_steps=steps, ensemble_size=ensemble, processing_resolution=processing_resolution,
                       batch_size=batch, generator=generator, output_type="np")
        normals = np.asarray(out.prediction, dtype=np.float32)
    norm = np.linalg.norm(normals, axis=-1, keepdims=True)
    return normals / np.clip(norm, 1e-6, None)


def _half_precision_on_cpu(pipe, rgb: list[Image.Image], steps, ensemble: int, processing_resolution, batch: int, generator,
                           reporter, total: int) -> np.ndarray:
    """The pipeline's call with its two resizes done here in float32 (bilinear, antialiased on the
    way in, not on the way out): the CPU has no half-precision antialiased resize, so bf16 on the CPU
    failed inside the pipeline. Used only there; everywhere else the pipeline's own call runs (its
    fp32 results differ from these by up to 5e-5)."""
    width, height = rgb[0].size
    resolution = processing_resolution if processing_resolution is not None else (pipe.default_processing_resolution or 0)
    pixels = torch.from_numpy(np.stack([np.asarray(im) for im in rgb])).permute(0, 3, 1, 2).float() / 255.0  # [N,3,H,W] in [0, 1]
    if resolution > 0:
        longest = max(width, height)
        pixels = F.interpolate(pixels, (height * resolution // longest, width * resolution // longest), mode="bilinear", antialias=True)
    with _step_reports(pipe, reporter, total, "estimating normals"):
        out = pipe(pixels, num_inference_steps=steps, ensemble_size=ensemble, processing_resolution=0, match_input_resolution=False,
                   batch_size=batch, generator=generator, output_type="pt")
    prediction = out.prediction.float()  # [N,3,h,w]
    if prediction.shape[-2:] != (height, width):
        prediction = F.interpolate(prediction, (height, width), mode="bilinear")
    return prediction.permute(0, 2, 3, 1).cpu().numpy()


def camera_normals_to_opencv(normals: np.ndarray) -> np.ndarray:
    """Marigold camera frame -> OpenCV camera frame (+x right, +y down, +z forward): (x, y, z) -> (x, -y, -z)."""
    normals = np.asarray(normals, dtype=np.float32)
    return normals @ MARIGOLD_TO_OPENCV.T.astype(np.float32)


def opencv_normals_to_world(normals: np.ndarray, c2w: np.ndarray) -> np.ndarray:
    """Rotate OpenCV-camera-frame normals (..., 3) into world space with a camera-to-world matrix."""
    rot = np.asarray(c2w, dtype=np.float64)[:3, :3]
    out = np.asarray(normals, dtype=np.float64) @ rot.T
    return (out / np.clip(np.linalg.norm(out, axis=-1, keepdims=True), 1e-12, None)).astype(np.float32)


def camera_normals_to_world(normals: np.ndarray, c2w: np.ndarray) -> np.ndarray:
    """Marigold camera-frame normals (..., 3) -> world-space normals, for a view with this OpenCV c2w."""
    return opencv_normals_to_world(camera_normals_to_opencv(normals), c2w)


def world_normals_to_opencv(normals: np.ndarray, c2w: np.ndarray) -> np.ndarray:
    """World-space normals (..., 3) -> the OpenCV camera frame of the view with this c2w (inverse
    of `opencv_normals_to_world`); e.g. to express every view's normals in the front camera's frame."""
    rot = np.asarray(c2w, dtype=np.float64)[:3, :3]
    out = np.asarray(normals, dtype=np.float64) @ rot
    return (out / np.clip(np.linalg.norm(out, axis=-1, keepdims=True), 1e-12, None)).astype(np.float32)


# --- tiny model set ----------------------------------------------------------------------------



def write_tiny_normal_estimator(folder: Path, seed: int) -> None:
    """A tiny Marigold-normals folder in the published layout (toy sizes, random weights).

    Byte-identical for a seed: every module is built under a forked, seeded torch RNG.
    """
    from diffusers import DDIMScheduler, UNet2DConditionModel

    from make_your_3d.models.tiny_parts import TINY_DIM, tiny_clip_text_encoder, tiny_vae

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab_size = write_tiny_clip_tokenizer(folder / "tokenizer")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        UNet2DConditionModel(
            sample_size=8,
            in_channels=8,  # image latent + noisy normals latent, as Marigold
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=TINY_DIM,
            attention_head_dim=8,
            norm_num_groups=8,
            use_linear_projection=True,  # as SD 2, Marigold's base
        ).save_pretrained(folder / "unet", safe_serialization=True)
        tiny_vae(seed + 1).save_pretrained(folder / "vae", safe_serialization=True)
        tiny_clip_text_encoder(seed + 2, vocab_size).save_pretrained(folder / "text_encoder", safe_serialization=True)
    # Marigold v1-1 ships DDIM with v-prediction and trailing timesteps (few-step inference).
    DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction",
        timestep_spacing="trailing",
    ).save_pretrained(folder / "scheduler")
    index = {
        "_class_name": "MarigoldNormalsPipeline",
        "default_denoising_steps": 4,
        "default_processing_resolution": 32,
        "prediction_type": "normals",
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "use_full_z_range": True,
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
