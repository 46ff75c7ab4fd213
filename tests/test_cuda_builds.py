"""Issue 28.1: the PyTorch CUDA build for the card and driver, one table for Install Backend and doctor."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from make_your_3d import cuda_builds as cb

REPO = Path(__file__).resolve().parents[1]
MODULE = REPO / "backend" / "make_your_3d" / "cuda_builds.py"

CARDS = {  # current GeForce/RTX generations: name, compute capability
    "NVIDIA GeForce GTX 1080": "6.1",
    "NVIDIA GeForce RTX 2080 SUPER": "7.5",
    "NVIDIA GeForce RTX 3060": "8.6",
    "NVIDIA GeForce RTX 4090": "8.9",
    "NVIDIA GeForce RTX 5090": "12.0",
}
DRIVERS = {"535.183.01": (12, 2), "560.35.03": (12, 6), "570.86.10": (12, 8), "580.95.05": (13, 0)}
# expected build tag per (compute capability, driver); None = no build, the fallback sentence
EXPECTED = {
    ("6.1", "535.183.01"): None, ("6.1", "560.35.03"): "cu126", ("6.1", "570.86.10"): "cu126", ("6.1", "580.95.05"): "cu126",
    ("7.5", "535.183.01"): None, ("7.5", "560.35.03"): "cu126", ("7.5", "570.86.10"): "cu126", ("7.5", "580.95.05"): "cu130",
    ("8.6", "535.183.01"): None, ("8.6", "560.35.03"): "cu126", ("8.6", "570.86.10"): "cu126", ("8.6", "580.95.05"): "cu130",
    ("8.9", "535.183.01"): None, ("8.9", "560.35.03"): "cu126", ("8.9", "570.86.10"): "cu126", ("8.9", "580.95.05"): "cu130",
    ("12.0", "535.183.01"): None, ("12.0", "560.35.03"): None, ("12.0", "570.86.10"): None, ("12.0", "580.95.05"): "cu130",
}


@pytest.mark.parametrize("name,cc", CARDS.items())
@pytest.mark.parametrize("driver", DRIVERS)
def test_choice_table_cards_and_drivers(name: str, cc: str, driver: str) -> None:
    plain = f"| NVIDIA-SMI {driver}   Driver Version: {driver}   CUDA Version: {DRIVERS[driver][0]}.{DRIVERS[driver][1]}     |"
    gpu = cb.parse_nvidia_smi(f"{name}, {cc}, {driver}\n", plain)
    assert gpu is not None and gpu.driver_cuda == DRIVERS[driver] and gpu.name == name
    choice = cb.choose(gpu)
    want = EXPECTED[(cc, driver)]
    if want is None:
        assert choice.build is None
        # the fallback says what to do: which driver, and that the CPU runs meanwhile
        assert "update the driver to version" in choice.message and "CPU" in choice.message, choice.message
        assert name in choice.message
    else:
        assert choice.build is not None and choice.build.tag == want, (name, driver, choice)
        assert choice.build.index_url == f"https://download.pytorch.org/whl/{want}"
        assert choice.build.pip_args == [f"torch=={cb.TORCH_VERSION}", "--index-url", choice.build.index_url]
        assert name in choice.message and want in choice.message


def test_rtx50_needs_cuda_12_8_or_newer_and_the_tested_torch() -> None:
    """Blackwell (12.0) has no kernels in builds older than CUDA 12.8; the pin is the tested version."""
    gpu = cb.parse_nvidia_smi("NVIDIA GeForce RTX 5070 Ti, 12.0, 581.57")  # no plain header: driver branch table
    assert gpu.driver_cuda == (13, 0)
    build = cb.choose(gpu).build
    assert build is not None and build.cuda >= (12, 8)
    assert all(b.cuda >= (12, 8) for b in cb.BUILDS if b.min_cc <= (12, 0) and (12, 0) <= b.max_cc)
    assert cb.TORCH_VERSION == "2.13.0"
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert f"torch=={cb.TORCH_VERSION}" in readme  # the version the README installs and the project is tested with


def test_parse_nvidia_smi_odd_output() -> None:
    assert cb.parse_nvidia_smi("") is None
    assert cb.parse_nvidia_smi("No devices were found\n") is None
    assert cb.parse_nvidia_smi("NVIDIA GeForce RTX 3060, [N/A], 560.35.03") is None
    gpu = cb.parse_nvidia_smi("NVIDIA RTX A4000, 8.6, 999.1\n")  # a driver newer than the table knows
    assert gpu.driver_cuda == (13, 0) and cb.choose(gpu).build.tag == "cu130"
    assert cb.parse_nvidia_smi("Tesla K80, 3.7, 470.82.01").driver_cuda is None
    assert cb.choose(cb.parse_nvidia_smi("Tesla K80, 3.7, 470.82.01")).build is None


def test_one_copy_standard_library_only() -> None:
    """The add-on loads this very file by path (it never imports the backend): stdlib imports only,
    and no other file of the add-on or backend names a PyTorch CUDA index."""
    tree = ast.parse(MODULE.read_text(encoding="utf-8"))
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}, imported
    for path in [*(REPO / "blender_addon").glob("*.py"), *(REPO / "backend").rglob("*.py")]:
        if path != MODULE:
            text = path.read_text(encoding="utf-8")
            assert "download.pytorch.org" not in text, path


def test_verify_script_names_card_and_build_on_failure(tmp_path: Path) -> None:
    """After install one small matmul runs on the GPU; here (no CUDA) it must fail with a clear ERROR line."""
    import subprocess

    import torch

    src = cb.verify_script("NVIDIA GeForce RTX 5090", "cu130")
    out = subprocess.run([sys.executable, "-c", src], capture_output=True, text=True, timeout=120)
    if torch.cuda.is_available():
        assert out.returncode == 0 and "GPU check passed" in out.stdout, out.stdout + out.stderr
    else:
        assert out.returncode == 1, out.stdout + out.stderr
        line = out.stdout.strip().splitlines()[-1]
        assert line.startswith("ERROR: the PyTorch cu130 build cannot run on the NVIDIA GeForce RTX 5090"), line
        assert "Traceback" not in out.stdout + out.stderr


def test_doctor_names_the_fitting_build() -> None:
    """doctor reads the same table: on a CPU-only torch with an RTX 50 card it gives the cu130 command."""
    import torch

    from make_your_3d.doctor import gpu_report

    gpu = cb.parse_nvidia_smi("NVIDIA GeForce RTX 5090, 12.0, 580.95.05")
    lines = gpu_report(gpu, probe=False)
    text = "\n".join(lines)
    assert "RTX 5090, compute capability 12.0, driver 580.95.05" in text, text
    if not torch.cuda.is_available():
        assert "cu124" not in text
        assert f"pip install torch=={cb.TORCH_VERSION} --index-url https://download.pytorch.org/whl/cu130" in text, text
