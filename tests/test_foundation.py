"""Foundation: the CLI starts, the tiny set is complete and deterministic, doctor explains state,
and the tiny SD 1.5 + IP-Adapter set runs through diffusers' own loaders offline."""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from make_your_3d.models.registry import ROLES, is_tiny
from make_your_3d.models.tiny import tiny_writers, write_tiny_set

CLI = [sys.executable, "-m", "make_your_3d"]


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=full_env, timeout=300)


def test_cli_starts_and_lists_subcommands():
    res = run_cli("--help")
    assert res.returncode == 0, res.stderr
    for sub in ("models", "reconstruct", "multiview", "generate", "serve", "demo", "doctor"):
        assert sub in res.stdout
    assert run_cli("--version").stdout.strip().startswith("make-your-3d ")


def test_unknown_subcommand_is_a_usage_error():
    res = run_cli("frobnicate")
    assert res.returncode == 2
    assert "invalid choice" in res.stderr


def test_tiny_set_has_every_file_each_loader_expects(tiny_models: Path):
    assert is_tiny(tiny_models)
    written = set(tiny_writers(tiny_models))
    for name in written:
        assert ROLES[name].missing(tiny_models) == [], name


def test_tiny_set_is_byte_identical_for_a_seed_and_differs_for_another(tmp_path: Path, tiny_models: Path):
    again = write_tiny_set(tmp_path / "again", seed=0)
    cmp = filecmp.dircmp(tiny_models, again)

    def assert_same(c: filecmp.dircmp) -> None:
        assert not c.left_only and not c.right_only, (c.left_only, c.right_only)
        _, mismatch, errors = filecmp.cmpfiles(c.left, c.right, c.common_files, shallow=False)
        assert not mismatch and not errors, (c.left, mismatch, errors)
        for sub in c.subdirs.values():
            assert_same(sub)

    assert_same(cmp)
    other = write_tiny_set(tmp_path / "other", seed=1)
    unet = "personalized/unet/diffusion_pytorch_model.safetensors"
    assert (other / unet).read_bytes() != (tiny_models / unet).read_bytes()


def test_models_tiny_cli(tmp_path: Path):
    res = run_cli("models", "tiny", "--out", str(tmp_path / "m"), "--seed", "3")
    assert res.returncode == 0, res.stderr
    assert "tiny model set" in res.stdout.lower()
    assert is_tiny(tmp_path / "m")


def test_doctor_reports_complete_and_incomplete_sets(tmp_path: Path, tiny_models: Path):
    import shutil

    res = run_cli("doctor", "--models", str(tiny_models))
    assert "TINY model set" in res.stdout
    for name in tiny_writers(tiny_models):
        assert f"[ok]      {name}" in res.stdout
    assert res.returncode == (0 if all(r.complete(tiny_models) for r in ROLES.values()) else 1)

    broken = tmp_path / "broken"
    shutil.copytree(tiny_models, broken)
    (broken / "personalized" / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    res = run_cli("doctor", "--models", str(broken))
    assert res.returncode == 1
    assert "[broken]  personalized" in res.stdout
    assert "missing unet/diffusion_pytorch_model.safetensors" in res.stdout
    assert "run `make-your-3d models fetch`" in res.stdout

    res = run_cli("doctor", "--models", str(tmp_path / "nowhere"))
    assert "does not exist yet" in res.stdout and "not downloaded" in res.stdout


def test_models_dir_from_environment(tmp_path: Path):
    from make_your_3d.paths import MODELS_ENV, resolve_models_dir

    os.environ[MODELS_ENV] = str(tmp_path / "env-models")
    try:
        assert resolve_models_dir(None) == tmp_path / "env-models"
        assert resolve_models_dir(str(tmp_path / "flag")) == tmp_path / "flag"
    finally:
        del os.environ[MODELS_ENV]


def test_tiny_sd_ip_adapter_loads_through_diffusers_and_generates(tiny_models: Path):
    from diffusers import StableDiffusionPipeline
    from PIL import Image
    from transformers import CLIPVisionModelWithProjection

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    # diffusers' own from_pretrained + load_ip_adapter, exactly as a user would with the real weights
    pipe = StableDiffusionPipeline.from_pretrained(tiny_models / "personalized", safety_checker=None, use_safetensors=True)
    pipe.image_encoder = CLIPVisionModelWithProjection.from_pretrained(tiny_models / "image_encoder")
    pipe.load_ip_adapter(str(tiny_models / "ip_adapter"), subfolder="", weight_name="ip-adapter_sd15.safetensors", image_encoder_folder=None)
    pipe.set_progress_bar_config(disable=True)
    subject = Image.new("RGB", (40, 40), (180, 40, 40))

    def generate(scale: float) -> np.ndarray:
        pipe.set_ip_adapter_scale(scale)
        out = pipe("a toy, front view", ip_adapter_image=subject, num_inference_steps=2, height=16, width=16,
                   generator=torch.Generator().manual_seed(0), output_type="np")
        return out.images[0]

    with_ip, without_ip = generate(1.0), generate(0.0)
    assert with_ip.shape == (16, 16, 3) and np.isfinite(with_ip).all()
    assert np.abs(with_ip - without_ip).max() > 1e-4, "the IP-Adapter image must change the result"


def test_ip_adapter_parameters_are_exactly_the_image_projections(tiny_models: Path):
    from make_your_3d.models.personalized import ip_adapter_parameters, load_personalized

    pipe = load_personalized(tiny_models, torch.device("cpu"))
    params = ip_adapter_parameters(pipe.unet)
    n_cross = sum(1 for name in pipe.unet.attn_processors if name.endswith("attn2.processor"))
    assert len(params) == 2 * n_cross
    assert all(".to_k_ip." in n or ".to_v_ip." in n for n in params)
    assert not any(p.requires_grad for p in pipe.unet.parameters()), "the loaded model is frozen"


def test_missing_weights_error_names_the_files(tmp_path: Path):
    from make_your_3d.errors import WeightsMissing
    from make_your_3d.models.personalized import load_personalized

    with pytest.raises(WeightsMissing) as err:
        load_personalized(tmp_path, torch.device("cpu"))
    assert "personalized" in err.value.message and "models fetch" in err.value.message
