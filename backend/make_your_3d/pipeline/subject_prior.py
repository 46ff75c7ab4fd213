"""Subject-prior optimisation (paper 3.4): teach the multi-view model what the edited subject looks like.

Only the UNet's cross-domain attention (`attn_joint_mid`, the layers Wonder3D's own second stage
trains) gets LoRA weights; they learn from the edited views and their estimated normals, in the
multi-view batch layout [normals(6), colours(6)] with the edited front view as the condition.
The multi-view self-attention stays frozen, so the views stay consistent with each other.
"""

from __future__ import annotations


import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from make_your_3d.models.multiview_unet import cross_domain_module_names
from make_your_3d.pipeline.training import OptimizerStep, training_autocast
from make_your_3d.progress import Reporter

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


class SubjectPriorTrainer:
    """LoRA fine-tuning of the cross-domain attention on one edited multi-view sample."""

    def __init__(self, mv, colors: list[Image.Image], normals: list[Image.Image], condition: Image.Image, rank: int, lr: float, seed: int):
        from diffusers import DDPMScheduler

        self.mv = mv
        unet = mv.unet
        ensure_adapter(unet, rank)
        unet.set_adapters(ADAPTER)
        unet.enable_adapters()
        self.params = lora_parameters(unet)
        for p in self.params.values():
            p.data = p.data.float()
            p.requires_grad_(True)
        self.optimizer = torch.optim.AdamW(list(self.params.values()), lr=lr, weight_decay=0.0)
        self._step = OptimizerStep(self.optimizer, unet.device, unet.dtype)
        self.scheduler = DDPMScheduler.from_config(mv.scheduler.config)
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self.device = unet.device
        with torch.no_grad():
            # [normals(6), colours(6)]: the layout the UNet's attention processors expect
            self.latents = torch.cat([mv.encode_views(normals), mv.encode_views(colors)])
            image_embeds, cond_latents = mv.encode_condition([condition])
            n = self.latents.shape[0]
            self.image_embeds = image_embeds.repeat(n, 1, 1)
            self.cond_latents = cond_latents.repeat(n, 1, 1, 1)
            self.class_labels = mv.camera_embeddings(1)

    def _autocast(self):
        return training_autocast(self.device, self.mv.unet.dtype)

    def noise_for(self) -> tuple[torch.Tensor, torch.Tensor]:
        noise = torch.randn(self.latents.shape, generator=self.generator).to(self.device, self.latents.dtype)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (1,), generator=self.generator)
        return noise, t.repeat(self.latents.shape[0]).to(self.device)  # one timestep for the whole sample

    def loss(self, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        noisy = self.scheduler.add_noise(self.latents, noise, timesteps)
        sample = torch.cat([noisy, self.cond_latents], dim=1)
        with self._autocast():
            pred = self.mv.unet(sample, timesteps, encoder_hidden_states=self.image_embeds, class_labels=self.class_labels).sample
        target = noise if self.scheduler.config.prediction_type == "epsilon" else self.scheduler.get_velocity(self.latents, noise, timesteps)
        return F.mse_loss(pred.float(), target.float())

    def step(self, noise: torch.Tensor, timesteps: torch.Tensor) -> float:
        return self._step(self.loss(noise, timesteps))

    def train(self, steps: int, reporter: Reporter | None = None) -> list[float]:
        unet = self.mv.unet
        unet.train()
        losses: list[float] = []
        try:
            for i in range(steps):
                losses.append(self.step(*self.noise_for()))
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
