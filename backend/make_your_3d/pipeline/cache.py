"""On-disk stage cache: each stage's result is a folder named by the hash of everything it depends on.

A result appears only when complete (written to a temporary folder, then renamed), so a cancelled
or crashed run never leaves a half entry that a later run would trust.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from make_your_3d.files import sha256_file
from make_your_3d.models.registry import ROLES
from make_your_3d.process import pid_alive

log = logging.getLogger("make_your_3d.cache")


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


UNNAMED_TEMP_AGE_S = 24 * 3600.0  # a temporary folder without a pid in its name is left this long
RECORD = ".complete"  # the entry's record: written last, so its presence means the entry is whole
QUARANTINE = ".quarantine"


def _files(folder: Path) -> dict[str, Path]:
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file() and p.name != RECORD}


class StageCache:
    """Folders under `root/<stage>/<key>`; `get` returns a finished, verified entry, `build` makes one
    atomically.

    The record (`.complete`) lists every file's sha256 and size, taken when the entry was built.
    `get` re-checks them: a damaged entry (a flipped byte, a truncated or deleted file, or an entry
    from before records were kept) is moved to `root/.quarantine/` with a log line, and the caller
    rebuilds it once as for a miss.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def get(self, stage: str, key: str) -> Path | None:
        path = self.path(stage, key)
        if not (path / RECORD).is_file():
            return None
        problem = self.verify(path)
        if problem is None:
            return path
        self._quarantine(stage, key, path, problem)
        return None

    def verify(self, path: Path) -> str | None:
        """None when every file matches the entry's record, else what is wrong (one sentence)."""
        try:
            record = json.loads((path / RECORD).read_text(encoding="utf-8"))
            recorded = record["files"]
            assert isinstance(recorded, dict)
        except (OSError, ValueError, KeyError, TypeError, AssertionError):
            return "it has no checksum record (made by an older version, or the record is damaged)"
        present = _files(path)
        for rel, entry in recorded.items():
            file = present.get(rel)
            if file is None:
                return f"{rel} is missing"
            if file.stat().st_size != entry.get("size"):
                return f"{rel} is {file.stat().st_size} bytes, {entry.get('size')} were written"
            if sha256_file(file) != entry.get("sha256"):
                return f"{rel} does not match its checksum"
        extra = sorted(set(present) - set(recorded))
        if extra:
            return f"{extra[0]} was not part of the entry"
        return None

    def _quarantine(self, stage: str, key: str, path: Path, problem: str) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        target = self.root / QUARANTINE / f"{stage}-{key[:16]}-{stamp}-{os.getpid()}"
        target.parent.mkdir(parents=True, exist_ok=True)
        n = 0
        while target.exists():
            n += 1
            target = target.with_name(f"{target.name.split('~')[0]}~{n}")
        try:
            os.replace(path, target)
        except OSError:
            shutil.rmtree(path, ignore_errors=True)
            log.warning("cache entry %s/%s is damaged (%s); removed it (could not move it aside); rebuilding", stage, key[:12], problem)
            return
        log.warning("cache entry %s/%s is damaged (%s); moved it to %s; rebuilding", stage, key[:12], problem, target)

    def build(self, stage: str, key: str, writer: Callable[[Path], None], inputs: dict | None = None) -> Path:
        """Run `writer(tmp_folder)` and publish the folder as the entry (replacing a broken one)."""
        final = self.path(stage, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        # the builder's pid in the name: a clean-up can tell a killed build from a running one
        tmp = Path(tempfile.mkdtemp(prefix=f".{key[:12]}.{os.getpid()}.", dir=final.parent))
        try:
            writer(tmp)
            (tmp / "inputs.json").write_text(json.dumps(inputs or {}, indent=2, sort_keys=True, default=str))
            files = {rel: {"sha256": sha256_file(p), "size": p.stat().st_size} for rel, p in _files(tmp).items()}
            (tmp / RECORD).write_text(json.dumps({"files": files}, indent=1, sort_keys=True))
            if final.exists():  # an incomplete leftover from a killed run
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return final

    def export(self, stage: str, key: str) -> dict[str, bytes] | None:
        """Entry `stage/key` as {relative path: bytes}, its record included (None: not cached here),
        for moving it to another machine's cache (a farm worker: service/farm.py)."""
        path = self.get(stage, key)
        if path is None:
            return None
        return {rel: p.read_bytes() for rel, p in _files(path).items()} | {RECORD: (path / RECORD).read_bytes()}

    def import_entry(self, stage: str, key: str, files: dict[str, bytes]) -> bool:
        """Publish an entry exported by `export` elsewhere: written to a temporary folder, checked
        against its own record (a damaged transfer is refused, not trusted), then renamed into
        place. False when refused; an entry already here is kept."""
        if self.get(stage, key) is not None:
            return True
        final = self.path(stage, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key[:12]}.{os.getpid()}.", dir=final.parent))
        try:
            for rel, data in files.items():
                target = (tmp / rel).resolve()
                if not target.is_relative_to(tmp.resolve()):
                    log.warning("refused cache entry %s/%s: the path %r leaves the entry", stage, key[:12], rel)
                    return False
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
            problem = self.verify(tmp)
            if problem is not None:
                log.warning("refused cache entry %s/%s from another worker: %s", stage, key[:12], problem)
                return False
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            return True
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def remove_partial(self, unnamed_age_s: float = UNNAMED_TEMP_AGE_S) -> list[Path]:
        """Delete the temporary folders (`<stage>/.<key>.<pid>.*`) that killed builds left behind;
        returns them. Safe while other processes build here (the cache is one per user): a folder
        is removed only when its builder's pid is gone (or is this process, which calls this before
        building), or, for a name without a pid (older versions), when untouched for `unnamed_age_s`."""
        removed: list[Path] = []
        if not self.root.is_dir():
            return removed
        now = time.time()
        for stage in self.root.iterdir():
            if stage.name.startswith(".") or not stage.is_dir():
                continue
            for entry in stage.iterdir():
                if not entry.name.startswith(".") or not entry.is_dir() or entry.is_symlink():
                    continue
                parts = entry.name.split(".")  # ["", key[:12], pid, random] or ["", key[:12], random]
                if len(parts) == 4 and parts[2].isdigit():
                    pid = int(parts[2])
                    if pid != os.getpid() and pid_alive(pid):
                        continue  # being built right now by another process
                else:
                    try:
                        if now - entry.stat().st_mtime < unnamed_age_s:
                            continue
                    except OSError:
                        continue
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
        return removed
