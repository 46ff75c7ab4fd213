"""Multi-view model: attention coupling, Wonder3D checkpoint compatibility, guidance, the pipeline,
the views it writes, cancellation and the CLI (tiny random weights, CPU)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from make_your_3d.errors import Cancelled, WeightsMissing
from make_your_3d.models.multiview import load_multiview
from make_your_3d.models.multiview_attention import JointAttnProcessor, MultiViewAttnProcessor
from make_your_3d.models.multiview_pipeline import (
    FRONT_GL_TO_WORLD,
    MultiViewImages,
    front_normals_to_world,
    world_normals_to_front,
)
from make_your_3d.models.multiview_tiny import tiny_unet_config, write_tiny_multiview
from make_your_3d.models.multiview_unet import (
    WEIGHTS_NAME,
    CheckpointMismatch,
    UNetMV2DConditionModel,
    cross_domain_module_names,
    cross_domain_parameters,
)
from make_your_3d.progress import CancelToken, Reporter
from make_your_3d.models.wonder3d_views import WONDER3D_VIEW_TABLE, WONDER3D_VIEWS
from make_your_3d.pipeline.multiview_views import to_viewset
from make_your_3d.recon.camera import orbit_c2w
from make_your_3d.views import load_views, save_views

V = 6

# Wonder3D v1.0's published unet/config.json (huggingface.co/flamehaze1115/wonder3d-v1.0, unet/).
PUBLISHED_UNET_CONFIG = {
    "_class_name": "UNetMV2DConditionModel", "_diffusers_version": "0.19.3", "act_fn": "silu",
    "addition_embed_type": None, "addition_embed_type_num_heads": 64, "addition_time_embed_dim": None,
    "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "cd_attention_last": False,
    "cd_attention_mid": True, "center_input_sample": False, "class_embed_type": "projection",
    "class_embeddings_concat": False, "conv_in_kernel": 3, "conv_out_kernel": 3, "cross_attention_dim": 768,
    "cross_attention_norm": None, "cross_domain_attention": False,
    "down_block_types": ["CrossAttnDownBlockMV2D", "CrossAttnDownBlockMV2D", "CrossAttnDownBlockMV2D", "DownBlock2D"],
    "downsample_padding": 1, "dual_cross_attention": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 8, "joint_attention": False,
    "joint_attention_twice": True, "layers_per_block": 2, "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlockMV2DCrossAttn", "multiview_attention": True,
    "mvcd_attention": False, "norm_eps": 1e-05, "norm_num_groups": 32, "num_attention_heads": None,
    "num_class_embeds": None, "num_views": 6, "only_cross_attention": False, "out_channels": 4,
    "projection_class_embeddings_input_dim": 10, "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default", "sample_size": 32, "sparse_mv_attention": False,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlockMV2D", "CrossAttnUpBlockMV2D", "CrossAttnUpBlockMV2D"],
    "upcast_attention": False, "use_linear_projection": False,
}


@pytest.fixture(scope="module")
def mv_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("mv") / "multiview"
    write_tiny_multiview(folder, seed=0)
    return folder


@pytest.fixture(scope="module")
def pipe(mv_folder):
    return load_multiview(mv_folder, "cpu", torch.float32)


def subject_image(size: int = 64) -> Image.Image:
    arr = np.zeros((size, size, 4), np.uint8)
    q = size // 4
    arr[q : size - q, q : size - q] = (200, 60, 40, 255)
    arr[q + 4 : q + 10, q + 4 : size - q - 4] = (30, 160, 220, 255)
    return Image.fromarray(arr, "RGBA")


def row(domain: int, sample: int, view: int, batch: int) -> int:
    """Index of (domain, sample, view) in the [normals(B*V), colours(B*V)] layout."""
    return domain * batch * V + sample * V + view


def changed_rows(a: torch.Tensor, b: torch.Tensor) -> set[int]:
    diff = (a - b).flatten(1).abs().amax(dim=1)
    return set(torch.nonzero(diff > 1e-6).flatten().tolist())


# --- attention processors --------------------------------------------------------------------


def make_attention(processor) -> torch.nn.Module:
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    return Attention(query_dim=16, heads=2, dim_head=8, processor=processor)


def test_multiview_attention_couples_exactly_the_views_of_one_sample_and_domain():
    attn = make_attention(MultiViewAttnProcessor(V))
    batch, tokens = 2, 5
    x = torch.randn(2 * batch * V, tokens, 16)
    base = attn(x)
    poked = x.clone()
    target = row(0, 1, 2, batch)
    poked[target] += 1.0
    group = {row(0, 1, v, batch) for v in range(V)}
    assert changed_rows(attn(poked), base) == group  # every view of that (sample, domain), nothing else


def test_multiview_attention_equals_attention_over_concatenated_view_keys():
    """The reshape formulation == each view's queries against the V views' keys/values concatenated."""
    attn = make_attention(MultiViewAttnProcessor(V))
    x = torch.randn(2 * V, 4, 16)
    out = attn(x)
    q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
    ref = []
    for i in range(x.shape[0]):
        g = i // V
        keys = k[g * V : (g + 1) * V].reshape(-1, 16)
        vals = v[g * V : (g + 1) * V].reshape(-1, 16)
        heads = []
        for h in range(2):
            sl = slice(h * 8, (h + 1) * 8)
            w = torch.softmax(q[i][:, sl] @ keys[:, sl].T / math.sqrt(8), dim=-1)
            heads.append(w @ vals[:, sl])
        ref.append(attn.to_out[0](torch.cat(heads, dim=-1)))
    torch.testing.assert_close(out, torch.stack(ref), atol=1e-5, rtol=1e-5)


def test_joint_attention_equals_wonder3d_key_concatenation():
    """Row i of either half attends to [keys of normal row i, keys of colour row i] (Wonder3D's
    JointAttnProcessor: chunk the batch in two, concatenate the halves' keys on the token axis)."""
    attn = make_attention(JointAttnProcessor())
    x = torch.randn(2 * V, 4, 16)
    q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
    k2 = torch.cat(k.chunk(2), dim=1).repeat(2, 1, 1)
    v2 = torch.cat(v.chunk(2), dim=1).repeat(2, 1, 1)
    split = lambda t: t.view(t.shape[0], t.shape[1], 2, 8).transpose(1, 2)
    ref = torch.softmax(split(q) @ split(k2).transpose(-1, -2) / math.sqrt(8), dim=-1) @ split(v2)
    ref = attn.to_out[0](ref.transpose(1, 2).reshape(2 * V, 4, 16))
    torch.testing.assert_close(attn(x), ref, atol=1e-5, rtol=1e-5)


def test_joint_attention_couples_each_view_with_itself_in_the_other_domain_only():
    attn = make_attention(JointAttnProcessor())
    batch = 2
    x = torch.randn(2 * batch * V, 5, 16)
    base = attn(x)
    for domain in (0, 1):
        poked = x.clone()
        poked[row(domain, 1, 3, batch)] -= 2.0
        assert changed_rows(attn(poked), base) == {row(0, 1, 3, batch), row(1, 1, 3, batch)}


# --- the UNet ------------------------------------------------------------------------------------


def test_published_wonder3d_config_builds_the_sd_layout_plus_cross_domain_layers():
    """Real configuration on the meta device: the SD 1.x keys and shapes exactly, plus attn_joint_mid /
    norm_joint_mid in all 16 transformer blocks; 910.8M parameters = the published 1.82 GB fp16 file."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        mv = UNetMV2DConditionModel.from_config(PUBLISHED_UNET_CONFIG)
        sd = UNet2DConditionModel(in_channels=8, class_embed_type="projection", projection_class_embeddings_input_dim=10, cross_attention_dim=768, sample_size=32)
    ours = {k: tuple(v.shape) for k, v in mv.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in sd.state_dict().items()}
    joint = {k for k in ours if "_joint_mid." in k}
    assert {k: s for k, s in ours.items() if k not in joint} == theirs
    assert len({k.split(".attn_joint_mid")[0] for k in joint if ".attn_joint_mid." in k}) == 16
    assert ours["class_embedding.linear_1.weight"] == (1280, 10)
    assert ours["conv_in.weight"] == (320, 8, 3, 3)
    params = sum(v.numel() for v in mv.parameters())
    assert params == 910_785_284
    assert round(params * 2 / 1e9, 2) == 1.82


def test_without_multiview_layers_the_unet_is_diffusers_sd_unet():
    """num_views 1 and no cross-domain attention: same keys and same numbers as diffusers' UNet."""
    from diffusers import UNet2DConditionModel

    cfg = {**tiny_unet_config(), "num_views": 1, "cd_attention_mid": False, "joint_attention_twice": False}
    torch.manual_seed(0)
    ours = UNetMV2DConditionModel(**cfg).eval()
    ref = UNet2DConditionModel(
        sample_size=8, in_channels=8, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8, class_embed_type="projection",
        projection_class_embeddings_input_dim=10,
    ).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(4, 8, 8, 8)
    ehs = torch.randn(4, 1, 32)
    labels = torch.randn(4, 10)
    with torch.no_grad():
        a = ours(x, 321, encoder_hidden_states=ehs, class_labels=labels).sample
        b = ref(x, 321, encoder_hidden_states=ehs, class_labels=labels).sample
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_unet_samples_are_independent_and_domains_are_coupled(pipe):
    unet = pipe.unet
    batch = 2
    n = 2 * batch * V
    torch.manual_seed(1)
    x, ehs = torch.randn(n, 8, 8, 8), torch.randn(n, 1, 32)
    labels = pipe.camera_embeddings(batch)
    with torch.no_grad():
        base = unet(x, 500, encoder_hidden_states=ehs, class_labels=labels).sample
        poked = x.clone()
        poked[row(0, 1, 0, batch)] += 1.0  # sample 1's front normal view
        out = unet(poked, 500, encoder_hidden_states=ehs, class_labels=labels).sample
    sample1 = {row(d, 1, v, batch) for d in (0, 1) for v in range(V)}
    assert changed_rows(out, base) == sample1  # all its views, both domains; sample 0 untouched


def test_camera_embeddings_follow_wonder3d_layout(pipe):
    """Rows [normals(B*V), colours(B*V)]; angles are the trained nine_views labels, not the poses
    (the golden test pins the values against Wonder3D's own table)."""
    emb = pipe.camera_embeddings(2)
    assert emb.shape == (2 * 2 * V, 10)
    raw = torch.atan2(emb[:, :5], emb[:, 5:])  # recover the angles from (sin, cos)
    for d, flag in ((0, (1.0, 0.0)), (1, (0.0, 1.0))):
        for b in range(2):
            for v, view in enumerate(WONDER3D_VIEW_TABLE):
                r = raw[row(d, b, v, 2)]
                assert abs(float(r[0])) < 1e-6
                assert math.isclose(float(r[1]), view.label_elevation, abs_tol=1e-5)
                assert math.isclose(float(r[2]) % (2 * math.pi), view.label_azimuth, abs_tol=1e-5)
                assert torch.allclose(r[3:], torch.tensor(flag), atol=1e-6)


# --- checkpoints ---------------------------------------------------------------------------------


def test_tiny_writer_is_complete_and_byte_identical_per_seed(tmp_path, mv_folder):
    from make_your_3d.models.registry import ROLES

    again = tmp_path / "again"
    write_tiny_multiview(again, seed=0)
    files = sorted(p.relative_to(mv_folder) for p in mv_folder.rglob("*") if p.is_file())
    assert {str(p) for p in files} >= set(ROLES["multiview"].required) | {"model_index.json"}
    for rel in files:
        assert (mv_folder / rel).read_bytes() == (again / rel).read_bytes(), rel
    other = tmp_path / "other"
    write_tiny_multiview(other, seed=1)
    assert (other / "unet" / WEIGHTS_NAME).read_bytes() != (mv_folder / "unet" / WEIGHTS_NAME).read_bytes()
    config = json.loads((mv_folder / "unet" / "config.json").read_text())
    assert config["_class_name"] == "UNetMV2DConditionModel"
    assert set(PUBLISHED_UNET_CONFIG) - {"_diffusers_version"} <= set(config)
    index = json.loads((mv_folder / "model_index.json").read_text())
    assert index["_class_name"] == "MVDiffusionImagePipeline" and index["scheduler"] == ["diffusers", "DDIMScheduler"]


def test_save_load_round_trip_is_exact(tmp_path, pipe):
    unet = pipe.unet
    unet.save_pretrained(tmp_path / "unet")
    again = UNetMV2DConditionModel.from_pretrained(tmp_path / "unet")
    a, b = unet.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert dict(again.config)["num_views"] == 6


def test_legacy_joint_twice_names_load(tmp_path, mv_folder):
    from safetensors.torch import load_file

    legacy = tmp_path / "legacy"
    write_tiny_multiview(legacy, seed=0, legacy_names=True)
    keys = load_file(str(legacy / "unet" / WEIGHTS_NAME)).keys()
    assert any(".attn_joint_twice." in k for k in keys) and any(".norm_joint_twice." in k for k in keys)
    assert not any("_joint_mid." in k for k in keys)
    old = UNetMV2DConditionModel.from_pretrained(legacy / "unet").state_dict()
    new = UNetMV2DConditionModel.from_pretrained(mv_folder / "unet").state_dict()
    assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old)


