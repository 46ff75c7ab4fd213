"""The loaded models of a long-lived backend, lent to one stage at a time in a known state.

Loading the models takes most of a short job, so one `ModelHost` keeps them between jobs (the
service holds it for its whole life). That makes the models the one place where a job could leave
state for the next: an IP-Adapter scale, fine-tuned adapter weights, an enabled LoRA, training
mode, a parameter left trainable. So a stage never touches a loaded model directly: it borrows it
through a context manager of `StageModels` that SETS every piece of state the stage relies on when
it is entered (whatever the previous user left) and puts the original back when it is left. The
state a stage may ask for is the context manager's arguments; nothing else is left to chance.

What stays between jobs, and why that is safe: the modules' original weights (never trained in
place: the trained parameters are reloaded from the snapshot or the stage's file on every
borrow), the CLIP feature extractor (stateless), the schedulers' configs (every sampler builds a
fresh scheduler from them), the peft adapter's *slots* (their weights are re-drawn or reloaded
on every borrow).
"""

from __future__ import annotations

import gc
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from make_your_3d.errors import Make3DError, WeightsBroken, WeightsMissing
from make_your_3d.models.registry import ROLES
from make_your_3d.pipeline.stages import UndeclaredInput


class ModelHost:
    """Loads models on first use and keeps them (per precision) until `unload`."""

    def __init__(self, models_dir: str | Path, device: torch.device):
        self.models_dir = Path(models_dir)
        self.device = device
        self._loaded: dict[str, object] = {}
        self._original_ip: dict[str, torch.Tensor] | None = None  # the published to_k_ip/to_v_ip weights

    def load(self, name: str, dtype: torch.dtype, offload: bool = False):
        """A loaded model, built on first use. With `offload` (the lowvram preset) only the one in use
        occupies the device: on CUDA every other loaded model is moved to the CPU first; on the CPU
        and Apple's GPU (one memory: moving would free nothing) the others are dropped and load
        again, memory-mapped, when asked for."""
        key = f"{name}:{dtype}"
        if offload and self.device.type != "cuda":
            self.release({name, "segmenter"})
        if key not in self._loaded:
            for other in [k for k in self._loaded if k.startswith(f"{name}:")]:
                del self._loaded[other]  # precision changed between presets
            if offload:
                self._evict(keep=None)
            self._loaded[key] = self._build_checked(name, dtype)
        elif offload:
            self._evict(keep=key)
            self._loaded[key].to(self.device)
        return self._loaded[key]

    def has_segmenter(self) -> bool:
        return ROLES["segmenter"].complete(self.models_dir)

    @property
    def original_ip(self) -> dict[str, torch.Tensor]:
        assert self._original_ip is not None, "the personalized model is not loaded"
        return self._original_ip

    def unload(self) -> None:
        """Drop every loaded model and free GPU memory."""
        self._loaded.clear()
        self._original_ip = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def release(self, keep: set[str]) -> list[str]:
        """Drop every loaded model whose role is not in `keep` (the roles the next stage declares), so
        only what that stage needs is in memory; returns the dropped roles. They load again, from the
        memory-mapped safetensors, when a later stage asks for them."""
        dropped = [key for key in self._loaded if key.split(":")[0] not in keep]
        for key in dropped:
            del self._loaded[key]
            if key.startswith("personalized:"):
                self._original_ip = None
        if dropped:
            gc.collect()  # diffusers pipelines hold reference cycles
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        return [key.split(":")[0] for key in dropped]

    def _evict(self, keep: str | None) -> None:
        if self.device.type != "cuda":
            return
        for key, model in self._loaded.items():
            if key != keep and hasattr(model, "to") and not key.startswith("segmenter:"):
                model.to("cpu")
        torch.cuda.empty_cache()

    def _build_checked(self, name: str, dtype: torch.dtype):
        """`_build`, with a loader failure on files that are all present reported as damaged weights
        of that role (a truncated or corrupted file fails deep inside safetensors/diffusers)."""
        try:
            return self._build(name, dtype)
        except (WeightsBroken, MemoryError, torch.cuda.OutOfMemoryError):
            raise
        except Exception as exc:
            if isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower():
                raise
            # a loader's own WeightsMissing while every file is present means a damaged file
            if isinstance(exc, Make3DError) and not (isinstance(exc, WeightsMissing) and not ROLES[name].missing(self.models_dir)):
                raise
            raise WeightsBroken(
                f"The {name} model's weights in {ROLES[name].path(self.models_dir)} could not be loaded ({type(exc).__name__}: "
                f"{str(exc)[:200]}). Run `make-your-3d models verify` to find the damaged file, then "
                f"`make-your-3d models fetch --role {name}` to fetch it again."
            ) from exc

    def _build(self, name: str, dtype: torch.dtype):
        if name == "personalized":
            from make_your_3d.models.personalized import ip_adapter_parameters, load_personalized

            pipe = load_personalized(self.models_dir, self.device, dtype)
            self._original_ip = {k: v.detach().clone() for k, v in ip_adapter_parameters(pipe.unet).items()}
            return pipe
        if name == "multiview":
            from make_your_3d.models.multiview import load_multiview

            return load_multiview(ROLES["multiview"].path(self.models_dir), self.device, dtype)
        if name == "normal_estimator":
            from make_your_3d.models.normals import load_normal_estimator

            return load_normal_estimator(ROLES["normal_estimator"].path(self.models_dir), self.device, dtype)
        if name == "segmenter":
            from make_your_3d.models.segmenter import load_segmenter

            return load_segmenter(ROLES["segmenter"].path(self.models_dir), self.device)
        raise KeyError(name)


