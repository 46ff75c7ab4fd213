"""One denoising step of the multi-view UNet at Wonder3D v1.0's real configuration (random weights:
speed does not depend on them), with our attention processors vs diffusers' stock per-image
attention on the same modules and shapes.

    python benchmarks/multiview_unet_bench.py [--device cpu|cuda] [--dtypes fp32,bf16] [--repeats 3]

Batch: one subject, 6 views x 2 domains = 12 rows of 32x32 latents (256 px), without guidance
(guidance doubles the rows). Prints a Markdown table of median seconds per step.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from datetime import date

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from make_your_3d.models.multiview_unet import UNetMV2DConditionModel

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build(device: torch.device, dtype: torch.dtype) -> UNetMV2DConditionModel:
    # Wonder3D v1.0's published unet/config.json: the class defaults plus these two flags.
    unet = UNetMV2DConditionModel(cd_attention_mid=True, joint_attention_twice=True)
    return unet.to(device, dtype).eval()


def swap_to_stock(unet: torch.nn.Module) -> dict[str, object]:
    """Replace the multi-view and cross-domain processors with diffusers' stock SDPA processor."""
    saved = {}
    for name, module in unet.named_modules():
        if isinstance(module, Attention) and name.rsplit(".", 1)[-1] in ("attn1", "attn_joint_mid"):
            saved[name] = module.processor
            module.set_processor(AttnProcessor2_0())
    return saved


def restore(unet: torch.nn.Module, saved: dict[str, object]) -> None:
    modules = dict(unet.named_modules())
    for name, processor in saved.items():
        modules[name].set_processor(processor)


@torch.no_grad()
def time_step(unet, device, dtype, repeats: int) -> float:
    rows = 12
    sample = torch.randn(rows, 8, 32, 32, device=device, dtype=dtype)
    t = torch.tensor(500, device=device)
    embeds = torch.randn(rows, 1, 768, device=device, dtype=dtype)
    labels = torch.randn(rows, 10, device=device, dtype=dtype)
    unet(sample, t, encoder_hidden_states=embeds, class_labels=labels)  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        unet(sample, t, encoder_hidden_states=embeds, class_labels=labels)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU {platform.machine()}, {torch.get_num_threads()} threads"
    print(f"Multi-view UNet step, Wonder3D v1.0 config, 12 rows x 32x32 latents, {where}, {date.today()}, median of {args.repeats}")
    print()
    print("| dtype | params | ours (multi-view + cross-domain) s | stock per-image SDPA s | ours / stock |")
    print("|---|---|---|---|---|")
    for name in args.dtypes.split(","):
        dtype = DTYPES[name]
        unet = build(device, dtype)
        params = sum(p.numel() for p in unet.parameters())
        ours = time_step(unet, device, dtype, args.repeats)
        saved = swap_to_stock(unet)
        stock = time_step(unet, device, dtype, args.repeats)
        restore(unet, saved)
        print(f"| {name} | {params / 1e6:.1f} M | {ours:.2f} | {stock:.2f} | {ours / stock:.2f} |", flush=True)
        del unet


if __name__ == "__main__":
    main()
