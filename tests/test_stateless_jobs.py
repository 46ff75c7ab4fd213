"""Every job independent of the last (issue 22): a job run after others in one long-lived process
writes, stage by stage, the same bytes as the same job alone in a fresh process.

The sequence is built to hit each way one job could leak into the next: a new subject after an
edit (and after a LoRA job: its frozen-model views must not see the LoRA), job overrides of the
IP-Adapter scale 0 and 1, a `quality` job after a `fast` one, a LoRA rank change, and torch's,
numpy's and Python's global generators scrambled between jobs. Each job has its own stage cache, so
every stage really runs in both places; the files are compared through the cache entries' records
(sha256 of every file).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from make_your_3d.pipeline.cache import RECORD
from make_your_3d.pipeline.generate import STAGES, Generator
from make_your_3d.pipeline.presets import TEST_OVERRIDES
from make_your_3d.pipeline.request import GenerateRequest

# (name, image, prompt, seed, preset, job overrides, generator overrides on top of the tiny sizes)
JOBS = [
    ("first", "bear", "wearing a red scarf", 1, "default", None, {}),
    ("new_subject", "bear2", "made of gold", 2, "default", None, {}),
    ("ip_scale_0", "bear", "wearing a red scarf", 1, "default", {"ip_scale": 0.0}, {}),
    ("ip_scale_1", "bear2", "wearing a red scarf", 3, "default", {"ip_scale": 1.0}, {}),
    ("fast_rank3", "bear", "made of gold", 1, "fast", None, {"lora_rank": 3}),
    ("quality", "bear2", "wearing a red scarf", 2, "quality", None, {}),
]

FRESH_RUNNER = """
import json, sys
from pathlib import Path
from make_your_3d.pipeline.generate import Generator
from make_your_3d.pipeline.request import GenerateRequest
job = json.loads(sys.argv[1])
gen = Generator(job["models"], job["cache"], "cpu", overrides=job["gen_overrides"])
req = GenerateRequest(image=Path(job["image"]).read_bytes(), prompt=job["prompt"], seed=job["seed"], preset=job["preset"],
                      overrides=job["overrides"])
gen.run(req, job["out"])
"""


def _images(example_image: Path, folder: Path) -> dict[str, Path]:
    """The example bear and a second subject (mirrored, colours rotated)."""
    bear = Image.open(example_image).convert("RGBA")
    r, g, b, a = bear.split()
    second = Image.merge("RGBA", (b, r, g, a)).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    paths = {"bear": folder / "bear.png", "bear2": folder / "bear2.png"}
    bear.save(paths["bear"])
    second.save(paths["bear2"])
    return paths


def _entries(cache: Path) -> dict[str, tuple[str, dict]]:
    """stage -> (key, {file: sha256}) of every entry in a one-job cache."""
    out = {}
    for record in cache.glob(f"*/*/{RECORD}"):
        files = json.loads(record.read_text())["files"]
        out[record.parent.parent.name] = (record.parent.name, {k: v["sha256"] for k, v in files.items()})
    return out


def _scramble_global_rngs(i: int) -> None:
    torch.manual_seed(1000 + i)
    torch.rand(17)
    np.random.seed(2000 + i)
    random.seed(3000 + i)


@pytest.mark.slow
def test_a_job_after_others_in_one_process_equals_the_job_alone_in_a_fresh_process(tiny_models: Path, example_image: Path, tmp_path: Path):
    images = _images(example_image, tmp_path)
    gens: dict[str, Generator] = {}
    host = None
    for i, (name, image, prompt, seed, preset, overrides, gen_overrides) in enumerate(JOBS):
        _scramble_global_rngs(i)
        gen = Generator(tiny_models, tmp_path / "seq" / name, "cpu", overrides={**TEST_OVERRIDES, **gen_overrides}, host=host)
        host = gen.host  # one set of loaded models for the whole sequence, as in `serve`
        request = GenerateRequest(image=images[image].read_bytes(), prompt=prompt, seed=seed, preset=preset, overrides=overrides)
        assert gen.run(request, tmp_path / "seq-out" / name).cached_stages == []
        gens[name] = gen

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs = []
    for name, image, prompt, seed, preset, overrides, gen_overrides in JOBS:
        job = {"models": str(tiny_models), "cache": str(tmp_path / "fresh" / name), "out": str(tmp_path / "fresh-out" / name),
               "image": str(images[image]), "prompt": prompt, "seed": seed, "preset": preset, "overrides": overrides,
               "gen_overrides": {**TEST_OVERRIDES, **gen_overrides}}
        procs.append((name, subprocess.Popen([sys.executable, "-c", FRESH_RUNNER, json.dumps(job)], env=env,
                                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)))
        if len(procs) % 2 == 0:  # two at a time: the CI machine has two cores
            for _, p in procs[-2:]:
                p.wait(timeout=300)
    for name, p in procs:
        assert p.wait(timeout=300) == 0, f"{name}: {p.stderr.read().decode()[-2000:]}"

    for name, *_ in JOBS:
        seq, fresh = _entries(tmp_path / "seq" / name), _entries(tmp_path / "fresh" / name)
        assert sorted(seq) == sorted(fresh) == sorted(STAGES), name
        for stage in STAGES:
            assert seq[stage][0] == fresh[stage][0], f"{name}/{stage}: keys differ"
            differing = sorted(f for f in seq[stage][1] if seq[stage][1][f] != fresh[stage][1].get(f))
            assert not differing, f"{name}/{stage}: {differing[:5]} differ between the sequence and a fresh process"


def test_every_job_of_the_sequence_really_differs(tiny_models: Path, example_image: Path, tmp_path: Path):
    """The sequence test can fail: the IP-Adapter scale of the edits reaches their output (so a scale
    left over from the previous job would show), and a LoRA left enabled changes the frozen views."""
    from make_your_3d.pipeline.model_host import ModelHost, StageModels
    from make_your_3d.pipeline.multiview_views import generate_views
    from make_your_3d.pipeline.presets import resolve_preset
    from make_your_3d.pipeline.subject_prior import ensure_adapter, lora_parameters
    from make_your_3d.progress import Reporter

    host = ModelHost(tiny_models, torch.device("cpu"))
    models = StageModels(host, "probe", ("multiview", "personalized"), False, torch.float32, False)
    preset = resolve_preset("default", tiny_models)
    subject = Image.open(example_image).convert("RGBA").resize((preset.mv_size, preset.mv_size))
    with models.multiview(lora=None) as mv:
        before = generate_views(mv, subject, preset, 0, Reporter("probe")).views[0].color
        ensure_adapter(mv.unet, preset.lora_rank)
        with torch.no_grad():
            for p in lora_parameters(mv.unet).values():
                p.fill_(0.05)
        mv.unet.enable_adapters()
        leaked = generate_views(mv, subject, preset, 0, Reporter("probe")).views[0].color
    with models.multiview(lora=None) as mv:  # entering again sets the state back: the adapter is off
        after = generate_views(mv, subject, preset, 0, Reporter("probe")).views[0].color
    assert not np.array_equal(before, leaked)
    assert np.array_equal(before, after)

    with models.personalized(ip_scale=0.0) as pipe:
        scales = {p.scale[0] for p in pipe.unet.attn_processors.values() if hasattr(p, "scale")}
    assert scales == {0.0}
    with models.personalized() as pipe:  # a borrower that states no scale gets the trained one, 1.0
        scales = {p.scale[0] for p in pipe.unet.attn_processors.values() if hasattr(p, "scale")}
    assert scales == {1.0}