def _frozen(*modules: torch.nn.Module) -> None:
    for module in modules:
        module.requires_grad_(False)
        module.eval()


class StageModels:
    """The models one stage declared, each borrowed in the state the stage asks for."""

    def __init__(self, host: ModelHost, stage: str, roles: tuple[str, ...], segmenter: bool, dtype: torch.dtype, offload: bool):
        self._host, self._stage, self._roles, self._segmenter = host, stage, roles, segmenter
        self.dtype, self.offload = dtype, offload

    def _need(self, role: str) -> None:
        if role not in self._roles:
            raise UndeclaredInput(f"stage {self._stage} uses the {role} model but does not declare it (pipeline/stages.py)")

    @contextmanager
    def personalized(self, *, ip_state: dict[str, torch.Tensor] | None = None, ip_scale: float = 1.0) -> Iterator:
        """SD 1.5 + IP-Adapter with the given adapter projections (None: the published ones) at
        `ip_scale` (1.0: as the adapter was trained), frozen and in eval mode."""
        from make_your_3d.pipeline.identity import load_ip_state

        self._need("personalized")
        pipe = self._host.load("personalized", self.dtype, self.offload)
        load_ip_state(pipe.unet, ip_state if ip_state is not None else self._host.original_ip)
        pipe.set_ip_adapter_scale(ip_scale)
        pipe.vae.enable_slicing()  # a batch of 512 px images through the VAE one at a time: its largest buffers
        _frozen(pipe.unet, pipe.vae, pipe.text_encoder, pipe.image_encoder)
        try:
            yield pipe
        finally:
            load_ip_state(pipe.unet, self._host.original_ip)
            pipe.set_ip_adapter_scale(1.0)
            _frozen(pipe.unet)

    @contextmanager
    def multiview(self, *, lora: dict[str, torch.Tensor] | None = None, rank: int | None = None) -> Iterator:
        """The multi-view model with the subject-prior LoRA `lora` of `rank` enabled (None: the
        original model, every adapter disabled), frozen and in eval mode."""
        from make_your_3d.pipeline.subject_prior import use_adapter

        self._need("multiview")
        mv = self._host.load("multiview", self.dtype, self.offload)
        use_adapter(mv.unet, lora, rank)
        mv.vae.enable_slicing()  # the 12 decoded views (6 colour + 6 normal) one at a time
        _frozen(mv.unet, mv.vae, mv.image_encoder)
        try:
            yield mv
        finally:
            use_adapter(mv.unet, None, rank)
            _frozen(mv.unet)

    @contextmanager
    def normal_estimator(self) -> Iterator:
        """The single-view normal estimator (Marigold), frozen and in eval mode."""
        self._need("normal_estimator")
        pipe = self._host.load("normal_estimator", self.dtype, self.offload)
        pipe.vae.enable_slicing()  # 768 px images through the VAE one at a time
        _frozen(pipe.unet, pipe.vae)
        yield pipe

    def segmenter(self):
        """The background remover (stateless), or None when its optional role is not installed."""
        if not self._segmenter:
            raise UndeclaredInput(f"stage {self._stage} uses the segmenter but does not declare uses_segmenter (pipeline/stages.py)")
        return self._host.load("segmenter", torch.float32) if self._host.has_segmenter() else None
