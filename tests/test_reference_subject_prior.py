"""The subject-prior objective against Wonder3D's own joint training stage.

`tests/golden/subject_prior/` (see its README) holds six training steps recorded from a run of
Wonder3D's `train_mvdiffusion_joint.py` `main()` (xxlong0/Wonder3D d894f82) with its stage-2 config
at tiny sizes, learning rate 0 (so all six steps see the same weights), on the project's tiny
multi-view UNet: per step the clean target latents, the noise, the per-row timesteps, the
condition's VAE latent and CLIP embedding before dropout, the dropout draw, the class labels and
the loss; for one step the gradients of every parameter the reference trains.

`SubjectPriorTrainer.loss` (LoRA at zero, as it starts) must give the reference's loss for the same
inputs, and the gradient of our loss w.r.t. the reference's trained layers must be the reference's.
Deliberate differences (LoRA instead of full layers, one timestep per sample, ...) are listed in
`pipeline/subject_prior.py`; the checks below show what stays identical.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from golden_utils import weights_digest
from make_your_3d.models.multiview import load_multiview
from make_your_3d.models.multiview_tiny import write_tiny_multiview
from make_your_3d.models.multiview_unet import read_checkpoint
from make_your_3d.pipeline.subject_prior import PriorBatch, SubjectPriorTrainer, condition_keep, lora_parameters, use_adapter

GOLDEN = Path(__file__).resolve().parent / "golden" / "subject_prior"
RTOL_LOSS = 1e-5  # |loss| ~ 1
ATOL_GRAD, RTOL_GRAD = 1e-6, 1e-4


@pytest.fixture(scope="module")
def golden() -> tuple[dict[str, torch.Tensor], dict]:
    assert (GOLDEN / "prior_steps.safetensors").is_file(), f"fixture missing: {GOLDEN}"
    return read_checkpoint(GOLDEN / "prior_steps.safetensors"), json.loads((GOLDEN / "prior_steps.json").read_text())


@pytest.fixture(scope="module")
def trainer(tmp_path_factory, golden):
    folder = tmp_path_factory.mktemp("tiny_mv")
    write_tiny_multiview(folder, seed=0)
    for rel, digest in golden[1]["tiny_weights_content_sha256"].items():
        got = weights_digest(folder / rel)
        assert got == digest, f"{rel}: the tiny multi-view writer changed; regenerate tests/golden/subject_prior (README)"
    mv = load_multiview(folder, "cpu", torch.float32)
    size = mv.image_size
    colors = [Image.new("RGB", (size, size), (40 * i, 90, 200)) for i in range(6)]
    normals = [Image.new("RGB", (size, size), (128, 128, 255)) for _ in range(6)]
    made = SubjectPriorTrainer(mv, colors, normals, colors[0], rank=2, lr=1e-4, seed=0)
    yield made
    use_adapter(mv.unet, None, 2)


def _batch(x: dict, k: int, labels: torch.Tensor | None = None) -> PriorBatch:
    rows = x[f"s{k}.latents"].shape[0]
    return PriorBatch(
        latents=x[f"s{k}.latents"],
        image_embeds=x[f"s{k}.image_embeds"].expand(rows, -1, -1),
        cond_latents=x[f"s{k}.cond_latents"].expand(rows, -1, -1, -1),
        class_labels=x[f"s{k}.class_labels"] if labels is None else labels,
    )


_REF = object()


def _loss(trainer: SubjectPriorTrainer, x: dict, k: int, batch: PriorBatch | None = None, noise: torch.Tensor | None = None,
          timesteps: torch.Tensor | None = None, drop_p: float | None | object = _REF) -> torch.Tensor:
    """`trainer.loss` on step k's recorded inputs (any of them replaced for a wrong variant)."""
    saved = trainer.batch
    trainer.batch = batch or _batch(x, k)
    try:
        return trainer.loss(x[f"s{k}.noise"] if noise is None else noise,
                            x[f"s{k}.timesteps"] if timesteps is None else timesteps,
                            float(x[f"s{k}.random_p"]) if drop_p is _REF else drop_p)
    finally:
        trainer.batch = saved


def test_lora_starts_at_zero(trainer):
    lora_b = [p for n, p in lora_parameters(trainer.mv.unet).items() if "lora_B" in n]
    assert lora_b and all(torch.count_nonzero(p) == 0 for p in lora_b)


def test_reference_batch_layout(golden):
    """What the reference does, as recorded: [normals(6), colours(6)] rows, one timestep per
    (sample, domain) group, one condition image for every row, dropout bands of 5%."""
    x, meta = golden
    seen = set()
    for k in range(meta["steps"]):
        t = x[f"s{k}.timesteps"]
        assert torch.equal(t[:6], t[:1].expand(6)) and torch.equal(t[6:], t[6:7].expand(6))
        labels = x[f"s{k}.class_labels"]
        # columns 3, 4 are sin(task_normal), sin(task_color): normals (1, 0) first, then colours (0, 1)
        assert torch.equal(labels[:6, [3, 4]], torch.tensor([[1.0, 0.0]]).sin().expand(6, 2))
        assert torch.equal(labels[6:, [3, 4]], torch.tensor([[0.0, 1.0]]).sin().expand(6, 2))
        seen.add(condition_keep(float(x[f"s{k}.random_p"])))
    assert seen == {(True, True), (False, False), (True, False), (False, True)}  # every dropout case is in the data


