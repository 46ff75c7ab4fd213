"""Issue 28.4: check before you work. Every place a job writes is probed before any model loads, and
after `demo` a missing-weights error names the tiny set it wrote and the download size.

Tests may run as root, where chmod does not stop a write; the unwritable folders here are ones no
user can create: a path under a regular file (NotADirectoryError for everyone) and, on Linux, a folder
inside /proc (procfs refuses new files, root included)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest

from make_your_3d.errors import OutputUnwritable, WeightsMissing
from make_your_3d.files import check_writable

REPO = Path(__file__).resolve().parents[1]
IMAGE = REPO / "examples" / "toy_bear.png"


def _blocked(tmp_path: Path) -> Path:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    return blocker / "out"


def test_check_writable_really_writes(tmp_path: Path) -> None:
    check_writable(tmp_path / "new" / "deeper", "output folder")  # missing folders below a writable one are fine
    assert not (tmp_path / "new").exists() and not list(tmp_path.iterdir())  # the probe leaves nothing behind
    with pytest.raises(OutputUnwritable, match="is a file, not a folder") as info:
        check_writable(_blocked(tmp_path), "output folder")
    assert info.value.code == "output_unwritable"
    if sys.platform.startswith("linux") and Path("/proc/self").is_dir():
        with pytest.raises(OutputUnwritable, match="is not writable"):
            check_writable(Path("/proc/self/make_your_3d_out"), "output folder")


def test_cli_unwritable_output_fails_in_under_a_second(tmp_path: Path) -> None:
    """`generate --out` on a folder that cannot be made: the error table's sentence, no traceback, and
    the check itself (argument checks, before torch is imported) takes well under a second."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "backend"), HF_HUB_OFFLINE="1")
    for out in [_blocked(tmp_path)] + ([Path("/proc/self/make_your_3d_out")] if sys.platform.startswith("linux") else []):
        t0 = time.monotonic()
        run = subprocess.run([sys.executable, "-m", "make_your_3d", "generate", str(IMAGE), "--prompt", "wearing a red scarf",
                              "--out", str(out), "--models", str(tmp_path)], capture_output=True, text=True, timeout=60, env=env)
        took = time.monotonic() - t0
        assert run.returncode == 2, run.stdout + run.stderr
        assert run.stderr.startswith("error [output_unwritable]: The output folder"), run.stderr
        assert "Traceback" not in run.stderr and "torch" not in sys.modules.get("__none__", "")
        assert took < 3.0, took  # interpreter start included; the check alone is timed below
    t0 = time.monotonic()
    with pytest.raises(OutputUnwritable):
        from make_your_3d.cli import checks

        checks.check_args(Namespace(command="generate", image=str(IMAGE), models=None, out=str(_blocked(tmp_path)),
                                    cache=None, prompt="x"))
    assert time.monotonic() - t0 < 1.0


def test_generator_checks_job_folder_and_cache_before_models(tmp_path: Path) -> None:
    """The service's path (no CLI checks): Generator.run refuses an unwritable stage cache or job
    folder parent before it looks at weights or loads a model (an empty models folder here)."""
    from make_your_3d.pipeline.generate import Generator
    from make_your_3d.pipeline.request import GenerateRequest

    request = GenerateRequest(image=IMAGE.read_bytes(), prompt="wearing a red scarf", seed=0, preset="fast")
    for cache, out in ((_blocked(tmp_path), tmp_path / "jobs" / "j1"), (tmp_path / "cache", _blocked(tmp_path) / "j1")):
        gen = Generator(tmp_path / "no_models", cache, "cpu")
        t0 = time.monotonic()
        with pytest.raises(OutputUnwritable) as info:
            gen.run(request, out)
        assert time.monotonic() - t0 < 1.0
        assert info.value.code == "output_unwritable" and not gen.host._loaded
        assert ("stage cache folder" if cache.parent.is_file() else "output folder") in info.value.message


def test_missing_weights_after_demo_names_tiny_set_size_and_free_space(tmp_path: Path, monkeypatch, capsys) -> None:
    """`demo` without weights records its tiny set; `generate` then says where it is and how to use it,
    and gives `models fetch` with the download size and the free disk space."""
    from make_your_3d.cli import commands
    from make_your_3d.models import registry, tiny
    from make_your_3d.pipeline import generate as gen_mod

    models = tmp_path / "models"

    class _NoRun:  # the demo's chain is covered elsewhere (test_cli); here only what it records
        def __init__(self, *a, **k) -> None:
            pass

        def run(self, request, target, progress=None):
            return Namespace(timings={"total": 0.0})

    def marker_only(path, seed=0):
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / registry.TINY_MARKER).write_text("tiny")

    monkeypatch.setattr(gen_mod, "Generator", _NoRun)
    monkeypatch.setattr(tiny, "write_tiny_set", marker_only)
    commands.demo(Namespace(out=str(tmp_path / "demo"), models=str(models), cache=str(tmp_path / "cache"), device="cpu"))
    shown = capsys.readouterr().out
    assert "models fetch` (about 8.9 GB)" in shown, shown
    monkeypatch.undo()

    request = gen_mod.GenerateRequest(image=IMAGE.read_bytes(), prompt="wearing a red scarf", seed=0, preset="fast")
    with pytest.raises(WeightsMissing) as info:
        gen_mod.Generator(models, tmp_path / "cache", "cpu").run(request, tmp_path / "out" / "j")
    msg = info.value.message
    tiny_dir = (tmp_path / "demo" / "tiny-models").resolve()
    assert f"The demo wrote a TINY model set to {tiny_dir}" in msg and f"--models {tiny_dir}" in msg, msg
    assert "`make-your-3d models fetch`" in msg and "about 8.9 GB" in msg and "GB free on the disk of" in msg, msg
    assert registry.download_bytes() == 8_919_497_542  # 2 bytes x the published configs' 4.46e9 parameters
