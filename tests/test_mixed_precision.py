"""The whole chain in half precision on the CPU: the dtype paths a real CUDA run takes.

A dtype mismatch (fp32 labels into an fp16 UNet, fp16 LoRA gradients, an fp16 VAE decode) only
shows in half precision; explicit `precision` is honoured on the CPU so these run without a GPU.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import trimesh
from safetensors.torch import load_file

from make_your_3d.device import resolve_dtype
from make_your_3d.pipeline.generate import Generator
from make_your_3d.pipeline.presets import TEST_OVERRIDES
from make_your_3d.pipeline.request import GenerateRequest


def test_precision_resolution():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_dtype(cpu, "auto") == torch.float32 and resolve_dtype(cuda, "auto") == torch.float16
    assert resolve_dtype(cpu, "bf16") == torch.bfloat16 and resolve_dtype(cpu, "fp16") == torch.float16
    from make_your_3d.errors import BadRequest

    with pytest.raises(BadRequest, match="precision"):
        resolve_dtype(cpu, "fp8")


@pytest.mark.parametrize("precision, dtype", [("bf16", "bfloat16"), ("fp16", "float16")])
def test_whole_chain_in_half_precision(tiny_models: Path, tmp_path, example_image, precision, dtype):
    generator = Generator(tiny_models, tmp_path / "cache", "cpu", overrides={**TEST_OVERRIDES, "precision": precision})
    result = generator.run(GenerateRequest(image=example_image.read_bytes(), prompt="wearing a red scarf", seed=1), tmp_path / "out")
    job = json.loads((tmp_path / "out" / "job.json").read_text())
    assert job["dtype"] == dtype
    mesh = trimesh.load(tmp_path / "out" / "subject.glb", force="mesh")
    assert len(mesh.faces) > 0 and torch.isfinite(torch.as_tensor(mesh.vertices)).all()
    # both optimisations ran in half precision with finite losses and kept fp32 master weights
    for stage, weights in (("identity", "ip_adapter.safetensors"), ("subject_prior", "lora.safetensors")):
        [entry] = [p for p in (tmp_path / "cache" / stage).iterdir() if not p.name.startswith(".")]
        losses = json.loads((entry / "losses.json").read_text())
        assert losses and all(math.isfinite(x) for x in losses), (stage, losses)
        state = load_file(str(entry / weights))
        assert state and all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in state.values()), stage
    assert result.cached_stages == []
