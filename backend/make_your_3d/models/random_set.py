"""A complete model set with random weights at the published sizes (or tiny ones), in the published layouts.

Speed does not depend on weight values, so a GPU benchmark of the whole chain needs the published
*architectures*, not the published weights (which a bare benchmark machine cannot download). Each
network's configuration is a JSON file under `published_configs/` transcribed from the file its
publisher ships (sources in `published_configs/SOURCES.md`); this module builds every network on
the `meta` device from it, draws each tensor directly on the target device (a 900M-parameter UNet
built on the CPU with its default initialisation takes minutes; here it takes a second on a GPU)
and writes safetensors, the config files, tokenizer, scheduler and `model_index.json` exactly where
a fetched set keeps them, so the real loaders in `models/` run unchanged.

`sizes="tiny"` shrinks the widths and depths (same layouts, same code path) so the whole writer and
the chain that loads it run in seconds on a CPU; that is what the tests exercise.

The tokenizer is the tiny BPE tokenizer (`models/tokenizer.py`): its ids fit the published 49,408-
token embedding, and speed does not depend on the vocabulary. Text encoders keep their published size.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from safetensors.torch import save_file

from make_your_3d.models.personalized import IP_ADAPTER_WEIGHTS, ip_adapter_shapes
from make_your_3d.models.registry import PUBLISHED_PARAMETERS, ROLES, TINY_MARKER  # noqa: F401 - PUBLISHED_PARAMETERS re-exported
from make_your_3d.models.tokenizer import write_tiny_clip_tokenizer

PUBLISHED_CONFIGS = Path(__file__).with_name("published_configs")
RANDOM_MARKER = "RANDOM_MODEL_SET"
SIZES = ("published", "tiny")
ROLE_ORDER = ("personalized", "image_encoder", "ip_adapter", "multiview", "normal_estimator", "segmenter")


@dataclass(frozen=True)
class Network:
    """One network of a role: where its config and weights live inside the role folder."""

    role: str
    folder: str  # inside the role folder; "" is the role folder itself
    kind: str  # unet2d | vae | mv_unet | clip_text | clip_vision | clipseg
    weights: str

    @property
    def name(self) -> str:
        return f"{self.role}/{self.folder}" if self.folder else self.role

    @property
    def config_path(self) -> Path:
        return PUBLISHED_CONFIGS / self.role / self.folder / "config.json"


_DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
_HF_WEIGHTS = "model.safetensors"

NETWORKS: tuple[Network, ...] = (
    Network("personalized", "unet", "unet2d", _DIFFUSERS_WEIGHTS),
    Network("personalized", "vae", "vae", _DIFFUSERS_WEIGHTS),
    Network("personalized", "text_encoder", "clip_text", _HF_WEIGHTS),
    Network("image_encoder", "", "clip_vision", _HF_WEIGHTS),
    Network("multiview", "unet", "mv_unet", _DIFFUSERS_WEIGHTS),
    Network("multiview", "vae", "vae", _DIFFUSERS_WEIGHTS),
    Network("multiview", "image_encoder", "clip_vision", _HF_WEIGHTS),
    Network("normal_estimator", "unet", "unet2d", _DIFFUSERS_WEIGHTS),
    Network("normal_estimator", "vae", "vae", _DIFFUSERS_WEIGHTS),
    Network("normal_estimator", "text_encoder", "clip_text", _HF_WEIGHTS),
    Network("segmenter", "", "clipseg", _HF_WEIGHTS),
)

# PUBLISHED_PARAMETERS (imported above, kept in models/registry.py for the download sizes): the parameter
# counts of the published configurations, as their meta builds give them (tests check the builds
# against these; where the publisher states a count it agrees, see SOURCES.md).

# Tiny sizes: same block layouts, toy widths and depths. The cross-attention widths agree with the
# encoders that feed them (32), as the published ones do (768 / 1024).
_TINY_CLIP = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
_TINY_VAE = {"block_out_channels": [8, 16, 16, 16], "layers_per_block": 1, "norm_num_groups": 8}
_TINY_UNET = {"block_out_channels": [16, 16, 32, 32], "layers_per_block": 1, "norm_num_groups": 8, "cross_attention_dim": 32}
TINY_OVERRIDES: dict[str, dict] = {
    "personalized/unet": {**_TINY_UNET, "attention_head_dim": 2},  # sample_size kept: diffusers warns below 64 for SD
    "personalized/vae": dict(_TINY_VAE, sample_size=64),
    "personalized/text_encoder": {**_TINY_CLIP, "projection_dim": 32},
    "image_encoder": {**_TINY_CLIP, "image_size": 32, "patch_size": 8, "projection_dim": 32},
    "multiview/unet": {**_TINY_UNET, "attention_head_dim": 4, "sample_size": 8},
    "multiview/vae": dict(_TINY_VAE, sample_size=64),
    "multiview/image_encoder": {**_TINY_CLIP, "image_size": 32, "patch_size": 8, "projection_dim": 32},
    "normal_estimator/unet": {**_TINY_UNET, "attention_head_dim": [2, 2, 4, 4], "sample_size": 8},
    "normal_estimator/vae": dict(_TINY_VAE, sample_size=64),
    "normal_estimator/text_encoder": {**_TINY_CLIP, "projection_dim": 32},
    "segmenter": {
        "text_config": dict(_TINY_CLIP),
        "vision_config": {**_TINY_CLIP, "num_hidden_layers": 3, "image_size": 32, "patch_size": 8},
        "projection_dim": 16,
        "extract_layers": [1, 2],
        "reduce_dim": 16,
        "decoder_num_attention_heads": 2,
        "decoder_intermediate_size": 32,
    },
}
# Image-processor sizes at tiny scale (the published files say 224 for CLIP, 352 for CLIPSeg).
_TINY_IMAGE_SIZE = 32


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else copy.deepcopy(value)
    return out


def _check_sizes(sizes: str) -> None:
    if sizes not in SIZES:
        raise ValueError(f"sizes must be one of {', '.join(SIZES)}, not {sizes!r}")


def network_config(net: Network, sizes: str = "published") -> dict:
    """The network's config dict: the published file, with the tiny widths applied for sizes='tiny'."""
    _check_sizes(sizes)
    config = json.loads(net.config_path.read_text())
    return _merge(config, TINY_OVERRIDES[net.name]) if sizes == "tiny" else config


