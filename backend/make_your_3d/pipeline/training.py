"""Mixed precision for the two optimisations: half-precision forward, fp32 master weights.

The frozen networks run in the pipeline's dtype (fp16/bf16 on a GPU); the few trained parameters
are kept in fp32 so that small Adam updates are not rounded away. Autocast makes the forward
mix the two: on CUDA for fp16/bf16, and on the CPU for bf16/fp16 (how the tests run this path).
"""

from __future__ import annotations

import contextlib
import math

import torch

from make_your_3d.pipeline.presets import LR_SCHEDULES


def diffusion_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What a diffusion UNet learns to predict, from the scheduler's `prediction_type`: the noise
    (epsilon, SD 1.5 and Wonder3D) or the velocity. Shared by both trainers' losses."""
    prediction = scheduler.config.prediction_type
    if prediction == "epsilon":
        return noise
    if prediction == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {prediction!r}")


def training_autocast(device: torch.device, dtype: torch.dtype):
    """The autocast context for a forward of a `dtype` network with fp32 trained parameters."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


class OptimizerStep:
    """One optimisation step; with fp16 a dynamic loss scale keeps small gradients from flushing to
    zero (bf16 has fp32's range and needs none). Shared by both trainers."""

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device, dtype: torch.dtype, max_grad_norm: float | None = None):
        self.optimizer = optimizer
        self.max_grad_norm = max_grad_norm  # clip the gradient's global norm (None: no clipping)
        self.scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None

    def __call__(self, loss: torch.Tensor) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            self._clip()
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)  # clip the true gradient, not the scaled one
            self._clip()
            self.scaler.step(self.optimizer)  # skipped when a gradient overflowed
            self.scaler.update()
        return float(loss.detach())

    def _clip(self) -> None:
        if self.max_grad_norm is not None:
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)


WARMUP_STEPS = 100  # "constant_with_warmup": Wonder3D stage 2's lr_warmup_steps


def lr_scheduler(optimizer: torch.optim.Optimizer, kind: str, steps: int):
    """The learning-rate schedule of a run of `steps` optimiser steps (None for "constant"): step i
    uses lr x f(i / steps), f = (1 + cos(pi x))/2 for "cosine", 1 - x for "linear", so the first
    step has the full rate and the last a small one; "constant_with_warmup" rises linearly over the
    first WARMUP_STEPS steps, as diffusers' `get_constant_schedule_with_warmup` (Wonder3D's) does.
    Shared by both trainers' `train`."""
    if kind not in LR_SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {kind!r}; use one of {', '.join(LR_SCHEDULES)}")
    if kind == "constant":
        return None

    def factor(i: int) -> float:
        if kind == "constant_with_warmup":
            return min(1.0, i / WARMUP_STEPS)
        x = min(i / max(1, steps), 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * x)) if kind == "cosine" else 1.0 - x

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
