"""The identity stage's objective against IP-Adapter's own training step (tests/golden/ip_adapter).

The fixture was recorded from tencent-ailab/IP-Adapter's `tutorial_train.py` training step (their
`IPAdapter`, `ImageProjModel` and `IPAttnProcessor2_0`) on the tiny personalised set (seed 0); see
its README. Here the same inputs go through our `IdentityTrainer.loss`, which runs diffusers'
`IPAdapterAttnProcessor2_0` via `added_cond_kwargs={"image_embeds": [...]}`. Each check also runs
a deliberately wrong variant and shows that the comparison catches it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from make_your_3d.models.personalized import ip_adapter_parameters, load_personalized
from make_your_3d.pipeline.identity import Batch, IdentityTrainer, clip_image_embeds, diffusion_loss, encode_prompts

GOLDEN = Path(__file__).parent / "golden" / "ip_adapter"
LOSS_RTOL = 2e-6  # measured: 0 (bit-equal) on the CI host's CPU
GRAD_TOL = 1e-4  # of each gradient's largest magnitude (measured: 1.9e-6)
PRED_TOL = 1e-5  # of the predicted noise's largest magnitude (measured: 5.8e-7)


@pytest.fixture(scope="module")
def ref() -> dict[str, torch.Tensor]:
    return load_file(str(GOLDEN / "reference.safetensors"))


@pytest.fixture(scope="module")
def info() -> dict:
    return json.loads((GOLDEN / "inputs.json").read_text())


@pytest.fixture(scope="module")
def pipe(tiny_models: Path, info: dict):
    for rel, digest in info["tiny_weights_sha256"].items():
        actual = hashlib.sha256((tiny_models / rel).read_bytes()).hexdigest()
        assert actual == digest, f"tiny weights {rel} changed since the fixture was made: regenerate it (see {GOLDEN}/README.md)"
    return load_personalized(tiny_models, torch.device("cpu"))


@pytest.fixture()
def trainer(pipe, ref):
    views = [(name, Image.fromarray(im.numpy())) for name, im in zip(("front", "back"), ref["images"])]
    return IdentityTrainer(pipe, views, "a toy bear", size=16, lr=1e-4, batch_size=2, seed=0)


def _batch(ref, image_embeds: torch.Tensor | None = None) -> Batch:
    embeds = ref["image_embeds"] if image_embeds is None else image_embeds
    return Batch(latents=ref["latents"], text_embeds=ref["text_embeds"], image_embeds=embeds.unsqueeze(1))  # (B, 1, D) for diffusers


def _grads_by_reference_key(unet, params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """Our gradients under the published key names: `ip_adapter.{k}` numbers every attention processor."""
    out = {}
    for k, name in enumerate(unet.attn_processors):
        for proj in ("to_k_ip", "to_v_ip"):
            ours = f"{name}.{proj}.0.weight"
            if ours in params:
                out[f"grad.ip_adapter.{k}.{proj}.weight"] = params[ours].grad.detach().clone()
    return out


def _assert_grads_match(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    expected = {k for k in ref if k.startswith("grad.")}
    assert set(ours) == expected
    for key in sorted(expected):
        scale = float(ref[key].abs().max())
        assert scale > 0, key
        torch.testing.assert_close(ours[key], ref[key], rtol=0, atol=GRAD_TOL * scale, msg=key)


@torch.no_grad()
def _noise_pred(trainer, ref, image_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """The UNet call `diffusion_loss` makes, with the trainer's scheduler and kwargs layout."""
    batch = _batch(ref, image_embeds)
    noisy = trainer.scheduler.add_noise(batch.latents, ref["noise"], ref["timesteps"])
    return trainer.pipe.unet(noisy, ref["timesteps"], encoder_hidden_states=batch.text_embeds,
                             added_cond_kwargs={"image_embeds": [batch.image_embeds]}).sample


def _pred_matches(pred: torch.Tensor, ref) -> bool:
    return bool((pred - ref["noise_pred"]).abs().max() <= PRED_TOL * ref["noise_pred"].abs().max())


def _loss_and_grads(trainer, batch, ref):
    for p in trainer.params.values():
        p.grad = None
    loss = trainer.loss(batch, ref["noise"], ref["timesteps"])
    loss.backward()
    return loss.detach(), _grads_by_reference_key(trainer.pipe.unet, trainer.params)


