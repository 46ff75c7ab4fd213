"""`make-your-3d doctor --selftest`: does the whole chain run on this device, and how fast?

An artist on Windows or a Mac learns in a minute, before fetching any weights, whether the backend
works on the device and precision they picked: the tiny model set (real architectures, random
weights) goes through every stage, from the subject image to a GLB, which is then checked. The
report gives pass or fail, the seconds and the peak memory of that device. Nothing here raises: a
failure is part of the report, in a sentence.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

@dataclass(frozen=True)
class SelfTest:
    passed: bool
    device: str
    precision: str
    seconds: float
    peak_gib: float | None  # peak memory of the device (CUDA allocated, MPS driver, CPU resident)
    detail: str  # what was checked, or what failed

    def lines(self) -> list[str]:
        peak = f", peak memory {self.peak_gib:.2f} GiB" if self.peak_gib is not None else ""
        verdict = "passed" if self.passed else "FAILED"
        return [f"Self-test on {self.device} ({self.precision}): {verdict} in {self.seconds:.1f} s{peak}.", f"  {self.detail}"]


def _peak_gib(device) -> float | None:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    if device.type == "mps":
        return torch.mps.driver_allocated_memory() / 2**30
    try:
        import resource
        import sys

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return rss / (2**30 if sys.platform == "darwin" else 2**20)
    except ImportError:  # Windows
        return None


def run_selftest(device: str = "auto", precision: str = "auto", image: Path | None = None) -> SelfTest:
    """The tiny chain on `device` at `precision`, end to end, with its GLB checked."""
    t0 = time.monotonic()
    resolved, dtype_name = device, precision
    try:
        import torch
        import trimesh

        from make_your_3d.device import resolve_device, resolve_dtype
        from make_your_3d.models.tiny import write_tiny_set
        from make_your_3d.pipeline.generate import Generator
        from make_your_3d.pipeline.request import GenerateRequest

        dev = resolve_device(device)
        resolved, dtype_name = str(dev), str(resolve_dtype(dev, precision)).removeprefix("torch.")
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        with tempfile.TemporaryDirectory(prefix="make_your_3d_selftest_") as tmp:
            models = write_tiny_set(Path(tmp) / "models", seed=0)
            generator = Generator(models, Path(tmp) / "cache", str(dev), overrides={"precision": precision})
            data = image.read_bytes() if image is not None else _subject_png()
            result = generator.run(GenerateRequest(image=data, prompt="wearing a red scarf", seed=0, preset="fast"), Path(tmp) / "job")
            mesh = trimesh.load(result.out_dir / "subject.glb", force="mesh")
            if len(mesh.faces) == 0 or getattr(mesh.visual, "uv", None) is None:
                raise RuntimeError("the GLB has no faces or no UVs")
            detail = (f"every stage ran ({', '.join(k for k in result.timings if k != 'total')}); the GLB has {len(mesh.faces)} faces with UVs "
                      "(tiny random models: the picture is noise, the point is that the code runs here)")
        return SelfTest(True, resolved, dtype_name, time.monotonic() - t0, _peak_gib(dev), detail)
    except Exception as exc:  # the report is the product: a failure is a sentence, never a traceback
        message = getattr(exc, "message", None) or f"{type(exc).__name__}: {str(exc)[:300]}"
        return SelfTest(False, resolved, dtype_name, time.monotonic() - t0, None,
                        f"{message} Try another device or precision (--device cpu --precision fp32 always works), "
                        "and include this line if you report it.")


def _subject_png(size: int = 96) -> bytes:
    """A small RGBA subject drawn here (a shaded disc on transparency), so the test needs no file."""
    import io

    from PIL import Image, ImageDraw

    image = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    for r in range(size // 3, 0, -1):  # darker rim, lighter centre
        shade = 90 + int(150 * (1 - r / (size / 3)))
        draw.ellipse((size / 2 - r, size / 2 - r, size / 2 + r, size / 2 + r), fill=(shade, shade // 2, 40, 255))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()
