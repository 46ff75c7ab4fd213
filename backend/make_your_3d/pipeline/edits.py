"""Edited images from the personalized model: SD 1.5 img2img with the IP-Adapter image prompt.

Used twice: with the *original* adapter on the subject's six views to make the edited views of the
subject-prior stage, and with the *fine-tuned* adapter on the subject image to make the edited front
view that the multi-view model turns into six views. img2img keeps each view's pose and framing,
which the multi-view model and the normal estimator rely on.
"""

from __future__ import annotations

import torch
from PIL import Image

from make_your_3d.pipeline.identity import clip_image_embeds
from make_your_3d.progress import Reporter


def _per_image_img2img(pipe):
    """diffusers' img2img with one image prompt per row.

    diffusers broadcasts the given `ip_adapter_image_embeds` to the whole batch: it repeats them
    batch-size times, so with B rows of (B, 1, D) embeddings every row's attention sees all B
    images' tokens (each of the six views was conditioned on all six views at once). Here row i gets
    exactly image i's embedding, laid out as the prompts are ([negative(B), positive(B)] with
    guidance), which is also what one call per image gives.
    """
    from diffusers import StableDiffusionImg2ImgPipeline

    class PerImageAdapterImg2Img(StableDiffusionImg2ImgPipeline):
        def prepare_ip_adapter_image_embeds(self, ip_adapter_image, ip_adapter_image_embeds, device, num_images_per_prompt,
                                            do_classifier_free_guidance):
            return [e.to(device) for e in ip_adapter_image_embeds]

    img2img = PerImageAdapterImg2Img.from_pipe(pipe)
    img2img.set_progress_bar_config(disable=True)
    return img2img


def edit_images(
    pipe,
    images: list[Image.Image],
    prompts: list[str],
    negative_prompt: str,
    *,
    size: int,
    steps: int,
    guidance: float,
    strength: float,
    seed: int,
    batch: int | None = None,
    reporter: Reporter | None = None,
) -> list[Image.Image]:
    """One edited RGB image per (image, prompt), conditioned on that same image through the adapter.

    Image `i` draws its noise (VAE posterior sample and initial noise) from its own generator seeded
    `seed + i`, and attends to its own image prompt only (see `_per_image_img2img`), so the images
    are the same whether they run in one call or in calls of `batch` (None: all at once; the lowvram
    preset uses 1), up to the float summation order of a batched UNet. The scheduler (SD 1.5's PNDM)
    draws no noise while stepping.
    """
    if batch is not None and batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    img2img = _per_image_img2img(pipe)
    rgb = [im.convert("RGB").resize((size, size), Image.BICUBIC) for im in images]
    embeds = clip_image_embeds(pipe, rgb)
    total = max(1, int(steps * strength))
    chunk = len(rgb) if batch is None else batch
    starts = range(0, len(rgb), chunk)
    out: list[Image.Image] = []
    for call, start in enumerate(starts):
        part = slice(start, start + chunk)
        done = call * total

        def on_step(_pipe, i, _t, kwargs, done=done):
            if reporter is not None:
                reporter.step(done + min(i + 1, total), total * len(starts), "denoising")
            return kwargs

        part_embeds = embeds[part]
        if guidance > 1.0:  # diffusers expects [negative, positive] stacked when guidance is on
            part_embeds = torch.cat([torch.zeros_like(part_embeds), part_embeds])
        n = len(rgb[part])
        result = img2img(
            prompt=prompts[part],
            negative_prompt=[negative_prompt] * n if negative_prompt else None,
            image=rgb[part],
            strength=strength,
            num_inference_steps=steps,
            guidance_scale=guidance,
            ip_adapter_image_embeds=[part_embeds],
            generator=[torch.Generator(device="cpu").manual_seed(seed + start + j) for j in range(n)],
            callback_on_step_end=on_step,
            output_type="pil",
        )
        out.extend(result.images)
    return out
