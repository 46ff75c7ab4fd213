#!/usr/bin/env python3
"""Regenerate `tests/golden/wonder3d/`: Wonder3D's multi-view UNet on a tiny config, run by its own code.

    python scripts/golden/wonder3d_unet_golden.py --reference /path/to/Wonder3D --out tests/golden/wonder3d

`--reference` is a checkout (or `git archive`) of xxlong0/Wonder3D at commit d894f82; the script checks
the git blob id of every reference file it reads against that commit, so another version is refused,
not silently used. Needs torch, diffusers 0.42, safetensors, numpy, PIL and einops (the reference
imports it); nothing is downloaded and no reference code ends up in the output.

Why a script: the golden data is the project's only proof that its re-implementation of the multi-view
UNet, its class labels and its guided batch layout equal Wonder3D's. Anyone must be able to rebuild it
from the reference and see the numbers move if the reference or the recipe changes.

What it does (see the README it writes for the data layout):
- copies the reference files it runs into a temporary folder, rewrites only their import lines
  for diffusers 0.42 (each rewrite must match exactly once) and imports them from there;
- builds the tiny `UNetMV2DConditionModel` from `config.json`, fills it from one seeded generator;
- runs the reference `MVDiffusionImagePipeline.__call__` for one step per case, with stand-ins for the
  CLIP image encoder, its feature extractor and the VAE encoder that return preset seeded values, and
  records the UNet's inputs and output (forward hook) and the guided noise (at `scheduler.step`);
- recomputes the outputs in float64 from the recorded float32 weights and inputs;
- writes the pipeline's default camera table, checked against the reference dataset's own pose maths.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.machinery
import json
import math
import platform
import shutil
import sys
import tempfile
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

REFERENCE_REPO = "xxlong0/Wonder3D"
REFERENCE_COMMIT = "d894f827aa8c2917761a0dad3ab40df74c7a5b24"
SEED_WEIGHTS = 0  # the generator that fills the state dict
SEED_INPUTS = 1  # the generator that draws the cases' latents and the stand-ins' encodings
SEED_IMAGES = 2  # the generator that draws the input images (they only tell the rows apart)
VIEWS = ("front", "front_right", "right", "back", "left", "front_left")
DOMAINS = ("normal", "color")
SCALING_FACTOR = 0.18215

# git blob ids of the reference files at REFERENCE_COMMIT (`git ls-tree -r d894f82`).
REFERENCE_BLOBS = {
    "mvdiffusion/models/transformer_mv2d.py": "f9f0be6bcb554af916fe74ee7d919d0a1a47aa36",
    "mvdiffusion/models/unet_mv2d_blocks.py": "4dfba32e67879ae52b14ef66173830dbf6cdd520",
    "mvdiffusion/models/unet_mv2d_condition.py": "f1da502f37d4d7afce6593e348abd77f49e9fd9d",
    "mvdiffusion/pipelines/pipeline_mvdiffusion_image.py": "eceaf7c94e30354ce1b14df0e16e05393ee53ef2",
    "mvdiffusion/data/single_image_dataset.py": "b1b28b54ce60fef6e4513c5f41e2b0c7dab662b4",
    "mvdiffusion/data/normal_utils.py": "dff3730a312e96a2ed82dfd5a337d263baa0f2d8",
    **{
        f"mvdiffusion/data/fixed_poses/nine_views/000_{view}_RT.txt": blob
        for view, blob in {
            "front": "8278639ec5ec9d0f1e4c88d54295a0cd4acee593",
            "front_right": "e1d76c85c1a05de1d6bf3dd70ed02721a40f73c2",
            "right": "2d37c0219db99aeeede6b48815b932058538adc6",
            "back": "7ef2610bdbde3f9c9db89c05fc5606362adc7d0c",
            "left": "bd42197eaae14526b00cb4676528a2465cbaf1dd",
            "front_left": "6255b9f84ccb1bf3527897ef648811ff171aa025",
        }.items()
    },
}

# Import-only rewrites for diffusers 0.42 (modules moved, helpers removed). Each (old, new) must occur
# exactly once in its file; nothing below an import line is touched.
_UTILS_OLD = """from diffusers.utils import (
    CONFIG_NAME,
    DIFFUSERS_CACHE,
    FLAX_WEIGHTS_NAME,
    HF_HUB_OFFLINE,
    SAFETENSORS_WEIGHTS_NAME,
    WEIGHTS_NAME,
    _add_variant,
    _get_model_file,
    deprecate,
    is_accelerate_available,
    is_safetensors_available,
    is_torch_version,
    logging,
)"""
IMPORT_PATCHES: dict[str, list[tuple[str, str]]] = {
    "mvdiffusion/models/transformer_mv2d.py": [
        ("from diffusers.utils import BaseOutput, deprecate, maybe_allow_in_graph",
         "from diffusers.utils import BaseOutput, deprecate\nfrom diffusers.utils.torch_utils import maybe_allow_in_graph"),
        ("from diffusers.models.attention import FeedForward, AdaLayerNorm, AdaLayerNormZero, Attention",
         "from diffusers.models.attention import FeedForward, Attention\nfrom diffusers.models.normalization import AdaLayerNorm, AdaLayerNormZero"),
        # without LoRA these are plain Conv2d/Linear with the same parameter names
        ("from diffusers.models.lora import LoRACompatibleConv, LoRACompatibleLinear",
         "from torch.nn import Conv2d as LoRACompatibleConv, Linear as LoRACompatibleLinear"),
        # xformers: the stand-in registered in sys.modules by `_register_xformers_standin`
        ("if is_xformers_available():\n    import xformers\n    import xformers.ops\n",
         "if True:  # golden script: stand-in xformers (plain softmax attention)\n    import xformers\n    import xformers.ops\n"),
    ],
    "mvdiffusion/models/unet_mv2d_blocks.py": [
        ("from diffusers.models.attention import AdaGroupNorm", "from diffusers.models.normalization import AdaGroupNorm"),
        ("from diffusers.models.dual_transformer_2d import DualTransformer2DModel",
         "from diffusers.models.transformers.dual_transformer_2d import DualTransformer2DModel"),
        ("from diffusers.models.resnet import Downsample2D, FirDownsample2D, FirUpsample2D, KDownsample2D, KUpsample2D, ResnetBlock2D, Upsample2D",
         "from diffusers.models.resnet import ResnetBlock2D\n"
         "from diffusers.models.downsampling import Downsample2D, FirDownsample2D, KDownsample2D\n"
         "from diffusers.models.upsampling import FirUpsample2D, KUpsample2D, Upsample2D"),
        ("from diffusers.models.unet_2d_blocks import DownBlock2D,", "from diffusers.models.unets.unet_2d_blocks import DownBlock2D,"),
        ("from diffusers.models.unet_2d_blocks import UpBlock2D,", "from diffusers.models.unets.unet_2d_blocks import UpBlock2D,"),
    ],
    "mvdiffusion/models/unet_mv2d_condition.py": [
        ("from diffusers.models.modeling_utils import ModelMixin, load_state_dict, _load_state_dict_into_model",
         "from diffusers.models.modeling_utils import ModelMixin, load_state_dict\n"
         "from diffusers.models.model_loading_utils import _load_state_dict_into_model"),
        ("from diffusers.models.unet_2d_blocks import (", "from diffusers.models.unets.unet_2d_blocks import ("),
        # the hub/cache helpers only `from_pretrained_2d` (training-time initialiser) uses are dropped
        (_UTILS_OLD, "from diffusers.utils import (\n    deprecate,\n    is_torch_version,\n    logging,\n)"),
    ],
    "mvdiffusion/pipelines/pipeline_mvdiffusion_image.py": [
        ("from diffusers.utils import deprecate, logging, randn_tensor",
         "from diffusers.utils import deprecate, logging\nfrom diffusers.utils.torch_utils import randn_tensor"),
    ],
}

# run as they are (the camera-table check imports the dataset module for its pose maths)
UNPATCHED = ("mvdiffusion/data/single_image_dataset.py", "mvdiffusion/data/normal_utils.py")


def git_blob_id(data: bytes) -> str:
    """The id git gives a file's content: ties each file read to the reference commit."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def check_reference(reference: Path) -> None:
    """Refuse any checkout whose files differ from the reference commit."""
    for rel, blob in REFERENCE_BLOBS.items():
        path = reference / rel
        if not path.is_file():
            raise SystemExit(f"{path} missing: --reference must be a checkout of {REFERENCE_REPO}")
        got = git_blob_id(path.read_bytes())
        if got != blob:
            raise SystemExit(f"{rel}: blob {got}, expected {blob} ({REFERENCE_REPO} at {REFERENCE_COMMIT[:7]})")


