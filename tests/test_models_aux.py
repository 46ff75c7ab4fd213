"""Normal estimator, background removal, preprocessing and the weights commands (issue 4).

All on CPU with tiny models written here; nothing touches the network (fetch runs from a local
folder laid out like a hub repository, through the same planning/conversion/checksum code).
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from make_your_3d.cli import main as cli_main
from make_your_3d.errors import Cancelled, Make3DError, NoSubject, WeightsMissing
from make_your_3d.models import fetch
from make_your_3d.models.normals import (
    camera_normals_to_opencv,
    camera_normals_to_world,
    estimate_normals,
    load_normal_estimator,
    world_normals_to_opencv,
    write_tiny_normal_estimator,
)
from make_your_3d.models.registry import ROLES
from make_your_3d.models.segmenter import load_segmenter, segment, write_tiny_segmenter
from make_your_3d.pipeline.preprocess import composite, foreground_mask, prepare_subject, subject_from_bytes
from make_your_3d.progress import CancelToken, Reporter
from make_your_3d.recon.camera import orbit_c2w


def _tree_hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def aux_models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("aux_models")
    write_tiny_normal_estimator(ROLES["normal_estimator"].path(root), seed=3)
    write_tiny_segmenter(ROLES["segmenter"].path(root), seed=4)
    return root


@pytest.fixture(scope="module")
def marigold(aux_models):
    return load_normal_estimator(ROLES["normal_estimator"].path(aux_models), "cpu", torch.float32)


@pytest.fixture(scope="module")
def clipseg(aux_models):
    return load_segmenter(ROLES["segmenter"].path(aux_models), "cpu")


def _noise_image(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


# --- normal estimator --------------------------------------------------------------------------


def test_tiny_normal_estimator_is_complete_and_deterministic(aux_models, tmp_path):
    folder = ROLES["normal_estimator"].path(aux_models)
    assert ROLES["normal_estimator"].missing(aux_models) == []
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "MarigoldNormalsPipeline"
    unet_cfg = json.loads((folder / "unet/config.json").read_text())
    assert (unet_cfg["in_channels"], unet_cfg["out_channels"]) == (8, 4)
    write_tiny_normal_estimator(tmp_path / "again", seed=3)
    assert _tree_hashes(tmp_path / "again") == _tree_hashes(folder)
    write_tiny_normal_estimator(tmp_path / "other", seed=5)
    other = _tree_hashes(tmp_path / "other")
    assert other["unet/diffusion_pytorch_model.safetensors"] != _tree_hashes(folder)["unet/diffusion_pytorch_model.safetensors"]


def test_estimate_normals_unit_vectors_in_marigold_frame(marigold):
    images = [_noise_image(48, 40, 0), _noise_image(48, 40, 1)]
    events = []
    normals = estimate_normals(marigold, images, steps=2, generator=torch.Generator().manual_seed(0), reporter=Reporter("normals", events.append))
    assert normals.shape == (2, 40, 48, 3) and normals.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(normals, axis=-1), 1.0, atol=1e-4)
    assert normals.std() > 0.01  # not a constant
    # One report per denoising step, ending at the stated total.
    assert [e.step for e in events] == list(range(1, len(events) + 1)) and events[-1].step == events[-1].total == 2
    # Same seed, same result; the output is the pipeline's own frame (no silent flip applied).
    raw = marigold(images, num_inference_steps=2, generator=torch.Generator().manual_seed(0), batch_size=2).prediction
    np.testing.assert_allclose(normals, raw / np.linalg.norm(raw, axis=-1, keepdims=True), atol=1e-5)


def test_estimate_normals_cancels_between_steps(marigold):
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        estimate_normals(marigold, [_noise_image(32, 32, 2)], steps=2, reporter=Reporter("normals", None, token))


def test_frame_conversion_on_known_normals():
    facing, up, right = np.array([0.0, 0.0, 1.0]), np.array([0.0, 1.0, 0.0]), np.array([1.0, 0.0, 0.0])
    np.testing.assert_allclose(camera_normals_to_opencv(facing), [0, 0, -1])
    np.testing.assert_allclose(camera_normals_to_opencv(up), [0, -1, 0])
    np.testing.assert_allclose(camera_normals_to_opencv(right), [1, 0, 0])
    front, side = orbit_c2w(0.0), orbit_c2w(90.0)  # camera on +Z, camera on +X
    # A surface facing the front camera faces +Z in the world; image-up is world +Y.
    np.testing.assert_allclose(camera_normals_to_world(facing, front), [0, 0, 1], atol=1e-6)
    np.testing.assert_allclose(camera_normals_to_world(up, front), [0, 1, 0], atol=1e-6)
    # Seen from the +X camera, a facing surface points +X and image-right is world -Z.
    np.testing.assert_allclose(camera_normals_to_world(facing, side), [1, 0, 0], atol=1e-6)
    np.testing.assert_allclose(camera_normals_to_world(right, side), [0, 0, -1], atol=1e-6)
    rng = np.random.default_rng(0)
    batch = rng.normal(size=(2, 3, 4, 3))
    batch /= np.linalg.norm(batch, axis=-1, keepdims=True)
    world = camera_normals_to_world(batch, side)
    assert world.shape == (2, 3, 4, 3)
    # Back into the same camera (OpenCV axes) and then Marigold's axes gives the input again.
    np.testing.assert_allclose(camera_normals_to_opencv(world_normals_to_opencv(world, side)), batch, atol=1e-5)


def test_normal_estimator_missing_or_damaged_files_are_named(aux_models, tmp_path):
    import shutil

    folder = tmp_path / "ne"
    shutil.copytree(ROLES["normal_estimator"].path(aux_models), folder)
    weights = folder / "unet/diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(WeightsMissing, match="unet/diffusion_pytorch_model.safetensors"):
        load_normal_estimator(folder)
    weights.unlink()
    with pytest.raises(WeightsMissing, match="missing unet/diffusion_pytorch_model.safetensors"):
        load_normal_estimator(folder)


# --- segmenter ---------------------------------------------------------------------------------


def test_tiny_clipseg_mask_at_image_size(aux_models, clipseg, tmp_path):
    image = _noise_image(56, 40, 3)
    mask = segment(clipseg, image, "a toy robot")
    assert mask.shape == (40, 56) and mask.dtype == np.float32
    assert 0.0 <= mask.min() and mask.max() <= 1.0 and mask.std() > 0
    np.testing.assert_array_equal(mask, segment(clipseg, image, "a toy robot"))
    assert not np.allclose(mask, segment(clipseg, image, "the red scarf"))  # the prompt conditions the mask
    write_tiny_segmenter(tmp_path / "seg", seed=4)
    assert _tree_hashes(tmp_path / "seg") == _tree_hashes(ROLES["segmenter"].path(aux_models))


# --- preprocessing -----------------------------------------------------------------------------


def _rgba_subject(w=64, h=48, box=(6, 10, 16, 30), alpha=255) -> Image.Image:
    arr = np.zeros((h, w, 4), dtype=np.uint8)
    x0, y0, x1, y1 = box
    arr[y0:y1, x0:x1] = (200, 30, 40, alpha)
    arr[(y0 + y1) // 2 : y1, x0:x1, :3] = (40, 30, 200)  # two colours: a flat image is "no subject"
    return Image.fromarray(arr, "RGBA")


def _alpha_bbox(img: Image.Image, thr: int = 128):
    a = np.asarray(img)[..., 3] >= thr
    ys, xs = np.flatnonzero(a.any(1)), np.flatnonzero(a.any(0))
    return xs[0], ys[0], xs[-1] + 1, ys[-1] + 1


def test_prepare_subject_centres_and_scales(tmp_path):
    image = _rgba_subject()  # a 10 x 20 subject in the image's top-left area
    out = prepare_subject(image, 64, fill=0.75)
    assert out.mode == "RGBA" and out.size == (64, 64)
    x0, y0, x1, y1 = _alpha_bbox(out)
    assert abs((y1 - y0) - 48) <= 1  # longer side == fill * size
    assert abs((x1 - x0) - 24) <= 1  # aspect kept
    assert abs((x0 + x1) / 2 - 32) <= 1 and abs((y0 + y1) / 2 - 32) <= 1
    arr = np.asarray(out)
    np.testing.assert_array_equal(arr[20, 32], [200, 30, 40, 255])  # straight colour, not darkened
    np.testing.assert_array_equal(arr[44, 32], [40, 30, 200, 255])
    np.testing.assert_array_equal(arr[2, 2], [255, 255, 255, 0])  # background colour under alpha 0
    # Wonder3D framing: ~192 px subject in 256.
    x0, y0, x1, y1 = _alpha_bbox(prepare_subject(image, 256))
    assert abs(max(x1 - x0, y1 - y0) - 192) <= 1


def test_prepare_subject_preserves_soft_alpha():
    out = np.asarray(prepare_subject(_rgba_subject(alpha=180), 64, fill=0.75))
    assert out[20, 32, 3] == 180 and out[44, 32, 3] == 180
    np.testing.assert_array_equal(out[20, 32, :3], [200, 30, 40])


def test_empty_alpha_is_no_subject():
    with pytest.raises(NoSubject, match="alpha channel is empty"):
        foreground_mask(_rgba_subject(alpha=0))
    tiny = np.zeros((40, 40, 4), dtype=np.uint8)
    tiny[5:8, 5:8] = (10, 200, 30, 255)  # 9 visible pixels, alpha elsewhere 0
    tiny[20:30, 20:30, :3] = 90
    with pytest.raises(NoSubject):
        prepare_subject(Image.fromarray(tiny, "RGBA"), 64)


def test_rgb_without_segmenter_names_the_role():
    with pytest.raises(WeightsMissing, match="segmenter"):
        foreground_mask(_noise_image(40, 40, 5))
    with pytest.raises(WeightsMissing, match="segmenter"):
        prepare_subject(_noise_image(40, 40, 5), 64)


def test_rgb_with_segmenter_and_bytes_path(clipseg):
    image = _noise_image(48, 40, 6)
    mask = foreground_mask(image, clipseg, "a toy")
    assert mask.dtype == bool and mask.shape == (40, 48) and mask.sum() >= 16
    out = prepare_subject(image, 32, mask=mask)
    assert out.size == (32, 32)
    x0, y0, x1, y1 = _alpha_bbox(out)
    assert abs(max(x1 - x0, y1 - y0) - 24) <= 1
    buf = io.BytesIO()
    _rgba_subject().save(buf, "PNG")
    framed = subject_from_bytes(buf.getvalue(), 64)
    x0, y0, x1, y1 = _alpha_bbox(framed)
    assert abs((y1 - y0) - 48) <= 1


def test_composite_blends_straight_alpha():
    arr = np.array([[[100, 0, 0, 0], [100, 0, 0, 255], [100, 0, 0, 128]]], dtype=np.uint8)
    out = np.asarray(composite(Image.fromarray(arr, "RGBA"), (0, 0, 250)))
    np.testing.assert_array_equal(out[0, 0], [0, 0, 250])
    np.testing.assert_array_equal(out[0, 1], [100, 0, 0])
    np.testing.assert_allclose(out[0, 2], [50, 0, 124], atol=1)


# --- fetch / verify / list ---------------------------------------------------------------------


def _fake_wonder3d_hub(root: Path) -> dict[str, torch.Tensor]:
    """A local folder laid out like flamehaze1115/wonder3d-v1.0: pickle fp16 UNet and encoder."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    unet = {"conv_in.weight": torch.randn(8, 8, 3, 3, generator=gen).half(), "conv_in.bias": torch.randn(8, generator=gen).half()}
    unet["tied.weight"] = unet["conv_in.bias"]  # shared storage must survive conversion
    encoder = {"vision_model.embeddings.patch_embedding.weight": torch.randn(4, 3, 2, 2, generator=gen).half()}
    vae = {"encoder.conv_in.weight": torch.randn(4, 3, 3, 3, generator=gen)}
    for rel in ("unet", "vae", "image_encoder", "feature_extractor", "scheduler"):
        (root / rel).mkdir(parents=True)
    for rel in ("model_index.json", "unet/config.json", "vae/config.json", "image_encoder/config.json",
                "feature_extractor/preprocessor_config.json", "scheduler/scheduler_config.json"):
        (root / rel).write_text(json.dumps({"name": rel}))
    torch.save(unet, root / "unet/diffusion_pytorch_model.bin")
    torch.save(encoder, root / "image_encoder/pytorch_model.bin")
    torch.save(vae, root / "vae/diffusion_pytorch_model.bin")
    save_file(vae, str(root / "vae/diffusion_pytorch_model.safetensors"))  # a published sibling wins
    (root / "README.md").write_text("not fetched")
    return unet | {f"enc.{k}": v for k, v in encoder.items()}