def test_mismatched_checkpoints_fail_naming_the_keys(tmp_path, mv_folder):
    from safetensors.torch import load_file, save_file

    state = load_file(str(mv_folder / "unet" / WEIGHTS_NAME))
    dropped = "mid_block.attentions.0.transformer_blocks.0.attn_joint_mid.to_q.weight"
    cases = {
        "missing": ({k: v for k, v in state.items() if k != dropped}, dropped),
        "unexpected": ({**state, "mid_block.extra_layer.weight": torch.zeros(2)}, "mid_block.extra_layer.weight"),
        "shape": ({**state, "conv_in.weight": torch.zeros(32, 4, 3, 3)}, "conv_in.weight"),
    }
    for name, (bad, key) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text((mv_folder / "unet" / "config.json").read_text())
        save_file(bad, str(folder / WEIGHTS_NAME))
        with pytest.raises(CheckpointMismatch, match=key.replace(".", r"\.")):
            UNetMV2DConditionModel.from_pretrained(folder)
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "config.json").write_text((mv_folder / "unet" / "config.json").read_text())
    (truncated / WEIGHTS_NAME).write_bytes((mv_folder / "unet" / WEIGHTS_NAME).read_bytes()[:1000])
    with pytest.raises(CheckpointMismatch, match="diffusion_pytorch_model.safetensors"):
        UNetMV2DConditionModel.from_pretrained(truncated)


