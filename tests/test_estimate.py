"""Issue 28.2: the expected duration before a job, from measured seconds per step (the CPU) and the
FLOP count per stage, with a plain warning over 15 minutes that offers the fast preset."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from make_your_3d import estimate as est
from make_your_3d.pipeline.presets import PRESETS

REPO = Path(__file__).resolve().parents[1]


def test_preset_steps_match_the_presets() -> None:
    """estimate.py keeps the presets' step fields (it must stay standard library only for the add-on)."""
    assert set(est.PRESET_STEPS) == set(PRESETS)
    for name, preset in PRESETS.items():
        want = {"mv_steps": preset.mv_steps, "mv_rows": 2 if preset.mv_guidance > 1 else 1, "identity_steps": preset.identity_steps,
                "identity_batch": preset.identity_batch, "prior_steps": preset.prior_steps, "sd_steps": preset.sd_steps}
        assert est.PRESET_STEPS[name] == want, name


def test_cpu_figures_follow_the_measured_step() -> None:
    """The default preset's two multi-view sampling stages are 2 x 50 real UNet steps: at the measured
    27.72 s per step that is about 46 min; the estimate (FLOP-scaled) must agree within 10%."""
    mv = (est.DEFAULT_TFLOP["subject_views"] + est.DEFAULT_TFLOP["multiview"]) * est.CPU_S_PER_TFLOP
    assert abs(mv - 100 * 27.72) / (100 * 27.72) < 0.10, mv
    default = est.estimate("default", "cpu")
    assert default.measured and default.warn and 3 * 3600 < default.seconds < 12 * 3600, default
    assert "h on a CPU" in default.text and "the fast preset takes about" in default.text, default.text
    fast = est.estimate("fast", "cpu")
    assert fast.seconds < default.seconds < est.estimate("quality", "cpu").seconds


def test_gpu_bound_says_it_was_never_measured() -> None:
    gpu = est.estimate("default", "cuda")
    assert not gpu.measured and "never measured" in gpu.text and not gpu.warn, gpu
    assert est.estimate("nonsense", "cpu") is None and est.estimate("default", "mps") is None
    assert est.duration_text(30) == "about 30 s" and est.duration_text(20 * 60) == "about 20 min"
    assert est.duration_text(3 * 3600) == "about 3.0 h"


def test_cli_generate_states_the_duration_before_the_job(tmp_path: Path) -> None:
    """Printed before any model loads (here the weights are missing, so the job then stops)."""
    models = tmp_path / "models"
    models.mkdir()
    env = dict(os.environ, PYTHONPATH=str(REPO / "backend"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "make_your_3d", "generate", str(REPO / "examples" / "toy_bear.png"),
                          "--prompt", "wearing a red scarf", "--out", str(tmp_path / "out"), "--models", str(models),
                          "--device", "cpu", "--cache", str(tmp_path / "cache")], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 2 and "error [weights_missing]" in run.stderr, run.stdout + run.stderr
    line = next((ln for ln in run.stdout.splitlines() if "Expected duration" in ln), "")
    assert line.startswith("WARNING: Expected duration: about ") and "--preset fast" in line, run.stdout
