"""What `make-your-3d demo` (the README's main job, `cli.commands.demo`) runs: `generate` on the
bundled example image, on the real weights when installed, otherwise on a fresh tiny model set."""

from __future__ import annotations

from pathlib import Path


DEMO_PROMPT = "wearing a red scarf"
DEMO_SUBJECT = "a toy bear"


def example_image() -> Path:
    """The bundled example: in a source checkout it sits in examples/ at the repository root."""
    for base in Path(__file__).resolve().parents:
        candidate = base / "examples" / "toy_bear.png"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError("examples/toy_bear.png was not found next to the backend source")
