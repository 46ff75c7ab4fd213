"""Uploaded subject images, stored once by content hash so variants and re-runs share one file."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import tempfile
from pathlib import Path

from make_your_3d.errors import DiskFull, InputMissing, Make3DError

_SHA = re.compile(r"^[0-9a-f]{64}$")


class InputStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def put(self, data: bytes) -> str:
        """Write `data` durably (temp file, fsync, rename) unless already there; returns its sha256."""
        digest = hashlib.sha256(data).hexdigest()
        target = self.root / digest
        if target.is_file() and target.stat().st_size == len(data):
            return digest
        fd, tmp = tempfile.mkstemp(prefix=".in-", dir=self.root)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except OSError as exc:
            Path(tmp).unlink(missing_ok=True)
            if exc.errno == errno.ENOSPC:
                raise DiskFull(f"The disk holding {self.root} is full. Free some space and submit the job again.") from None
            raise
        return digest

    def get(self, digest: str) -> bytes:
        if not _SHA.match(digest):
            raise Make3DError(f"Bad input image reference {digest!r}.")
        path = self.root / digest
        if not path.is_file():
            raise InputMissing("The job's input image is missing from the data folder; submit the image again.")
        return path.read_bytes()
