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
    reporter: Reporter | None = None,
) -> list[Image.Image]:
    """One edited RGB image per (image, prompt), conditioned on that same image through the adapter."""
    from diffusers import StableDiffusionImg2ImgPipeline

    img2img = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    img2img.set_progress_bar_config(disable=True)
    rgb = [im.convert("RGB").resize((size, size), Image.BICUBIC) for im in images]
    embeds = clip_image_embeds(pipe, rgb)
    if guidance > 1.0:  # diffusers expects [negative, positive] stacked when guidance is on
        embeds = torch.cat([torch.zeros_like(embeds), embeds])
    total = max(1, int(steps * strength))

    def on_step(_pipe, i, _t, kwargs):
        if reporter is not None:
            reporter.step(min(i + 1, total), total, "denoising")
        return kwargs

    generator = torch.Generator(device="cpu").manual_seed(seed)
    result = img2img(
        prompt=prompts,
        negative_prompt=[negative_prompt] * len(prompts) if negative_prompt else None,
        image=rgb,
        strength=strength,
        num_inference_steps=steps,
        guidance_scale=guidance,
        ip_adapter_image_embeds=[embeds],
        generator=generator,
        callback_on_step_end=on_step,
        output_type="pil",
    )
    return list(result.images)
