"""On-disk stage cache: each stage's result is a folder named by the hash of everything it depends on.

A result appears only when complete (written to a temporary folder, then renamed), so a cancelled
or crashed run never leaves a half entry that a later run would trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from make_your_3d.models.registry import ROLES


def digest(value: Any) -> str:
    """A stable sha256 of JSON-able data (dict keys sorted) or raw bytes."""
    data = value if isinstance(value, bytes) else json.dumps(value, sort_keys=True, default=str).encode()
    return hashlib.sha256(data).hexdigest()


def models_fingerprint(models_dir: Path, *roles: str) -> dict[str, str]:
    """Per role, a hash of its weights: the checksums recorded at fetch time when present, otherwise
    each required file's size and modification time (cheap, and changes whenever a file is replaced)."""
    result = {}
    for name in roles:
        folder = ROLES[name].path(models_dir)
        checksums = folder / "checksums.json"
        if checksums.is_file():
            result[name] = digest(checksums.read_bytes())
            continue
        stats = []
        for rel in ROLES[name].required:
            path = folder / rel
            st = path.stat() if path.exists() else None
            stats.append((rel, st.st_size if st else None, st.st_mtime_ns if st else None))
        result[name] = digest(stats)
    return result


class StageCache:
    """Folders under `root/<stage>/<key>`; `get` returns a finished entry, `build` makes one atomically."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def get(self, stage: str, key: str) -> Path | None:
        path = self.path(stage, key)
        return path if (path / ".complete").is_file() else None

    def build(self, stage: str, key: str, writer: Callable[[Path], None], inputs: dict | None = None) -> Path:
        """Run `writer(tmp_folder)` and publish the folder as the entry (replacing a broken one)."""
        final = self.path(stage, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key[:12]}.", dir=final.parent))
        try:
            writer(tmp)
            (tmp / "inputs.json").write_text(json.dumps(inputs or {}, indent=2, sort_keys=True, default=str))
            (tmp / ".complete").write_text("")
            if final.exists():  # an incomplete leftover from a killed run
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return final
