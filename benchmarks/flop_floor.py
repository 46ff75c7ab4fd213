"""FLOP-derived floor of each stage of the chain at the published model sizes: the seconds the
networks' arithmetic alone needs on one H100 (bf16 dense peak 989 TFLOP/s) and at a realistic 40% of it.

    python benchmarks/flop_floor.py [--preset default] [--json PATH]

Every count comes from `torch.utils.flop_counter.FlopCounterMode` running the real networks (built by
`models/random_set.py` from the published configs) on the `meta` device at the shapes the preset
gives, so no memory is used and nothing is approximated by hand except where a note says so.
Multiply-adds count as 2 FLOPs. Reconstruction (Gaussian fitting, meshing, texturing) is not a
network and is left out: its floor is not a FLOP count.

What each stage runs (pipeline/generate.py and the modules it calls):

    subject_views  ViT-L/14 on the input, VAE encode (256 px), mv_steps x multi-view UNet on 12 rows
                   (6 views x 2 domains; 24 when mv_guidance != 1), VAE decode of 12 views
    identity       VAE encode + ViT-H/14 of each augmented view: 6 x identity_augment_pool once, or
                   identity_steps x identity_batch (a fresh augmentation per draw) when the pool is 0;
                   identity_steps x [SD UNet forward and backward of identity_batch rows at sd_size];
                   the backward runs from the loss to the first trained layer (to_k_ip/to_v_ip of the
                   first cross-attention), weight gradients only there
    edited_views   img2img of the 6 views: prompt encodes, ViT-H x6, VAE encode x6, (strength x sd_steps
                   [+1 for PNDM]) SD UNet calls on 12 rows (guidance doubles 6), VAE decode x6; then
                   Marigold normals: normal_steps x UNet on 6 rows at 256 px, VAE encode/decode x6
    subject_prior  VAE encode of 12 views + the condition, ViT-L x1, prior_steps x multi-view UNet forward
                   and backward on 12 rows (backward from the loss to the first cross-domain layer)
    front_view     img2img of 1 image (2 rows with guidance)
    multiview      as subject_views

The IP-Adapter's image tokens are counted by giving the SD UNet 77 + 4 context tokens (its decoupled
attention attends 77 text and 4 image tokens, the same work as one attention over 81).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from make_your_3d.models import personalized, random_set
from make_your_3d.pipeline.presets import get_preset

H100_BF16_DENSE = 989e12  # FLOP/s, H100 SXM bf16 dense tensor-core peak
UTILISATION = 0.40
TEXT_TOKENS = 77
IP_TOKENS = personalized.IP_ADAPTER_TOKENS
NUM_VIEWS = 6
SCENARIO_STAGES = {
    "new subject": ("subject_views", "identity", "edited_views", "subject_prior", "front_view", "multiview"),
    "new prompt": ("edited_views", "subject_prior", "front_view", "multiview"),
    "new seed": ("front_view", "multiview"),
}
TARGET_S = {"new subject": 60.0, "new prompt": 25.0, "new seed": 10.0}
META = torch.device("meta")


def count(fn) -> int:
    """FLOPs of running fn() (forward, and backward when fn calls it)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _meta(*shape: int) -> torch.Tensor:
    return torch.empty(*shape, device=META)


