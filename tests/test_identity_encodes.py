"""The identity stage's encode cache and the batched edited-views calls (issue 16, item 3).

The cached path (each pooled augmentation VAE/CLIP-encoded once) must give exactly what encoding the
picked images at every step gives (diffusers' own `latent_dist.sample`), and must call the real
encoders once per distinct image (counted with forward hooks, no mocks). The six views' img2img and
Marigold calls must give the same images whether the views run one at a time or together.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from make_your_3d.models.personalized import ip_adapter_parameters, load_personalized
from make_your_3d.pipeline.identity import IdentityTrainer, clip_image_embeds, load_ip_state

VIEWS = (("front", 0), ("right", 12), ("back", -12))
POOL = 3
STEPS = 4
BATCH = 2


@pytest.fixture(scope="module")
def pipe(tiny_models: Path):
    return load_personalized(tiny_models, torch.device("cpu"))


@pytest.fixture(scope="module")
def views(example_image: Path) -> list[tuple[str, Image.Image]]:
    subject = Image.open(example_image).convert("RGBA").resize((64, 64))
    return [(name, subject.rotate(angle)) for name, angle in VIEWS]


class Calls:
    """Counts a module's forward calls and the images (rows) they carried, via a forward hook."""

    def __init__(self, module: torch.nn.Module):
        self.calls = self.rows = 0
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, _module, args, _output) -> None:
        self.calls += 1
        self.rows += int(args[0].shape[0])

    def close(self) -> None:
        self._handle.remove()


def _trainer(pipe, views, cache: bool) -> IdentityTrainer:
    return IdentityTrainer(pipe, views, "a toy bear", size=32, lr=5e-3, batch_size=BATCH, seed=0, augment_pool=POOL, cache_encodes=cache)


def _train(pipe, views, cache: bool, tmp: Path) -> dict:
    """Train from the original adapter; the losses, the last step's gradients, the saved adapter
    bytes and the encoder counts (VAE encoder, CLIP image encoder) from construction to the end."""
    original = {k: v.detach().clone() for k, v in ip_adapter_parameters(pipe.unet).items()}
    vae, clip = Calls(pipe.vae.encoder), Calls(pipe.image_encoder)
    try:
        trainer = _trainer(pipe, views, cache)
        after_init = (vae.rows, clip.rows)
        losses = trainer.train(STEPS)
        grads = {k: p.grad.detach().clone() for k, p in trainer.params.items()}
        path = tmp / f"ip_{cache}.safetensors"
        save_file(trainer.state_dict(), str(path))
    finally:
        vae.close(), clip.close()
        load_ip_state(pipe.unet, original)
    return {"losses": losses, "grads": grads, "saved": path.read_bytes(), "state": trainer.state_dict(),
            "vae": (vae.calls, vae.rows), "clip": (clip.calls, clip.rows), "after_init": after_init}


def test_cached_encodes_train_exactly_like_per_step_encodes(pipe, views, tmp_path: Path):
    cached = _train(pipe, views, True, tmp_path)
    per_step = _train(pipe, views, False, tmp_path)
    # Bit-identical: same losses, last-step gradients and saved adapter file.
    assert cached["losses"] == per_step["losses"]
    assert set(cached["grads"]) == set(per_step["grads"]) and cached["grads"]
    for name, grad in cached["grads"].items():
        assert torch.equal(grad, per_step["grads"][name]), name
    assert cached["saved"] == per_step["saved"]
    assert any(not torch.equal(v, ip_adapter_parameters(pipe.unet)[k].float()) for k, v in cached["state"].items())  # it trained

    # Encoder calls: once per distinct pooled image (views x pool), all before the loop, one image
    # per call; the per-step path encodes every target (VAE) and every condition (CLIP) at each step.
    distinct = len(VIEWS) * POOL
    assert cached["after_init"] == (distinct, distinct)
    assert cached["vae"] == (distinct, distinct) and cached["clip"] == (distinct, distinct)
    assert per_step["after_init"] == (0, 0)
    assert per_step["vae"] == (STEPS * BATCH, STEPS * BATCH) and per_step["clip"] == (STEPS * BATCH, STEPS * BATCH)


