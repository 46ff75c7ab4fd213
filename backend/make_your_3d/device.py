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
    if precision == "fp32" or device.type != "cuda":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    return torch.float16
