"""The limits of one job request, in one place for the CLI, the service schema and the generator.

Standard library only, so the CLI can check arguments before any heavy import. The add-on (which
never imports the backend) mirrors these values; `tests/test_job_limits.py` checks that it does.
"""

from __future__ import annotations

PRESET_NAMES: tuple[str, ...] = ("fast", "default", "quality", "lowvram")  # pipeline/presets.py PRESETS, same order
FACES_RANGE: tuple[int, int] = (500, 500_000)  # triangles in the output mesh
TEXTURE_SIZES: tuple[int, ...] = (256, 512, 1024, 2048, 4096)  # baseColor texture side, pixels
SEED_MAX: int = 2**32 - 1
VARIANTS_RANGE: tuple[int, int] = (1, 16)  # jobs per click / per `generate --variants`