def test_pool_batches_equal_per_step_batches_and_wrong_variants_differ(pipe, views):
    from diffusers.utils.torch_utils import randn_tensor

    cached, per_step = _trainer(pipe, views, True), _trainer(pipe, views, False)
    sf = pipe.vae.config.scaling_factor
    for _ in range(3):
        before = cached.rng.bit_generator.state
        a, b = cached.make_batch(), per_step.make_batch()
        assert torch.equal(a.latents, b.latents) and torch.equal(a.image_embeds, b.image_embeds) and torch.equal(a.text_embeds, b.text_embeds)
        na, nb = cached.noise_for(a), per_step.noise_for(b)
        assert torch.equal(na[0], nb[0]) and torch.equal(na[1], nb[1])

        # Replay the step's draws to build wrong variants from the same picks.
        after = cached.rng.bit_generator.state
        cached.rng.bit_generator.state = before
        picks = cached._pool_picks()
        seed = int(cached.rng.integers(2**31))
        cached.rng.bit_generator.state = after
        enc = cached.pool.encoded
        mean = torch.cat([enc[v][t].mean for v, t, _ in picks])
        std = torch.cat([enc[v][t].std for v, t, _ in picks])
        # the posterior mode instead of a sample
        assert not torch.allclose(mean * sf, b.latents, atol=1e-3)
        eps = randn_tensor(mean.shape, generator=torch.Generator().manual_seed(seed), dtype=mean.dtype)
        # the variance in place of the standard deviation
        assert not torch.allclose((mean + std.square() * eps) * sf, b.latents, atol=1e-3)
        # noise from the trainer's generator without the per-step reseed
        assert not torch.allclose((mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(0))) * sf, b.latents, atol=1e-3)
        # the right replay matches bit for bit
        assert torch.equal((mean + std * eps) * sf, b.latents)
        # the target's own framing as the condition (the pool always picks another framing)
        assert all(t != c for _, t, c in picks)
        same = torch.cat([enc[v][t].image_embeds for v, t, _ in picks])
        assert not torch.allclose(same, b.image_embeds, atol=1e-4)
    # A batched encode of the pool (one call for several images) is not bit-equal to single-image
    # calls, which is why both paths encode one image per call.
    images = cached.pool.images[0]
    with torch.no_grad():
        batched = pipe.vae.encode(torch.cat([_pixels(im) for im in images])).latent_dist.mean
        batched_clip = clip_image_embeds(pipe, images)
    singles = torch.cat([e.mean for e in cached.pool.encoded[0]])
    assert torch.allclose(batched, singles, atol=1e-5) and not torch.equal(batched, singles)
    assert torch.allclose(batched_clip, torch.cat([e.image_embeds for e in cached.pool.encoded[0]]), atol=1e-5)


def _pixels(image: Image.Image) -> torch.Tensor:
    from make_your_3d.pipeline.augment import to_tensor

    return to_tensor([image])


def test_pool_zero_keeps_fresh_augmentation_and_bad_pool_is_refused(pipe, views):
    trainer = IdentityTrainer(pipe, views, "a toy bear", size=32, lr=1e-4, batch_size=BATCH, seed=0)
    assert trainer.pool is None
    with pytest.raises(ValueError, match="augment_pool"):
        IdentityTrainer(pipe, views, None, size=32, lr=1e-4, batch_size=BATCH, seed=0, augment_pool=-1)
    from make_your_3d.errors import BadRequest
    from make_your_3d.pipeline.presets import get_preset

    for bad in ({"edit_batch": 0}, {"normal_batch": -1}, {"identity_augment_pool": -2}, {"edit_batch": 1.5}):
        with pytest.raises(BadRequest):
            get_preset("default", bad)
    assert get_preset("lowvram").edit_batch == get_preset("lowvram").normal_batch == 1


def _edit(pipe, images, batch, guidance=3.0, seed=5):
    from make_your_3d.pipeline.edits import edit_images

    return [np.asarray(im, dtype=np.int16) for im in edit_images(pipe, images, PROMPTS[: len(images)], "blurry", size=32, steps=4, guidance=guidance,
                                                                 strength=0.75, seed=seed, batch=batch)]


PROMPTS = [f"a toy bear, wearing a red scarf, {w}" for w in ("front view", "side view", "back view")]


def _img2img(img2img, rgb, embeds, generator, output_type="pil", rows=slice(None)):
    """One direct call with guidance 3 on views `rows`: [zero, own] image embeddings as `edit_images` passes them."""
    rgb, embeds = rgb[rows], embeds[rows]
    out = img2img(prompt=PROMPTS[rows], negative_prompt=["blurry"] * len(rgb), image=rgb, strength=0.75, num_inference_steps=4,
                  guidance_scale=3.0, ip_adapter_image_embeds=[torch.cat([torch.zeros_like(embeds), embeds])], generator=generator,
                  output_type=output_type).images
    return out if output_type == "latent" else [np.asarray(im, dtype=np.int16) for im in out]


