"""Edited images from the personalized model: SD 1.5 img2img with the IP-Adapter image prompt.

Used twice: with the *original* adapter on the subject's six views to make the edited views of the
subject-prior stage, and with the *fine-tuned* adapter on the subject image to make the edited front
view that the multi-view model turns into six views. img2img keeps each view's pose and framing,
which the multi-view model and the normal estimator rely on.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from make_your_3d.pipeline.identity import clip_image_embeds, view_prompt
from make_your_3d.pipeline.preprocess import composite, generated_mask, prepare_subject
from make_your_3d.progress import Reporter
from make_your_3d.views import View, ViewSet, encode_normals, load_views, save_views

if TYPE_CHECKING:
    from make_your_3d.pipeline.stages import StageInputs


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

    # from_pipe casts the components it shares with `pipe` to its `dtype` argument, float32 when not
    # given: a bf16/fp16 pipeline would be turned into float32 in place (twice the memory, for every
    # later user of the loaded model). Keep the pipeline's own dtype.
    img2img = PerImageAdapterImg2Img.from_pipe(pipe, dtype=pipe.unet.dtype)
    img2img.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)  # its own: schedulers keep stepping state
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


def run_edited_views(inputs: "StageInputs", out: Path) -> None:
    """Stage edited_views: the ORIGINAL personalized model edits each subject view (at the preset's
    IP-Adapter scale); the normal estimator gives their normals, turned to world space."""
    from make_your_3d.models.normals import camera_normals_to_world, estimate_normals

    request, preset = inputs.request, inputs.preset
    source = load_views(inputs.upstream("subject_views") / "views")
    images = [composite(Image.fromarray(v.color, "RGBA")) for v in source.views]
    prompts = [view_prompt(request.subject, v.name, request.prompt) for v in source.views]
    edited = [im.resize(source.image_size, Image.BICUBIC) for im in _edit_views(inputs, images, prompts)]
    segmenter = inputs.models.segmenter()
    masks = [generated_mask(im, segmenter, request.subject, fallback=v.mask) for im, v in zip(edited, source.views)]
    # Marigold at its published processing resolution (768 px for v1-1), as its reference usage:
    # the views are smaller, and the pipeline resizes its output back to their size.
    with inputs.models.normal_estimator() as normal_pipe:
        normals = estimate_normals(normal_pipe, edited, steps=preset.normal_steps, generator=torch.Generator().manual_seed(inputs.seed),
                                   processing_resolution=preset.normal_resolution, batch=preset.normal_batch,
                                   reporter=inputs.reporter.child(inputs.spec.substages[0]))
    views = []
    for v, im, mask, n_cam in zip(source.views, edited, masks, normals):
        alpha = (mask * 255).astype(np.uint8)
        color = np.concatenate([np.asarray(im.convert("RGB")), alpha[..., None]], axis=-1)
        world = camera_normals_to_world(n_cam, v.c2w)
        views.append(View(v.name, color, v.c2w, encode_normals(world, alpha), v.projection, v.ortho_size, v.K))
    save_views(out / "views", ViewSet(views))


def _edit_views(inputs: "StageInputs", images: list[Image.Image], prompts: list[str]) -> list[Image.Image]:
    """The personalized model's edits, in a function of their own so that no name of the stage keeps
    the pipeline alive afterwards: lowvram drops it when the normal estimator loads (ModelHost.load)."""
    request, preset = inputs.request, inputs.preset
    with inputs.models.personalized(ip_scale=preset.ip_scale) as pipe:
        return edit_images(pipe, images, prompts, request.negative_prompt, size=preset.sd_size, steps=preset.sd_steps,
                           guidance=preset.sd_guidance, strength=preset.edit_strength, seed=inputs.seed, batch=preset.edit_batch,
                           reporter=inputs.reporter)


def run_front_view(inputs: "StageInputs", out: Path) -> None:
    """Stage front_view: the identity-tuned personalized model renders the edited front view of the
    subject image, framed for the multi-view model."""
    from safetensors.torch import load_file

    request, preset = inputs.request, inputs.preset
    with Image.open(inputs.upstream("subject") / "input.png") as im:
        subject = im.convert("RGBA")
    ip_state = load_file(str(inputs.upstream("identity") / "ip_adapter.safetensors"))
    with inputs.models.personalized(ip_state=ip_state, ip_scale=preset.ip_scale) as pipe:
        [front] = edit_images(pipe, [composite(subject)], [view_prompt(request.subject, "front", request.prompt)], request.negative_prompt,
                              size=preset.sd_size, steps=preset.sd_steps, guidance=preset.sd_guidance, strength=preset.edit_strength,
                              seed=inputs.seed, reporter=inputs.reporter)
    front = front.resize(subject.size, Image.BICUBIC)
    mask = generated_mask(front, inputs.models.segmenter(), request.subject, fallback=np.asarray(subject)[..., 3] >= 128)
    prepare_subject(front, preset.mv_size, preset.subject_fill, mask=mask).save(out / "front.png")
