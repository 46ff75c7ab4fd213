"""Loading the multi-view model role (Wonder3D v1.0's published folder layout) from local files.

Every component comes from safetensors/JSON in the role folder; nothing is downloaded and no
pickle is read (`models fetch` converts Wonder3D's published `.bin` files once, at fetch time).
"""

from __future__ import annotations

from pathlib import Path

import torch

from make_your_3d.errors import WeightsMissing
from make_your_3d.models.multiview_pipeline import MultiViewPipeline
from make_your_3d.models.multiview_unet import UNetMV2DConditionModel
from make_your_3d.models.registry import ROLES


def _role_folder(folder: Path) -> Path:
    """Accept the role folder itself or a models directory that contains it."""
    folder = Path(folder)
    nested = ROLES["multiview"].path(folder)
    if not (folder / "unet").exists() and (nested / "unet").exists():
        return nested
    return folder


def missing_multiview_files(folder: Path) -> list[str]:
    folder = _role_folder(folder)
    return [rel for rel in ROLES["multiview"].required if not (folder / rel).is_file()]


def load_multiview(
    folder: Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    cpu_offload: bool = False,
) -> MultiViewPipeline:
    """The multi-view pipeline from a role folder (or a models directory), frozen, in eval mode.

    Raises WeightsMissing naming every missing file, CheckpointMismatch for a UNet checkpoint whose
    keys do not match its config. `cpu_offload` keeps the networks on the CPU between uses.
    """
    from diffusers import AutoencoderKL, DDIMScheduler
    # The PIL image processor is transformers 4's CLIPImageProcessor, the one Wonder3D ran; with
    # torchvision installed, transformers 5's CLIPImageProcessor resizes in torch and differs.
    from transformers import CLIPImageProcessorPil, CLIPVisionModelWithProjection

    folder = _role_folder(folder)
    missing = missing_multiview_files(folder)
    if missing:
        raise WeightsMissing(
            f"The multi-view model (Wonder3D v1.0) is incomplete in {folder}: missing {', '.join(missing)}. "
            "Run `make-your-3d models fetch --role multiview` (or `make-your-3d models tiny --out DIR` for a test set)."
        )
    unet = UNetMV2DConditionModel.from_pretrained(folder / "unet", torch_dtype=dtype)
    try:
        vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=dtype, use_safetensors=True)
        image_encoder = CLIPVisionModelWithProjection.from_pretrained(folder / "image_encoder", dtype=dtype, use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise WeightsMissing(f"Could not load the multi-view model's VAE or image encoder from {folder} ({exc}). Re-run `make-your-3d models fetch --role multiview`.") from None
    feature_extractor = CLIPImageProcessorPil.from_pretrained(folder / "feature_extractor")
    scheduler = DDIMScheduler.from_pretrained(folder / "scheduler")
    for module in (unet, vae, image_encoder):
        module.requires_grad_(False)
        module.eval()
    pipe = MultiViewPipeline(unet, vae, image_encoder, feature_extractor, scheduler)
    if cpu_offload and torch.device(device).type != "cpu":
        return pipe.enable_model_cpu_offload(device)
    return pipe.to(device)
