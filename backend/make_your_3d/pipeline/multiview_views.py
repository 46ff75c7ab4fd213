"""Generated multi-view images -> the views contract.

The multi-view model (`models/multiview_pipeline.py`) knows nothing about the views contract;
this module places its six images on the ideal Wonder3D poses (orthographic, elevation 0), turns
its front-frame normals into world normals and its backgrounds into masks.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from make_your_3d.errors import BadRequest, BadViews
from make_your_3d.models.multiview_pipeline import WONDER3D_ORTHO_SIZE, MultiViewImages, _to_uint8, front_normals_to_world, view_mask
from make_your_3d.progress import Reporter
from make_your_3d.recon.camera import orbit_c2w
from make_your_3d.views import View, ViewSet, encode_normals, save_views

if TYPE_CHECKING:
    from make_your_3d.pipeline.stages import StageInputs


def to_viewset(images: MultiViewImages, index: int = 0, ortho_size: float = WONDER3D_ORTHO_SIZE, extras: dict | None = None) -> ViewSet:
    """One sample of generated views -> the views contract (world normals, masks as alpha)."""
    views = []
    for v, (name, azimuth) in enumerate(zip(images.view_names, images.azimuths)):
        color = images.colors[index, v].permute(1, 2, 0).numpy()
        normal_rgb = images.normals[index, v].permute(1, 2, 0).numpy()
        mask = view_mask(color, normal_rgb)
        if not mask.any():
            raise BadViews(f"the multi-view model produced an empty {name} view (nothing but background); try another seed.")
        alpha = np.where(mask, 255, 0).astype(np.uint8)
        normals_world = front_normals_to_world(normal_rgb.astype(np.float64) * 2.0 - 1.0)
        views.append(
            View(
                name=name,
                color=np.concatenate([_to_uint8(color), alpha[..., None]], axis=-1),
                normal=encode_normals(normals_world, alpha),
                c2w=orbit_c2w(azimuth, 0.0),
                projection="orthographic",
                ortho_size=(ortho_size, ortho_size),
            )
        )
    return ViewSet(views=views, extras=dict(extras or {}))


def generate_views(mv, subject_rgba: Image.Image, preset, seed: int, reporter: Reporter) -> ViewSet:
    """Six colour + normal views of a prepared subject image, with the preset's sampling settings."""
    if mv.image_size != preset.mv_size:
        raise BadRequest(f"The multi-view model works at {mv.image_size} px but the preset asks for {preset.mv_size} px; "
                         "fix the preset's mv_size.")
    images = mv(subject_rgba, steps=preset.mv_steps, guidance=preset.mv_guidance, eta=preset.mv_eta, scheduler=preset.mv_scheduler,
                generator=torch.Generator(device="cpu").manual_seed(seed), reporter=reporter)
    settings = {"steps": preset.mv_steps, "guidance": preset.mv_guidance, "eta": preset.mv_eta, "scheduler": preset.mv_scheduler, "seed": seed}
    return to_viewset(images, extras={"multiview": settings})


def run_subject_views(inputs: "StageInputs", out: Path) -> None:
    """Stage subject_views: the frozen multi-view model's six views of the framed subject."""
    with Image.open(inputs.upstream("subject") / "input.png") as im:
        subject = im.convert("RGBA")
    with inputs.models.multiview(lora=None) as mv:
        save_views(out / "views", generate_views(mv, subject, inputs.preset, inputs.seed, inputs.reporter))


def run_multiview(inputs: "StageInputs", out: Path) -> None:
    """Stage multiview: the subject-prior-tuned multi-view model's six views of the edited front view."""
    from safetensors.torch import load_file

    lora = load_file(str(inputs.upstream("subject_prior") / "lora.safetensors"))
    with Image.open(inputs.upstream("front_view") / "front.png") as im:
        front = im.convert("RGBA")
    with inputs.models.multiview(lora=lora, rank=inputs.preset.lora_rank) as mv:
        viewset = generate_views(mv, front, inputs.preset, inputs.seed, inputs.reporter)
    save_views(out / "views", viewset)
