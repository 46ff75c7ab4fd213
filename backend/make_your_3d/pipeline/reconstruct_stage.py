"""Stage reconstruct: the multi-view stage's views -> subject.glb, through recon/ (no models).

`recon_options` is the one rule for the reconstruction's settings; the generator also calls it
before any model loads, so a bad `recon` override is a bad request at once, and puts its resolved
config into the stage's key and job.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from make_your_3d.errors import BadRequest
from make_your_3d.recon.reconstruct import ReconOptions, reconstruct

if TYPE_CHECKING:
    from make_your_3d.pipeline.stages import StageInputs


def recon_options(preset: Any, request: Any, device: str, seed: int) -> ReconOptions:
    """The reconstruction's options from the preset's recon fields and the request's face and
    texture budgets; `resolved()` validates them."""
    try:
        return ReconOptions(preset=preset.recon_preset, device=device, faces=request.faces or preset.faces,
                            texture_size=request.texture_size or preset.texture_size, seed=seed, **preset.recon)
    except TypeError as exc:  # a recon key that repeats a named argument (preset, device, ...)
        raise BadRequest(f"Unknown reconstruction setting in the preset's recon overrides ({exc}).") from None


def run_reconstruct(inputs: "StageInputs", out: Path) -> None:
    options = recon_options(inputs.preset, inputs.request, str(inputs.device), inputs.seed)
    result = reconstruct(inputs.upstream("multiview") / "views", out / "subject.glb", options,
                         progress=inputs.progress, cancel=inputs.cancel)
    # The entry holds results only: the steps' seconds differ from run to run, so they stay out of
    # it (job.json has the stage's time), and the same inputs give the same bytes.
    record = {k: v for k, v in result.record.items() if k != "timings"}
    (out / "recon.json").write_text(json.dumps({"mesh": result.mesh_summary(), "record": record}, default=str))
