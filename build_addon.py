#!/usr/bin/env python3
"""Build the installable Blender extension zip for Make-Your-3D and validate it.

Zip layout (Blender reads the manifest at the top level):

    blender_manifest.toml           the extension manifest (from the repository root)
    __init__.py, *.py               the add-on package (from blender_addon/)
    backend_src/pyproject.toml      the backend project, installable with `pip install backend_src`
    backend_src/README.md           (pyproject's readme; LICENSE too when present)
    backend_src/backend/make_your_3d/...  the backend package the add-on launches

The add-on finds the backend at `<extension dir>/backend_src` (blender_addon/backend.py,
`bundled_backend_root`): it puts `backend_src/backend` on PYTHONPATH when it launches
`python -m make_your_3d serve`, so the add-on always runs the backend it was built with, and its
"Install backend" button pip-installs `backend_src` (with its dependencies) into a virtual
environment. Tests, caches, __pycache__ and .pyc files are never packed.

Usage: python build_addon.py [--out dist/] [--check-only ZIP]
Standard library only, Python 3.9+ (macOS's system Python is 3.9): where tomllib is missing (before
3.11) a small reader of the TOML this repository's manifest and pyproject use takes its place.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent
ADDON_DIR = ROOT / "blender_addon"
BACKEND_PKG = ROOT / "backend" / "make_your_3d"
BACKEND_PREFIX = "backend_src"
MANIFEST = "blender_manifest.toml"

REQUIRED_FIELDS: dict[str, type] = {
    "schema_version": str,
    "id": str,
    "version": str,
    "name": str,
    "tagline": str,
    "maintainer": str,
    "type": str,
    "blender_version_min": str,
    "license": list,
    "permissions": dict,
}
EXCLUDED_PARTS = {"__pycache__", "tests", "test", ".pytest_cache", ".mypy_cache", ".ruff_cache", ".git"}
EXCLUDED_GLOBS = ("*.pyc", "*.pyo", "*.egg-info", ".DS_Store", "*~", "*.swp", "test_*.py", "*_test.py", "*.orig")
TERSE_LIMIT = 64  # Blender's limit for tagline and permission reasons


if sys.version_info < (3, 9):
    raise SystemExit(f"build_addon.py needs Python 3.9 or newer (this is {sys.version.split()[0]}).")

try:
    import tomllib
except ImportError:  # Python 3.9 and 3.10
    tomllib = None


class _TomlSubset:
    """Reads the TOML subset our two files use (tables, key = value, strings, numbers, booleans, arrays,
    inline tables, comments); anything else is an error naming the line, never a wrong value."""

    def __init__(self, text: str):
        self.text, self.pos = text, 0

    def fail(self, what: str) -> "SystemExit":
        line = self.text.count("\n", 0, self.pos) + 1
        return SystemExit(f"TOML line {line}: {what} (use Python 3.11+, whose tomllib reads all of TOML)")

    def skip(self, newlines: bool = True) -> None:
        while self.pos < len(self.text):
            ch = self.text[self.pos]
            if ch == "#":
                end = self.text.find("\n", self.pos)
                self.pos = len(self.text) if end < 0 else end
            elif ch in " \t\r" or (newlines and ch == "\n"):
                self.pos += 1
            else:
                break

    def key(self) -> list[str]:
        parts = []
        while True:
            self.skip(newlines=False)
            match = re.compile(r'[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"').match(self.text, self.pos)
            if not match:
                raise self.fail("expected a key")
            self.pos = match.end()
            parts.append(json.loads(match.group()) if match.group().startswith('"') else match.group())
            self.skip(newlines=False)
            if self.text.startswith(".", self.pos):
                self.pos += 1
            else:
                return parts

    def value(self):
        self.skip()
        text, pos = self.text, self.pos
        if text.startswith('"', pos) and not text.startswith('"""', pos):
            match = re.compile(r'"(?:[^"\\\n]|\\.)*"').match(text, pos)
            if not match:
                raise self.fail("unterminated string")
            self.pos = match.end()
            return json.loads(match.group())
        if text.startswith("'", pos) and not text.startswith("'''", pos):
            end = text.find("'", pos + 1)
            if end < 0 or "\n" in text[pos:end]:
                raise self.fail("unterminated string")
            self.pos = end + 1
            return text[pos + 1:end]
        if text.startswith("[", pos):
            self.pos += 1
            items = []
            while True:
                self.skip()
                if self.text.startswith("]", self.pos):
                    self.pos += 1
                    return items
                items.append(self.value())
                self.skip()
                if self.text.startswith(",", self.pos):
                    self.pos += 1
                elif not self.text.startswith("]", self.pos):
                    raise self.fail("expected , or ] in an array")
        if text.startswith("{", pos):
            self.pos += 1
            table: dict = {}
            while True:
                self.skip(newlines=False)
                if self.text.startswith("}", self.pos):
                    self.pos += 1
                    return table
                self.assign(table)
                self.skip(newlines=False)
                if self.text.startswith(",", self.pos):
                    self.pos += 1
        match = re.compile(r"true|false|[+-]?\d[\d_]*(?:\.\d+)?(?:[eE][+-]?\d+)?(?![\w:-])").match(text, pos)
        if not match:
            raise self.fail("unsupported value")
        self.pos = match.end()
        word = match.group().replace("_", "")
        return word == "true" if word in ("true", "false") else (float(word) if any(c in word for c in ".eE") else int(word))

    def assign(self, table: dict) -> None:
        *path, last = self.key()
        if not self.text.startswith("=", self.pos):
            raise self.fail("expected =")
        self.pos += 1
        for part in path:
            table = table.setdefault(part, {})
        if last in table:
            raise self.fail(f"duplicate key {last!r}")
        table[last] = self.value()

    def parse(self) -> dict:
        root: dict = {}
        table = root
        while True:
            self.skip()
            if self.pos >= len(self.text):
                return root
            if self.text.startswith("[[", self.pos):
                raise self.fail("arrays of tables are not supported")
            if self.text.startswith("[", self.pos):
                self.pos += 1
                path = self.key()
                if not self.text.startswith("]", self.pos):
                    raise self.fail("expected ]")
                self.pos += 1
                table = root
                for part in path:
                    table = table.setdefault(part, {})
            else:
                self.assign(table)
            self.skip(newlines=False)
            if self.pos < len(self.text) and self.text[self.pos] != "\n":
                raise self.fail("expected the end of the line")


