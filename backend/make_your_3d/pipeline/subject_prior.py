"""Subject-prior optimisation (paper 3.4): teach the multi-view model what the edited subject looks like.

The objective is Wonder3D's own second ("joint") training stage, `train_mvdiffusion_joint.py` with
`configs/train/stage2-joint-6views-lvis.yaml` (xxlong0/Wonder3D d894f82), checked against a run of
that script in `tests/test_reference_subject_prior.py` (`tests/golden/subject_prior/`):

- batch `[normals(6), colours(6)]` of one sample (views front, front_right, right, back, left,
  front_left); targets are the views' VAE latents times `scaling_factor`;
- every row is conditioned on the condition (front) image: its CLIP `image_embeds` as the one
  cross-attention token, its VAE latent (`latent_dist.mode() * scaling_factor`) concatenated on
  channels; class labels = camera/domain labels;
- the target is the noise (`prediction_type` epsilon in the scheduler config; v-prediction is
  honoured the same way the reference does);
- condition dropout 'drop_as_a_whole' at rate 0.05: one uniform `p` per sample; `p < 0.10` zeroes
  the CLIP embedding, `0.05 <= p < 0.15` zeroes the condition latent (so 5% each: CLIP only, both,
  latent only), which is what lets classifier-free guidance use the tuned model;
- loss: per-row MSE, weighted by Min-SNR (`snr_gamma` 5: `min(snr, 5) / snr`), averaged.

Deliberate differences (each keeps the objective but fits a one-subject fine-tune):

- **LoRA instead of full layers.** Wonder3D trains `trainable_modules: ['joint_mid']`, i.e. every
  `attn_joint_mid` (to_q, to_k, to_v, to_out.0) and `norm_joint_mid` fully. We put LoRA on the same
  four projections of every `attn_joint_mid` and keep `norm_joint_mid` frozen: a few hundred steps
  on six views would overfit full layers, and LoRA keeps the result a small, cacheable file. With
  the LoRA at zero the loss and its gradient w.r.t. those layers are the reference's exactly.
- **One timestep per sample.** The reference draws one timestep per (sample, domain): the normal
  and colour halves of one object get different noise levels. We draw one per sample, shared by
  both domains, as at inference, where the cross-domain attention we tune always sees equal
  levels. `loss` itself takes per-row timesteps, so the reference's layout is reproduced exactly.
- **Deterministic targets.** The reference encodes targets with `latent_dist.sample()` every
  step; we encode the six views once and keep `latent_dist.mode()` as one fixed target per view
  (the VAE runs once instead of every step, and the cached stage is deterministic).
- **Inference conditioning.** The reference trains with the CLIP input resized as a tensor
  (`TF.resize` bicubic, no crop), labels from float32 angles of its `nine_views` cameras, and a
  random white/black/grey background. We condition exactly as `MultiViewPipeline` samples (the CLIP
  feature extractor, the float16 label table, white), so the LoRA learns the inputs it will see.
- **Optimiser.** AdamW with weight decay 1e-2 and gradient clipping at norm 1, as the reference;
  learning rate and step count come from the preset (the reference: 5e-5 for full layers, 20k
  steps, batch 32 x 2 accumulation, EMA, fp16) because a LoRA on one subject needs far fewer steps.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from make_your_3d.models.multiview_unet import cross_domain_module_names
from make_your_3d.pipeline.training import OptimizerStep, diffusion_target, lr_scheduler, training_autocast
from make_your_3d.progress import Reporter
from make_your_3d.seeds import derive_seed
from make_your_3d.views import load_views

if TYPE_CHECKING:
    from make_your_3d.pipeline.stages import StageInputs

ADAPTER = "subject_prior"


def lora_parameters(unet) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in unet.named_parameters() if "lora_" in name and ADAPTER in name}


def ensure_adapter(unet, rank: int) -> None:
    """Add the (zero-effect at init) LoRA adapter on the cross-domain attention, once per rank."""
    from peft import LoraConfig

    config = getattr(unet, "peft_config", {}).get(ADAPTER)
    if config is not None and config.r == rank:
        return
    if config is not None:
        unet.delete_adapters(ADAPTER)
    targets = cross_domain_module_names(unet)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=True), adapter_name=ADAPTER)
    unet.requires_grad_(False)


@torch.no_grad()
def init_adapter(unet, generator: torch.Generator) -> None:
    """Draw the adapter's starting weights from `generator`, as peft's default initialisation does
    (lora_A kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)); lora_B zero, so
    the adapted model starts as the original). peft draws lora_A from torch's global generator, whose
    state depends on whatever ran before in the process, and a reused adapter slot would start from
    the previous job's weights: either way the same seed gave a different LoRA."""
    for name, p in sorted(lora_parameters(unet).items()):
        if ".lora_A." in name:
            bound = 1.0 / math.sqrt(p.shape[1])
            p.copy_(torch.empty(p.shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator))
        else:
            p.zero_()


