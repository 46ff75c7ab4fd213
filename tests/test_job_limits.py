"""One set of job limits: the presets, the CLI, the service schema and the add-on agree."""

from __future__ import annotations

import ast
import typing
from pathlib import Path

from make_your_3d.job_limits import FACES_RANGE, PRESET_NAMES, SEED_MAX, TEXTURE_SIZES, VARIANTS_RANGE
from make_your_3d.pipeline.presets import PRESETS

ADDON_PROPS = Path(__file__).resolve().parents[1] / "blender_addon" / "props.py"


def test_backend_spellings_agree():
    from make_your_3d.cli import build_parser
    from make_your_3d.service import app

    assert tuple(PRESETS) == PRESET_NAMES
    assert typing.get_args(app.Preset) == PRESET_NAMES and typing.get_args(app.TextureSize) == TEXTURE_SIZES
    gen = build_parser()._subparsers._group_actions[0].choices["generate"]
    preset_action = next(a for a in gen._actions if a.dest == "preset")
    assert tuple(preset_action.choices) == PRESET_NAMES
    faces = app.JobCreate.model_fields["faces"].metadata
    assert [m.ge for m in faces if hasattr(m, "ge")] == [FACES_RANGE[0]] and [m.le for m in faces if hasattr(m, "le")] == [FACES_RANGE[1]]
    assert app.MAX_SEED == SEED_MAX and app.MAX_VARIANTS == VARIANTS_RANGE[1]


def test_addon_mirrors_the_limits():
    """The add-on never imports the backend, so it spells the values itself; read them from its source."""
    tree = ast.parse(ADDON_PROPS.read_text())
    values = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name) and node.targets[0].id in ("PRESETS", "TEXTURE_SIZES"):
            values[node.targets[0].id] = ast.literal_eval(node.value)
    assert tuple(item[0] for item in values["PRESETS"]) == PRESET_NAMES
    assert {int(item[0]) for item in values["TEXTURE_SIZES"] if item[0] != "0"} <= set(TEXTURE_SIZES)  # the panel offers a subset
    text = ADDON_PROPS.read_text()
    assert f"max={FACES_RANGE[1]:_}" in text and f"max={VARIANTS_RANGE[1]}" in text
