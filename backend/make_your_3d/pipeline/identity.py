"""Identity-aware optimisation (paper 3.3): teach the IP-Adapter the subject from its six views.

Only the adapter's image cross-attention projections (`to_k_ip`, `to_v_ip`) train, with the
standard epsilon diffusion loss on augmented views paired with view-direction prompts built from
the subject description (never the edit, so this stage depends on the subject alone).

Reference: IP-Adapter's own training step (tencent-ailab/IP-Adapter `tutorial_train.py`). The same
objective: `DDPMScheduler` from the SD scheduler config, uniform integer timesteps, `add_noise`, the
CLIP `image_embeds` projected to 4 tokens placed after the 77 text tokens (here diffusers'
`added_cond_kwargs={"image_embeds": [...]}` path), `F.mse_loss(pred.float(), noise.float())`.
`tests/test_reference_ip_adapter.py` checks loss, predicted noise and adapter gradients against a
recording of that step. Deliberate differences from that script:
- only `to_k_ip`/`to_v_ip` train; theirs also trains `image_proj` (the paper's identity stage
  adapts the image cross-attention only; the projection stays the pretrained one, so the
  fine-tuned state is just these projections and loads into any pipeline with the same adapter);
- no text/image condition dropout (theirs drops each with 5%, to learn the unconditional branch
  for guidance): the pretrained adapter already has it, and this short stage only sharpens the
  conditional branch. Our unconditional image prompt (the zero embedding `edit_images` stacks as
  the negative) is exactly their dropped image (the zeroed CLIP embedding, checked by the test);
- the target follows the scheduler's `prediction_type` (epsilon for SD 1.5, the only model used;
  theirs always uses epsilon), and there is no weight decay (theirs 1e-2) at our few hundred steps;
- the CLIP image is a second augmented framing of the same view rather than the target image
  itself, so the adapter learns identity rather than pixel positions;
- prompts are view-direction prompts from the subject description, keyed on the subject so the
  stage is cached per subject and a new edit prompt reuses it.

Encodes. Their script runs the VAE and the CLIP image encoder on every training image at every step;
with our random augmentation each step's images are new, so the same held here (47% of the stage's
FLOPs at the default preset, benchmarks/flop_floor.py). With `augment_pool` K > 0 (the presets'
`identity_augment_pool`) each view instead gets K augmentations drawn once before the loop, each
encoded once (VAE posterior mean and std, CLIP embedding); a step picks a target and a different
condition framing from its view's pool and draws the VAE sample `mean + std * eps` with exactly the
generator call `latent_dist.sample` makes, so it equals encoding the picked images every step
(tests/test_identity_encodes.py checks it bit for bit, and counts the encoder calls). What changes against K = 0 is the augmentation's
variety: K framings per view (K * (K - 1) target/condition pairs) instead of a fresh one per draw.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from make_your_3d.models.personalized import ip_adapter_parameters
from make_your_3d.pipeline.augment import augment, to_tensor
from make_your_3d.pipeline.training import OptimizerStep, diffusion_target, lr_scheduler, training_autocast
from make_your_3d.progress import Reporter
from make_your_3d.views import load_views

if TYPE_CHECKING:
    from make_your_3d.pipeline.stages import StageInputs

DIRECTION_WORDS = {
    "front": "front view",
    "front_right": "front side view",
    "front_left": "front side view",
    "right": "side view",
    "left": "side view",
    "back": "back view",
}
DEFAULT_SUBJECT = "an object"


def view_prompt(subject: str | None, view_name: str, edit: str | None = None) -> str:
    parts = [subject or DEFAULT_SUBJECT] + ([edit] if edit else []) + [DIRECTION_WORDS.get(view_name, "view")]
    return ", ".join(parts)


@torch.no_grad()
def clip_image_embeds(pipe, images: list[Image.Image]) -> torch.Tensor:
    """CLIP image embeddings (B, 1, D) in the layout diffusers' IP-Adapter expects."""
    pixels = pipe.feature_extractor(images=[im.convert("RGB") for im in images], return_tensors="pt").pixel_values
    encoder = pipe.image_encoder
    return encoder(pixels.to(encoder.device, encoder.dtype)).image_embeds.unsqueeze(1)


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str]) -> torch.Tensor:
    tokens = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt")
    return pipe.text_encoder(tokens.input_ids.to(pipe.text_encoder.device))[0]


@dataclass
class Batch:
    latents: torch.Tensor
    text_embeds: torch.Tensor
    image_embeds: torch.Tensor