def test_missing_role_files_are_named(tmp_path):
    with pytest.raises(WeightsMissing, match=r"unet/diffusion_pytorch_model\.safetensors.*models fetch"):
        load_multiview(tmp_path, "cpu")


def test_cross_domain_layers_are_the_peft_targets(mv_folder):
    from peft import LoraConfig

    unet = UNetMV2DConditionModel.from_pretrained(mv_folder / "unet")
    names = cross_domain_module_names(unet)
    assert len(names) == 4 * 4  # 4 Linear layers x (1 down + 1 mid + 2 up transformer blocks at toy size)
    assert all(isinstance(unet.get_submodule(n), torch.nn.Linear) and ".attn_joint_mid." in n for n in names)
    params = cross_domain_parameters(unet)
    assert params and all("_joint_mid." in k for k in params)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=names), adapter_name="t")
    lora = [n for n, p in unet.named_parameters() if "lora_" in n]
    assert lora and all(".attn_joint_mid." in n for n in lora)


# --- pipeline --------------------------------------------------------------------------------------


def test_guidance_keeps_normal_and_colour_halves_aligned(pipe):
    """The guided prediction equals u + g (c - u) of two separate unguided runs: each branch sees
    its own [normals, colours] pairing, never the other branch's."""
    torch.manual_seed(3)
    embeds, cond = pipe.encode_condition([subject_image()])
    lat = torch.randn(2 * V, 4, 8, 8)
    t = torch.tensor(700)
    with torch.no_grad():
        guided = pipe.predict_noise(lat, t, embeds, cond, guidance=3.0)
        c = pipe.predict_noise(lat, t, embeds, cond, guidance=1.0)
        u = pipe.predict_noise(lat, t, torch.zeros_like(embeds), torch.zeros_like(cond), guidance=1.0)
    torch.testing.assert_close(guided, u + 3.0 * (c - u), atol=1e-4, rtol=1e-4)


