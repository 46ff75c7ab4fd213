"""A file's checksum, a byte count for people and the check that a folder can be written: used by
models/ (fetch, verify, list), pipeline/ (the stage cache, the job's pre-flight check) and cli/ (cache
info, argument checks). Standard library only, so any layer may import it."""

from __future__ import annotations

import hashlib
import os
import tempfile
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