def build_on_meta(net: Network, config: dict) -> torch.nn.Module:
    """The network with its real module tree and parameter shapes, holding no memory (meta device)."""
    with torch.device("meta"):
        if net.kind in ("unet2d", "vae"):
            from diffusers import AutoencoderKL, UNet2DConditionModel

            cls = UNet2DConditionModel if net.kind == "unet2d" else AutoencoderKL
            return cls.from_config(config)
        if net.kind == "mv_unet":
            from make_your_3d.models.multiview_unet import UNetMV2DConditionModel

            return UNetMV2DConditionModel.from_config(config)
        if net.kind == "clip_text":
            from transformers import CLIPTextConfig, CLIPTextModel

            return CLIPTextModel(CLIPTextConfig.from_dict(config))
        if net.kind == "clip_vision":
            from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

            return CLIPVisionModelWithProjection(CLIPVisionConfig.from_dict(config))
        if net.kind == "clipseg":
            from transformers import CLIPSegConfig, CLIPSegForImageSegmentation

            return CLIPSegForImageSegmentation(CLIPSegConfig.from_dict(config))
    raise ValueError(f"unknown network kind {net.kind!r}")


def _init_std(name: str, shape: tuple[int, ...]) -> float | None:
    """None: a constant (biases 0, norm weights 1); else the std of a fan-in-scaled normal draw,
    which keeps activations near unit scale through deep stacks (no fp16 overflow on random weights)."""
    if len(shape) == 0 or name.endswith("bias"):
        return None
    if len(shape) == 1:
        return None if name.endswith("weight") else 0.02  # 1-D weights are norm scales; others (CLIP class_embedding) small
    return 1.0 / math.sqrt(max(1, math.prod(shape[1:])))


