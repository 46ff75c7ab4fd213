"""`make-your-3d cache info|clear`: the per-user stage cache (paths.default_cache_dir).

Clearing removes only what looks like a stage cache entry (`<stage>/<key>/` folders holding the
cache's `.complete` marker or `inputs.json`, and the cache's own hidden temporary folders), so a
mistaken `--cache ~/Documents` deletes nothing of the user's."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from make_your_3d.files import human_bytes
from make_your_3d.paths import resolve_cache_dir


@dataclass
class CacheInfo:
    path: str
    exists: bool
    bytes: int = 0
    entries: int = 0
    stages: dict[str, dict[str, int]] = field(default_factory=dict)  # stage -> {"entries", "bytes"}


def _is_entry(folder: Path) -> bool:
    if not folder.is_dir() or folder.is_symlink():
        return False
    return (folder / ".complete").is_file() or (folder / "inputs.json").is_file() or folder.name.startswith(".")


def _size(folder: Path) -> int:
    total = 0
    for p in folder.rglob("*"):
        try:
            if p.is_file() and not p.is_symlink():
                total += p.stat().st_size
        except OSError:
            pass
    return total


def entries(root: Path) -> list[tuple[str, Path]]:
    found = []
    if not root.is_dir():
        return found
    for stage in sorted(root.iterdir()):
        if not stage.is_dir() or stage.is_symlink():
            continue
        for entry in sorted(stage.iterdir()):
            if _is_entry(entry):
                found.append((stage.name, entry))
    return found


def cache_info(root: Path) -> CacheInfo:
    info = CacheInfo(path=str(root), exists=root.is_dir())
    for stage, entry in entries(root):
        size = _size(entry)
        rec = info.stages.setdefault(stage, {"entries": 0, "bytes": 0})
        rec["entries"] += 1
        rec["bytes"] += size
        info.entries += 1
        info.bytes += size
    return info


def clear_cache(root: Path) -> CacheInfo:
    """Delete every cache entry under `root`; returns what was removed."""
    removed = cache_info(root)
    for _stage, entry in entries(root):
        shutil.rmtree(entry, ignore_errors=True)
    if root.is_dir():
        for stage in root.iterdir():
            if stage.is_dir() and not stage.is_symlink() and not any(stage.iterdir()):
                stage.rmdir()
    return removed


def run_info(args) -> int:
    info = cache_info(resolve_cache_dir(args.cache))
    if args.json:
        print(json.dumps(asdict(info)))
        return 0
    if not info.exists:
        print(f"Stage cache: {info.path} (empty; nothing has run yet)")
        return 0
    print(f"Stage cache: {info.path}")
    print(f"  {info.entries} cached stage result(s), {human_bytes(info.bytes)}")
    for stage, rec in sorted(info.stages.items()):
        print(f"  {stage:<15} {rec['entries']:>4}  {human_bytes(rec['bytes'])}")
    print("Clear it with `make-your-3d cache clear` (finished results in output folders stay).")
    return 0


def run_clear(args) -> int:
    removed = clear_cache(resolve_cache_dir(args.cache))
    if args.json:
        print(json.dumps(asdict(removed)))
    else:
        print(f"Removed {removed.entries} cached stage result(s), {human_bytes(removed.bytes)}, from {removed.path}.")
    return 0