@dataclass
class Encoded:
    """One augmented view, encoded once: the VAE posterior (unscaled mean and std, as diffusers'
    `DiagonalGaussianDistribution` holds them) and the CLIP image embedding."""

    mean: torch.Tensor  # (1, 4, h, w)
    std: torch.Tensor  # (1, 4, h, w)
    image_embeds: torch.Tensor  # (1, 1, D)


@dataclass
class AugmentPool:
    """K augmentations of each view, drawn once; `encoded[v][k]` is filled when encodes are cached."""

    images: list[list[Image.Image]]
    encoded: list[list[Encoded]] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.images[0]) if self.images else 0


def diffusion_loss(unet, scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, **unet_kwargs) -> torch.Tensor:
    """The standard epsilon (or v) prediction loss of a diffusion model at given noise and timesteps."""
    noisy = scheduler.add_noise(latents, noise, timesteps)
    pred = unet(noisy, timesteps, **unet_kwargs).sample
    return F.mse_loss(pred.float(), diffusion_target(scheduler, latents, noise, timesteps).float())


class IdentityTrainer:
    """Fine-tunes exactly `ip_adapter_parameters(pipe.unet)` on the subject's views."""

    def __init__(self, pipe, views: list[tuple[str, Image.Image]], subject: str | None, size: int, lr: float, batch_size: int, seed: int,
                 augment_pool: int = 0, cache_encodes: bool = True, lr_schedule: str = "constant"):
        """`augment_pool` K > 0: K augmentations per view, drawn (and, with `cache_encodes`, encoded)
        once here; 0: a fresh augmentation per draw, encoded every step. `cache_encodes=False` with a
        pool re-encodes the picked pool images every step: the slow path the cached one must equal."""
        from diffusers import DDPMScheduler

        self.pipe = pipe
        self.views = views
        self.size = size
        self.batch_size = batch_size
        self.device = pipe.unet.device
        self.rng = np.random.default_rng(seed)
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.params = ip_adapter_parameters(pipe.unet)
        for p in self.params.values():
            p.data = p.data.float()  # fp32 master weights; autocast runs the forward in half on GPU
            p.requires_grad_(True)
        self.optimizer = torch.optim.AdamW(list(self.params.values()), lr=lr, weight_decay=0.0)
        self._step = OptimizerStep(self.optimizer, pipe.unet.device, pipe.unet.dtype)
        lr_scheduler(self.optimizer, lr_schedule, 1)  # an unknown schedule fails here, before any work
        self.lr_schedule = lr_schedule
        self.prompt_embeds = {name: encode_prompts(pipe, [view_prompt(subject, name)]) for name, _ in views}
        if augment_pool < 0:
            raise ValueError(f"augment_pool must be 0 or more, got {augment_pool}")
        self.pool: AugmentPool | None = None
        if augment_pool:
            self.pool = AugmentPool([[augment(image, self.rng, size) for _ in range(augment_pool)] for _, image in views])
            if cache_encodes:
                self.pool.encoded = [[self._encode_one(im) for im in images] for images in self.pool.images]

    def _autocast(self):
        return training_autocast(self.device, self.pipe.unet.dtype)

    # One image per encoder call in both the cached and the per-step pool paths: a batched call
    # differs from a single one in the last bits (measured ~1e-6 on the CPU), and the two must agree.
    @torch.no_grad()
    def _posterior(self, image: Image.Image):
        """The VAE posterior (diffusers' `DiagonalGaussianDistribution`) of one image."""
        vae = self.pipe.vae
        return vae.encode(to_tensor([image]).to(self.device, vae.dtype)).latent_dist

    def _encode_one(self, image: Image.Image) -> Encoded:
        dist = self._posterior(image)
        return Encoded(mean=dist.mean, std=dist.std, image_embeds=clip_image_embeds(self.pipe, [image]))

    def _pool_picks(self) -> list[tuple[int, int, int]]:
        """(view, target framing, condition framing) per batch row; the condition is another framing
        of the same view whenever the pool has two or more."""
        k = self.pool.size
        picks = self.rng.choice(len(self.views), size=self.batch_size, replace=len(self.views) < self.batch_size)
        out = []
        for i in picks:
            target = int(self.rng.integers(k))
            condition = (target + 1 + int(self.rng.integers(k - 1))) % k if k > 1 else target
            out.append((int(i), target, condition))
        return out

    @torch.no_grad()
    def _pool_batch(self) -> Batch:
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
        from diffusers.utils.torch_utils import randn_tensor

        picks = self._pool_picks()
        generator = self.generator.manual_seed(int(self.rng.integers(2**31)))
        if self.pool.encoded:
            mean = torch.cat([self.pool.encoded[v][t].mean for v, t, _ in picks])
            std = torch.cat([self.pool.encoded[v][t].std for v, t, _ in picks])
            # exactly DiagonalGaussianDistribution.sample(generator): one randn_tensor of the batch's shape
            latents = mean + std * randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            embeds = [self.pool.encoded[v][c].image_embeds for v, _, c in picks]
        else:  # the per-step path: encode the picked images again and sample their posterior
            params = torch.cat([self._posterior(self.pool.images[v][t]).parameters for v, t, _ in picks])
            latents = DiagonalGaussianDistribution(params).sample(generator)
            embeds = [clip_image_embeds(self.pipe, [self.pool.images[v][c]]) for v, _, c in picks]
        texts = [self.prompt_embeds[self.views[v][0]] for v, _, _ in picks]
        return Batch(latents=latents * self.pipe.vae.config.scaling_factor, text_embeds=torch.cat(texts), image_embeds=torch.cat(embeds))

    @torch.no_grad()
    def make_batch(self) -> Batch:
        if self.pool is not None:
            return self._pool_batch()
        picks = self.rng.choice(len(self.views), size=self.batch_size, replace=len(self.views) < self.batch_size)
        targets, conditions, texts = [], [], []
        for i in picks:
            name, image = self.views[int(i)]
            targets.append(augment(image, self.rng, self.size))
            conditions.append(augment(image, self.rng, self.size))  # a second framing: learn identity, not pixels
            texts.append(self.prompt_embeds[name])
        vae = self.pipe.vae
        pixels = to_tensor(targets).to(self.device, vae.dtype)
        latents = vae.encode(pixels).latent_dist.sample(self.generator.manual_seed(int(self.rng.integers(2**31)))) * vae.config.scaling_factor
        return Batch(latents=latents, text_embeds=torch.cat(texts), image_embeds=clip_image_embeds(self.pipe, conditions))

    def noise_for(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        noise = torch.randn(batch.latents.shape, generator=self.generator).to(self.device, batch.latents.dtype)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (batch.latents.shape[0],), generator=self.generator)
        return noise, t.to(self.device)

    def loss(self, batch: Batch, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return diffusion_loss(
                self.pipe.unet, self.scheduler, batch.latents, noise, timesteps,
                encoder_hidden_states=batch.text_embeds, added_cond_kwargs={"image_embeds": [batch.image_embeds]},
            )

    def step(self, batch: Batch, noise: torch.Tensor, timesteps: torch.Tensor) -> float:
        return self._step(self.loss(batch, noise, timesteps))

    def train(self, steps: int, reporter: Reporter | None = None) -> list[float]:
        self.pipe.unet.train()
        losses = []
        schedule = lr_scheduler(self.optimizer, self.lr_schedule, steps)
        try:
            for i in range(steps):
                batch = self.make_batch()
                losses.append(self.step(batch, *self.noise_for(batch)))
                if schedule is not None:
                    schedule.step()
                if reporter is not None:
                    reporter.step(i + 1, steps, f"identity loss {losses[-1]:.4f}")
        finally:
            self.pipe.unet.eval()
            for p in self.params.values():
                p.requires_grad_(False)
                p.data = p.data.to(self.pipe.unet.dtype)  # back to the inference precision
        return losses

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().to("cpu", torch.float32).contiguous() for name, p in self.params.items()}