def _repo_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_fetch_from_local_source_converts_records_and_verifies(tmp_path, capsys):
    from safetensors.torch import load_file

    hub, models = tmp_path / "hub", tmp_path / "models"
    tensors = _fake_wonder3d_hub(hub)
    role = ROLES["multiview"]
    calls: list[str] = []

    def source(repo_path: str) -> Path:
        calls.append(repo_path)
        return hub / repo_path

    record = fetch.fetch_role(role, models, source, _repo_files(hub), revision="abc123", log=lambda _m: None)
    folder = role.path(models)
    assert role.missing(models) == []
    assert "vae/diffusion_pytorch_model.bin" not in calls and "README.md" not in calls
    assert not list(folder.rglob("*.bin"))
    unet = load_file(folder / "unet/diffusion_pytorch_model.safetensors")
    for key in ("conv_in.weight", "conv_in.bias", "tied.weight"):
        assert unet[key].dtype == torch.float16
        torch.testing.assert_close(unet[key], tensors[key], rtol=0, atol=0)
    enc = load_file(folder / "image_encoder/model.safetensors")
    torch.testing.assert_close(enc["vision_model.embeddings.patch_embedding.weight"], tensors["enc.vision_model.embeddings.patch_embedding.weight"], rtol=0, atol=0)
    saved = json.loads((folder / fetch.CHECKSUMS).read_text())
    assert saved["repo_id"] == role.repo_id and saved["revision"] == "abc123" and saved["licence"] == role.licence
    assert saved["files"]["unet/diffusion_pytorch_model.safetensors"]["converted_from_pickle"] is True
    for rel, entry in saved["files"].items():
        assert entry["sha256"] == hashlib.sha256((folder / rel).read_bytes()).hexdigest()
    assert record["files"] == saved["files"]
    assert fetch.verify_role(role, models) == []

    # One flipped byte in the weights is reported by verify, naming the file.
    target = folder / "unet/diffusion_pytorch_model.safetensors"
    data = bytearray(target.read_bytes())
    data[-3] ^= 0xFF
    target.write_bytes(bytes(data))
    problems = fetch.verify_role(role, models)
    assert problems == ["checksum mismatch: unet/diffusion_pytorch_model.safetensors (the file is corrupted or was changed)"]
    assert cli_main(["models", "verify", "--models", str(models), "--role", "multiview"]) == 1
    assert "checksum mismatch: unet/diffusion_pytorch_model.safetensors" in capsys.readouterr().out

    # Re-fetching the same revision resumes: only the damaged file is fetched again.
    calls.clear()
    fetch.fetch_role(role, models, source, _repo_files(hub), revision="abc123", log=lambda _m: None)
    assert calls == ["unet/diffusion_pytorch_model.bin"]
    assert cli_main(["models", "verify", "--models", str(models), "--role", "multiview"]) == 0

    # A truncated file: verify says so, and loading names it.
    target.write_bytes(target.read_bytes()[:100])
    assert any(p.startswith("size mismatch: unet/diffusion_pytorch_model.safetensors") for p in fetch.verify_role(role, models))
    with pytest.raises(WeightsMissing, match="diffusion_pytorch_model.safetensors"):
        fetch.check_weight_files(folder, ["unet/diffusion_pytorch_model.safetensors"], "multiview")