def test_pipeline_writes_valid_deterministic_views(tmp_path, pipe):
    image = subject_image()
    first = pipe(image, steps=2, generator=torch.Generator().manual_seed(7))
    second = pipe(image, steps=2, generator=torch.Generator().manual_seed(7))
    other = pipe(image, steps=2, generator=torch.Generator().manual_seed(8))
    assert first.colors.shape == first.normals.shape == (1, V, 3, 64, 64)
    assert torch.equal(first.colors, second.colors) and torch.equal(first.normals, second.normals)
    assert not torch.equal(first.colors, other.colors)
    save_views(tmp_path / "views", to_viewset(first))
    views = load_views(tmp_path / "views")
    assert [v.name for v in views.views] == [n for n, _ in WONDER3D_VIEWS]
    for view in views.views:
        assert view.size == (64, 64) and view.ortho_size == (2.0, 2.0)
        assert np.array_equal(view.color[..., 3], view.normal[..., 3])
        n = view.normal[..., :3].astype(np.float32) / 255.0 * 2.0 - 1.0
        lengths = np.linalg.norm(n[view.mask], axis=-1)
        assert np.all(np.abs(lengths - 1.0) < 0.02)  # unit vectors up to 8-bit quantisation


def test_masks_come_from_the_generated_views():
    from make_your_3d.models.multiview_pipeline import view_mask

    size = 64
    color = np.ones((size, size, 3), np.float32)
    normal = np.ones((size, size, 3), np.float32)
    normal[10:50, 10:50] = (0.5, 0.5, 1.0)  # a subject facing the camera ...
    color[10:50, 10:50] = 1.0  # ... that is itself white: only the normal map shows it
    normal[25:27, 25:27] = 1.0  # a tiny enclosed gap: filled
    normal[30:45, 30:45] = 1.0  # a large enclosed hole (a handle): kept open
    color[60, 60] = 0.0  # a one-pixel speck: dropped
    mask = view_mask(color, normal)
    expected = np.zeros((size, size), bool)
    expected[10:50, 10:50] = True
    expected[30:45, 30:45] = False
    assert np.array_equal(mask, expected)


