"""`make-your-3d doctor`: what a user runs when something is wrong. Plain sentences, no tracebacks."""

from __future__ import annotations

from pathlib import Path

from make_your_3d import __version__
from make_your_3d.cuda_builds import GpuInfo, choose, query_gpu
from make_your_3d.models.registry import ROLES, is_tiny


def gpu_report(gpu: "GpuInfo | None" = None, probe: bool = True) -> list[str]:
    """torch, the GPU, and the PyTorch CUDA build that fits the card and driver (cuda_builds' table,
    the one Install Backend uses). `gpu` defaults to what nvidia-smi says; `probe` runs one matmul."""
    import torch

    if gpu is None and probe:
        gpu = query_gpu()
    choice = choose(gpu) if gpu is not None else None
    fix = (f"pip install {' '.join(choice.build.pip_args)}" if choice is not None and choice.build is not None else "")
    lines = [f"torch {torch.__version__}"]
    if gpu is not None:
        lines.append(f"nvidia-smi: {gpu.name}, compute capability {gpu.compute_cap[0]}.{gpu.compute_cap[1]}, "
                     f"driver {gpu.driver_version}" + (f" (CUDA {gpu.driver_cuda[0]}.{gpu.driver_cuda[1]})" if gpu.driver_cuda else ""))
        lines.append(f"  Fitting PyTorch build: {choice.message}" if choice.build else f"  {choice.message}")
    if not torch.cuda.is_available():
        if torch.version.cuda is None:
            lines.append("CUDA: not available: this torch is a CPU-only build."
                         + (f" For the NVIDIA GPU, install the fitting CUDA build ({fix})." if fix else ""))
        else:
            lines.append(f"CUDA: not available with this CUDA {torch.version.cuda} build (no NVIDIA GPU, or the driver is too old)."
                         + (f" Install the fitting build: {fix}." if fix else "")
                         + " Jobs run on the CPU (slow; the fast preset is recommended).")
        lines.append(rasterizer_line())
        return lines
    free, total = torch.cuda.mem_get_info()
    name = torch.cuda.get_device_name(0)
    lines.append(f"CUDA {torch.version.cuda}: {name}, {free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB")
    if probe:
        lines.append(gpu_kernel_line(name, fix))
    if total < 12 * 2**30:
        lines.append("  Less than 12 GiB of VRAM: use the lowvram preset.")
    lines.append(rasterizer_line())
    return lines


def gpu_kernel_line(name: str, fix: str) -> str:
    """One small matmul on the GPU: where the build has no kernels for the card ("no kernel image is
    available"), say so with the card, the build and the fix, instead of failing in the first job."""
    import torch

    try:
        a = torch.ones(64, 64, device="cuda")
        ok = float((a @ a).sum().item()) == 64.0 ** 3
        reason = "" if ok else "wrong result"
    except RuntimeError as exc:
        ok, reason = False, (str(exc) or type(exc).__name__).splitlines()[0]
    if ok:
        return f"  GPU check passed: a matmul ran on the {name}."
    return (f"  GPU check FAILED on the {name} with torch {torch.__version__} (CUDA {torch.version.cuda} build): {reason}. "
            + (f"Install the fitting build: {fix}." if fix else "Update the NVIDIA driver, then install torch again."))


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