def toml_loads(text: str) -> dict:
    """tomllib.loads where it exists (3.11+), else the subset reader above."""
    return tomllib.loads(text) if tomllib is not None else _TomlSubset(text).parse()


@dataclass(frozen=True)
class BuildResult:
    zip_path: Path
    entries: tuple[str, ...]


def _excluded(rel: Path) -> bool:
    if any(part in EXCLUDED_PARTS for part in rel.parts):
        return True
    return any(fnmatch.fnmatch(part, pat) for part in rel.parts for pat in EXCLUDED_GLOBS)


def _files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and not _excluded(p.relative_to(root)))


def load_manifest(path: Path = ROOT / MANIFEST) -> dict:
    return toml_loads(path.read_text(encoding="utf-8"))


def _terse_ok(value: str) -> bool:
    return 0 < len(value) <= TERSE_LIMIT and value == value.strip() and (value[-1].isalnum() or value[-1] in ")]}")


def validate_manifest(manifest: dict, backend_version: str | None = None) -> list[str]:
    """Problems with the manifest, as sentences (empty when it is fine)."""
    errors: list[str] = []
    for key, typ in REQUIRED_FIELDS.items():
        if key not in manifest:
            errors.append(f"manifest: missing field {key!r}")
        elif not isinstance(manifest[key], typ):
            errors.append(f"manifest: {key!r} must be a {typ.__name__}")
    if errors:
        return errors
    if manifest["schema_version"] != "1.0.0":
        errors.append("manifest: schema_version must be '1.0.0'")
    if manifest["id"] != "make_your_3d":
        errors.append("manifest: id must be 'make_your_3d'")
    if manifest["type"] != "add-on":
        errors.append("manifest: type must be 'add-on'")
    if not re.fullmatch(r"\d+\.\d+\.\d+", manifest["version"]):
        errors.append("manifest: version must be X.Y.Z")
    if not re.fullmatch(r"\d+\.\d+\.\d+", manifest["blender_version_min"]):
        errors.append("manifest: blender_version_min must be X.Y.Z")
    elif tuple(int(x) for x in manifest["blender_version_min"].split(".")) < (4, 2, 0):
        errors.append("manifest: blender_version_min must be at least 4.2.0 (extensions)")
    if "SPDX:GPL-3.0-or-later" not in manifest["license"]:
        errors.append("manifest: license must include SPDX:GPL-3.0-or-later")
    if not _terse_ok(manifest["tagline"]):
        errors.append(f"manifest: tagline must be 1-{TERSE_LIMIT} characters and not end with punctuation")
    perms = manifest["permissions"]
    for key in ("network", "files"):
        if key not in perms:
            errors.append(f"manifest: permissions must give a reason for {key!r}")
    for key, reason in perms.items():
        if key not in {"files", "network", "clipboard", "camera", "microphone"}:
            errors.append(f"manifest: unknown permission {key!r}")
        elif not isinstance(reason, str) or not _terse_ok(reason):
            errors.append(f"manifest: permission {key!r} needs a reason of 1-{TERSE_LIMIT} characters without final punctuation")
    if backend_version is not None and manifest["version"] != backend_version:
        errors.append(f"manifest: version {manifest['version']} differs from the backend's {backend_version}")
    return errors


def backend_version() -> str:
    text = (BACKEND_PKG / "__init__.py").read_text(encoding="utf-8")
    match = re.search(r'__version__\s*=\s*"([^"]+)"', text)
    if not match:
        raise SystemExit("backend/make_your_3d/__init__.py has no __version__")
    return match.group(1)


