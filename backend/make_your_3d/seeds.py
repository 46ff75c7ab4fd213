"""Seeds for every random draw, derived from the job's seed and what the draw is for.

Each consumer (a stage, a trainer's adapter initialisation, ...) gets its own stream, derived by
hashing, so adding a draw in one place never shifts the numbers another place sees, and nothing
ever reads torch's or numpy's global generator (whose state depends on what ran before in the
process: the cause of issue 22's "same seed, different LoRA").
"""

from __future__ import annotations

import hashlib


def derive_seed(seed: int, *labels: str) -> int:
    """A 63-bit seed from `seed` and the labels naming the draw (stable across runs and platforms)."""
    text = ":".join([str(int(seed)), *labels])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1
