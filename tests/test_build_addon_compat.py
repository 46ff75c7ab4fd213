"""Issue 28.5: an artist can build the add-on zip with an older Python (macOS's system Python is 3.9),
and README says why the test extras change numpy."""

from __future__ import annotations

import glob
import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import build_addon  # noqa: E402


def _oldest_python() -> str | None:
    """The oldest Python 3.9/3.10 on this machine (pyenv, uv or PATH), or None."""
    found = []
    for pattern in ("/root/.pyenv/versions/3.9*/bin/python", "/root/.pyenv/versions/3.10*/bin/python",
                    os.path.expanduser("~/.local/share/uv/python/cpython-3.9*/bin/python3"),
                    os.path.expanduser("~/.local/share/uv/python/cpython-3.10*/bin/python3")):
        found += sorted(glob.glob(pattern))
    found += [p for p in (shutil.which("python3.9"), shutil.which("python3.10")) if p]
    return found[0] if found else None


def _build_with(cmd: list[str], out: Path) -> Path:
    run = subprocess.run([*cmd, str(REPO / "build_addon.py"), "--out", str(out)], capture_output=True, text=True, timeout=300,
                         cwd=out)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    zips = list(out.glob("make_your_3d-*.zip"))
    assert len(zips) == 1, run.stdout
    return zips[0]


def _same_as_reference(zip_path: Path) -> None:
    """The zip validates (with tomllib here) and holds the same files as one built with 3.11+."""
    assert build_addon.validate_zip(zip_path) == [], build_addon.validate_zip(zip_path)
    with zipfile.ZipFile(zip_path) as zf:
        names = set(zf.namelist())
    assert names == set(build_addon.planned_entries()), names ^ set(build_addon.planned_entries())


def test_build_zip_with_oldest_python(tmp_path: Path) -> None:
    """Builds with the oldest Python >= 3.9 present (3.9.18 under pyenv here); without one, skips."""
    py = _oldest_python()
    if py is None:
        pytest.skip("no Python 3.9 or 3.10 on this machine; test_build_zip_without_tomllib covers the same path")
    version = subprocess.run([py, "-c", "import sys; print(sys.version_info[:2] < (3, 11))"], capture_output=True, text=True)
    assert version.stdout.strip() == "True", (py, version.stdout)
    _same_as_reference(_build_with([py], tmp_path))


def test_build_zip_without_tomllib(tmp_path: Path) -> None:
    """The same path on this interpreter with tomllib blocked, as on Python 3.9 and 3.10."""
    blocker = "import sys, runpy; sys.modules['tomllib'] = None; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    _same_as_reference(_build_with([sys.executable, "-c", blocker], tmp_path))


def test_toml_subset_matches_tomllib_and_refuses_the_rest() -> None:
    tomllib = pytest.importorskip("tomllib")
    for name in ("pyproject.toml", "blender_manifest.toml"):
        text = (REPO / name).read_text(encoding="utf-8")
        assert build_addon._TomlSubset(text).parse() == tomllib.loads(text), name
    sample = 'a = "x # y" # c\n[t.u]\n"k.q" = [1, 2.5, true, \'lit\', {v = "w"},\n]\n'
    assert build_addon._TomlSubset(sample).parse() == tomllib.loads(sample)
    for bad in ('a = """multi"""\n', "[[arr]]\nx = 1\n", "a = 1979-05-27\n", "a = 1\na = 2\n"):
        with pytest.raises(SystemExit, match="TOML line"):
            build_addon._TomlSubset(bad).parse()


def test_readme_says_why_test_extras_change_numpy() -> None:
    """`pip install -e ".[test]"` moves numpy 2.x to 1.26: bpy 5.0.1 requires numpy<2. README must say so."""
    try:
        requires = importlib.metadata.requires("bpy") or []
    except importlib.metadata.PackageNotFoundError:
        requires = []
    pins_numpy = [r for r in requires if r.replace(" ", "").startswith("numpy") and "<2" in r.replace(" ", "")]
    if sys.version_info[:2] == (3, 11):
        assert pins_numpy, requires  # the cause, read from bpy's own metadata
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "bpy 5.0.1 requires `numpy<2" in readme, "README's install section must name the numpy pin's cause"