def _pyproject_extras() -> list[Path]:
    """Files pyproject.toml refers to that pip needs to build the backend (readme, licence)."""
    extras = []
    data = toml_loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    readme = data.get("project", {}).get("readme")
    if isinstance(readme, str):
        extras.append(ROOT / readme)
    for name in ("LICENSE", "LICENSE.txt", "COPYING"):
        if (ROOT / name).is_file():
            extras.append(ROOT / name)
    return extras


def planned_entries() -> dict[str, Path]:
    """Archive name -> source file, for everything that goes into the zip."""
    entries: dict[str, Path] = {MANIFEST: ROOT / MANIFEST}
    for path in _files_under(ADDON_DIR):
        entries[path.relative_to(ADDON_DIR).as_posix()] = path
    entries[f"{BACKEND_PREFIX}/pyproject.toml"] = ROOT / "pyproject.toml"
    for extra in _pyproject_extras():
        if extra.is_file():
            entries[f"{BACKEND_PREFIX}/{extra.name}"] = extra
        elif extra.name.lower().startswith("readme"):
            entries[f"{BACKEND_PREFIX}/{extra.name}"] = None  # written as a stub below: pip needs it
    for path in _files_under(BACKEND_PKG):
        entries[f"{BACKEND_PREFIX}/backend/make_your_3d/{path.relative_to(BACKEND_PKG).as_posix()}"] = path
    return entries


def allowed_entry(name: str) -> bool:
    """Whether a zip entry belongs in the extension (anything else is a stray file)."""
    rel = Path(name)
    if _excluded(rel):
        return False
    if name == MANIFEST:
        return True
    if len(rel.parts) == 1:
        return rel.suffix == ".py"
    if rel.parts[0] == BACKEND_PREFIX:
        if len(rel.parts) == 2:
            return rel.name in {"pyproject.toml", "README.md", "LICENSE", "LICENSE.txt", "COPYING"}
        return rel.parts[1:3] == ("backend", "make_your_3d")
    # add-on sub-packages (e.g. icons/) are allowed when they are inside the add-on folder
    return (ADDON_DIR / rel).is_file()


def validate_zip(zip_path: Path) -> list[str]:
    """Problems with a built zip: manifest fields, required files, stray or excluded files."""
    errors: list[str] = []
    with zipfile.ZipFile(zip_path) as zf:
        names = [n for n in zf.namelist() if not n.endswith("/")]
        if MANIFEST not in names:
            return [f"{zip_path}: no {MANIFEST} at the top level"]
        manifest = toml_loads(zf.read(MANIFEST).decode("utf-8"))
        errors += validate_manifest(manifest)
        for required in ("__init__.py", f"{BACKEND_PREFIX}/pyproject.toml",
                         f"{BACKEND_PREFIX}/backend/make_your_3d/__init__.py",
                         f"{BACKEND_PREFIX}/backend/make_your_3d/__main__.py",
                         f"{BACKEND_PREFIX}/backend/make_your_3d/cli/__init__.py"):
            if required not in names:
                errors.append(f"zip: missing {required}")
        init = zf.read("__init__.py").decode("utf-8") if "__init__.py" in names else ""
        if "def register" not in init or "def unregister" not in init:
            errors.append("zip: __init__.py must define register() and unregister()")
        if "import torch" in "\n".join(zf.read(n).decode("utf-8", "replace") for n in names if "/" not in n and n.endswith(".py")):
            errors.append("zip: the add-on itself must not import torch (bpy and the standard library only)")
        stray = [n for n in names if not allowed_entry(n)]
        errors += [f"zip: stray file {n}" for n in stray]
        if len(set(names)) != len(names):
            errors.append("zip: duplicate entries")
    return errors


def build(out_dir: Path = ROOT / "dist") -> BuildResult:
    manifest = load_manifest()
    problems = validate_manifest(manifest, backend_version())
    if problems:
        raise SystemExit("\n".join(problems))
    out_dir.mkdir(parents=True, exist_ok=True)
    zip_path = out_dir / f"{manifest['id']}-{manifest['version']}.zip"
    tmp = zip_path.with_suffix(".zip.tmp")
    entries = planned_entries()
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, src in sorted(entries.items()):
            if src is None:
                zf.writestr(name, "# Make-Your-3D backend\n\nBundled with the Make-Your-3D Blender add-on.\n")
            else:
                zf.write(src, name)
    tmp.replace(zip_path)
    problems = validate_zip(zip_path)
    if problems:
        zip_path.unlink()
        raise SystemExit("\n".join(problems))
    return BuildResult(zip_path=zip_path, entries=tuple(sorted(entries)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "dist", help="output folder (default: dist/)")
    parser.add_argument("--check-only", type=Path, metavar="ZIP", help="only validate an existing zip")
    args = parser.parse_args(argv)
    if args.check_only:
        problems = validate_zip(args.check_only)
        print("\n".join(problems) or f"{args.check_only}: OK")
        return 1 if problems else 0
    result = build(args.out)
    print(f"built {result.zip_path} ({len(result.entries)} files, {result.zip_path.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