def memory_efficient_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_bias: Any = None) -> torch.Tensor:
    """What `xformers.ops.memory_efficient_attention` computes without a bias: softmax(q k^T / sqrt d) v."""
    if attn_bias is not None:
        raise NotImplementedError("the reference passes attn_bias=None on this path")
    scores = query @ key.transpose(-2, -1) / math.sqrt(query.shape[-1])
    return scores.softmax(dim=-1) @ value


def _xformers_standin() -> dict[str, types.ModuleType]:
    """xformers is CUDA-only; the reference processors call only `xformers.ops.memory_efficient_attention`."""
    root, ops = _module("xformers"), _module("xformers.ops")
    ops.memory_efficient_attention = memory_efficient_attention
    root.ops = ops
    return {"xformers": root, "xformers.ops": ops}


def _torchvision_standin() -> dict[str, types.ModuleType]:
    """The pipeline uses `torchvision.transforms.functional.to_tensor` only to hand the input images to
    the stubbed VAE (torchvision is not installed): a stand-in with torchvision's arithmetic."""
    tv, transforms, functional = _module("torchvision"), _module("torchvision.transforms"), _module("torchvision.transforms.functional")

    def to_pil_image(pic: torch.Tensor) -> Image.Image:
        raise NotImplementedError("the golden cases pass PIL images")

    functional.to_tensor, functional.to_pil_image = to_tensor, to_pil_image
    transforms.functional = functional
    tv.transforms = transforms
    return {"torchvision": tv, "torchvision.transforms": transforms, "torchvision.transforms.functional": functional}


def _module(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)
    return module


@dataclass
class Reference:
    """The imported reference modules and the checkout they came from."""

    root: Path
    unet_module: types.ModuleType
    transformer_module: types.ModuleType
    pipeline_module: types.ModuleType