class Networks:
    """The published networks on the meta device, built on first use; unit costs per image/row."""

    def _build(self, name: str) -> torch.nn.Module:
        net = next(n for n in random_set.NETWORKS if n.name == name)
        module = random_set.build_on_meta(net, random_set.network_config(net))
        module.requires_grad_(False)
        return module.eval()

    @cached_property
    def sd_unet(self):
        return self._build("personalized/unet")

    @cached_property
    def vae(self):  # SD 1.5's, Wonder3D's and Marigold's VAEs share one configuration
        return self._build("personalized/vae")

    @cached_property
    def sd_text(self):
        return self._build("personalized/text_encoder")

    @cached_property
    def vit_h(self):
        return self._build("image_encoder")

    @cached_property
    def mv_unet(self):
        return self._build("multiview/unet")

    @cached_property
    def vit_l(self):
        return self._build("multiview/image_encoder")

    @cached_property
    def marigold_unet(self):
        return self._build("normal_estimator/unet")

    @cached_property
    def marigold_text(self):
        return self._build("normal_estimator/text_encoder")

    # --- unit costs (one image or one row) ---

    def vae_encode(self, px: int) -> int:
        return count(lambda: self.vae.encode(_meta(1, 3, px, px)))

    def vae_decode(self, px: int) -> int:
        return count(lambda: self.vae.decode(_meta(1, 4, px // 8, px // 8)))

    def clip_vision(self, model) -> int:
        size = model.config.image_size
        return count(lambda: model(pixel_values=_meta(1, 3, size, size)))

    def clip_text(self, model) -> int:
        return count(lambda: model(input_ids=torch.zeros(1, TEXT_TOKENS, dtype=torch.long, device=META)))

    def sd_unet_row(self, px: int, backward: bool = False) -> int:
        unet, lat = self.sd_unet, px // 8
        context = _meta(1, TEXT_TOKENS + IP_TOKENS, unet.config.cross_attention_dim)
        first = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_v.weight  # where to_v_ip sits
        return self._row(lambda: unet(_meta(1, 4, lat, lat), _meta(1), encoder_hidden_states=context).sample, first, backward)

    def mv_unet_rows(self, rows: int, px: int, backward: bool = False) -> int:
        """The multi-view UNet needs whole samples (its attention mixes the 6 views of a domain)."""
        unet, lat = self.mv_unet, px // 8
        context = _meta(rows, 1, unet.config.cross_attention_dim)
        first = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn_joint_mid.to_q.weight  # first LoRA target
        fn = lambda: unet(_meta(rows, 8, lat, lat), _meta(rows), encoder_hidden_states=context, class_labels=_meta(rows, 10)).sample  # noqa: E731
        return self._row(fn, first, backward)

    def marigold_row(self, px: int) -> int:
        unet, lat = self.marigold_unet, px // 8
        context = _meta(1, TEXT_TOKENS, unet.config.cross_attention_dim)
        return count(lambda: unet(_meta(1, 8, lat, lat), _meta(1), encoder_hidden_states=context))

    @staticmethod
    def _row(fn, trained: torch.nn.Parameter, backward: bool) -> int:
        if not backward:
            with torch.no_grad():
                return count(fn)
        trained.requires_grad_(True)
        try:
            return count(lambda: fn().float().square().mean().backward())
        finally:
            trained.requires_grad_(False)
            trained.grad = None


def img2img_unet_calls(steps: int, strength: float) -> int:
    """UNet calls of diffusers' img2img with SD 1.5's published scheduler (PNDM, PLMS steps)."""
    from diffusers import PNDMScheduler

    config = json.loads((random_set.PUBLISHED_CONFIGS / "personalized" / "scheduler" / "scheduler_config.json").read_text())
    scheduler = PNDMScheduler.from_config(config)
    scheduler.set_timesteps(steps)
    init = min(int(steps * strength), steps)
    t_start = max(steps - init, 0)
    return len(scheduler.timesteps[t_start * scheduler.order:])


@dataclass
class StageFloor:
    stage: str
    flops: int
    terms: dict[str, int]

    @property
    def peak_s(self) -> float:
        return self.flops / H100_BF16_DENSE

    @property
    def realistic_s(self) -> float:
        return self.flops / (H100_BF16_DENSE * UTILISATION)


def stage_floors(preset, nets: Networks | None = None) -> list[StageFloor]:
    nets = nets or Networks()
    p = preset
    mv_rows = 2 * NUM_VIEWS * (2 if p.mv_guidance != 1.0 else 1)
    sd_cfg = 2 if p.sd_guidance > 1.0 else 1
    calls = img2img_unet_calls(p.sd_steps, p.edit_strength)
    enc_mv, dec_mv, enc_sd, dec_sd = nets.vae_encode(p.mv_size), nets.vae_decode(p.mv_size), nets.vae_encode(p.sd_size), nets.vae_decode(p.sd_size)
    vit_h, vit_l = nets.clip_vision(nets.vit_h), nets.clip_vision(nets.vit_l)
    sd_text, mari_text = nets.clip_text(nets.sd_text), nets.clip_text(nets.marigold_text)
    sd_fwd, sd_train = nets.sd_unet_row(p.sd_size), nets.sd_unet_row(p.sd_size, backward=True)
    mv_fwd = nets.mv_unet_rows(mv_rows, p.mv_size)
    mv_train = nets.mv_unet_rows(2 * NUM_VIEWS, p.mv_size, backward=True)
    mari = nets.marigold_row(p.mv_size)

    def views(label: str) -> dict[str, int]:
        return {
            f"{label}: ViT-L x1 + VAE encode x1": vit_l + enc_mv,
            f"{label}: multi-view UNet {p.mv_steps} steps x {mv_rows} rows": p.mv_steps * mv_fwd,
            f"{label}: VAE decode x12": 2 * NUM_VIEWS * dec_mv,
        }

    def img2img(n: int) -> dict[str, int]:
        return {
            f"text encoder x{n * sd_cfg} + ViT-H x{n} + VAE encode x{n}": n * sd_cfg * sd_text + n * vit_h + n * enc_sd,
            f"SD UNet {calls} calls x {n * sd_cfg} rows": calls * n * sd_cfg * sd_fwd,
            f"VAE decode x{n}": n * dec_sd,
        }

    b = p.identity_batch
    encodes = NUM_VIEWS * p.identity_augment_pool if p.identity_augment_pool else p.identity_steps * b
    stages = {
        "subject_views": views("subject views"),
        "identity": {
            "text encoder x6 (view prompts)": NUM_VIEWS * sd_text,
            f"[VAE encode + ViT-H] x{encodes}": encodes * (enc_sd + vit_h),
            f"{p.identity_steps} steps x SD UNet fwd+bwd x{b}": p.identity_steps * b * sd_train,
        },
        "edited_views": {
            **img2img(NUM_VIEWS),
            f"Marigold {p.normal_steps} steps x 6 + VAE enc/dec x6 + text x1": p.normal_steps * NUM_VIEWS * mari + NUM_VIEWS * (enc_mv + dec_mv) + mari_text,
        },
        "subject_prior": {
            "VAE encode x13 + ViT-L x1": (2 * NUM_VIEWS + 1) * enc_mv + vit_l,
            f"{p.prior_steps} steps x multi-view UNet fwd+bwd x12 rows": p.prior_steps * mv_train,
        },
        "front_view": img2img(1),
        "multiview": views("multiview"),
    }
    return [StageFloor(name, sum(terms.values()), terms) for name, terms in stages.items()]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="default")
    parser.add_argument("--json")
    parser.add_argument("--terms", action="store_true", help="also print each stage's terms")
    args = parser.parse_args(argv)
    preset = get_preset(args.preset)
    floors = stage_floors(preset)
    by_name = {f.stage: f for f in floors}
    print(f"FLOP floor, preset {preset.name} (sd {preset.sd_size} px x {preset.sd_steps} steps at strength {preset.edit_strength}, "
          f"guidance {preset.sd_guidance}; mv {preset.mv_size} px x {preset.mv_steps} steps, guidance {preset.mv_guidance}; "
          f"identity {preset.identity_steps} x batch {preset.identity_batch}; prior {preset.prior_steps}; normals {preset.normal_steps} steps)")
    print(f"Seconds at the H100's bf16 dense peak ({H100_BF16_DENSE / 1e12:.0f} TFLOP/s) and at {UTILISATION:.0%} of it. Reconstruction not included.")
    print()
    print("| stage | TFLOP | s at peak | s at 40% |")
    print("|---|---|---|---|")
    for f in floors:
        print(f"| {f.stage} | {f.flops / 1e12:.1f} | {f.peak_s:.2f} | {f.realistic_s:.2f} |")
        if args.terms:
            for term, value in f.terms.items():
                print(f"|   {term} | {value / 1e12:.1f} | {value / H100_BF16_DENSE:.2f} | {value / H100_BF16_DENSE / UTILISATION:.2f} |")
    print()
    print("| scenario | TFLOP | s at peak | s at 40% | target s (whole job) |")
    print("|---|---|---|---|---|")
    scenarios = {}
    for name, stages in SCENARIO_STAGES.items():
        flops = sum(by_name[s].flops for s in stages)
        scenarios[name] = flops
        print(f"| {name} | {flops / 1e12:.1f} | {flops / H100_BF16_DENSE:.2f} | {flops / H100_BF16_DENSE / UTILISATION:.2f} | {TARGET_S[name]:.0f} |")
    result = {
        "preset": preset.to_dict(),
        "peak_flops": H100_BF16_DENSE,
        "utilisation": UTILISATION,
        "stages": {f.stage: {"flops": f.flops, "peak_s": f.peak_s, "realistic_s": f.realistic_s, "terms": f.terms} for f in floors},
        "scenarios": {k: {"flops": v, "peak_s": v / H100_BF16_DENSE, "realistic_s": v / H100_BF16_DENSE / UTILISATION} for k, v in scenarios.items()},
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