def load_ip_state(unet, state: dict[str, torch.Tensor]) -> None:
    """Copy saved to_k_ip/to_v_ip weights into a UNet (names must match exactly)."""
    params = ip_adapter_parameters(unet)
    if set(params) != set(state):
        missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        raise ValueError(f"IP-Adapter weights do not match the UNet: missing {missing[:3]}, unexpected {unexpected[:3]}")
    with torch.no_grad():
        for name, p in params.items():
            p.data = state[name].to(p.device, unet.dtype).clone()


def run_identity(inputs: "StageInputs", out: Path) -> None:
    """Stage identity: the adapter's projections fine-tuned on the subject views, at IP-Adapter scale
    1.0 (as the adapter was trained and as tutorial_train.py trains it)."""
    from safetensors.torch import save_file

    preset = inputs.preset
    views = [(v.name, Image.fromarray(v.color, "RGBA")) for v in load_views(inputs.upstream("subject_views") / "views").views]
    with inputs.models.personalized(ip_scale=1.0) as pipe:
        trainer = IdentityTrainer(pipe, views, inputs.request.subject, preset.sd_size, preset.identity_lr, preset.identity_batch, inputs.seed,
                                  augment_pool=preset.identity_augment_pool, lr_schedule=preset.lr_schedule)
        losses = trainer.train(preset.identity_steps, inputs.reporter)
        save_file(trainer.state_dict(), str(out / "ip_adapter.safetensors"))
    (out / "losses.json").write_text(json.dumps(losses))
