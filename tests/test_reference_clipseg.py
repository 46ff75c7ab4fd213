"""Background removal against the reference usage of transformers' CLIPSeg (tiny weights).

Reference usage (transformers' `CLIPSegForImageSegmentation` docstring and model card):
`processor = AutoProcessor.from_pretrained(folder)`, `inputs = processor(text=texts, images=images,
padding=True, return_tensors="pt")`, `logits = model(**inputs).logits`, probabilities
`torch.sigmoid(logits)` at the model's resolution, resized to the image for use. Our `segment`
must equal that at the model's resolution; at other sizes it upsamples the logits before the
sigmoid (a deliberate difference, see `models.segmenter`), which must equal that recipe applied to
the reference's logits.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from make_your_3d.models.segmenter import TINY_IMAGE_SIZE, load_segmenter, segment, write_tiny_segmenter

PROMPT = "a toy robot"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("clipseg") / "segmenter"
    write_tiny_segmenter(path, seed=4)
    return path


@pytest.fixture(scope="module")
def ours(folder):
    return load_segmenter(folder, "cpu")


@pytest.fixture(scope="module")
def reference(folder):
    from transformers import AutoProcessor, CLIPSegForImageSegmentation

    processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    model = CLIPSegForImageSegmentation.from_pretrained(folder, local_files_only=True).eval()
    return processor, model


def _image(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    base[h // 4 : 3 * h // 4, w // 3 : 2 * w // 3] = (200, 40, 40)  # a block, so the map has structure
    return Image.fromarray(base)


@torch.no_grad()
def _reference_logits(reference, image: Image.Image, text: str = PROMPT) -> torch.Tensor:
    processor, model = reference
    inputs = processor(text=[text], images=[image], padding=True, return_tensors="pt")
    return model(**inputs).logits.reshape(1, 1, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)


def test_native_resolution_equals_the_reference_probabilities(ours, reference):
    image = _image(TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    expected = torch.sigmoid(_reference_logits(reference, image))[0, 0].numpy()
    got = segment(ours, image, PROMPT)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    # Wrong variants: another prompt, raw logits, BGR channel order.
    assert np.abs(segment(ours, image, "a red scarf") - expected).max() > 1e-3
    assert np.abs(_reference_logits(reference, image)[0, 0].numpy() - expected).max() > 1e-2
    bgr = Image.fromarray(np.asarray(image)[..., ::-1].copy())
    assert np.abs(segment(ours, bgr, PROMPT) - expected).max() > 1e-3


def test_other_sizes_resize_the_reference_logits_to_the_image(ours, reference):
    image = _image(50, 30, seed=1)  # non-square: the processor squashes it to the model's square
    logits = _reference_logits(reference, image)
    ours_recipe = torch.sigmoid(F.interpolate(logits, size=(30, 50), mode="bilinear", align_corners=False))[0, 0].numpy()
    prob_recipe = F.interpolate(torch.sigmoid(logits), size=(30, 50), mode="bilinear", align_corners=False)[0, 0].numpy()
    got = segment(ours, image, PROMPT)
    assert got.shape == (30, 50)
    np.testing.assert_allclose(got, ours_recipe, rtol=0, atol=1e-6)
    # The deliberate difference: between cells, upsampled logits are not upsampled probabilities
    # (on these random weights neighbouring cells differ wildly, so the gap is large; they agree
    # wherever the cells do, as at the native resolution above).
    assert np.abs(got - prob_recipe).max() > 1e-3
    # Wrong variant: width and height swapped in the resize, then transposed back to the image's shape.
    swapped = torch.sigmoid(F.interpolate(logits, size=(50, 30), mode="bilinear", align_corners=False))[0, 0].numpy()
    swapped = np.asarray(Image.fromarray(swapped).resize((50, 30), Image.BILINEAR))
    assert np.abs(got - swapped).max() > 1e-3