def import_reference(reference: Path, workdir: Path) -> Reference:
    """Copy the reference files into `workdir`, rewrite their import lines for diffusers 0.42, import them."""
    check_reference(reference)
    for rel in UNPATCHED:
        (workdir / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(reference / rel, workdir / rel)
    for rel, patches in IMPORT_PATCHES.items():
        text = (reference / rel).read_text()
        for old, new in patches:
            count = text.count(old)
            if count != 1:
                raise SystemExit(f"{rel}: import patch matched {count} times: {old[:60]!r}")
            text = text.replace(old, new)
        target = workdir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    # Import what the reference imports first, so that diffusers' and transformers' package probes
    # never see the stand-ins; the stand-ins live in sys.modules only while the reference imports.
    importlib.import_module("diffusers.pipelines.stable_diffusion.safety_checker")
    transformers = importlib.import_module("transformers")
    transformers.CLIPImageProcessor, transformers.CLIPVisionModelWithProjection  # resolve the lazy imports now

    standins = {**_xformers_standin(), **_torchvision_standin()}
    clash = [name for name in standins if name in sys.modules]
    if clash:
        raise SystemExit(f"{clash} already imported; the stand-ins would not be the ones the reference sees")
    sys.modules.update(standins)
    sys.path.insert(0, str(workdir))
    try:
        return Reference(
            root=reference,
            unet_module=importlib.import_module("mvdiffusion.models.unet_mv2d_condition"),
            transformer_module=importlib.import_module("mvdiffusion.models.transformer_mv2d"),
            pipeline_module=importlib.import_module("mvdiffusion.pipelines.pipeline_mvdiffusion_image"),
        )
    finally:
        for name in standins:
            sys.modules.pop(name, None)


def tiny_config() -> dict[str, Any]:
    """The published `flamehaze1115/wonder3d-v1.0` unet/config.json with only the sizes shrunk
    (block_out_channels, cross_attention_dim, norm_num_groups, sample_size)."""
    return {
        "_class_name": "UNetMV2DConditionModel",
        "_diffusers_version": "0.19.3",
        "act_fn": "silu",
        "addition_embed_type": None,
        "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": None,
        "attention_head_dim": 8,
        "block_out_channels": [8, 16, 24, 24],
        "cd_attention_last": False,
        "cd_attention_mid": True,
        "center_input_sample": False,
        "class_embed_type": "projection",
        "class_embeddings_concat": False,
        "conv_in_kernel": 3,
        "conv_out_kernel": 3,
        "cross_attention_dim": 16,
        "cross_attention_norm": None,
        "cross_domain_attention": False,
        "down_block_types": ["CrossAttnDownBlockMV2D", "CrossAttnDownBlockMV2D", "CrossAttnDownBlockMV2D", "DownBlock2D"],
        "downsample_padding": 1,
        "dual_cross_attention": False,
        "encoder_hid_dim": None,
        "encoder_hid_dim_type": None,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 8,
        "joint_attention": False,
        "joint_attention_twice": True,
        "layers_per_block": 2,
        "mid_block_only_cross_attention": None,
        "mid_block_scale_factor": 1,
        "mid_block_type": "UNetMidBlockMV2DCrossAttn",
        "multiview_attention": True,
        "mvcd_attention": False,
        "norm_eps": 1e-05,
        "norm_num_groups": 8,
        "num_attention_heads": None,
        "num_class_embeds": None,
        "num_views": 6,
        "only_cross_attention": False,
        "out_channels": 4,
        "projection_class_embeddings_input_dim": 10,
        "resnet_out_scale_factor": 1.0,
        "resnet_skip_time_act": False,
        "resnet_time_scale_shift": "default",
        "sample_size": 8,
        "sparse_mv_attention": False,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlockMV2D", "CrossAttnUpBlockMV2D", "CrossAttnUpBlockMV2D"],
        "upcast_attention": False,
        "use_linear_projection": False,
    }


def build_unet(ref: Reference, config: dict[str, Any]) -> torch.nn.Module:
    """The reference UNet from the config, as its pipelines load it (`from_config` warns about and
    ignores the three published keys its constructor does not take)."""
    model = ref.unet_module.UNetMV2DConditionModel.from_config(config)
    return model.eval()


def randomise(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Random weights from one generator, in `named_parameters()` order: matrices and kernels
    randn/sqrt(fan_in) (fan_in = elements of one output slice), norm scales 1 + 0.2 randn,
    biases 0.1 randn. Nothing stays zero, so every weight is exercised (the reference
    zero-initialises `attn_joint_mid.to_out.0.weight`)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            if param.ndim >= 2:
                value = noise / math.sqrt(param[0].numel())
            elif name.endswith(".weight"):
                value = 1 + 0.2 * noise
            else:
                value = 0.1 * noise
            param.copy_(value)
            state[name] = param.detach().clone().contiguous()
    return state


def enable_reference_xformers(unet: torch.nn.Module, transformer_module: types.ModuleType) -> int:
    """Switch processors as `unet.enable_xformers_memory_efficient_attention()` does on the reference's
    own attention classes (`CustomAttention`, `CustomJointAttention`); diffusers' `attn2` keeps its
    default processor. Returns how many modules were switched."""
    kinds = (transformer_module.CustomAttention, transformer_module.CustomJointAttention)
    switched = 0
    for module in unet.modules():
        if isinstance(module, kinds):
            module.set_use_memory_efficient_attention_xformers(True)
            switched += 1
    return switched


# ---------------------------------------------------------------------------------------------
# Stand-ins for the CLIP image encoder, its feature extractor and the VAE encoder: functions of
# the input image that return preset values, so the recorded UNet inputs show which image feeds
# which row.


def _image_key(pixels: torch.Tensor) -> bytes:
    """One image's identity: its [0, 1] float pixels (as `to_tensor` gives them)."""
    return pixels.detach().to(torch.float32).contiguous().numpy().tobytes()


def to_tensor(image: Image.Image) -> torch.Tensor:
    """torchvision's `to_tensor` for 8-bit RGB images: CHW float32 in [0, 1]."""
    return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous().float().div(255)


class PresetEncodings:
    """What the stand-ins return per input image: a CLIP `image_embeds` row and a VAE latent mode."""

    def __init__(self) -> None:
        self.embeds: dict[bytes, torch.Tensor] = {}
        self.modes: dict[bytes, torch.Tensor] = {}

    def add(self, image: Image.Image, embed: torch.Tensor, mode: torch.Tensor) -> None:
        pixels = to_tensor(image)
        self.embeds[_image_key(pixels)] = embed
        self.modes[_image_key(pixels * 2.0 - 1.0)] = mode  # what the pipeline hands the VAE


class StandInFeatureExtractor:
    """`CLIPImageProcessor(images=..., return_tensors="pt")`: here just the images' pixels, so the
    stand-in encoder can tell them apart."""

    def __call__(self, images: list[Image.Image], return_tensors: str = "pt") -> types.SimpleNamespace:
        assert return_tensors == "pt"
        return types.SimpleNamespace(pixel_values=torch.stack([to_tensor(image) for image in images]))


class _StandInModule(torch.nn.Module):
    """A component the pipeline can ask for its device and dtype (one unused parameter)."""

    def __init__(self, presets: PresetEncodings) -> None:
        super().__init__()
        self.presets = presets
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    @property
    def dtype(self) -> torch.dtype:
        return self.anchor.dtype


class StandInImageEncoder(_StandInModule):
    """`CLIPVisionModelWithProjection`: returns the preset `image_embeds` of each image."""

    def forward(self, pixel_values: torch.Tensor) -> types.SimpleNamespace:
        rows = [self.presets.embeds[_image_key(row)] for row in pixel_values]
        return types.SimpleNamespace(image_embeds=torch.stack(rows))


class _LatentDist:
    def __init__(self, mode: torch.Tensor) -> None:
        self._mode = mode

    def mode(self) -> torch.Tensor:
        return self._mode


class StandInVAE(_StandInModule):
    """`AutoencoderKL` with 4 blocks (scale factor 8) and Stable Diffusion's scaling factor: `encode`
    returns each image's preset `latent_dist.mode()`."""

    def __init__(self, presets: PresetEncodings) -> None:
        super().__init__(presets)
        self.config = types.SimpleNamespace(block_out_channels=[1, 1, 1, 1], scaling_factor=SCALING_FACTOR)

    def encode(self, image: torch.Tensor) -> types.SimpleNamespace:
        rows = [self.presets.modes[_image_key(row)] for row in image]
        return types.SimpleNamespace(latent_dist=_LatentDist(torch.stack(rows)))


# ---------------------------------------------------------------------------------------------
# The cases: pipeline inputs drawn from seeded generators, one denoising step each.


@dataclass
class CaseInputs:
    """What the pipeline is given (latents, images) and what the stand-ins return for the images."""

    images: list[Image.Image]  # 1 (the pipeline repeats it 12 times) or 12
    latents: torch.Tensor  # (12, 4, 8, 8)
    embeds: torch.Tensor  # (n_images, 16): CLIP image_embeds
    modes: torch.Tensor  # (n_images, 4, 8, 8): VAE latent_dist.mode()


@dataclass(frozen=True)
class Case:
    name: str
    inputs: str  # "single" or "multi"
    timestep: int
    guidance_scale: float


CASES = (
    Case("a", "single", 801, 1.0),
    Case("b", "single", 801, 3.0),
    Case("c", "multi", 281, 1.0),
    Case("d", "multi", 541, 3.0),
)


def draw_inputs(seed: int, image_seed: int) -> dict[str, CaseInputs]:
    """Both input sets from one generator, in this order: single (latents, embed, mode), multi (latents,
    12 embeds, 12 modes); modes are drawn as N(0,1) latents / scaling factor, so the encoded
    latents are unit-scale. The images only identify rows (the stand-ins key on them); they come from
    a second generator: 8x8 random RGB, one for `single`, twelve for `multi`."""
    gen = torch.Generator().manual_seed(seed)
    image_gen = torch.Generator().manual_seed(image_seed)

    def images(count: int) -> list[Image.Image]:
        pixels = torch.randint(0, 256, (count, 8, 8, 3), generator=image_gen, dtype=torch.uint8)
        return [Image.fromarray(p.numpy(), mode="RGB") for p in pixels]

    def draw(count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        latents = torch.randn(12, 4, 8, 8, generator=gen)
        embeds = torch.randn(count, 16, generator=gen)
        modes = torch.randn(count, 4, 8, 8, generator=gen) / SCALING_FACTOR
        return latents, embeds, modes

    single, multi = draw(1), draw(12)
    out = {"single": CaseInputs(images(1), *single), "multi": CaseInputs(images(12), *multi)}
    for inputs in out.values():
        keys = {_image_key(to_tensor(image)) for image in inputs.images}
        assert len(keys) == len(inputs.images), "input images must differ"
    return out


def make_pinned_scheduler(timestep: int):
    """diffusers' real DDIMScheduler (Stable Diffusion's config, as Wonder3D ships it) whose one
    timestep is pinned: the pipeline's `set_timesteps(1)` ends with `timesteps == [timestep]`."""
    from diffusers import DDIMScheduler

    class PinnedDDIMScheduler(DDIMScheduler):
        def set_timesteps(self, num_inference_steps: int, device: Any = None) -> None:
            super().set_timesteps(num_inference_steps, device=device)
            self.timesteps = torch.tensor([timestep], dtype=torch.int64, device=device)

    return PinnedDDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    )


def run_case(ref: Reference, unet: torch.nn.Module, case: Case, inputs: CaseInputs) -> dict[str, torch.Tensor]:
    """One call of the reference `MVDiffusionImagePipeline.__call__`, recording the UNet's inputs and
    output (forward hook) and the noise the pipeline hands `scheduler.step`."""
    presets = PresetEncodings()
    for image, embed, mode in zip(inputs.images, inputs.embeds, inputs.modes):
        presets.add(image, embed, mode)
    scheduler = make_pinned_scheduler(case.timestep)
    pipe = ref.pipeline_module.MVDiffusionImagePipeline(
        vae=StandInVAE(presets), image_encoder=StandInImageEncoder(presets), unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=StandInFeatureExtractor(), requires_safety_checker=False,
        camera_embedding_type="e_de_da_sincos", num_views=6,
    )
    pipe.set_progress_bar_config(disable=True)
    assert scheduler.init_noise_sigma == 1.0

    seen: list[dict[str, torch.Tensor]] = []

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        seen.append({
            "sample": args[0].detach().clone(),
            "timestep": args[1].detach().clone(),
            "encoder_hidden_states": kwargs["encoder_hidden_states"].detach().clone(),
            "class_labels": kwargs["class_labels"].detach().clone(),
            "out": output.sample.detach().clone(),
        })

    guided: list[torch.Tensor] = []
    real_step = scheduler.step

    def step(model_output: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        guided.append(model_output.detach().clone())
        return real_step(model_output, *args, **kwargs)

    scheduler.step = step
    handle = unet.register_forward_hook(hook, with_kwargs=True)
    try:
        image = inputs.images[0] if len(inputs.images) == 1 else list(inputs.images)
        pipe(image, guidance_scale=case.guidance_scale, num_inference_steps=1, latents=inputs.latents.clone(), output_type="latent")
    finally:
        handle.remove()
    assert len(seen) == 1 and len(guided) == 1, "one denoising step: one UNet call"
    rec = seen[0]
    x = case.name
    out = {
        f"{x}.latents": inputs.latents.clone(),
        f"{x}.image_embeds": inputs.embeds.expand(12, -1).unsqueeze(1).contiguous() if len(inputs.images) == 1 else inputs.embeds.unsqueeze(1).contiguous(),
        f"{x}.image_latents": (inputs.modes * SCALING_FACTOR).expand(12, -1, -1, -1).contiguous() if len(inputs.images) == 1 else inputs.modes * SCALING_FACTOR,
        f"{x}.sample": rec["sample"],
        f"{x}.timestep": rec["timestep"],
        f"{x}.encoder_hidden_states": rec["encoder_hidden_states"],
        f"{x}.class_labels": rec["class_labels"],
        f"{x}.out": rec["out"],
    }
    if case.guidance_scale != 1.0:
        out[f"{x}.guidance_scale"] = torch.tensor(case.guidance_scale, dtype=torch.float32)
        out[f"{x}.out_guided"] = guided[0]
    else:
        assert torch.equal(guided[0], rec["out"]), "without guidance the pipeline steps with the UNet output"
    return out


def guided_noise(pipe_module: types.ModuleType, out: torch.Tensor, scale: float) -> torch.Tensor:
    """The reference's guidance combination (`reshape_to_cfg_output`, then uncond + s (cond - uncond)),
    on an output computed outside the pipeline (the float64 runs)."""
    reordered = pipe_module.MVDiffusionImagePipeline.reshape_to_cfg_output(None, out)
    uncond, cond = reordered.chunk(2)
    return uncond + scale * (cond - uncond)


def float64_outputs(ref: Reference, unet: torch.nn.Module, cases: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same reference UNet with weights and recorded inputs upcast to float64."""
    unet.double()
    out: dict[str, torch.Tensor] = {}
    try:
        for case in CASES:
            x = case.name
            with torch.no_grad():
                pred = unet(cases[f"{x}.sample"].double(), cases[f"{x}.timestep"], encoder_hidden_states=cases[f"{x}.encoder_hidden_states"].double(), class_labels=cases[f"{x}.class_labels"].double()).sample
            out[f"{x}.out_float64"] = pred
            if case.guidance_scale != 1.0:
                out[f"{x}.out_guided_float64"] = guided_noise(ref.pipeline_module, pred, case.guidance_scale)
    finally:
        unet.float()
    return out


def check_cases(ref: Reference, cases: dict[str, torch.Tensor], labels: torch.Tensor) -> float:
    """The README's row layout and guidance formula hold exactly on the recorded data. Returns how far
    the conditional rows of `b.out` are from `a.out` (equal in exact arithmetic; float32 CPU kernels
    may differ with the batch size)."""
    for case in CASES:
        x = case.name
        lat, z, e = cases[f"{x}.latents"], cases[f"{x}.image_latents"], cases[f"{x}.image_embeds"]
        if case.guidance_scale == 1.0:
            sample, hidden, lab = torch.cat([lat, z], dim=1), e, labels
        else:
            zero_z, zero_e = torch.zeros_like(z[:6]), torch.zeros_like(e[:6])
            sample = torch.cat([torch.cat([lat[:6], lat[:6], lat[6:], lat[6:]]), torch.cat([zero_z, z[:6], zero_z, z[6:]])], dim=1)
            hidden = torch.cat([zero_e, e[:6], zero_e, e[6:]])
            lab = torch.cat([labels[:6], labels[:6], labels[6:], labels[6:]])
            want = guided_noise(ref.pipeline_module, cases[f"{x}.out"], case.guidance_scale)
            assert torch.equal(want, cases[f"{x}.out_guided"]), f"{x}: guidance formula"
        assert torch.equal(sample, cases[f"{x}.sample"]), f"{x}: sample layout"
        assert torch.equal(hidden, cases[f"{x}.encoder_hidden_states"]), f"{x}: hidden-state layout"
        assert torch.equal(lab, cases[f"{x}.class_labels"]), f"{x}: class labels"
        assert cases[f"{x}.timestep"].dtype == torch.int64 and cases[f"{x}.timestep"].ndim == 0
    # the conditional rows of the guided batch are the unguided batch
    b, a = cases["b.out"], cases["a.out"]
    gap = (torch.cat([b[6:12], b[18:24]]) - a).abs().max().item()
    assert gap <= 1e-5, f"b's conditional rows are {gap} from a"
    return gap


# ---------------------------------------------------------------------------------------------
# The camera table.

COLUMN_MEANING = {
    "elevation_cond": "elevation of the input (condition) view, radians; 0 in Wonder3D",
    "elevation": "d_theta = theta(target camera centre) - theta(front camera centre), theta = polar angle from the world Z axis, radians (get_T)",
    "azimuth": "d_azimuth = (atan2(y,x)(target centre) - atan2(y,x)(front centre)) mod 2*pi, radians (get_T)",
    "task_normal": "1 for normal-map rows, 0 for colour rows",
    "task_color": "0 for normal-map rows, 1 for colour rows",
}


def nine_views_angles(ref: Reference) -> list[tuple[float, float]]:
    """(elevation, azimuth) of the six views relative to the front view, from the reference dataset's
    own `load_fixed_poses`, `cartesian_to_spherical` and `get_T` (float64) on `fixed_poses/nine_views`."""
    standins = {name: _module(name) for name in ("cv2", "omegaconf")}
    standins["omegaconf"].DictConfig = standins["omegaconf"].ListConfig = type("Unused", (), {})
    standins.update(_torchvision_standin())
    clash = [name for name in standins if name in sys.modules]
    if clash:
        raise SystemExit(f"{clash} already imported")
    sys.modules.update(standins)  # imported but unused by the three methods
    try:
        dataset = importlib.import_module("mvdiffusion.data.single_image_dataset").SingleImageDataset
    finally:
        for name in standins:
            sys.modules.pop(name, None)
    this = types.SimpleNamespace(view_types=list(VIEWS), fix_cam_pose_dir=str(ref.root / "mvdiffusion/data/fixed_poses/nine_views"))
    this.cartesian_to_spherical = types.MethodType(dataset.cartesian_to_spherical, this)
    poses = dataset.load_fixed_poses(this)
    angles = []
    for view in VIEWS:
        d_theta, d_azimuth = dataset.get_T(this, poses[view], poses["front"])
        angles.append((float(d_theta.item()), float(d_azimuth.item())))
    return angles


def camera_table(ref: Reference, table: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """The pipeline's default camera table, each row's label as the pipeline fed the UNet, and the
    table's angles recomputed from the reference poses."""
    assert table.dtype == torch.float16 and table.shape == (12, 5)
    rows = [
        {"row": i, "view": VIEWS[i % 6], "domain": DOMAINS[i // 6], "fields": [float(v) for v in table[i]], "class_label": [float(v) for v in labels[i]]}
        for i in range(12)
    ]
    checks = []
    for view, (elevation, azimuth) in zip(VIEWS, nine_views_angles(ref)):
        row = VIEWS.index(view)
        table_el, table_az = float(table[row, 1]), float(table[row, 2])
        f16 = [float(np.float16(elevation)), float(np.float16(azimuth))]
        ulps = [abs(f - t) / float(np.spacing(np.float16(t))) for f, t in zip(f16, (table_el, table_az))]
        checks.append({
            "view": view, "elevation": elevation, "azimuth": azimuth, "table_elevation": table_el, "table_azimuth": table_az,
            "abs_diff": [abs(elevation - table_el), abs(azimuth - table_az)], "float16_of_computed": f16, "float16_ulps_off": ulps,
        })
    return {
        "columns": list(COLUMN_MEANING),
        "column_meaning": COLUMN_MEANING,
        "view_names": list(VIEWS),
        "domain_order": list(DOMAINS),
        "row_order": "row = domain_index * 6 + view_index (rows 0-5 normals, 6-11 colours), the order of the pipeline's default table and of its UNet batch without guidance",
        "table_dtype": "float16 (the values below are the exact float16 values)",
        "table": [[float(v) for v in row] for row in table],
        "rows": rows,
        "class_label_formula": "class_label = concat(sin(f), cos(f)) where f = the row's 5 fields [elevation_cond, elevation, azimuth, task_normal, task_color], i.e. [sin f0, sin f1, sin f2, sin f3, sin f4, cos f0, cos f1, cos f2, cos f3, cos f4]; the float16 table is cast to the VAE dtype and then to the UNet dtype before sin/cos (here float32, so sin/cos are evaluated in float32 on the float16 values)",
        "class_label_dtype": "float32",
        "nine_views_check": {
            "method": "get_T(target_RT, front_RT) of single_image_dataset.py on the fixed_poses/nine_views world-to-camera matrices of the six views, float64",
            "elevation_azimuth_rad": checks,
            "max_abs_diff": max(max(c["abs_diff"]) for c in checks),
            "float16_of_computed_equals_table": all(c["float16_of_computed"] == [c["table_elevation"], c["table_azimuth"]] for c in checks),
            "max_float16_ulps_off": max(max(c["float16_ulps_off"]) for c in checks),
        },
    }


# ---------------------------------------------------------------------------------------------
# Writing.

FILES = ("config.json", "unet.safetensors", "cases.safetensors", "camera_table.json")
COMMAND = "python scripts/golden/wonder3d_unet_golden.py --reference /path/to/Wonder3D --out tests/golden/wonder3d"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def compare_with(earlier: Path, out: Path) -> list[str]:
    """Per file and per tensor: does the new set equal an earlier copy? (README lines.)"""
    from safetensors.torch import load_file

    lines = []
    for name in FILES:
        same = (earlier / name).is_file() and (earlier / name).read_bytes() == (out / name).read_bytes()
        lines.append(f"- `{name}`: {'byte-identical' if same else 'differs'}")
        if same or not (earlier / name).is_file():
            continue
        if name.endswith(".json"):
            old_leaves = dict(_json_leaves(json.loads((earlier / name).read_text())))
            new_leaves = dict(_json_leaves(json.loads((out / name).read_text())))
            changed = sorted(k for k in set(old_leaves) | set(new_leaves) if old_leaves.get(k) != new_leaves.get(k))
            numeric = [abs(old_leaves[k] - new_leaves[k]) for k in changed if isinstance(old_leaves.get(k), float) and isinstance(new_leaves.get(k), float)]
            lines.append(f"  - {len(changed)} of {len(new_leaves)} values differ" + (f", all floats, by at most {max(numeric):.2g}" if numeric and len(numeric) == len(changed) else ""))
            lines.extend(f"  - `{k}`" for k in changed)
            continue
        old, new = load_file(str(earlier / name)), load_file(str(out / name))
        if set(old) != set(new):
            lines.append(f"  - key sets differ: {sorted(set(old) ^ set(new))}")
        equal = sorted(k for k in new if k in old and torch.equal(old[k], new[k]))
        lines.append(f"  - {len(equal)} of {len(new)} tensors bit-identical")
        for key in sorted(k for k in new if k in old and k not in equal):
            diff = (old[key].double() - new[key].double()).abs().max().item()
            lines.append(f"  - `{key}`: max |difference| {diff:.3g} (max |value| {new[key].abs().max().item():.3g})")
    return lines


def _json_leaves(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        return [leaf for key, item in value.items() for leaf in _json_leaves(item, f"{prefix}.{key}" if prefix else key)]
    if isinstance(value, list):
        return [leaf for i, item in enumerate(value) for leaf in _json_leaves(item, f"{prefix}[{i}]")]
    return [(prefix, value)]


def versions() -> str:
    import diffusers
    import einops
    import safetensors

    return (f"Python {platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} thread(s)), "
            f"diffusers {diffusers.__version__}, safetensors {safetensors.__version__}, numpy {np.__version__}, einops {einops.__version__}, "
            f"{platform.machine()} {platform.system()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", type=Path, required=True, help=f"checkout of {REFERENCE_REPO} at {REFERENCE_COMMIT[:7]}")
    parser.add_argument("--out", type=Path, required=True, help="output folder (tests/golden/wonder3d)")
    parser.add_argument("--compare", type=Path, help="an earlier copy of this set to compare with (README section)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (float32 results depend on it at the 1e-6 level)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory(prefix="wonder3d_ref_") as work:
        ref = import_reference(args.reference.resolve(), Path(work))
        config = tiny_config()
        unet = build_unet(ref, config)
        state = randomise(unet, SEED_WEIGHTS)
        switched = enable_reference_xformers(unet, ref.transformer_module)
        assert switched == 32, f"{switched} attention modules switched, expected 32 (16 blocks x attn1 + attn_joint_mid)"
        inputs = draw_inputs(SEED_INPUTS, SEED_IMAGES)
        cases: dict[str, torch.Tensor] = {}
        for case in CASES:
            cases.update(run_case(ref, unet, case, inputs[case.inputs]))
        labels = cases["a.class_labels"]
        cond_gap = check_cases(ref, cases, labels)
        cases.update(float64_outputs(ref, unet, cases))
        table = camera_table(ref, _default_camera_table(ref, unet), labels)

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    save_file(state, str(out / "unet.safetensors"), metadata={"format": "pt"})
    save_file({k: v.contiguous().clone() for k, v in cases.items()}, str(out / "cases.safetensors"), metadata={"format": "pt"})
    (out / "camera_table.json").write_text(json.dumps(table, indent=1))
    comparison = compare_with(args.compare, out) if args.compare else None
    (out / "README.md").write_text(render_readme(out, state, cases, cond_gap, comparison))
    for name in FILES:
        print(f"{sha256(out / name)}  {name}")
    if comparison:
        print("\n".join(comparison))
    return 0


def _default_camera_table(ref: Reference, unet: torch.nn.Module) -> torch.Tensor:
    """The table the pipeline builds in its constructor (used when no `camera_embedding` is passed)."""
    pipe = ref.pipeline_module.MVDiffusionImagePipeline(
        vae=StandInVAE(PresetEncodings()), image_encoder=StandInImageEncoder(PresetEncodings()), unet=unet,
        scheduler=make_pinned_scheduler(1), safety_checker=None, feature_extractor=StandInFeatureExtractor(),
        requires_safety_checker=False, camera_embedding_type="e_de_da_sincos", num_views=6,
    )
    return pipe.camera_embedding.clone()


README = """# Wonder3D v1.0 multi-view UNet: golden reference data (tiny configuration)

Reference data from the original Wonder3D `UNetMV2DConditionModel` and `MVDiffusionImagePipeline`
(`{repo}` at commit `{commit}`): a tiny configuration, one random state dict, and the UNet's inputs
and outputs recorded inside the reference pipeline. `tests/test_reference_wonder3d_golden.py` checks
the project's re-implementation against it. No reference code is in this repository, only this data
and the script that made it.

## Reproduce

```
git clone https://github.com/{repo} /tmp/Wonder3D && git -C /tmp/Wonder3D checkout {commit_short}
pip install einops   # the reference imports it; anywhere on PYTHONPATH
OMP_NUM_THREADS=1 {command}
```

The script checks the git blob id of every reference file it reads against `{commit_short}` and refuses
anything else. It prints the sha256 of the four data files; they must equal the table below (the
float32 outputs may move at the 1e-6 level on another CPU or thread count, see Checks).

Made with: {versions}.

| file | bytes | sha256 |
|---|---|---|
{sha_rows}

## How the data is produced (`scripts/golden/wonder3d_unet_golden.py`)

- **Reference files run:** `mvdiffusion/models/{{unet_mv2d_condition,unet_mv2d_blocks,transformer_mv2d}}.py`
  and `mvdiffusion/pipelines/pipeline_mvdiffusion_image.py`, copied to a temporary folder with their
  **import lines only** rewritten for diffusers 0.42 (each rewrite must match exactly once):
  modules that moved (`unets.unet_2d_blocks`, `transformers.dual_transformer_2d`,
  `normalization.AdaLayerNorm/AdaLayerNormZero/AdaGroupNorm`, `downsampling`/`upsampling`,
  `torch_utils.maybe_allow_in_graph`/`randn_tensor`, `model_loading_utils._load_state_dict_into_model`);
  `LoRACompatibleConv`/`LoRACompatibleLinear` imported as `nn.Conv2d`/`nn.Linear` (without LoRA the
  same modules with the same parameter names); the hub and cache helpers that only
  `from_pretrained_2d` uses dropped.
- **Import-time stand-ins** (in `sys.modules` only while the reference imports):
  - `xformers.ops.memory_efficient_attention` = plain `softmax(q kᵀ / √d) · v`, what xformers
    computes without a bias (xformers is CUDA-only); the reference's `if is_xformers_available()`
    import guard is rewritten to import it;
  - `torchvision.transforms.functional.to_tensor`, used only to hand the input images to the VAE
    stand-in.
- **Attention processors:** switched as `enable_xformers_memory_efficient_attention()` switches them:
  `set_use_memory_efficient_attention_xformers(True)` on each of the 32 `CustomAttention`/
  `CustomJointAttention` modules (`XFormersMVAttnProcessor`, `XFormersJointAttnProcessor`);
  `attn2` (CLIP cross-attention) keeps diffusers' default processor. The reference's non-xformers
  `JointAttnProcessor` has no `return`, so with real weights it always runs these processors.
- **Pipeline run:** the reference `MVDiffusionImagePipeline.__call__`, unmodified, one denoising step per
  case, `output_type="latent"`, built with `safety_checker=None`, `camera_embedding_type="e_de_da_sincos"`,
  `num_views=6` (so it uses its built-in camera table).
  - Stand-ins return preset values per input image for the CLIP image encoder (`image_embeds`), its
    feature extractor and the VAE encoder (`latent_dist.mode()`, `scaling_factor` 0.18215).
  - The scheduler is diffusers' real `DDIMScheduler` (scaled-linear betas 0.00085-0.012, 1000 steps)
    with its one timestep pinned; `scale_model_input` is the identity and `init_noise_sigma` is 1.
  - A forward hook records the UNet's inputs and output; the guided noise is recorded where the
    pipeline passes it to `scheduler.step`.
- **Random values:** weights from `torch.Generator().manual_seed({seed_weights})`; the cases' latents and
  encodings from `manual_seed({seed_inputs})`, drawn in the order single-image set (latents (12,4,8,8),
  embedding (1,16), mode (1,4,8,8) / 0.18215), then 12-image set (latents, embeddings (12,16), modes
  (12,4,8,8) / 0.18215); the input images (8x8 random RGB, used only to tell rows apart) from
  `manual_seed({seed_images})`.
- **float64 outputs:** `*_float64` come from the same reference UNet with weights and recorded inputs
  upcast from the float32 data; the guided ones through the reference's `reshape_to_cfg_output` and
  guidance formula.

## `config.json`

The key set of the published `unet/config.json` of `flamehaze1115/wonder3d-v1.0` (including
`joint_attention_twice: true`, `joint_attention: false`, `cross_domain_attention: false`, which the
reference constructor does not take: `from_config` ignores them with a warning, as for the published
config). Only the sizes changed:

| key | published | here |
|---|---|---|
| `block_out_channels` | [320, 640, 1280, 1280] | [8, 16, 24, 24] |
| `cross_attention_dim` | 768 | 16 |
| `norm_num_groups` | 32 | 8 |
| `sample_size` | 32 | 8 |

Blocks `CrossAttnDownBlockMV2D` x3 + `DownBlock2D`, `UNetMidBlockMV2DCrossAttn`, `UpBlock2D` +
`CrossAttnUpBlockMV2D` x3; `layers_per_block` 2; `attention_head_dim` 8 (the number of heads, diffusers'
legacy naming: head widths 1, 2, 3); `class_embed_type` "projection" with 10 inputs; `num_views` 6;
`in_channels` 8, `out_channels` 4; `cd_attention_mid` true (cross-domain attention in all 16
transformer blocks), `cd_attention_last` false, `multiview_attention` true, `sparse_mv_attention` false,
`mvcd_attention` false. `sample_size` 8: 8x8 latents, then 4x4, 2x2, 1x1.

## `unet.safetensors`

{n_tensors} float32 tensors, {n_params:,} parameters, header metadata `{{"format": "pt"}}`, no buffers;
diffusers UNet state-dict names, the cross-domain modules named `attn_joint_mid`/`norm_joint_mid`
(112 keys; `*_joint_twice` occurs in the reference only as a rename inside the training-time
`from_pretrained_2d`). One generator over `named_parameters()` in order: tensors with 2 or more
dimensions `randn / sqrt(fan_in)` (fan_in = elements of one output slice), 1-D `*.weight` (norm scales)
`1 + 0.2 randn`, biases `0.1 randn`. No tensor is zero, including `attn_joint_mid.to_out.0.weight`,
which the reference zero-initialises.

## `cases.safetensors`

| case | description | timestep | guidance | UNet rows |
|---|---|---|---|---|
| `a` | one input image, no guidance | 801 | 1 | 12 |
| `b` | same inputs as `a`, classifier-free guidance | 801 | 3 | 24 |
| `c` | 12 different input images (one per row), no guidance | 281 | 1 | 12 |
| `d` | inputs of `c`, classifier-free guidance | 541 | 3 | 24 |

Per case `x` (float32 unless `*_float64`):

| name | shape | meaning |
|---|---|---|
| `x.latents` | (12, 4, 8, 8) | the noisy latents given to the pipeline (`latents=`): rows 0-5 normals, 6-11 colours, views front, front_right, right, back, left, front_left |
| `x.image_embeds` | (12, 1, 16) | CLIP `image_embeds.unsqueeze(1)` of the 12 input images (in `a`/`b` the one image is repeated, so all rows are equal) |
| `x.image_latents` | (12, 4, 8, 8) | `vae.encode(image).latent_dist.mode() * 0.18215` of the 12 input images |
| `x.sample` | (R, 8, 8, 8) | UNet input: noisy latent (channels 0-3) and image latent (channels 4-7) |
| `x.timestep` | () int64 | UNet timestep as DDIM passes it |
| `x.encoder_hidden_states` | (R, 1, 16) | UNet cross-attention input |
| `x.class_labels` | (R, 10) | UNet class labels, see `camera_table.json` |
| `x.out` | (R, 4, 8, 8) | reference UNet output, in UNet batch order |
| `x.out_float64` | (R, 4, 8, 8) | the same in float64 |
| `b.guidance_scale`, `d.guidance_scale` | () | 3.0 |
| `b.out_guided`, `d.out_guided` | (12, 4, 8, 8) | the noise after guidance (what `scheduler.step` receives), rows 0-5 normals, 6-11 colours |
| `b.out_guided_float64`, `d.out_guided_float64` | (12, 4, 8, 8) | the same in float64 |

**Row layout** (`L` = the 12 `class_label` rows of `camera_table.json`, `lat`, `z`, `e` = `x.latents`,
`x.image_latents`, `x.image_embeds`):

- without guidance (`a`, `c`): `sample = cat([lat, z], dim=1)`, `encoder_hidden_states = e`,
  `class_labels = L`; input image `i` conditions UNet row `i`;
- with guidance (`b`, `d`): rows `[normals uncond (6), normals cond (6), colours uncond (6), colours cond (6)]`:
  `sample[:, :4] = cat([lat[0:6], lat[0:6], lat[6:12], lat[6:12]])`,
  `sample[:, 4:] = cat([0, z[0:6], 0, z[6:12]])`, `encoder_hidden_states = cat([0, e[0:6], 0, e[6:12]])`,
  `class_labels = cat([L[0:6], L[0:6], L[6:12], L[6:12]])`; guidance: split `out` into 4 chunks
  `o0..o3`, reorder to `[o0, o2, o1, o3]`, halve into `u`, `c`, `out_guided = u + 3 (c - u)`.

The script asserts, exactly: every recorded UNet input follows this layout; `out_guided` is the formula
applied to `out`. The conditional rows of `b.out` (6-11, 18-23) equal `a.out` {cond_gap}.

## `camera_table.json`

`table`: the pipeline's default `camera_embedding` (12x5 float16, exact values; rows
`domain_index * 6 + view_index`; columns `elevation_cond`, `elevation`, `azimuth`, `task_normal`,
`task_color`). `rows`: each row's view, domain, fields and the 10-dimensional `class_label` the pipeline
fed the UNet in case `a` (`[sin f, cos f]`, taken in float32 on the float16 values).
`nine_views_check`: the angle columns recomputed with the reference dataset's own `load_fixed_poses`,
`cartesian_to_spherical` and `get_T` (float64, `fixed_poses/nine_views`, condition view `front`): their
float16 roundings equal the table {f16_equal}; largest difference before rounding {max_abs_diff:.2g} rad.

## Checks

Largest magnitudes: |out| <= {max_out:.3g}, |out_guided| <= {max_guided:.3g}. The recorded float32 outputs
are {ref32_f64} from the float64 ones. float32 CPU results depend on the kernels the machine picks (thread
count, instruction set, batch size) at that level, and a re-implementation drifts as much the other way,
so the float32 outputs are checked with tolerances (2e-5 for `out`, 3e-5 for `out_guided`) and the
float64 ones at 1e-12, which is what pins the arithmetic.
{comparison}"""


def render_readme(out: Path, state: dict[str, torch.Tensor], cases: dict[str, torch.Tensor], cond_gap: float, comparison: list[str] | None) -> str:
    """The data's README: what, how, the command, versions and the sha256 table."""
    table = json.loads((out / "camera_table.json").read_text())
    rows = "\n".join(f"| `{name}` | {(out / name).stat().st_size:,} | `{sha256(out / name)}` |" for name in FILES)
    if comparison:
        text = ("\n## Compared with the earlier copy (`--compare`)\n\nThe set this folder replaced (made earlier with the same recipe "
                "on another machine, kept outside the repository) against this one. Every input tensor and the weights are "
                "bit-identical; the outputs differ at the level of float32 (and float64) rounding, i.e. in the order "
                "the CPU kernels summed; the camera table differs only in the last digits of numpy's float64 pose maths:\n\n"
                + "\n".join(comparison) + "\n")
    else:
        text = ""
    return README.format(
        repo=REFERENCE_REPO, commit=REFERENCE_COMMIT, commit_short=REFERENCE_COMMIT[:7], command=COMMAND, versions=versions(),
        sha_rows=rows, seed_weights=SEED_WEIGHTS, seed_inputs=SEED_INPUTS, seed_images=SEED_IMAGES,
        n_tensors=len(state), n_params=sum(t.numel() for t in state.values()),
        f16_equal="exactly" if table["nine_views_check"]["float16_of_computed_equals_table"] else "NOT exactly",
        max_abs_diff=table["nine_views_check"]["max_abs_diff"],
        max_out=max(cases[f"{c.name}.out"].abs().max().item() for c in CASES),
        max_guided=max(cases[f"{c.name}.out_guided"].abs().max().item() for c in CASES if c.guidance_scale != 1.0),
        ref32_f64=", ".join(f"{c.name} {(cases[f'{c.name}.out'].double() - cases[f'{c.name}.out_float64']).abs().max().item():.2g}" for c in CASES),
        comparison=text, cond_gap="exactly" if cond_gap == 0 else f"to {cond_gap:.2g} (float32 kernels differ with the batch size here)",
    )


if __name__ == "__main__":
    sys.exit(main())
