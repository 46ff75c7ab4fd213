"""The tiny model set: every role at toy size with random weights, in the published on-disk formats.

It lets the real loading, training and inference code run in tests and on machines without the
real weights or a GPU. Output is deterministic: the same seed gives byte-identical files.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from functools import partial
from pathlib import Path
from typing import Callable

from make_your_3d.models.registry import ROLES, TINY_MARKER

TinyWriter = Callable[[Path, int], None]


def tiny_writers(out: Path) -> dict[str, TinyWriter]:
    """Role name -> writer(folder, seed), in dependency order (the IP-Adapter is sized from the UNet)."""
    from make_your_3d.models import personalized
    from make_your_3d.models.multiview_tiny import write_tiny_multiview
    from make_your_3d.models.normals import write_tiny_normal_estimator
    from make_your_3d.models.segmenter import write_tiny_segmenter

    writers: dict[str, TinyWriter] = {
        "personalized": personalized.write_tiny_personalized,
        "image_encoder": personalized.write_tiny_image_encoder,
        "ip_adapter": partial(personalized.write_tiny_ip_adapter, personalized_folder=ROLES["personalized"].path(out)),
        "multiview": write_tiny_multiview,
        "normal_estimator": write_tiny_normal_estimator,
        "segmenter": write_tiny_segmenter,
    }
    return writers


def write_tiny_set(out: str | Path, seed: int = 0) -> Path:
    """Write (or overwrite) a complete tiny model set under `out`; returns `out`.

    Each role gets a checksums.json like a fetched one, so `models verify` and the stage cache's
    model fingerprints treat tiny and real sets alike.
    """
    from make_your_3d.models.fetch import record_checksums

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    roles = []
    for offset, (name, writer) in enumerate(tiny_writers(out).items()):
        target = ROLES[name].path(out)
        # Write into a temporary sibling and swap it in, so an interrupted run never leaves a half role.
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out))
        try:
            writer(tmp, seed * 100 + offset)
            record_checksums(tmp, name, repo_id="tiny")
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        roles.append(name)
    (out / TINY_MARKER).write_text(json.dumps({"seed": seed, "roles": roles}, indent=2) + "\n")
    return out
