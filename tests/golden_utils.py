"""Helpers shared by the reference-equivalence tests (tests/test_reference_*.py)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from make_your_3d.models.multiview_unet import read_checkpoint


def weights_digest(path: Path) -> str:
    """sha256 over a safetensors file's tensors (sorted names, dtype, shape, bytes): the weights,
    independent of the file's header and metadata. The golden fixtures record it for the tiny
    weights they were made with, so a changed tiny writer is named as the cause of a mismatch."""
    state = read_checkpoint(path)
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name]
        for part in (name, str(t.dtype), str(tuple(t.shape))):
            h.update(part.encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()