def random_tensors(shapes: Iterable[tuple[str, tuple[int, ...]]], device: torch.device, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    """Draw every named tensor on `device` (fast on a GPU), return them on the CPU for saving."""
    gen = torch.Generator(device=device).manual_seed(seed)
    out = {}
    for name, shape in shapes:
        std = _init_std(name, shape)
        if std is None:
            value = 1.0 if len(shape) == 1 and name.endswith("weight") else 0.0
            tensor = torch.full(shape, value, device=device, dtype=dtype)
        else:
            tensor = (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * std).to(dtype)
        out[name] = tensor.to("cpu").contiguous()
    return out


def _state_shapes(module: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of everything the module saves; refuses persistent buffers (random values
    would be wrong for them, e.g. position ids), which none of these networks has."""
    state = module.state_dict()
    params = {name for name, _ in module.named_parameters(remove_duplicate=False)}
    buffers = sorted(set(state) - params)
    if buffers:
        raise ValueError(f"{type(module).__name__} saves buffers this writer cannot draw at random: {buffers[:3]}")
    return [(name, tuple(t.shape)) for name, t in state.items()]


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def parameter_counts(sizes: str = "published") -> dict[str, int]:
    """Every network's parameter count from its meta build (no memory, well under a second each)."""
    modules = {net.name: build_on_meta(net, network_config(net, sizes)) for net in NETWORKS}
    counts = {name: parameter_count(module) for name, module in modules.items()}
    embed_dim = int(network_config(_net("image_encoder"), sizes)["projection_dim"])
    counts["ip_adapter"] = sum(math.prod(shape) for _, shape in ip_adapter_shapes(modules["personalized/unet"], embed_dim))
    return counts


def _net(name: str) -> Network:
    return next(n for n in NETWORKS if n.name == name)


def _copy_published(role: str, rel: str, dest: Path, sizes: str, image_size: int | None = None) -> None:
    """Copy a published non-weight file (scheduler, model_index, preprocessor), at tiny image size if asked."""
    data = json.loads((PUBLISHED_CONFIGS / role / rel).read_text())
    if sizes == "tiny" and image_size is not None:
        for key in ("size", "crop_size"):
            if key in data:  # an int, {"height", "width"} or {"shortest_edge"}: every entry becomes the tiny size
                data[key] = {k: image_size for k in data[key]} if isinstance(data[key], dict) else image_size
    if sizes == "tiny" and rel == "model_index.json" and "default_processing_resolution" in data:
        data["default_processing_resolution"] = 64
    path = dest / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def _write_network(net: Network, role_dir: Path, sizes: str, device: torch.device, dtype: torch.dtype, seed: int) -> None:
    config = network_config(net, sizes)
    module = build_on_meta(net, config)
    folder = role_dir / net.folder
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(random_tensors(_state_shapes(module), device, dtype, seed), str(folder / net.weights), metadata={"format": "pt"})


def _write_role(role: str, role_dir: Path, sizes: str, device: torch.device, dtype: torch.dtype, seed: int) -> None:
    image = _TINY_IMAGE_SIZE if sizes == "tiny" else None
    nets = [n for n in NETWORKS if n.role == role]
    for i, net in enumerate(nets):
        _write_network(net, role_dir, sizes, device, dtype, seed + 10 * i)
    if role in ("personalized", "normal_estimator"):
        write_tiny_clip_tokenizer(role_dir / "tokenizer")
        for rel in ("model_index.json", "scheduler/scheduler_config.json"):
            _copy_published(role, rel, role_dir, sizes)
    if role == "personalized":
        _copy_published(role, "feature_extractor/preprocessor_config.json", role_dir, sizes, image)
    if role == "multiview":
        for rel in ("model_index.json", "scheduler/scheduler_config.json"):
            _copy_published(role, rel, role_dir, sizes)
        _copy_published(role, "feature_extractor/preprocessor_config.json", role_dir, sizes, image)
    if role == "segmenter":
        write_tiny_clip_tokenizer(role_dir)
        _copy_published(role, "preprocessor_config.json", role_dir, sizes, image)
    if role == "ip_adapter":
        unet_net, encoder_net = _net("personalized/unet"), _net("image_encoder")
        unet = build_on_meta(unet_net, network_config(unet_net, sizes))
        shapes = ip_adapter_shapes(unet, int(network_config(encoder_net, sizes)["projection_dim"]))
        role_dir.mkdir(parents=True, exist_ok=True)
        save_file(random_tensors(shapes, device, dtype, seed), str(role_dir / IP_ADAPTER_WEIGHTS))


def write_random_set(
    out: str | Path,
    sizes: str = "published",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float16,
    seed: int = 0,
    segmenter: bool = True,
    checksums: bool = True,
) -> Path:
    """Write (or overwrite) a complete model set with random weights under `out`; returns `out`.

    Every role lands in its registry folder with each of its `required` files. `segmenter=False`
    leaves the optional background remover out (images with alpha never need it). Each role gets a
    checksums.json like a fetched one (`checksums=False` skips hashing, which takes ~10 s per 8 GB).
    """
    from make_your_3d.models.fetch import record_checksums

    _check_sizes(sizes)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    roles = [r for r in ROLE_ORDER if segmenter or r != "segmenter"]
    for offset, role in enumerate(roles):
        target = ROLES[role].path(out)
        tmp = Path(tempfile.mkdtemp(prefix=f".{role}.", dir=out))
        try:
            _write_role(role, tmp, sizes, device, dtype, seed * 1000 + 100 * offset)
            missing = [rel for rel in ROLES[role].required if not (tmp / rel).is_file()]
            if missing:
                raise RuntimeError(f"random set writer left {role} incomplete: {missing}")
            if checksums:
                record_checksums(tmp, role, repo_id=f"random:{sizes}")
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    marker = {"sizes": sizes, "seed": seed, "dtype": str(dtype).removeprefix("torch."), "roles": roles}
    (out / RANDOM_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    if sizes == "tiny":
        (out / TINY_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    elif (out / TINY_MARKER).exists():
        (out / TINY_MARKER).unlink()
    return out
