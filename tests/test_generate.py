"""The co-evolution stages and the end-to-end generator on the tiny model set (CPU, toy sizes)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from make_your_3d.errors import BadImage, BadPrompt, Cancelled, WeightsMissing
from make_your_3d.pipeline.generate import STAGES, Generator
from make_your_3d.pipeline.presets import TEST_OVERRIDES
from make_your_3d.pipeline.request import GenerateRequest
from make_your_3d.progress import CancelToken

SUBJECT_STAGES = ["subject", "subject_views", "identity"]
SEED_FREE_STAGES = ["subject", "subject_views", "identity", "edited_views", "subject_prior"]


@pytest.fixture(scope="module")
def generator(tiny_models: Path, tmp_path_factory) -> Generator:
    return Generator(tiny_models, tmp_path_factory.mktemp("cache"), "cpu", overrides=TEST_OVERRIDES)


@pytest.fixture(scope="module")
def image_bytes(example_image: Path) -> bytes:
    return example_image.read_bytes()


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> set[str]:
    after = module.state_dict()
    assert set(after) == set(before)
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_identity_optimisation_lowers_loss_and_changes_only_the_adapter_projections(tiny_models: Path, example_image: Path):
    from make_your_3d.models.personalized import ip_adapter_parameters, load_personalized
    from make_your_3d.pipeline.identity import IdentityTrainer

    pipe = load_personalized(tiny_models, torch.device("cpu"))
    subject = Image.open(example_image).convert("RGBA").resize((64, 64))
    views = [(name, subject.rotate(angle)) for name, angle in (("front", 0), ("right", 10), ("back", -10))]
    modules = {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder, "image_encoder": pipe.image_encoder}
    before = {name: snapshot(m) for name, m in modules.items()}
    trainer = IdentityTrainer(pipe, views, "a toy bear", size=32, lr=5e-3, batch_size=2, seed=0)
    batch = trainer.make_batch()
    noise, t = trainer.noise_for(batch)
    with torch.no_grad():
        start = float(trainer.loss(batch, noise, t))
    for _ in range(8):
        trainer.step(batch, noise, t)
    with torch.no_grad():
        end = float(trainer.loss(batch, noise, t))
    assert end < start * 0.98, (start, end)
    expected = set(ip_adapter_parameters(pipe.unet))
    assert changed(before["unet"], pipe.unet) == expected
    for name in ("vae", "text_encoder", "image_encoder"):
        assert changed(before[name], modules[name]) == set(), name


def test_subject_prior_lowers_loss_and_changes_only_cross_domain_lora(tiny_models: Path, example_image: Path):
    from make_your_3d.models.multiview import load_multiview
    from make_your_3d.models.registry import ROLES
    from make_your_3d.pipeline.subject_prior import SubjectPriorTrainer, lora_parameters

    mv = load_multiview(ROLES["multiview"].path(tiny_models), torch.device("cpu"), torch.float32)
    size = TEST_OVERRIDES["mv_size"]
    subject = Image.open(example_image).convert("RGB").resize((size, size))
    colors = [subject.rotate(a) for a in range(0, 60, 10)]
    normals = [Image.new("RGB", (size, size), (128, 128, 255)) for _ in range(6)]
    trainer = SubjectPriorTrainer(mv, colors, normals, subject, rank=2, lr=1e-2, seed=0)
    base = {k: v for k, v in snapshot(mv.unet).items()}
    others = {"vae": snapshot(mv.vae), "image_encoder": snapshot(mv.image_encoder)}
    noise, t = trainer.noise_for()
    with torch.no_grad():
        start = float(trainer.loss(noise, t))
    for _ in range(8):
        trainer.step(noise, t)
    with torch.no_grad():
        end = float(trainer.loss(noise, t))
    assert end < start * 0.98, (start, end)
    lora = set(lora_parameters(mv.unet))
    assert lora and all("attn_joint_mid" in n for n in lora), sorted(lora)[:3]
    assert changed(base, mv.unet) == {n for n in lora if "lora_B" in n or "lora_A" in n}
    for name, snap in others.items():
        assert changed(snap, getattr(mv, name)) == set(), name


def request(image: bytes, **kw) -> GenerateRequest:
    defaults = dict(prompt="wearing a red scarf", subject="a toy bear", seed=0, preset="fast")
    return GenerateRequest(image=image, **{**defaults, **kw})


def test_end_to_end_writes_glb_with_texture_and_complete_job_json(generator: Generator, image_bytes: bytes, tmp_path: Path):
    events = []
    result = generator.run(request(image_bytes), tmp_path / "job", progress=events.append)
    out = tmp_path / "job"
    for name in ("subject.glb", "preview.png", "job.json", "views/cameras.json", "input.png", "front_view.png"):
        assert (out / name).is_file(), name
        assert name in result.files
    scene = trimesh.load(out / "subject.glb")
    [mesh] = list(scene.geometry.values())
    assert len(mesh.faces) > 0 and mesh.visual.uv is not None and len(mesh.visual.uv) == len(mesh.vertices)
    texture = mesh.visual.material.baseColorTexture
    assert texture is not None and min(texture.size) >= 64
    # issue 26: base colour, normal and occlusion maps by default (the normal map with its tangents)
    glb = (out / "subject.glb").read_bytes()
    material = json.loads(glb[20:20 + int.from_bytes(glb[12:16], "little")])["materials"][0]
    assert {"normalTexture", "occlusionTexture"} <= set(material) and "baseColorTexture" in material["pbrMetallicRoughness"]
    job = json.loads((out / "job.json").read_text())
    assert job["inputs"]["prompt"] == "wearing a red scarf" and job["inputs"]["seed"] == 0
    assert [s["name"] for s in job["stages"]] == list(STAGES)
    assert set(job["timings"]) >= set(STAGES) | {"total"}
    assert job["mesh"]["faces"] == len(mesh.faces)
    assert job["preset"]["name"] == "fast" and job["tiny_models"] is True
    assert {"personalized", "multiview", "normal_estimator"} <= set(job["models"])
    assert set(job["files"]) == set(result.files)
    assert {e.stage for e in events} >= set(STAGES)
    views = json.loads((out / "views" / "cameras.json").read_text())["views"]
    assert [v["name"] for v in views] == ["front", "front_right", "right", "back", "left", "front_left"]


def test_reruns_reuse_exactly_the_stages_they_should(generator: Generator, image_bytes: bytes, tmp_path: Path):
    first = generator.run(request(image_bytes, prompt="made of gold"), tmp_path / "a")
    assert "edited_views" not in first.cached_stages
    new_prompt = generator.run(request(image_bytes, prompt="made of glass"), tmp_path / "b")
    assert set(SUBJECT_STAGES) <= set(new_prompt.cached_stages)
    assert "edited_views" not in new_prompt.cached_stages and "subject_prior" not in new_prompt.cached_stages
    new_seed = generator.run(request(image_bytes, prompt="made of glass", seed=7), tmp_path / "c")
    assert new_seed.cached_stages == SEED_FREE_STAGES
    same = generator.run(request(image_bytes, prompt="made of glass", seed=7), tmp_path / "d")
    assert same.cached_stages == list(STAGES)
    job = json.loads((tmp_path / "d" / "job.json").read_text())
    assert job["cached_stages"] == list(STAGES) and all(s["cached"] for s in job["stages"])
    # a new subject description changes every stage: the background remover is prompted with it
    # (pipeline/stages.py), so even the subject's views depend on it
    new_subject = generator.run(request(image_bytes, prompt="made of glass", subject="a teddy"), tmp_path / "e")
    assert new_subject.cached_stages == []


def test_cancel_mid_run_is_clean_and_the_cache_stays_consistent(generator: Generator, image_bytes: bytes, tmp_path: Path):
    token = CancelToken()
    seen = []

    def progress(p):
        seen.append(p.stage)
        if p.stage == "subject_prior" and p.step >= 1:
            token.cancel()

    req = request(image_bytes, prompt="wearing a tiny hat", seed=3)
    with pytest.raises(Cancelled):
        generator.run(req, tmp_path / "job", progress=progress, cancel=token)
    assert not (tmp_path / "job").exists(), "a cancelled run leaves no result folder"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no half-written temporary folders"
    cache_root = generator.cache.root
    for stage_dir in cache_root.iterdir():
        for entry in stage_dir.iterdir():
            assert (entry / ".complete").is_file(), f"incomplete cache entry {entry}"
    assert "front_view" not in seen, "cancel is honoured within one step"
    again = generator.run(req, tmp_path / "job")
    assert "edited_views" in again.cached_stages and "subject_prior" not in again.cached_stages
    assert (tmp_path / "job" / "subject.glb").is_file()


@pytest.mark.parametrize(
    "kw, error, words",
    [
        ({"prompt": ""}, BadPrompt, "empty"),
        ({"prompt": "   "}, BadPrompt, "empty"),
        ({"prompt": "x" * 5000}, BadPrompt, "characters"),
        ({"image": b"not an image"}, BadImage, "not a readable image"),
        ({"image": b""}, BadImage, "empty"),
    ],
)
def test_bad_input_is_a_clear_error_before_any_model_loads(tiny_models: Path, image_bytes: bytes, tmp_path: Path, kw, error, words):
    fresh = Generator(tiny_models, tmp_path / "cache", "cpu", overrides=TEST_OVERRIDES)
    with pytest.raises(error) as err:
        fresh.run(request(kw.pop("image", image_bytes), **kw), tmp_path / "job")
    assert words in err.value.message
    assert fresh.host._loaded == {}, "no model may load before the input is checked"
    assert not (tmp_path / "job").exists() and not (tmp_path / "cache").exists()


def test_image_without_subject_and_missing_weights(generator: Generator, tmp_path: Path):
    from make_your_3d.errors import NoSubject

    buf = io.BytesIO()
    Image.new("RGBA", (64, 64), (0, 0, 0, 0)).save(buf, "PNG")
    with pytest.raises(NoSubject):
        generator.run(request(buf.getvalue()), tmp_path / "job")
    empty = Generator(tmp_path / "no-models", tmp_path / "cache", "cpu")
    ok = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(ok, "PNG")
    with pytest.raises(WeightsMissing) as err:
        empty.run(request(ok.getvalue()), tmp_path / "job")
    assert "models fetch" in err.value.message


def test_generate_cli_variants_share_stages(tiny_models: Path, example_image: Path, tmp_path: Path):
    res = subprocess.run(
        [sys.executable, "-m", "make_your_3d", "generate", str(example_image), "--prompt", "wearing a red scarf",
         "--models", str(tiny_models), "--out", str(tmp_path), "--variants", "2", "--seed", "5", "--preset", "fast", "--device", "cpu"],
        capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    folders = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))
    assert folders == ["wearing-a-red-scarf-seed5", "wearing-a-red-scarf-seed6"]
    second = json.loads((tmp_path / folders[1] / "job.json").read_text())
    assert second["cached_stages"] == SEED_FREE_STAGES
    assert "TINY model set" in res.stdout
    bad = subprocess.run([sys.executable, "-m", "make_your_3d", "generate", str(example_image), "--prompt", "",
                          "--models", str(tiny_models), "--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "error [bad_prompt]" in bad.stderr and "Traceback" not in bad.stderr


def test_demo_without_weights_writes_a_tiny_set_says_so_and_makes_a_glb(tmp_path: Path):
    """The README's main job on a machine without weights (as CI is)."""
    import os

    env = {**os.environ, "MAKE_YOUR_3D_MODELS": str(tmp_path / "no-weights-here")}
    res = subprocess.run([sys.executable, "-m", "make_your_3d", "demo", "--out", str(tmp_path / "demo"), "--device", "cpu"],
                         capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "TINY model set" in res.stdout and "models fetch" in res.stdout
    [job] = [p for p in (tmp_path / "demo").iterdir() if p.name.startswith("wearing-a-red-scarf")]
    assert trimesh.load(job / "subject.glb").geometry
    assert json.loads((job / "job.json").read_text())["tiny_models"] is True
