"""The personalized model p_p: Stable Diffusion 1.5 + IP-Adapter through diffusers' own pipeline.

Loading goes through `StableDiffusionPipeline.from_pretrained` and `load_ip_adapter`, so the real
weights and the tiny set share one code path. The identity-aware stage trains exactly the
parameters `ip_adapter_parameters` returns (the adapter's `to_k_ip` / `to_v_ip`).

Against IP-Adapter's reference code (`tests/test_reference_ip_adapter.py`): diffusers'
`ImageProjection` + `IPAdapterAttnProcessor2_0`, fed `added_cond_kwargs={"image_embeds": [(B, 1, D)]}`,
compute what their `ImageProjModel` + `IPAttnProcessor2_0` compute with the 4 image tokens appended
after the text tokens (same noise prediction and gradients on the tiny set). The CLIP image
processor is built at the encoder's own `image_size` rather than taken from the reference's
`CLIPImageProcessor()` defaults: for h94's ViT-H encoder both are 224 px, and the tiny encoder's
32 px then works through the same code.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from make_your_3d.errors import WeightsMissing
from make_your_3d.models.registry import ROLES, missing_weights_advice
from make_your_3d.models.tiny_parts import TINY_DIM, tiny_clip_text_encoder, tiny_clip_vision_encoder, tiny_vae, write_clip_image_processor
from make_your_3d.models.tokenizer import write_tiny_clip_tokenizer

IP_ADAPTER_WEIGHTS = "ip-adapter_sd15.safetensors"
IP_ADAPTER_TOKENS = 4  # SD 1.5 IP-Adapter projects one CLIP embedding to 4 context tokens


def require_roles(models_dir: Path, *names: str) -> None:
    """Raise WeightsMissing naming every missing file of the given roles."""
    problems = []
    for name in names:
        missing = ROLES[name].missing(models_dir)
        if missing:
            shown = ", ".join(missing[:4]) + (" ..." if len(missing) > 4 else "")
            problems.append(f"{name} ({ROLES[name].folder}/: {shown})")
    if problems:
        raise WeightsMissing(f"Model weights are missing in {models_dir}: {'; '.join(problems)}. " + missing_weights_advice(models_dir))


def load_personalized(models_dir: Path, device: torch.device, dtype: torch.dtype = torch.float32, ip_scale: float = 1.0):
    """SD 1.5 pipeline with the IP-Adapter and its CLIP image encoder attached, frozen, in eval mode."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPImageProcessorPil, CLIPVisionModelWithProjection  # PIL backend: as IP-Adapter ran it, whatever torchvision

    models_dir = Path(models_dir)
    require_roles(models_dir, "personalized", "ip_adapter", "image_encoder")
    encoder = CLIPVisionModelWithProjection.from_pretrained(ROLES["image_encoder"].path(models_dir), dtype=dtype)
    size = encoder.config.image_size
    processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    pipe = StableDiffusionPipeline.from_pretrained(
        ROLES["personalized"].path(models_dir),
        safety_checker=None,
        requires_safety_checker=False,
        feature_extractor=processor,
        image_encoder=encoder,
        dtype=dtype,
        use_safetensors=True,
    )
    pipe.load_ip_adapter(str(ROLES["ip_adapter"].path(models_dir)), subfolder="", weight_name=IP_ADAPTER_WEIGHTS, image_encoder_folder=None)
    pipe.set_ip_adapter_scale(ip_scale)
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.image_encoder):
        module.requires_grad_(False)
        module.eval()
    return pipe.to(device)


