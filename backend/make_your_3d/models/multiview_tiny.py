"""A tiny multi-view role folder in exactly Wonder3D v1.0's published on-disk layout.

    model_index.json                          (MVDiffusionImagePipeline, as published)
    unet/config.json + diffusion_pytorch_model.safetensors   (Wonder3D's config keys)
    vae/config.json + diffusion_pytorch_model.safetensors    (AutoencoderKL)
    image_encoder/config.json + model.safetensors            (CLIPVisionModelWithProjection)
    feature_extractor/preprocessor_config.json               (CLIPImageProcessor)
    scheduler/scheduler_config.json                          (DDIMScheduler)

Toy sizes (64 px images, 8x8 latents, 32-d embeddings), random weights drawn from the seed inside
a forked RNG, so the same seed writes byte-identical files and the caller's RNG is untouched.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from make_your_3d.models.multiview_unet import UNetMV2DConditionModel, save_with_legacy_names
from make_your_3d.models.tiny_parts import TINY_DIM, tiny_clip_vision_encoder, tiny_vae, write_clip_image_processor

TINY_EMBED_DIM = TINY_DIM
TINY_IMAGE_SIZE = 64

# The published Wonder3D v1.0 model_index.json (the UNet entry names Wonder3D's own module; we
# never import it: `load_multiview` builds each component itself).
MODEL_INDEX = {
    "_class_name": "MVDiffusionImagePipeline",
    "_diffusers_version": "0.19.3",
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
    "requires_safety_checker": True,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "DDIMScheduler"],
    "unet": ["mvdiffusion.models.unet_mv2d_condition", "UNetMV2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def tiny_unet_config() -> dict:
    """Wonder3D's unet/config.json keys at toy sizes (values as published except the sizes)."""
    return dict(
        sample_size=TINY_IMAGE_SIZE // 8,
        in_channels=8,
        out_channels=4,
        down_block_types=("CrossAttnDownBlockMV2D", "DownBlock2D"),
        mid_block_type="UNetMidBlockMV2DCrossAttn",
        up_block_types=("UpBlock2D", "CrossAttnUpBlockMV2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=TINY_EMBED_DIM,
        attention_head_dim=8,
        class_embed_type="projection",
        projection_class_embeddings_input_dim=10,
        num_views=6,
        cd_attention_mid=True,
        joint_attention_twice=True,
        multiview_attention=True,
    )


def _randomise_zero_init(unet: UNetMV2DConditionModel, gen: torch.Generator) -> None:
    """Wonder3D zero-initialises attn_joint_mid's output; a tiny *trained-looking* checkpoint should
    not, or the cross-domain path would be invisible in tests."""
    for name, param in unet.named_parameters():
        if ".attn_joint_mid.to_out.0.weight" in name:
            with torch.no_grad():
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)


def write_tiny_multiview(folder: Path, seed: int, legacy_names: bool = False) -> None:
    """Write a complete tiny multi-view role folder; `legacy_names` saves `*_joint_twice` keys."""
    from diffusers import DDIMScheduler

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNetMV2DConditionModel(**tiny_unet_config())
        _randomise_zero_init(unet, torch.Generator().manual_seed(seed + 7))
        if legacy_names:
            save_with_legacy_names(unet, folder / "unet")
        else:
            unet.save_pretrained(folder / "unet")

        vae = tiny_vae(seed + 1, block_out_channels=(8, 16, 16, 16), sample_size=TINY_IMAGE_SIZE, scaling_factor=0.18215)
        vae.save_pretrained(folder / "vae")
        encoder = tiny_clip_vision_encoder(seed + 2, image_size=32, projection_dim=TINY_EMBED_DIM)
        encoder.save_pretrained(folder / "image_encoder", safe_serialization=True)

    write_clip_image_processor(folder / "feature_extractor", 32)
    # Wonder3D's scheduler: SD's scaled-linear betas, DDIM.
    DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    ).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2) + "\n")
