"""One job-parameter table (job_params.py): the CLI, the service schema it publishes and the add-on's
fallbacks agree with it, and variant seeds are drawn by one rule in the backend."""

from __future__ import annotations

import ast
import typing

import pytest
from pathlib import Path

from make_your_3d.job_params import AUTO_PRESET, FACES_RANGE, JOB_PARAMS, PRESET_NAMES, SEED_MAX, TEXTURE_SIZES, VARIANTS_RANGE, json_schema, variant_seeds
from make_your_3d.pipeline.presets import PRESETS

ADDON = Path(__file__).resolve().parents[1] / "blender_addon"
ADDON_PROPS = ADDON / "props.py"


def _addon_progress():
    """The add-on's progress module (standard library only), loaded from its file: the add-on
    package itself needs bpy."""
    import importlib.util

    import sys

    spec = importlib.util.spec_from_file_location("addon_progress_probe", ADDON / "progress.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def test_backend_spellings_agree():
    from make_your_3d.cli import build_parser
    from make_your_3d.service import app

    assert tuple(PRESETS) == PRESET_NAMES
    preset = app.JobCreate.model_fields["preset"].annotation
    texture = app.JobCreate.model_fields["texture_size"].annotation
    assert typing.get_args(typing.get_args(preset)[0]) == PRESET_NAMES and typing.get_args(typing.get_args(texture)[0]) == TEXTURE_SIZES
    gen = build_parser()._subparsers._group_actions[0].choices["generate"]
    preset_action = next(a for a in gen._actions if a.dest == "preset")
    assert tuple(preset_action.choices) == (*PRESET_NAMES, AUTO_PRESET)  # auto: the preset that fits the device
    faces = app.JobCreate.model_fields["faces"].metadata
    assert [m.ge for m in faces if hasattr(m, "ge")] == [FACES_RANGE[0]] and [m.le for m in faces if hasattr(m, "le")] == [FACES_RANGE[1]]
    seed = app.JobCreate.model_fields["seed"].metadata
    variants = app.JobCreate.model_fields["variants"].metadata
    assert [m.le for m in seed if hasattr(m, "le")] == [SEED_MAX] and [m.le for m in variants if hasattr(m, "le")] == [VARIANTS_RANGE[1]]


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
    # one seed range: the backend's is what Blender's 32-bit IntProperty holds, so no seed is ever wrapped
    assert SEED_MAX == 2**31 - 1 and "seed: IntProperty(name=\"Seed\", default=0, min=0, max=2**31 - 1)" in text


def test_the_service_publishes_the_table_and_the_stage_list():
    """GET /v1/schema's request schema is the table's (same fields, limits, defaults), and its stage
    list is pipeline/stages.py's (tests/test_service.py reads the route itself)."""
    from make_your_3d.pipeline.stages import STAGE_SPECS
    from make_your_3d.service import app as service_app

    published = service_app.JobCreate.model_json_schema()["properties"]
    for param, mine in zip(JOB_PARAMS, json_schema()["properties"].values()):
        theirs = published[param.name]
        assert theirs.get("description") == mine["description"], param.name
        bounds = {k: v for k, v in theirs.items() if k in ("maximum", "minimum", "maxLength")}
        for branch in theirs.get("anyOf", []):
            bounds.update({k: v for k, v in branch.items() if k in ("maximum", "minimum", "maxLength")})
        assert bounds == {k: v for k, v in mine.items() if k in ("maximum", "minimum", "maxLength")}, param.name
        assert theirs.get("default", ...) == (... if param.required else param.default), param.name
    assert set(published) == {p.name for p in JOB_PARAMS} | {"image_png_b64", "overrides"}
    from make_your_3d.pipeline.stages import published_stages

    assert [s["name"] for s in published_stages()] == [s.name for s in STAGE_SPECS]
    assert all(s["label"] and s["label"] != s["name"] for s in published_stages())


def test_the_addon_fallbacks_equal_what_the_backend_publishes():
    """The add-on reads the stage list from the running backend; its fallbacks (for a backend that
    publishes none) must be the backend's own declaration."""
    from make_your_3d.pipeline.stages import published_stages

    progress = _addon_progress()
    stages = published_stages()
    assert progress.STAGES == tuple((s["name"], s["label"]) for s in stages)
    assert progress.SUBSTAGES == {sub: s["name"] for s in stages for sub in s["substages"]}
    plan = progress.StagePlan.from_schema(stages)
    assert plan == progress.FALLBACK_PLAN
    # a plan from a backend with another stage list is used as published, not the fallback
    other = progress.StagePlan.from_schema([{"name": "a", "label": "First"}, {"name": "b", "label": "Second", "substages": ["b1"]}])
    assert progress.job_progress("b1", 1, 2, None, {"a": 1.0, "b": 1.0}, other).label == "Second"
    assert progress.job_progress("a", 1, 2, None, {"a": 1.0, "b": 1.0}, other).fraction == 0.25
    assert progress.StagePlan.from_schema("nonsense") is None and progress.StagePlan.from_schema([{"label": "x"}]) is None


def test_variant_seeds_are_drawn_once_by_one_rule():
    assert variant_seeds(7, 3) == [7, 8, 9]
    drawn = variant_seeds(None, 16)
    assert drawn == list(range(drawn[0], drawn[0] + 16)) and 0 <= drawn[0] and drawn[-1] < 2**31
    with pytest.raises(ValueError, match="seed \\+ variants - 1"):
        variant_seeds(SEED_MAX, 2)
    # the add-on draws none: it sends null for a random seed and takes the seeds the backend returns
    operators = (ADDON / "operators.py").read_text()
    assert "random." not in operators and "import random" not in operators
    assert "seeds" in (ADDON / "jobs.py").read_text()


def test_the_addon_modules_import_no_cycle():
    """runtime.py is the lower layer of the add-on's job flow: jobs.py imports it, never the other way."""
    imported = set()
    for node in ast.walk(ast.parse((ADDON / "runtime.py").read_text())):
        if isinstance(node, ast.ImportFrom):
            imported.update(alias.name for alias in node.names if node.module is None)
            imported.add(node.module or "")
    assert "jobs" not in imported and ".jobs" not in imported and "jobs" not in {m.lstrip(".") for m in imported}