def use_adapter(unet, state: dict[str, torch.Tensor] | None, rank: int) -> None:
    """Load saved LoRA weights and enable them (state None: disable the adapter; the original model)."""
    from peft import set_peft_model_state_dict

    if state is None:
        if getattr(unet, "peft_config", None):
            unet.disable_adapters()
        return
    ensure_adapter(unet, rank)
    result = set_peft_model_state_dict(unet, state, adapter_name=ADAPTER)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"subject-prior weights do not fit this UNet: unexpected {unexpected[:3]}")
    unet.set_adapters(ADAPTER)
    unet.enable_adapters()


def adapter_state(unet) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in get_peft_model_state_dict(unet, adapter_name=ADAPTER).items()}


# Wonder3D stage 2 (configs/train/stage2-joint-6views-lvis.yaml)
CONDITION_DROP_RATE = 0.05
SNR_GAMMA = 5.0
WEIGHT_DECAY = 1e-2
MAX_GRAD_NORM = 1.0


@dataclass
class PriorBatch:
    """One training sample in the UNet's row layout `[normals(V), colours(V)]` (2V rows)."""

    latents: torch.Tensor  # (2V, 4, h, w) clean target latents, times scaling_factor
    image_embeds: torch.Tensor  # (2V, 1, D) CLIP image_embeds of the condition image
    cond_latents: torch.Tensor  # (2V, 4, h, w) condition image latent (mode * scaling_factor)
    class_labels: torch.Tensor  # (2V, 10) camera/domain labels


def condition_keep(p: float, rate: float = CONDITION_DROP_RATE) -> tuple[bool, bool]:
    """Wonder3D's 'drop_as_a_whole' dropout for one sample's uniform draw `p`:
    (keep the condition latent, keep the CLIP embedding)."""
    keep_latent = not (rate <= p < 3.0 * rate)
    keep_clip = not (p < 2.0 * rate)
    return keep_latent, keep_clip


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-row Min-SNR loss weights `min(snr, gamma) / snr` (epsilon target), snr = a / (1 - a)."""
    alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alphas / (1.0 - alphas)
    return torch.clamp(snr, max=gamma) / snr


def prior_loss(unet, scheduler, batch: PriorBatch, noise: torch.Tensor, timesteps: torch.Tensor,
               drop_p: float | None = None, drop_rate: float = CONDITION_DROP_RATE,
               snr_gamma: float | None = SNR_GAMMA) -> torch.Tensor:
    """The diffusion loss of one sample (see the module docstring); `timesteps` per row,
    `drop_p` the sample's dropout draw (None: keep both conditions)."""
    cond_latents, image_embeds = batch.cond_latents, batch.image_embeds
    if drop_p is not None:
        keep_latent, keep_clip = condition_keep(drop_p, drop_rate)
        cond_latents = cond_latents if keep_latent else torch.zeros_like(cond_latents)
        image_embeds = image_embeds if keep_clip else torch.zeros_like(image_embeds)
    noisy = scheduler.add_noise(batch.latents, noise, timesteps)
    sample = torch.cat([noisy, cond_latents], dim=1)
    pred = unet(sample, timesteps, encoder_hidden_states=image_embeds, class_labels=batch.class_labels).sample
    target = diffusion_target(scheduler, batch.latents, noise, timesteps)
    if snr_gamma is None:
        return F.mse_loss(pred.float(), target.float())
    per_row = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=list(range(1, pred.ndim)))
    return (per_row * min_snr_weights(scheduler, timesteps, snr_gamma)).mean()