def test_plan_uses_pickle_when_no_safetensors_is_published():
    files = ["config.json", "preprocessor_config.json", "pytorch_model.bin", "vocab.json", "merges.txt", "tokenizer_config.json", "README.md"]
    plan = {p.local_path: p for p in fetch.plan_role(ROLES["segmenter"], files)}
    assert plan["model.safetensors"].repo_path == "pytorch_model.bin" and plan["model.safetensors"].convert
    strip = {p.local_path: p.repo_path for p in fetch.plan_role(ROLES["image_encoder"], ["models/image_encoder/config.json", "models/image_encoder/model.safetensors", "models/other.bin"])}
    assert strip == {"config.json": "models/image_encoder/config.json", "model.safetensors": "models/image_encoder/model.safetensors"}
    with pytest.raises(WeightsMissing, match="model.safetensors"):
        fetch.plan_role(ROLES["segmenter"], [f for f in files if f != "pytorch_model.bin"])


def test_fetch_refuses_offline(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(Make3DError, match="HF_HUB_OFFLINE") as info:
        fetch.fetch_from_hub(ROLES["segmenter"], tmp_path)
    assert info.value.code == "offline"
    assert cli_main(["models", "fetch", "--models", str(tmp_path), "--role", "segmenter"]) == 2
    assert "offline" in capsys.readouterr().err
    assert not (tmp_path / "segmenter").exists()


def test_models_list_and_role_status(aux_models, tmp_path, capsys):
    assert cli_main(["models", "list", "--models", str(aux_models)]) == 0
    out = capsys.readouterr().out
    rows = out.splitlines()[1:]
    lines = {line.split()[0]: line for line in rows if not line.startswith(" ")}
    assert set(lines) == set(ROLES)
    assert lines["normal_estimator"].split()[1] == "complete" and "Apache-2.0" in lines["segmenter"]
    assert lines["multiview"].split()[1] == "incomplete"
    missing_row = rows[rows.index(lines["multiview"]) + 1]
    assert missing_row.split()[:2] == ["missing:", "unet/config.json,"]
    status = {s["name"]: s for s in fetch.role_status(aux_models)}
    assert status["segmenter"]["complete"] and status["segmenter"]["missing"] == []
    assert status["multiview"]["missing"] == list(ROLES["multiview"].required)
    assert set(status["segmenter"]) >= {"name", "title", "licence", "complete", "missing"}


def test_recorded_checksums_for_a_written_set_catch_a_truncated_file(aux_models, tmp_path):
    import shutil

    shutil.copytree(ROLES["segmenter"].path(aux_models), ROLES["segmenter"].path(tmp_path))
    folder = ROLES["segmenter"].path(tmp_path)
    first = fetch.record_checksums(folder, "segmenter", repo_id="tiny")
    assert fetch.record_checksums(folder, "segmenter", repo_id="tiny") == first  # deterministic (no date)
    assert set(first["files"]) >= set(ROLES["segmenter"].required)
    assert fetch.verify_role(ROLES["segmenter"], tmp_path) == []
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    assert fetch.verify_role(ROLES["segmenter"], tmp_path)[0].startswith("size mismatch: model.safetensors")
    with pytest.raises(WeightsMissing, match="model.safetensors"):
        load_segmenter(folder)


def test_presets_set_marigolds_published_processing_resolution():
    """Issue 22.6: the normal estimator runs at the resolution its published config names (768 px for
    marigold-normals-v1-1), set explicitly, not at whatever the installed checkpoint says."""
    from make_your_3d.pipeline.presets import PRESETS

    published = Path(__file__).resolve().parents[1] / "backend" / "make_your_3d" / "models" / "published_configs" / "normal_estimator" / "model_index.json"
    resolution = json.loads(published.read_text())["default_processing_resolution"]
    assert resolution == 768
    assert {p.normal_resolution for p in PRESETS.values()} == {resolution}