def test_front_frame_normals_become_world_normals(tmp_path):
    """Wonder3D's normals are in the front camera's OpenGL frame (x right, y up, z to the viewer):
    in the glTF world (front camera on +Z) that is the world frame; check it through the writer."""
    for front, world in (((0, 0, 1), (0, 0, 1)), ((1, 0, 0), (1, 0, 0)), ((0, 1, 0), (0, 1, 0)), ((0, 0, -1), (0, 0, -1))):
        assert np.allclose(front_normals_to_world(np.array(front, float)), world)
    n = np.random.default_rng(0).normal(size=(10, 3))
    assert np.allclose(world_normals_to_front(front_normals_to_world(n)), n / np.linalg.norm(n, axis=-1, keepdims=True))

    size = 32
    colors = torch.ones(1, V, 3, size, size)
    normals = torch.ones(1, V, 3, size, size)  # white background in both domains
    colors[..., 8:24, 8:24] = 0.4
    # every view shows a patch whose front-frame normal is +x (the subject's side facing the right camera)
    normals[..., 0, 8:24, 8:24] = 1.0
    normals[..., 1, 8:24, 8:24] = 0.5
    normals[..., 2, 8:24, 8:24] = 0.5
    images = MultiViewImages(colors=colors, normals=normals, view_names=tuple(n for n, _ in WONDER3D_VIEWS), azimuths=tuple(a for _, a in WONDER3D_VIEWS))
    save_views(tmp_path, to_viewset(images))
    views = {v.name: v for v in load_views(tmp_path).views}
    right = views["right"]
    expected_mask = np.zeros((size, size), bool)
    expected_mask[8:24, 8:24] = True
    assert np.array_equal(right.mask, expected_mask)
    world = right.normals_world()[right.mask]
    assert np.allclose(world, [1.0, 0.0, 0.0], atol=0.01)
    # the right camera (azimuth 90) sits on +X looking at the origin: that patch faces it
    assert np.allclose(right.c2w[:3, 3] / np.linalg.norm(right.c2w[:3, 3]), [1, 0, 0])
    assert float(world.mean(axis=0) @ -right.c2w[:3, 2]) > 0.99