def ip_adapter_parameters(unet: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Exactly the IP-Adapter image cross-attention projections (`to_k_ip`, `to_v_ip`) of a UNet."""
    params = {name: p for name, p in unet.named_parameters() if ".to_k_ip." in name or ".to_v_ip." in name}
    if not params:
        raise ValueError("this UNet has no IP-Adapter loaded (no to_k_ip/to_v_ip parameters)")
    return params


def ip_adapter_shapes(unet: torch.nn.Module, image_embed_dim: int) -> list[tuple[str, tuple[int, ...]]]:
    """The tensors of `ip-adapter_sd15.safetensors` for a UNet, in the published key layout:
    `image_proj.proj` / `image_proj.norm` (one CLIP embedding -> 4 context tokens) and
    `ip_adapter.{k}.to_k_ip` / `to_v_ip`, k counting every attention processor (cross-attention
    ones are 1, 3, 5, ...). The tiny writer below and `models/random_set.py` both draw these."""
    cross = int(unet.config.cross_attention_dim)
    shapes = [
        ("image_proj.proj.weight", (cross * IP_ADAPTER_TOKENS, image_embed_dim)),
        ("image_proj.proj.bias", (cross * IP_ADAPTER_TOKENS,)),
        ("image_proj.norm.weight", (cross,)),
        ("image_proj.norm.bias", (cross,)),
    ]
    key_id = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        to_k = unet.get_submodule(name.removesuffix(".processor")).to_k
        for proj in ("to_k_ip", "to_v_ip"):
            shapes.append((f"ip_adapter.{key_id}.{proj}.weight", tuple(to_k.weight.shape)))
        key_id += 2
    return shapes


# --- tiny model set ----------------------------------------------------------------------------

TINY_CROSS_DIM = TINY_DIM
TINY_IMAGE_EMBED_DIM = TINY_DIM


def _seeded(seed: int) -> None:
    torch.manual_seed(seed)


def write_tiny_personalized(folder: Path, seed: int) -> None:
    """A tiny SD 1.5 folder in the published diffusers layout (toy sizes, random weights)."""
    from diffusers import PNDMScheduler, UNet2DConditionModel

    folder = Path(folder)
    vocab_size = write_tiny_clip_tokenizer(folder / "tokenizer")
    _seeded(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TINY_CROSS_DIM,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    unet.save_pretrained(folder / "unet")
    tiny_vae(seed + 1).save_pretrained(folder / "vae")
    tiny_clip_text_encoder(seed + 2, vocab_size).save_pretrained(folder / "text_encoder", safe_serialization=True)
    PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1
    ).save_pretrained(folder / "scheduler")
    write_clip_image_processor(folder / "feature_extractor", 32)

    index = {
        "_class_name": "StableDiffusionPipeline",
        "feature_extractor": ["transformers", "CLIPImageProcessor"],
        "image_encoder": [None, None],
        "safety_checker": [None, None],
        "requires_safety_checker": False,
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


def write_tiny_image_encoder(folder: Path, seed: int) -> None:
    """A tiny `CLIPVisionModelWithProjection` folder (config.json + model.safetensors), as h94 ships it."""
    tiny_clip_vision_encoder(seed, image_size=32, projection_dim=TINY_IMAGE_EMBED_DIM).save_pretrained(folder, safe_serialization=True)


def write_tiny_ip_adapter(folder: Path, seed: int, personalized_folder: Path) -> None:
    """IP-Adapter weights for the tiny UNet in the published key layout.

    `image_proj.proj` / `image_proj.norm` map one CLIP image embedding to IP_ADAPTER_TOKENS context
    tokens; `ip_adapter.{k}.to_k_ip.weight` / `to_v_ip.weight` follow the original numbering, where
    k counts every attention processor of the UNet (so the cross-attention ones are 1, 3, 5, ...).
    """
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(Path(personalized_folder) / "unet")
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, shape in ip_adapter_shapes(unet, TINY_IMAGE_EMBED_DIM):  # the layout's order fixes the draws
        if name.endswith(".bias"):
            tensors[name] = torch.zeros(shape)
        elif name == "image_proj.norm.weight":
            tensors[name] = torch.ones(shape)
        else:
            tensors[name] = torch.randn(shape, generator=gen) * 0.05
    Path(folder).mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(Path(folder) / IP_ADAPTER_WEIGHTS))
