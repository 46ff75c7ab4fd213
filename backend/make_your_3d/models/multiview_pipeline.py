"""Multi-view generation: one prepared subject image -> six colour + six normal views (Wonder3D).

Conditioning, as in Wonder3D's `MVDiffusionImagePipeline` and `test_mvdiffusion_seq.py`: the
input (RGBA composited on white) gives one CLIP `image_embeds` token for `encoder_hidden_states`
and its VAE latent (`latent_dist.mode() * scaling_factor`), concatenated on channels with the noisy
latent of every view. Each batch row gets a 10-d class label `sin/cos` of
`(elevation_cond, elevation_offset, azimuth_offset, domain0, domain1)`, domain (1, 0) = normals,
(0, 1) = colours. The label angles are NOT the ideal 0/45/90/180/270/315 degrees at elevation 0:
they are Wonder3D's `nine_views` table, which the weights were trained on (see
`models.wonder3d_views`); the ideal angles are only the poses of the generated images.

Batch layout `[normals(B*V), colours(B*V)]`. Classifier-free guidance doubles the samples, not
the domains: the guided batch is `[normals(uncond B, cond B), colours(uncond B, cond B)]`, so the
cross-domain attention always pairs a view's normal and colour *of the same guidance branch*. For
B = 1 this is exactly the reference's `reshape_to_cd_input` layout, and the guidance combination is
the reference's `reshape_to_cfg_output` (checked against `tests/golden/wonder3d`).

Only the noisy latents go through `scheduler.scale_model_input` (Wonder3D scales the concatenated
input, which is the same for its DDIM and differs only for sigma-scaled schedulers like Euler).

Output frames: Wonder3D's normals are in the front camera's OpenGL frame (x right, y up, z towards
the viewer), which for our glTF world (+Y up, subject facing +Z, front camera on +Z) is the world
frame itself (`FRONT_GL_TO_WORLD`; a test checks it against the contract's front camera pose).
The conversion of generated images into the views contract lives in `pipeline/multiview_views.py`:
this module imports nothing from `recon/` or `pipeline/`. Wonder3D's orthographic frame spans [-1, 1] world units across the image (its
reconstruction's ray origins), so views are written with `ortho_size` (2, 2): the ~192 px subject
in the 256 px frame spans about +-0.75 units.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from make_your_3d.models.wonder3d_views import WONDER3D_VIEW_TABLE, Wonder3DView, class_labels
from make_your_3d.progress import Reporter

WONDER3D_ORTHO_SIZE = 2.0
BACKGROUND = 1.0  # Wonder3D composites inputs on white and generates white backgrounds
SCHEDULERS = ("ddim", "dpm", "euler", "euler_a", "unipc")

# The OpenGL front camera (x right, y up, z towards the viewer) expressed in the contract's glTF
# world (+Y up, subject facing +Z, front camera on +Z looking along -Z): its OpenCV camera-to-world
# rotation diag(1, -1, -1) times diag(1, -1, -1), i.e. the identity.
FRONT_GL_TO_WORLD = np.eye(3)


def front_normals_to_world(normals: np.ndarray) -> np.ndarray:
    """Normals (..., 3) in Wonder3D's front-camera frame -> unit normals in the views' world frame."""
    n = np.asarray(normals, dtype=np.float64) @ FRONT_GL_TO_WORLD.T
    return n / np.clip(np.linalg.norm(n, axis=-1, keepdims=True), 1e-8, None)


def world_normals_to_front(normals: np.ndarray) -> np.ndarray:
    """Inverse of `front_normals_to_world` (for building training targets in the model's frame)."""
    n = np.asarray(normals, dtype=np.float64) @ FRONT_GL_TO_WORLD
    return n / np.clip(np.linalg.norm(n, axis=-1, keepdims=True), 1e-8, None)


def view_mask(color: np.ndarray, normal: np.ndarray, background: float = BACKGROUND, threshold: float = 0.08) -> np.ndarray:
    """Foreground mask (H, W) of one generated view from its colour and normal images in [0, 1].

    Both domains are generated on the input's (white) background. A pixel is foreground where either
    image departs from it; the normal map is the robust cue (a unit normal cannot encode to near
    white, so even a white subject shows). Specks under 1% of the largest blob are dropped and
    enclosed holes under 0.5% of the image are filled; larger holes (a mug's handle) stay open.
    """
    from scipy import ndimage

    dist_c = np.abs(np.asarray(color, dtype=np.float32) - background).max(axis=-1)
    dist_n = np.abs(np.asarray(normal, dtype=np.float32) - background).max(axis=-1)
    mask = (dist_c > threshold) | (dist_n > threshold)
    labels, count = ndimage.label(mask)
    if count > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        mask = np.isin(labels, np.flatnonzero(sizes >= 0.01 * sizes.max()))
    holes, count = ndimage.label(~mask)
    if count:
        sizes = np.bincount(holes.ravel())
        border = np.unique(np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]]))
        small = np.flatnonzero(sizes < 0.005 * mask.size)
        fill = np.setdiff1d(small[small > 0], border)
        mask = mask | np.isin(holes, fill)
    return mask


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.round(np.asarray(image, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)


def _quantize_like_to_pil_image(rgb: np.ndarray) -> np.ndarray:
    """Float RGB in [0, 1] -> uint8 the way Wonder3D hands float images to its pipeline:
    `torchvision.transforms.functional.to_pil_image` computes `mul(255).byte()`, which truncates
    (it does not round). float32, as in the reference."""
    return (np.clip(np.asarray(rgb, dtype=np.float32), 0.0, 1.0) * np.float32(255.0)).astype(np.uint8)


def _rgb_on_white(image: Image.Image) -> Image.Image:
    """RGB image with any transparency composited over the white background Wonder3D expects.

    Bit-exact with the reference's inference path (`SingleImageDataset.load_image`, bg_color
    'white', then `to_pil_image` inside `MVDiffusionImagePipeline.__call__`): straight alpha
    composited in float32 as `rgb * a + 1 * (1 - a)`, then truncated to uint8. (PIL's integer
    `alpha_composite` rounds instead and differs by one level on soft edges.) Opaque images pass
    through unchanged, as a PIL RGB input does in the reference (its README example).
    """
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        arr = np.asarray(image.convert("RGBA")).astype(np.float32) / np.float32(255.0)
        alpha = arr[..., 3:4]
        rgb = arr[..., :3] * alpha + np.ones(3, dtype=np.float32) * (np.float32(1.0) - alpha)
        return Image.fromarray(_quantize_like_to_pil_image(rgb), "RGB")
    return image.convert("RGB")


@dataclass
class MultiViewImages:
    """Generated views, float32 on the CPU, values in [0, 1], view order = `view_names`.

    `normals` hold Wonder3D's encoding (n + 1) / 2 of normals in the front camera's frame.
    """

    colors: torch.Tensor  # (B, V, 3, H, W)
    normals: torch.Tensor  # (B, V, 3, H, W)
    view_names: tuple[str, ...]
    azimuths: tuple[float, ...]


class MultiViewPipeline:
    """Wonder3D-compatible sampling around `UNetMV2DConditionModel` (see module docstring).

    Public pieces the subject-prior optimisation uses: `encode_condition`, `encode_views`,
    `camera_embeddings`, `expand_condition`, `unet`, `scheduler`, and the UNet forward contract
    `unet(sample (2*B*V, 8, h, w), t, encoder_hidden_states (2*B*V, 1, D), class_labels (2*B*V, 10))`.
    """

    def __init__(self, unet, vae, image_encoder, feature_extractor, scheduler, views: Sequence[Wonder3DView] = WONDER3D_VIEW_TABLE):
        self.unet = unet
        self.vae = vae
        self.image_encoder = image_encoder
        self.feature_extractor = feature_extractor
        self.scheduler = scheduler
        self.views = tuple(views)
        if len(self.views) != unet.config.num_views:
            raise ValueError(f"{len(self.views)} views given but the UNet was trained for {unet.config.num_views}")
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self._offload_device: torch.device | None = None

    # -- placement -----------------------------------------------------------------------------

    @property
    def num_views(self) -> int:
        return len(self.views)

    @property
    def image_size(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def device(self) -> torch.device:
        return self._offload_device or self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def _modules(self) -> tuple[torch.nn.Module, ...]:
        return (self.unet, self.vae, self.image_encoder)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "MultiViewPipeline":
        self._offload_device = None
        for module in self._modules():
            module.to(device) if dtype is None else module.to(device=device, dtype=dtype)
        return self

    def enable_model_cpu_offload(self, device: torch.device | str = "cuda") -> "MultiViewPipeline":
        """Keep every network on the CPU and move each to `device` only while it runs (low VRAM)."""
        for module in self._modules():
            module.to("cpu")
        self._offload_device = torch.device(device)
        return self

    @contextlib.contextmanager
    def _running(self, module: torch.nn.Module) -> Iterator[torch.nn.Module]:
        if self._offload_device is None:
            yield module
            return
        module.to(self._offload_device)
        try:
            yield module
        finally:
            module.to("cpu")
            if self._offload_device.type == "cuda":
                torch.cuda.empty_cache()

    # -- conditioning ----------------------------------------------------------------------------

    def _as_pil(self, images) -> list[Image.Image]:
        if isinstance(images, Image.Image):
            images = [images]
        if isinstance(images, torch.Tensor):
            if images.ndim != 4 or images.shape[1] != 3:
                raise ValueError(f"expected images (B, 3, H, W) in [0, 1], got shape {tuple(images.shape)}")
            # as the reference's `to_pil_image` (truncating), so a tensor gives the same pixels
            arr = _quantize_like_to_pil_image(images.detach().float().cpu().permute(0, 2, 3, 1).numpy())
            images = [Image.fromarray(a, "RGB") for a in arr]
        size = self.image_size
        out = []
        for im in images:
            if im.size != (size, size):
                # resize before compositing, as Wonder3D's dataset does (PIL's bicubic resize of
                # RGBA premultiplies alpha, so no colour leaks from transparent pixels)
                im = im.convert("RGBA") if im.mode in ("LA", "PA", "P") else im
                im = im.resize((size, size), Image.Resampling.BICUBIC)
            out.append(_rgb_on_white(im))
        return out

    def _pixels(self, pil: list[Image.Image]) -> torch.Tensor:
        arr = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in pil])
        return torch.from_numpy(arr).permute(0, 3, 1, 2)

    @torch.no_grad()
    def encode_condition(self, images) -> tuple[torch.Tensor, torch.Tensor]:
        """Subject images (PIL list, RGBA composited on white, or (B, 3, H, W) in [0, 1]) ->
        (image_embeds (B, 1, D), cond_latents (B, 4, h, w)) on the pipeline's device and dtype."""
        pil = self._as_pil(images)
        device = self.device
        with self._running(self.image_encoder) as encoder:
            pixel_values = self.feature_extractor(images=pil, return_tensors="pt").pixel_values
            embeds = encoder(pixel_values.to(device, encoder.dtype)).image_embeds.unsqueeze(1)
        with self._running(self.vae) as vae:
            x = self._pixels(pil).to(device, vae.dtype) * 2.0 - 1.0
            latents = vae.encode(x).latent_dist.mode() * vae.config.scaling_factor
        return embeds.to(self.dtype), latents.to(self.dtype)

    def encode_views(self, images, generator: torch.Generator | None = None) -> torch.Tensor:
        """Views (PIL list or (N, 3, H, W) in [0, 1]) -> VAE latents (N, 4, h, w) * scaling_factor.

        The posterior mode without a generator (deterministic), a posterior sample with one.
        """
        pil = self._as_pil(images)
        with torch.no_grad(), self._running(self.vae) as vae:
            x = self._pixels(pil).to(self.device, vae.dtype) * 2.0 - 1.0
            dist = vae.encode(x).latent_dist
            if generator is None:
                z = dist.mode()
            else:
                noise = torch.randn(dist.mean.shape, generator=generator).to(dist.mean.device, dist.mean.dtype)
                z = dist.mean + dist.std * noise
            return (z * vae.config.scaling_factor).to(self.dtype)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """(N, 4, h, w) scaled latents -> (N, 3, H, W) float32 images in [0, 1] on the CPU."""
        with self._running(self.vae) as vae:
            images = vae.decode(latents.to(self.device, vae.dtype) / vae.config.scaling_factor).sample
        return ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0).cpu()

    def camera_embeddings(self, batch: int) -> torch.Tensor:
        """(2*batch*V, 10) class labels in the [normals, colours] layout (Wonder3D's e_de_da_sincos,
        its trained `nine_views` angles; see `models.wonder3d_views`)."""
        return class_labels(batch, self.dtype, self.device, self.views)

    def expand_condition(self, image_embeds: torch.Tensor, cond_latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample conditions (B, 1, D), (B, 4, h, w) -> per-row (2*B*V, ...) in the batch layout."""
        views = self.num_views
        embeds = image_embeds.repeat_interleave(views, dim=0).repeat(2, 1, 1)
        latents = cond_latents.repeat_interleave(views, dim=0).repeat(2, 1, 1, 1)
        return embeds, latents

    # -- sampling --------------------------------------------------------------------------------

    def predict_noise(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        image_embeds: torch.Tensor,
        cond_latents: torch.Tensor,
        guidance: float,
    ) -> torch.Tensor:
        """Guided noise prediction for noisy `latents` (2*B*V, 4, h, w) in the batch layout.

        The guided batch treats [unconditional, conditional] as 2B samples, keeping each row's
        normal/colour pairing inside one guidance branch (see the module docstring).
        """
        batch = image_embeds.shape[0]
        rows = batch * self.num_views
        if latents.shape[0] != 2 * rows:
            raise ValueError(f"latents have {latents.shape[0]} rows, expected {2 * rows} ([normals, colours] x {batch} x {self.num_views})")
        guided = guidance != 1.0
        if guided:
            image_embeds = torch.cat([torch.zeros_like(image_embeds), image_embeds])
            cond_latents = torch.cat([torch.zeros_like(cond_latents), cond_latents])
            normals, colors = latents[:rows], latents[rows:]
            latents = torch.cat([normals, normals, colors, colors])
        embeds, cond = self.expand_condition(image_embeds, cond_latents)
        labels = self.camera_embeddings(image_embeds.shape[0])
        sample = torch.cat([latents.to(cond.dtype), cond], dim=1)
        with self._running(self.unet) as unet:
            eps = unet(sample, timestep, encoder_hidden_states=embeds, class_labels=labels).sample
        if not guided:
            return eps
        n_uncond, n_cond, c_uncond, c_cond = eps.chunk(4)
        return torch.cat([n_uncond + guidance * (n_cond - n_uncond), c_uncond + guidance * (c_cond - c_uncond)])

    def make_scheduler(self, name: str = "ddim"):
        """A fresh scheduler of the named kind, configured from the published scheduler config."""
        from diffusers import (
            DDIMScheduler,
            DPMSolverMultistepScheduler,
            EulerAncestralDiscreteScheduler,
            EulerDiscreteScheduler,
            UniPCMultistepScheduler,
        )

        kinds = {
            "ddim": DDIMScheduler,
            "dpm": DPMSolverMultistepScheduler,
            "euler": EulerDiscreteScheduler,
            "euler_a": EulerAncestralDiscreteScheduler,
            "unipc": UniPCMultistepScheduler,
        }
        if name not in kinds:
            raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(kinds)}")
        return kinds[name].from_config(self.scheduler.config)

    @torch.no_grad()
    def __call__(
        self,
        image,
        steps: int = 20,
        guidance: float = 3.0,
        generator: torch.Generator | None = None,
        scheduler: str = "ddim",
        eta: float = 1.0,
        reporter: Reporter | None = None,
    ) -> MultiViewImages:
        """Subject image(s) (prepared RGBA, see `pipeline.preprocess.prepare_subject`) -> views.

        Wonder3D's published settings (d894f82): `configs/mvdiffusion-joint-ortho-6views.yaml`
        samples with DDIM, eta 1, guidance 1 and 3 at the pipeline's default 50 steps; its README
        calls 20 steps, guidance 1, eta left at 0. Noise is drawn on the CPU from `generator` (the
        reference draws on the pipeline's device), so a seed gives the same views on any device;
        on the CPU the draws, the DDIM eta noise included, are the reference's exactly
        (`tests/test_reference_wonder3d_pipeline.py`).
        """
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        image_embeds, cond_latents = self.encode_condition(image)
        batch = image_embeds.shape[0]
        sched = self.make_scheduler(scheduler)
        sched.set_timesteps(steps, device=self.device)
        h = w = int(self.unet.config.sample_size)
        shape = (2 * batch * self.num_views, int(self.unet.config.out_channels), h, w)
        latents = torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device)
        latents = latents * sched.init_noise_sigma
        step_kwargs = {}
        params = inspect.signature(sched.step).parameters
        if "eta" in params:
            step_kwargs["eta"] = eta
        if "generator" in params:
            step_kwargs["generator"] = generator
        timesteps = sched.timesteps
        total = len(timesteps)
        for i, t in enumerate(timesteps):
            if reporter is not None:
                reporter.step(i, total, f"multi-view denoising step {i + 1}/{total}")
            model_in = sched.scale_model_input(latents, t)
            eps = self.predict_noise(model_in.to(self.dtype), t, image_embeds, cond_latents, guidance)
            latents = sched.step(eps.float(), t, latents, **step_kwargs).prev_sample
        if reporter is not None:
            reporter.step(total, total, "decoding views")
        images = self.decode_latents(latents)
        rows = batch * self.num_views
        size = images.shape[-1]
        normals = images[:rows].reshape(batch, self.num_views, 3, size, size)
        colors = images[rows:].reshape(batch, self.num_views, 3, size, size)
        return MultiViewImages(colors=colors, normals=normals, view_names=tuple(v.name for v in self.views), azimuths=tuple(v.azimuth_deg for v in self.views))
