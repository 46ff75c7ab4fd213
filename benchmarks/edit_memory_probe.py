"""Resident memory and seconds of the personalized model's img2img edits at the published sizes, in one
process: after loading (bf16, from the fp16 files of `models/random_set.py`) and per edit call (512 px,
one img2img step at strength 0.8, batch 1, guidance 7.5), with a 20 ms RSS sampler. This is how the
float32 cast of diffusers' `from_pipe` was found (pipeline/edits.py): with it, RSS grew by the
pipeline's size on the first edit and stayed there.

    OMP_NUM_THREADS=1 PYTHONPATH=backend python benchmarks/edit_memory_probe.py MODELS [CALLS]
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import psutil
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def status_gb() -> dict[str, float]:
    """VmRSS / RssAnon / RssFile / VmHWM of this process, GB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS", "RssAnon", "RssFile", "VmHWM")):
            key, value = line.split(":")
            out[key] = round(int(value.split()[0]) * 1024 / 1e9, 2)
    return out


def main() -> None:
    sys.path.insert(0, str(REPO / "backend"))
    from make_your_3d.models.personalized import load_personalized
    from make_your_3d.pipeline.edits import edit_images

    models, calls = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 3
    proc, peak = psutil.Process(), [0]

    def sample() -> None:
        while True:
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.02)

    threading.Thread(target=sample, daemon=True).start()
    t0 = time.perf_counter()
    pipe = load_personalized(models, torch.device("cpu"), torch.bfloat16)
    print("loaded", round(time.perf_counter() - t0), "s, peak", round(peak[0] / 1e9, 2), "GB", status_gb(), flush=True)
    pipe.vae.enable_slicing()
    image = Image.open(REPO / "examples" / "toy_bear.png")
    for i in range(calls):
        peak[0], t0 = 0, time.perf_counter()
        edit_images(pipe, [image], ["a toy bear, front view, wearing a red scarf"], "ugly", size=512, steps=2, guidance=7.5, strength=0.8,
                    seed=i, batch=1)
        print("edit", i, round(time.perf_counter() - t0), "s, peak", round(peak[0] / 1e9, 2), "GB", status_gb(), "unet", pipe.unet.dtype, flush=True)


if __name__ == "__main__":
    main()
