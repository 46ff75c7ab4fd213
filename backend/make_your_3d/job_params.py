"""What one job request may ask for: every field with its type, default, limits and meaning, once.

Standard library only, so the CLI can check arguments before any heavy import. The service builds
its request schema from `JOB_PARAMS` and publishes it (GET /v1/schema) with the stage list; the
add-on (which never imports the backend) reads both from the running backend and keeps only
fallbacks, which `tests/test_job_params.py` compares with this table. Variant seeds are drawn here,
in the backend, by one rule (`variant_seeds`).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

PRESET_NAMES: tuple[str, ...] = ("fast", "default", "quality", "lowvram")  # pipeline/presets.py PRESETS, same order
# Not a preset: "the one that fits this device" (default, else lowvram; pipeline/memory.py pick_preset). A
# backend's default (`serve --preset auto`) or `generate --preset auto`, resolved before the job's keys.
AUTO_PRESET = "auto"
FACES_RANGE: tuple[int, int] = (500, 500_000)  # triangles in the output mesh
TEXTURE_SIZES: tuple[int, ...] = (256, 512, 1024, 2048, 4096)  # baseColor texture side, pixels
SEED_MAX: int = 2**31 - 1  # one range everywhere: the add-on keeps seeds in Blender's 32-bit signed ints
VARIANTS_RANGE: tuple[int, int] = (1, 16)  # jobs per click / per `generate --variants`
MAX_PROMPT_CHARS = 500  # after cleaning (pipeline/request.py clean_prompt)
MAX_RAW_PROMPT_CHARS = 4 * MAX_PROMPT_CHARS  # refused before cleaning (that pass is O(n))


@dataclass(frozen=True)
class Param:
    """One request field. `kind` is its JSON type; None in `default` with `nullable` means "unset"."""

    name: str
    kind: str  # "string" or "integer"
    default: Any
    description: str
    minimum: int | None = None
    maximum: int | None = None
    choices: tuple | None = None
    max_length: int | None = None
    nullable: bool = False
    required: bool = False

    def json_schema(self) -> dict:
        schema: dict[str, Any] = {"type": [self.kind, "null"] if self.nullable else self.kind, "description": self.description}
        for key, value in (("minimum", self.minimum), ("maximum", self.maximum), ("maxLength", self.max_length)):
            if value is not None:
                schema[key] = value
        if self.choices is not None:
            schema["enum"] = list(self.choices) + ([None] if self.nullable else [])
        schema["default"] = self.default
        return schema


JOB_PARAMS: tuple[Param, ...] = (
    Param("prompt", "string", "", 'the change, e.g. "wearing a red scarf"', max_length=MAX_RAW_PROMPT_CHARS, required=True),
    Param("negative_prompt", "string", "", "what the edit should avoid", max_length=MAX_RAW_PROMPT_CHARS),
    Param("subject", "string", None, 'short description of the subject, e.g. "a toy robot" (null: a generic word)',
          max_length=MAX_RAW_PROMPT_CHARS, nullable=True),
    Param("seed", "integer", None, "the first variant's seed; null: the backend draws one", minimum=0, maximum=SEED_MAX, nullable=True),
    Param("variants", "integer", 1, "jobs for this request, with seeds seed, seed+1, ...", minimum=VARIANTS_RANGE[0], maximum=VARIANTS_RANGE[1]),
    Param("preset", "string", None, "quality preset; null: the server's --preset", choices=PRESET_NAMES, nullable=True),
    Param("faces", "integer", None, "triangle budget of the mesh; null: the preset's", minimum=FACES_RANGE[0], maximum=FACES_RANGE[1],
          nullable=True),
    Param("texture_size", "integer", None, "texture side in pixels; null: the preset's", choices=TEXTURE_SIZES, nullable=True),
)
PARAMS: dict[str, Param] = {p.name: p for p in JOB_PARAMS}


def json_schema() -> dict:
    """The request fields above as a JSON schema object (the image and overrides are added by the service)."""
    return {"type": "object", "properties": {p.name: p.json_schema() for p in JOB_PARAMS}, "required": [p.name for p in JOB_PARAMS if p.required]}


def variant_seeds(seed: int | None, variants: int) -> list[int]:
    """The seeds of a request's variants: `seed`, `seed+1`, ...; a seed is drawn when none is given.
    Raises ValueError when the last one would pass SEED_MAX."""
    first = secrets.randbelow(SEED_MAX + 2 - variants) if seed is None else int(seed)  # a drawn seed leaves room for its variants
    if first + variants - 1 > SEED_MAX:
        raise ValueError(f"seed + variants - 1 must be at most {SEED_MAX}; pick a smaller seed.")
    return [first + i for i in range(variants)]