def test_edited_views_are_the_same_in_one_call_or_one_at_a_time(pipe, views):
    from diffusers import StableDiffusionImg2ImgPipeline

    from make_your_3d.pipeline.edits import _per_image_img2img

    pipe.set_ip_adapter_scale(0.7)
    images = [im.convert("RGB") for _, im in views]
    together, single, pairs = _edit(pipe, images, None), _edit(pipe, images, 1), _edit(pipe, images, 2)
    for a, b, c in zip(together, single, pairs):
        # uint8 images: the batched UNet sums in another order, at most one level apart (seen: 0)
        assert np.abs(a - b).max() <= 1 and np.abs(a - c).max() <= 1

    rgb = [im.resize((32, 32), Image.BICUBIC) for im in images]
    embeds = clip_image_embeds(pipe, rgb)
    # In latents (the tiny VAE's decoder flattens differences): batched rows equal single calls up
    # to float summation order (seen 4.5e-6), and each row is conditioned on its own image only.
    ours = _per_image_img2img(pipe)
    batched = _img2img(ours, rgb, embeds, [torch.Generator().manual_seed(5 + i) for i in range(3)], "latent")
    alone = torch.cat([_img2img(ours, rgb, embeds, [torch.Generator().manual_seed(5 + i)], "latent", slice(i, i + 1)) for i in range(3)])
    assert (batched - alone).abs().max() <= 1e-4
    # Wrong variant 1: diffusers' own img2img repeats the (B, 1, D) embeddings B times, so every row
    # attends to all three images' tokens (what the six views got before): far from the own-image rows.
    plain = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    plain.set_progress_bar_config(disable=True)
    broadcast = _img2img(plain, rgb, embeds, [torch.Generator().manual_seed(5 + i) for i in range(3)], "latent")
    assert (broadcast - alone).abs().amax(dim=(1, 2, 3)).min() > 2e-3  # seen 0.007 to 0.013 per row
    # Wrong variant 2: one generator shared by the batch (the draw before this change) samples the
    # whole batch's VAE posteriors and noise from one stream, so a view's noise depends on the batch.
    shared = _img2img(_per_image_img2img(pipe), rgb, embeds, torch.Generator().manual_seed(5))
    assert all(np.abs(x - y).max() > 8 for x, y in zip(shared, together))
    # A single image (the front-view stage) is exactly diffusers' own call with one plain generator.
    [front] = _img2img(plain, rgb, embeds, torch.Generator().manual_seed(5), rows=slice(0, 1))
    assert np.array_equal(front, _edit(pipe, images[:1], None)[0])


def test_marigold_batches_give_the_same_normals(tiny_models: Path, views):
    from make_your_3d.models.normals import estimate_normals, load_normal_estimator
    from make_your_3d.models.registry import ROLES

    marigold = load_normal_estimator(ROLES["normal_estimator"].path(tiny_models))
    images = [im.convert("RGB").resize((32, 32)) for _, im in views] * 2  # six views
    runs = {b: estimate_normals(marigold, images, steps=2, generator=torch.Generator().manual_seed(0), processing_resolution=0, batch=b)
            for b in (1, 4, 6)}
    for b in (4, 6):
        np.testing.assert_allclose(runs[b], runs[1], rtol=0, atol=1e-4)  # float summation order only (seen 1.9e-5)
    with pytest.raises(ValueError, match="batch"):
        estimate_normals(marigold, images, steps=1, batch=0)


def test_lr_schedules_decay_over_the_run(pipe, views):
    from make_your_3d.errors import BadRequest
    from make_your_3d.pipeline.presets import get_preset
    from make_your_3d.pipeline.training import lr_scheduler

    def rates(kind: str, steps: int = 4) -> list[float]:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
        sched = lr_scheduler(opt, kind, steps)
        out = []
        for _ in range(steps):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            if sched is not None:
                sched.step()
        return out

    assert rates("constant") == [2.0] * 4
    assert rates("linear") == pytest.approx([2.0, 1.5, 1.0, 0.5])
    assert rates("cosine") == pytest.approx([2.0, 2.0 * 0.5 * (1 + np.cos(np.pi / 4)), 1.0, 2.0 * 0.5 * (1 + np.cos(3 * np.pi / 4))])
    # Wonder3D's stage-2 schedule, step for step as diffusers' own (which its training script uses)
    from diffusers.optimization import get_constant_schedule_with_warmup

    theirs_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    theirs_sched = get_constant_schedule_with_warmup(theirs_opt, num_warmup_steps=100)
    theirs = []
    for _ in range(130):
        theirs.append(theirs_opt.param_groups[0]["lr"])
        theirs_opt.step()
        theirs_sched.step()
    assert rates("constant_with_warmup", 130) == pytest.approx(theirs) and theirs[50] == pytest.approx(1.0) and theirs[120] == 2.0
    with pytest.raises(ValueError, match="schedule"):
        rates("step")
    with pytest.raises(BadRequest):
        get_preset("default", {"lr_schedule": "exponential"})
    # The trainer applies it: after a 3-step cosine run the rate has decayed to 0 (constant: unchanged).
    original = {k: v.detach().clone() for k, v in ip_adapter_parameters(pipe.unet).items()}
    try:
        for kind, end in (("cosine", 0.0), ("constant", 1e-3)):
            trainer = IdentityTrainer(pipe, views, None, size=32, lr=1e-3, batch_size=1, seed=0, augment_pool=1, lr_schedule=kind)
            trainer.train(3)
            assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(end, abs=1e-12)
    finally:
        load_ip_state(pipe.unet, original)