def test_encoders_match_the_reference_inputs(pipe, ref, info):
    """Our text and CLIP image encodings equal the reference loop's (tokenizer, processor, encoders)."""
    torch.testing.assert_close(encode_prompts(pipe, info["prompts"]), ref["text_embeds"], rtol=1e-5, atol=1e-6)
    images = [Image.fromarray(im.numpy()) for im in ref["images"]]
    ours = clip_image_embeds(pipe, images)
    assert ours.shape == (2, 1, ref["image_embeds"].shape[-1])
    torch.testing.assert_close(ours[:, 0], ref["image_embeds"], rtol=1e-5, atol=1e-6)
    # Wrong variant: the embeddings of the other image order differ well beyond the tolerance.
    assert not torch.allclose(ours[:, 0].flip(0), ref["image_embeds"], rtol=1e-5, atol=1e-6)


def test_identity_loss_and_gradients_equal_the_reference_training_step(trainer, ref):
    assert trainer.scheduler.config.num_train_timesteps == 1000
    loss, grads = _loss_and_grads(trainer, _batch(ref), ref)
    torch.testing.assert_close(loss, ref["loss"][0], rtol=LOSS_RTOL, atol=0)
    _assert_grads_match(grads, ref)
    assert _pred_matches(_noise_pred(trainer, ref), ref)
    # Only the reference's adapter projections train (it also trains image_proj: a deliberate difference).
    assert set(_grads_by_reference_key(trainer.pipe.unet, trainer.params)) == {k for k in ref if k.startswith("grad.")}
    assert set(trainer.params) == set(ip_adapter_parameters(trainer.pipe.unet))


def test_zero_image_embedding_is_the_reference_image_drop(trainer, ref):
    """Their image drop zeroes the CLIP embedding before the projection; our unconditional
    image prompt (the negative in `edit_images`) is the same zero embedding."""
    dropped = ref["image_embeds"].clone()
    dropped[1] = 0
    loss, _ = _loss_and_grads(trainer, _batch(ref, dropped), ref)
    torch.testing.assert_close(loss, ref["loss_image_dropped_1"][0], rtol=LOSS_RTOL, atol=0)
    assert not torch.isclose(ref["loss_image_dropped_1"][0], ref["loss"][0], rtol=LOSS_RTOL * 10, atol=0)


def test_wrong_variants_are_detected(trainer, ref, pipe):
    def mismatch(loss, grads=None) -> bool:
        if not torch.isclose(loss, ref["loss"][0], rtol=LOSS_RTOL, atol=0):
            return True
        try:
            _assert_grads_match(grads, ref)
        except AssertionError:
            return True
        return False

    # v-prediction target instead of epsilon.
    from diffusers import DDPMScheduler

    v_sched = DDPMScheduler.from_config(trainer.scheduler.config, prediction_type="v_prediction")
    v_loss = diffusion_loss(pipe.unet, v_sched, ref["latents"], ref["noise"], ref["timesteps"], encoder_hidden_states=ref["text_embeds"],
                            added_cond_kwargs={"image_embeds": [ref["image_embeds"].unsqueeze(1)]})
    assert mismatch(v_loss.detach())

    # Image tokens dropped (every image embedding zeroed) and image prompt scale 0.
    loss, grads = _loss_and_grads(trainer, _batch(ref, torch.zeros_like(ref["image_embeds"])), ref)
    assert mismatch(loss, grads)
    assert not _pred_matches(_noise_pred(trainer, ref, torch.zeros_like(ref["image_embeds"])), ref)
    pipe.set_ip_adapter_scale(0.0)  # diffusers then skips the image attention: no gradient reaches the adapter
    try:
        loss = trainer.loss(_batch(ref), ref["noise"], ref["timesteps"])
        assert not loss.requires_grad  # while the reference's adapter gradients are all non-zero
        assert mismatch(loss.detach())
        assert not _pred_matches(_noise_pred(trainer, ref), ref)
    finally:
        pipe.set_ip_adapter_scale(1.0)

    # A different noise schedule (linear betas instead of SD's scaled_linear).
    lin = DDPMScheduler.from_config(trainer.scheduler.config, beta_schedule="linear")
    lin_loss = diffusion_loss(pipe.unet, lin, ref["latents"], ref["noise"], ref["timesteps"], encoder_hidden_states=ref["text_embeds"],
                              added_cond_kwargs={"image_embeds": [ref["image_embeds"].unsqueeze(1)]})
    assert mismatch(lin_loss.detach())

    # Training to_q as well: its gradients would be extra keys beyond the reference's adapter set.
    with_q = {n for n, _ in pipe.unet.named_parameters() if ".to_k_ip." in n or ".to_v_ip." in n or "attn2.to_q." in n}
    assert with_q != set(trainer.params)

    # Sanity: the right variant still matches after the wrong ones ran (scale restored).
    loss, grads = _loss_and_grads(trainer, _batch(ref), ref)
    assert not mismatch(loss, grads) and _pred_matches(_noise_pred(trainer, ref), ref)