def test_cpu_offload_and_bfloat16_paths(pipe, mv_folder):
    image = subject_image()
    ref = pipe(image, steps=1, generator=torch.Generator().manual_seed(5))
    pipe.enable_model_cpu_offload("cpu")
    try:
        offloaded = pipe(image, steps=1, generator=torch.Generator().manual_seed(5))
    finally:
        pipe.to("cpu")
    assert torch.equal(ref.colors, offloaded.colors) and torch.equal(ref.normals, offloaded.normals)
    half = load_multiview(mv_folder, "cpu", torch.bfloat16)
    assert {half.unet.dtype, half.vae.dtype, half.image_encoder.dtype} == {torch.bfloat16}
    low = half(image, steps=1, generator=torch.Generator().manual_seed(5))
    assert low.colors.dtype == torch.float32 and torch.isfinite(low.colors).all()
    assert (low.colors - ref.colors).abs().mean() < 0.03


def test_cancel_stops_within_one_step(pipe):
    token = CancelToken()
    calls = []
    handle = pipe.unet.register_forward_hook(lambda *a: calls.append(1))

    def progress(p):
        if p.step == 2:
            token.cancel()

    try:
        with pytest.raises(Cancelled):
            pipe(subject_image(), steps=10, generator=torch.Generator().manual_seed(0), reporter=Reporter("multiview", progress, token))
    finally:
        handle.remove()
    assert len(calls) == 3  # steps 0, 1 and the one running when cancel arrived; none after


def test_multiview_cli_writes_a_views_folder(tmp_path, mv_folder):
    import shutil

    from make_your_3d.cli import main

    models = tmp_path / "models"
    shutil.copytree(mv_folder, models / "multiview")
    image = tmp_path / "subject.png"
    big = subject_image(128)
    big.save(image)
    code = main(["multiview", str(image), "--out", str(tmp_path / "views"), "--models", str(models), "--steps", "2", "--seed", "3", "--device", "cpu"])
    assert code == 0
    views = load_views(tmp_path / "views")
    assert len(views.views) == V and views.extras["multiview"]["seed"] == 3


def test_near_white_subject_keeps_its_body():
    """A snowman (two spheres, albedo 0.96 with soft shading) on a slightly noisy white background,
    as a generated view would be: the normal map carries the mask where the colour cannot."""
    from make_your_3d.models.multiview_pipeline import view_mask

    size = 96
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    normal = np.ones((size, size, 3), np.float32)
    truth = np.zeros((size, size), bool)
    for cx, cy, r in ((48, 62, 24), (48, 28, 14)):
        dx, dy = (xx - cx) / r, (cy - yy) / r
        inside = dx**2 + dy**2 < 1.0
        nz = np.sqrt(np.clip(1.0 - dx**2 - dy**2, 0.0, 1.0))
        n = np.stack([dx, dy, nz], -1)
        normal[inside] = (n[inside] + 1.0) / 2.0
        truth |= inside
    shade = 0.93 + 0.06 * (normal[..., 2] - 0.5) * 2.0  # brighter where the surface faces the camera
    color = np.where(truth[..., None], np.clip(shade, 0.0, 1.0)[..., None].repeat(3, -1), 1.0).astype(np.float32)
    rng = np.random.default_rng(0)
    color = np.clip(color + rng.normal(0, 0.01, color.shape), 0, 1).astype(np.float32)
    normal = np.clip(normal + rng.normal(0, 0.01, normal.shape), 0, 1).astype(np.float32)

    def iou(a, b):
        return (a & b).sum() / (a | b).sum()

    assert iou(view_mask(color, normal), truth) > 0.97
    # the wrong variant: thresholding the colour's distance from white alone loses the body
    colour_only = np.abs(color - 1.0).max(-1) > 0.08
    assert iou(colour_only, truth) < 0.5


def test_front_frame_constant_is_the_contract_front_camera():
    """models/ states the front camera's frame without importing recon/; it must agree with the pose."""
    assert np.allclose(FRONT_GL_TO_WORLD, orbit_c2w(0.0)[:3, :3] @ np.diag([1.0, -1.0, -1.0]))