class SubjectPriorTrainer:
    """LoRA fine-tuning of the cross-domain attention on one edited multi-view sample."""

    def __init__(self, mv, colors: list[Image.Image], normals: list[Image.Image], condition: Image.Image, rank: int, lr: float, seed: int,
                 drop_rate: float = CONDITION_DROP_RATE, snr_gamma: float | None = SNR_GAMMA, lr_schedule: str = "constant"):
        from diffusers import DDPMScheduler

        self.mv = mv
        unet = mv.unet
        ensure_adapter(unet, rank)
        init_adapter(unet, torch.Generator(device="cpu").manual_seed(derive_seed(seed, "lora_init")))
        unet.set_adapters(ADAPTER)
        unet.enable_adapters()
        self.params = lora_parameters(unet)
        for p in self.params.values():
            p.data = p.data.float()
            p.requires_grad_(True)
        self.optimizer = torch.optim.AdamW(list(self.params.values()), lr=lr, weight_decay=WEIGHT_DECAY)
        self._step = OptimizerStep(self.optimizer, unet.device, unet.dtype, max_grad_norm=MAX_GRAD_NORM)
        lr_scheduler(self.optimizer, lr_schedule, 1)  # an unknown schedule fails here, before any work
        self.lr_schedule = lr_schedule
        self.scheduler = DDPMScheduler.from_config(mv.scheduler.config)
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self.device = unet.device
        self.drop_rate = drop_rate
        self.snr_gamma = snr_gamma
        with torch.no_grad():
            # [normals(6), colours(6)]: the layout the UNet's attention processors expect
            latents = torch.cat([mv.encode_views(normals), mv.encode_views(colors)])
            image_embeds, cond_latents = mv.encode_condition([condition])
            n = latents.shape[0]
            self.batch = PriorBatch(latents, image_embeds.repeat(n, 1, 1), cond_latents.repeat(n, 1, 1, 1), mv.camera_embeddings(1))

    @property
    def latents(self) -> torch.Tensor:
        return self.batch.latents

    def _autocast(self):
        return training_autocast(self.device, self.mv.unet.dtype)

    def noise_for(self) -> tuple[torch.Tensor, torch.Tensor]:
        noise = torch.randn(self.latents.shape, generator=self.generator).to(self.device, self.latents.dtype)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (1,), generator=self.generator)
        return noise, t.repeat(self.latents.shape[0]).to(self.device)  # one timestep for the whole sample

    def drop_for(self) -> float:
        """The sample's condition-dropout draw (uniform in [0, 1), from the trainer's generator)."""
        return float(torch.rand((), generator=self.generator))

    def loss(self, noise: torch.Tensor, timesteps: torch.Tensor, drop_p: float | None = None) -> torch.Tensor:
        with self._autocast():
            return prior_loss(self.mv.unet, self.scheduler, self.batch, noise, timesteps, drop_p, self.drop_rate, self.snr_gamma)

    def step(self, noise: torch.Tensor, timesteps: torch.Tensor, drop_p: float | None = None) -> float:
        return self._step(self.loss(noise, timesteps, drop_p))

    def train(self, steps: int, reporter: Reporter | None = None) -> list[float]:
        unet = self.mv.unet
        unet.train()
        losses: list[float] = []
        schedule = lr_scheduler(self.optimizer, self.lr_schedule, steps)
        try:
            for i in range(steps):
                noise, timesteps = self.noise_for()
                losses.append(self.step(noise, timesteps, self.drop_for()))
                if schedule is not None:
                    schedule.step()
                if reporter is not None:
                    reporter.step(i + 1, steps, f"subject-prior loss {losses[-1]:.4f}")
        finally:
            unet.eval()
            for p in self.params.values():
                p.requires_grad_(False)
                p.data = p.data.to(unet.dtype)
        return losses


def encode_normal_image(normals: np.ndarray, mask: np.ndarray, background: float = 1.0) -> Image.Image:
    """Unit normals (H, W, 3) in the model's normal frame -> RGB image (n + 1) / 2 over `background`."""
    rgb = (normals + 1.0) * 0.5
    rgb = np.where(mask[..., None], rgb, background)
    return Image.fromarray(np.round(np.clip(rgb, 0, 1) * 255).astype(np.uint8), "RGB")


def run_subject_prior(inputs: "StageInputs", out: Path) -> None:
    """Stage subject_prior: a fresh LoRA on the multi-view model's cross-domain attention, trained on
    the edited views (conditioned on the edited front view)."""
    from safetensors.torch import save_file

    from make_your_3d.models.multiview_pipeline import world_normals_to_front
    from make_your_3d.pipeline.preprocess import composite

    preset = inputs.preset
    edited = load_views(inputs.upstream("edited_views") / "views")
    colors = [composite(Image.fromarray(v.color, "RGBA")) for v in edited.views]
    normals = [encode_normal_image(world_normals_to_front(v.normals_world()), v.mask) for v in edited.views]
    front = next((v for v in edited.views if v.name == "front"), edited.views[0])
    with inputs.models.multiview(lora=None) as mv:
        trainer = SubjectPriorTrainer(mv, colors, normals, Image.fromarray(front.color, "RGBA"), preset.lora_rank, preset.prior_lr, inputs.seed,
                                      lr_schedule=preset.lr_schedule)
        losses = trainer.train(preset.prior_steps, inputs.reporter)
        save_file(adapter_state(mv.unet), str(out / "lora.safetensors"))
    (out / "losses.json").write_text(json.dumps(losses))
