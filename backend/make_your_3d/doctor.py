"""`make-your-3d doctor`: what a user runs when something is wrong. Plain sentences, no tracebacks."""

from __future__ import annotations

from pathlib import Path

from make_your_3d import __version__
from make_your_3d.models.registry import ROLES, is_tiny


def gpu_report() -> list[str]:
    import torch

    lines = [f"torch {torch.__version__}"]
    if not torch.cuda.is_available():
        if torch.version.cuda is None:
            lines.append("CUDA: not available: this torch is a CPU-only build. With an NVIDIA GPU, install a CUDA build "
                         "(pip install torch --index-url https://download.pytorch.org/whl/cu124).")
        else:
            lines.append("CUDA: not available (no NVIDIA GPU or driver found). Jobs run on the CPU (slow; the fast preset is recommended).")
        lines.append(rasterizer_line())
        return lines
    free, total = torch.cuda.mem_get_info()
    lines.append(f"CUDA {torch.version.cuda}: {torch.cuda.get_device_name(0)}, {free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB")
    if total < 12 * 2**30:
        lines.append("  Less than 12 GiB of VRAM: use the lowvram preset.")
    lines.append(rasterizer_line())
    return lines


def rasterizer_line() -> str:
    """Which Gaussian rasterizer reconstruction uses here, and why (recon.rasterize.rasterizer_choice)."""
    from make_your_3d.recon.rasterize import rasterizer_choice

    choice = rasterizer_choice()
    return f"Rasterizer: {'gsplat CUDA kernels' if choice.gsplat_cuda else 'torch'} ({choice.reason})"


def models_report(models_dir: Path) -> tuple[list[str], bool]:
    lines = [f"Models directory: {models_dir}" + ("" if models_dir.is_dir() else " (does not exist yet)")]
    if is_tiny(models_dir):
        lines.append("  This is a TINY model set: random toy weights that test the code but make noise, not subjects.")
    all_complete = True
    for role in ROLES.values():
        missing = role.missing(models_dir)
        if not missing:
            lines.append(f"  [ok]      {role.name:<17} {role.title}")
            continue
        all_complete = False
        if len(missing) == len(role.required):
            lines.append(f"  [missing] {role.name:<17} {role.title}: not downloaded")
        else:
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            lines.append(f"  [broken]  {role.name:<17} {role.title}: missing {shown}")
    if all_complete:
        lines.append("All model roles are complete.")
    else:
        lines.append("Some model roles are incomplete: run `make-your-3d models fetch` (add --role NAME for one role).")
    return lines, all_complete
