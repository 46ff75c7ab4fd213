"""Device and precision choice: CUDA, then Apple's GPU (MPS), then the CPU; half precision on the
GPUs, fp32 on the CPU (half precision is slow and lossy there).

MPS has never run this project on real hardware (no Mac in CI or lent to a session):
`make-your-3d doctor --selftest --device mps` (the add-on's Test Device) is how an artist checks it.
"""

from __future__ import annotations

import torch

AUTO_PRECISION = {"cuda": torch.float16, "mps": torch.float16, "cpu": torch.float32}  # "auto" per device kind


def mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def auto_device_kind(cuda: bool, mps: bool) -> str:
    """What "auto" picks, given what is there: CUDA first, then Apple's GPU, else the CPU."""
    return "cuda" if cuda else "mps" if mps else "cpu"


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device(auto_device_kind(torch.cuda.is_available(), mps_available()))
    from make_your_3d.errors import Make3DError

    if name.startswith("cuda") and not torch.cuda.is_available():
        raise Make3DError("CUDA was requested but no CUDA GPU is available; use --device cpu or auto.", code="no_gpu")
    if name == "mps" and not mps_available():
        raise Make3DError("Apple's GPU (mps) was requested but this torch cannot use it here (it needs an Apple Silicon Mac "
                          "and macOS 12.3 or newer); use --device cpu or auto.", code="no_gpu")
    return torch.device(name)


def resolve_dtype(device: torch.device, precision: str = "auto") -> torch.dtype:
    """`auto` is AUTO_PRECISION's (fp16 on CUDA and MPS, fp32 on the CPU); an explicit precision is
    honoured on any device (bf16 on the CPU is how the tests exercise the half-precision code paths
    without a GPU)."""
    explicit = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if precision in explicit:
        return explicit[precision]
    if precision != "auto":
        from make_your_3d.errors import BadRequest

        raise BadRequest(f"Unknown precision {precision!r}; use auto, fp32, fp16 or bf16.")
    return AUTO_PRECISION.get(device.type, torch.float32)