@pytest.mark.parametrize("k", range(6))
def test_loss_matches_reference_step(trainer, golden, k):
    x, _ = golden
    trainer.mv.unet.train()
    try:
        with torch.no_grad():
            ours = _loss(trainer, x, k)
    finally:
        trainer.mv.unet.eval()
    torch.testing.assert_close(ours, x[f"s{k}.loss"], rtol=RTOL_LOSS, atol=0)


def test_gradient_of_the_trained_layers_matches_reference(trainer, golden):
    """d loss / d (every attn_joint_mid and norm_joint_mid parameter) equals the reference's: our
    LoRA (on attn_joint_mid's four projections) starts from exactly the reference's gradient."""
    x, meta = golden
    k = meta["grad_step"]
    unet = trainer.mv.unet
    params = {n.replace(".base_layer", ""): p for n, p in unet.named_parameters() if "lora_" not in n and "_joint_mid" in n}
    assert set(params) == set(meta["trainable_parameters"])  # the layers the reference trains are the ones we adapt (+ frozen norms)
    lora_targets = {n.rsplit(".lora_", 1)[0].replace(".base_layer", "") for n in lora_parameters(unet)}
    assert {n.rsplit(".", 1)[0] for n in params if "attn_joint_mid" in n} == {t.replace(".base_layer", "") for t in lora_targets}
    unet.train()
    try:
        for p in params.values():
            p.requires_grad_(True)
            p.grad = None
        _loss(trainer, x, k).backward()
        for name, p in params.items():
            torch.testing.assert_close(p.grad, x[f"s{k}.grad.{name}"], atol=ATOL_GRAD, rtol=RTOL_GRAD, msg=lambda m: f"{name}: {m}")
    finally:
        unet.eval()
        for p in params.values():
            p.requires_grad_(False)
            p.grad = None


def test_our_labels_are_the_reference_training_labels_to_float16(trainer, golden):
    """Deliberate: we train with the pipeline's float16 label table, the reference with float32
    angles of the same cameras; they agree to float16 rounding and move the loss by little."""
    x, _ = golden
    ours = trainer.batch.class_labels
    assert (ours - x["s0.class_labels"]).abs().max() < 2e-3
    trainer.mv.unet.train()
    try:
        with torch.no_grad():
            loss = _loss(trainer, x, 0, batch=_batch(x, 0, labels=ours))
    finally:
        trainer.mv.unet.eval()
    assert abs(float(loss) - float(x["s0.loss"])) < 1e-3


def test_wrong_objectives_are_detected(trainer, golden):
    """Each check can fail: v-prediction target, swapped domain halves, no Min-SNR weighting, no
    condition dropout, and one shared timestep all move the loss far outside the tolerance."""
    from diffusers import DDPMScheduler

    x, _ = golden
    ref = {k: float(x[f"s{k}.loss"]) for k in range(6)}
    unet = trainer.mv.unet
    unet.train()
    try:
        with torch.no_grad():
            far = lambda ours, k: abs(float(ours) - ref[k]) > 100 * RTOL_LOSS * abs(ref[k])  # noqa: E731
            # v-prediction instead of epsilon (the scheduler config decides the target)
            saved = trainer.scheduler
            trainer.scheduler = DDPMScheduler.from_config(saved.config, prediction_type="v_prediction")
            try:
                assert far(_loss(trainer, x, 0), 0)
            finally:
                trainer.scheduler = saved
            # colours first: swapped domain halves of the targets and noise
            b = _batch(x, 0)
            swap = lambda t: torch.cat([t[6:], t[:6]])  # noqa: E731
            assert far(_loss(trainer, x, 0, batch=PriorBatch(swap(b.latents), b.image_embeds, b.cond_latents, b.class_labels), noise=swap(x["s0.noise"])), 0)
            # no Min-SNR weighting (step 2 has t=104 for the colours, where the weight is below 1)
            saved_gamma, trainer.snr_gamma = trainer.snr_gamma, None
            try:
                assert far(_loss(trainer, x, 2), 2)
            finally:
                trainer.snr_gamma = saved_gamma
            # condition dropout ignored (step 1 drops both conditions)
            assert far(_loss(trainer, x, 1, drop_p=None), 1)
            # one timestep for both domains (the normals') instead of the reference's per-domain ones
            # (step 3: normals at 918, colours at 218)
            t = x["s3.timesteps"]
            assert far(_loss(trainer, x, 3, timesteps=t[:1].expand_as(t).clone()), 3)
    finally:
        unet.eval()
