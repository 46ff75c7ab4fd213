"""A file's checksum, a byte count for people, the check that a folder can be written, and atomic
writes of a file or a whole folder: used by models/ (fetch, verify, list), pipeline/ (the stage cache,
the job's pre-flight check, the job folder), service/ (state, certificates, results from farm workers)
and cli/ (cache info, argument checks). Standard library only, so any layer may import it."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path

from make_your_3d.errors import OutputUnwritable


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks (weights are gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def human_bytes(n: int) -> str:
    """`n` bytes as B, KiB, MiB or GiB with one decimal (whole bytes below 1 KiB)."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def nearest_existing(path: Path) -> Path:
    """`path` or its closest ancestor that exists (what a later mkdir(parents=True) would write into)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def check_writable(path: str | os.PathLike, what: str) -> None:
    """Raise OutputUnwritable unless files can be created in `path` (created later if missing).

    Writes and removes one empty probe file in the folder or its nearest existing ancestor: a real
    write, because permission bits say nothing for root and a read-only mount ignores them. Runs
    before any model loads, so a wrong folder costs a second, not the whole job."""
    target = Path(path).expanduser()
    base = nearest_existing(target)
    if not base.is_dir():
        raise OutputUnwritable(f"The {what} {target} cannot be created: {base} is a file, not a folder. "
                               f"Choose another {what}.")
    try:
        fd, probe = tempfile.mkstemp(prefix=".make_your_3d_probe_", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputUnwritable(f"The {what} {target} is not writable ({exc.strerror or exc} in {base}). "
                               f"Choose a {what} you can write to, or fix its permissions, then run the job again.") from None


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write `data` to `path` all or nothing: a temporary file created with `mode` in the same folder,
    synced, then renamed over `path` (a reader never sees half a file, and a secret is never readable
    by others, not even for a moment)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        os.chmod(tmp, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def replace_dir(tmp: Path, out_dir: Path) -> None:
    """Put the finished folder `tmp` at `out_dir` with renames only, so `out_dir` is always either the
    old folder or the new one, never a mix (an older one is moved aside first, then deleted)."""
    if out_dir.exists():
        trash = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}-{time.monotonic_ns()}")
        os.replace(out_dir, trash)
        os.replace(tmp, out_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)
