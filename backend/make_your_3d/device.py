"""Device and precision choice: fp16 on CUDA, fp32 on CPU (half precision is slow and lossy there)."""

from __future__ import annotations

import torch


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        from make_your_3d.errors import Make3DError

        raise Make3DError("CUDA was requested but no CUDA GPU is available; use --device cpu or auto.", code="no_gpu")
    return torch.device(name)


def resolve_dtype(device: torch.device, precision: str = "auto") -> torch.dtype:
    """`auto` is fp16 on CUDA and fp32 elsewhere; an explicit precision is honoured on any device
    (bf16 on the CPU is how the tests exercise the half-precision code paths without a GPU)."""
    explicit = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if precision in explicit:
        return explicit[precision]
    if precision != "auto":
        from make_your_3d.errors import BadRequest

        raise BadRequest(f"Unknown precision {precision!r}; use auto, fp32, fp16 or bf16.")
    return torch.float16 if device.type == "cuda" else torch.float32
