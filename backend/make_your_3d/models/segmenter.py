"""Background removal for subject images without transparency: CLIPSeg, prompted with the subject.

CLIPSeg (transformers' native `CLIPSegForImageSegmentation`, published as CIDAS/clipseg-rd64-refined,
Apache-2.0) segments whatever a text prompt names, so the subject description the user already
types ("a toy robot") doubles as the segmentation prompt. It runs at 352 px and gives a soft,
fairly coarse mask; `pipeline.preprocess` thresholds it and keeps the main component. Images with
an alpha channel never reach it. Loaded only from the models directory's `segmenter` folder.

Reference usage (transformers' `CLIPSegForImageSegmentation` docstring, the model card): the
processor with `padding=True`, `model(**inputs).logits`, `torch.sigmoid` at the model's 352 px.
`tests/test_reference_clipseg.py` checks `segment` against it on tiny weights. Deliberate
difference: to reach the image's size we upsample the *logits* bilinearly and then apply the
sigmoid, rather than resizing the probabilities, so the 0.5 boundary (logit 0) moves smoothly
between the coarse cells; at the model's resolution the two are identical.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from make_your_3d.errors import WeightsMissing
from make_your_3d.models.registry import ROLES
from make_your_3d.models.tokenizer import write_tiny_clip_tokenizer

ROLE = "segmenter"
DEFAULT_SUBJECT = "the main object"


@dataclass
class Segmenter:
    """A loaded CLIPSeg model with its processor (image resize/normalise + CLIP tokenizer)."""

    model: torch.nn.Module
    processor: object
    device: torch.device


def load_segmenter(folder: Path, device: torch.device | str = "cpu") -> Segmenter:
    """CLIPSeg from a local folder (fp32: it is small); WeightsMissing names missing or damaged files."""
    from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

    from make_your_3d.models.fetch import check_weight_files

    folder = Path(folder)
    role = ROLES[ROLE]
    missing = [rel for rel in role.required if not (folder / rel).is_file()]
    if missing:
        raise WeightsMissing(
            f"The background-removal model ({role.title}) is incomplete in {folder}: missing {', '.join(missing)}. "
            f"Run `make-your-3d models fetch --role {ROLE}`, or use an image with a transparent background."
        )
    check_weight_files(folder, ["model.safetensors"], ROLE)
    try:
        processor = CLIPSegProcessor.from_pretrained(folder, local_files_only=True)
        model = CLIPSegForImageSegmentation.from_pretrained(folder, local_files_only=True, use_safetensors=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise WeightsMissing(
            f"The background-removal model in {folder} could not be loaded ({exc}). Run `make-your-3d models fetch --role {ROLE}` again."
        ) from exc
    model.requires_grad_(False)
    model.eval()
    device = torch.device(device)
    return Segmenter(model=model.to(device), processor=processor, device=device)


@torch.no_grad()
def segment(model: Segmenter, image: Image.Image, text: str | None = None) -> np.ndarray:
    """Probability (H, W) float32 in [0, 1], at the image's size, that a pixel shows `text`."""
    rgb = image.convert("RGB")
    prompt = (text or "").strip() or DEFAULT_SUBJECT
    inputs = model.processor(text=[prompt], images=[rgb], padding=True, return_tensors="pt")
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    logits = model.model(**inputs).logits
    logits = logits.reshape(1, 1, *logits.shape[-2:]).float()
    # Upsample logits (not probabilities) so the 0.5 boundary moves smoothly between cells.
    logits = torch.nn.functional.interpolate(logits, size=(rgb.height, rgb.width), mode="bilinear", align_corners=False)
    return torch.sigmoid(logits)[0, 0].cpu().numpy().astype(np.float32)


# --- tiny model set ----------------------------------------------------------------------------

TINY_IMAGE_SIZE = 32


def write_tiny_segmenter(folder: Path, seed: int) -> None:
    """A tiny CLIPSeg folder in the published layout: config.json, model.safetensors, the CLIP
    tokenizer files and a ViT-style preprocessor_config.json (toy sizes, random weights)."""
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab_size = write_tiny_clip_tokenizer(folder)
    config = CLIPSegConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 77,
            "bos_token_id": vocab_size - 2,
            "eos_token_id": vocab_size - 1,
            "pad_token_id": vocab_size - 1,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "image_size": TINY_IMAGE_SIZE,
            "patch_size": 8,
        },
        projection_dim=16,
        extract_layers=[1, 2],
        reduce_dim=16,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=32,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPSegForImageSegmentation(config)
    model.save_pretrained(folder, safe_serialization=True)
    # As published for CLIPSeg (ImageNet statistics, square resize), at the tiny model's size.
    preprocessor = {
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.485, 0.456, 0.406],
        "feature_extractor_type": "ViTImageProcessor",  # the key CIDAS publishes
        "image_std": [0.229, 0.224, 0.225],
        "processor_class": "CLIPSegProcessor",
        "resample": 2,
        "rescale_factor": 1 / 255,
        "size": {"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2, sort_keys=True) + "\n")
