"""Toy-sized building blocks shared by the tiny model set's writers (SD-style VAE, CLIP encoders).

Each builder seeds torch itself, so a writer's output depends only on the seeds it passes.
"""

from __future__ import annotations

from pathlib import Path

import torch

TINY_DIM = 32  # hidden size of every tiny CLIP encoder and UNet cross-attention


def tiny_vae(seed: int, block_out_channels: tuple[int, ...] = (16, 32), sample_size: int = 16, **config):
    """AutoencoderKL with the SD layout: 4 latent channels, downsampling 2**(len(blocks) - 1)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    n = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=block_out_channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=sample_size,
        **config,
    )


def tiny_clip_text_encoder(seed: int, vocab_size: int):
    """CLIPTextModel sized for the tiny tokenizer (its last two ids are the start/end tokens)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=TINY_DIM,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=TINY_DIM,
            bos_token_id=vocab_size - 2,
            eos_token_id=vocab_size - 1,
            pad_token_id=vocab_size - 1,
        )
    )


def tiny_clip_vision_encoder(seed: int, image_size: int = 32, projection_dim: int = TINY_DIM):
    """CLIPVisionModelWithProjection, the IP-Adapter's and Wonder3D's image encoder family."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    return CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=TINY_DIM,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=image_size,
            patch_size=8,
            projection_dim=projection_dim,
        )
    )


def write_clip_image_processor(folder: Path, size: int) -> None:
    """preprocessor_config.json of a CLIPImageProcessor resizing and centre-cropping to `size`."""
    from transformers import CLIPImageProcessor

    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(folder)
