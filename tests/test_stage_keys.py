"""Stage-cache keys derive from the declared stage graph and miss after any change that matters.

A key that omits something a stage reads returns a stale result after an upgrade or a tuning
change; these tests change every declared input one at a time.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from make_your_3d.pipeline.presets import TEST_OVERRIDES, Preset, get_preset
from make_your_3d.pipeline.request import GenerateRequest
from make_your_3d.pipeline.stages import (
    PRESET_FIELDS_OUTSIDE_KEYS,
    REQUEST_FIELDS_OUTSIDE_KEYS,
    STAGE_SPECS,
    STAGES,
    KeyContext,
    import_closure,
    stage_code_modules,
    stage_keys,
)

PACKAGE_DIR = Path(import_closure(("make_your_3d",))[0]).parent

ROLES = ("personalized", "ip_adapter", "image_encoder", "multiview", "normal_estimator")


def _context(**changes) -> KeyContext:
    base = dict(device_type="cpu", dtype="float32", fingerprints={r: f"fp-{r}" for r in ROLES}, version="0.1.0",
                extra={"reconstruct": {"grid_res": 512, "iterations": 300}})
    base.update(changes)
    return KeyContext(**base)


def _request(**changes) -> GenerateRequest:
    return dataclasses.replace(GenerateRequest(image=b"png-bytes", prompt="wearing a red scarf", subject="a toy bear", seed=3), **changes)


def _keys(request=None, preset=None, context=None) -> dict[str, str]:
    return {k: v[0] for k, v in stage_keys(request or _request(), preset or get_preset("default"), context or _context()).items()}


def _downstream(names: set[str]) -> set[str]:
    """The stages that read any of `names`, directly or through their upstream stages."""
    out = set(names)
    for spec in STAGE_SPECS:  # graph order: upstream before downstream
        if out & set(spec.upstream):
            out.add(spec.name)
    return out


# Fields whose values the preset validates against a list: another valid value.
VALID_ALTERNATIVES = {"lr_schedule": "cosine"}


def _other_value(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 2 + 0.5
    if isinstance(value, str):
        return value + "-changed"
    if isinstance(value, dict):
        return {**value, "iterations": 7}
    if value is None:
        return 1234
    raise TypeError(value)


def test_every_preset_and_request_field_is_keyed_or_exempt_with_a_reason():
    keyed = {f for s in STAGE_SPECS for f in s.preset_fields}
    for f in dataclasses.fields(Preset):
        assert (f.name in keyed) != (f.name in PRESET_FIELDS_OUTSIDE_KEYS), f"preset field {f.name} must be keyed or exempt"
    keyed_request = {f for s in STAGE_SPECS for f in s.request_fields}
    for f in dataclasses.fields(GenerateRequest):
        assert (f.name in keyed_request) != (f.name in REQUEST_FIELDS_OUTSIDE_KEYS), f"request field {f.name} must be keyed or exempt"
    assert all(reason for reason in {**PRESET_FIELDS_OUTSIDE_KEYS, **REQUEST_FIELDS_OUTSIDE_KEYS}.values())


@pytest.mark.parametrize("field", sorted({f for s in STAGE_SPECS for f in s.preset_fields}))
def test_changing_a_preset_field_misses_exactly_the_stages_that_read_it(field):
    preset = get_preset("default")
    base = _keys(preset=preset)
    other = VALID_ALTERNATIVES.get(field, _other_value(getattr(preset, field)))
    changed = _keys(preset=dataclasses.replace(preset, **{field: other}))
    readers = {s.name for s in STAGE_SPECS if field in s.preset_fields}
    assert {n for n in base if base[n] != changed[n]} == _downstream(readers)


@pytest.mark.parametrize("field", sorted({f for s in STAGE_SPECS for f in s.request_fields}))
def test_changing_a_request_field_misses_exactly_the_stages_that_read_it(field):
    request = _request()
    value = b"other-bytes" if field == "image" else _other_value(getattr(request, field))
    base, changed = _keys(request=request), _keys(request=dataclasses.replace(request, **{field: value}))
    readers = {s.name for s in STAGE_SPECS if field in s.request_fields}
    assert {n for n in base if base[n] != changed[n]} == _downstream(readers)


def test_a_new_prompt_keeps_the_subject_stages_and_a_new_seed_keeps_the_seed_free_ones():
    base = _keys()
    prompt = _keys(request=_request(prompt="made of gold"))
    seed = _keys(request=_request(seed=4))
    assert [n for n in base if base[n] == prompt[n]] == ["subject", "subject_views", "identity"]
    assert [n for n in base if base[n] == seed[n]] == ["subject", "subject_views", "identity", "edited_views", "subject_prior"]


@pytest.mark.parametrize("change", [
    {"version": "0.1.1"},
    {"dtype": "bfloat16"},
    {"device_type": "cuda"},
])
def test_package_version_dtype_and_device_miss_every_stage(change):
    base, changed = _keys(), _keys(context=_context(**change))
    assert all(base[n] != changed[n] for n in base)


def test_weights_miss_the_stages_that_load_them_and_everything_after():
    base = _keys()
    for role in ROLES:
        fps = {r: f"fp-{r}" for r in ROLES} | {role: "replaced"}
        changed = _keys(context=_context(fingerprints=fps))
        readers = {s.name for s in STAGE_SPECS if role in s.models}
        assert {n for n in base if base[n] != changed[n]} == _downstream(readers), role
    seg = _keys(context=_context(fingerprints={r: f"fp-{r}" for r in ROLES} | {"segmenter": "seg"}))
    assert {n for n in base if base[n] != seg[n]} == _downstream({s.name for s in STAGE_SPECS if s.uses_segmenter})


def test_a_resolved_reconstruction_threshold_misses_only_the_reconstruction():
    base = _keys()
    changed = _keys(context=_context(extra={"reconstruct": {"grid_res": 512, "iterations": 301}}))
    assert {n for n in base if base[n] != changed[n]} == {"reconstruct"}


def test_code_fingerprint_is_the_import_closure_of_the_stage_module():
    """Found from the imports, not listed by hand: both trainers' loop (pipeline/training.py) is in
    the trained stages' code, and the reconstruction's code holds no model or training code."""
    closure = {s.name: {p.relative_to(PACKAGE_DIR).as_posix() for p in import_closure(stage_code_modules(s))} for s in STAGE_SPECS}
    for stage in ("identity", "subject_prior"):
        assert "pipeline/training.py" in closure[stage], stage
    assert "pipeline/preprocess.py" in closure["subject"]
    assert {"recon/reconstruct.py", "recon/mesh.py", "views.py"} <= closure["reconstruct"]
    assert not any(f.startswith(("models/", "service/")) or f == "pipeline/training.py" for f in closure["reconstruct"])
    assert not any(f.startswith(("service/", "cli/")) for files in closure.values() for f in files)


def test_changing_any_source_file_misses_exactly_the_stages_whose_code_imports_it(monkeypatch):
    """Every file of the package, one at a time, changed by one byte (through `code_fingerprint`'s
    reader, the tree stays as it is): the stages whose import closure holds it miss, with everything
    downstream of them, and no other stage."""
    import make_your_3d.pipeline.stages as stages

    base = _keys()
    closure = {s.name: set(import_closure(stage_code_modules(s))) for s in STAGE_SPECS}
    original = stages.code_fingerprint
    files = sorted(PACKAGE_DIR.rglob("*.py"))
    assert len(files) > 50
    touched_any = 0
    for path in files:
        def mutated(modules, read=None, path=path):
            return original(modules, read=lambda p: p.read_bytes() + (b"#" if p == path else b""))

        monkeypatch.setattr(stages, "code_fingerprint", mutated)
        changed = _keys()
        readers = {name for name, files_ in closure.items() if path in files_}
        touched_any += bool(readers)
        assert {n for n in base if base[n] != changed[n]} == _downstream(readers), path
    assert touched_any > 30


def test_a_stage_reads_only_what_it_declares(tiny_models: Path):
    """`StageInputs` gives a stage its declared request and preset fields, upstream folders and
    models; anything else raises, so a stage cannot read what its key leaves out."""
    import torch

    from make_your_3d.pipeline.model_host import ModelHost, StageModels
    from make_your_3d.pipeline.stages import UndeclaredInput
    from make_your_3d.pipeline.stages import build_stage_inputs
    from make_your_3d.progress import Reporter

    request, preset = _request(), get_preset("default")
    host = ModelHost(tiny_models, torch.device("cpu"))
    for spec in STAGE_SPECS:
        models = StageModels(host, spec.name, spec.models, spec.uses_segmenter, torch.float32, False)
        dirs = {s.name: Path(s.name) for s in STAGE_SPECS}
        inputs = build_stage_inputs(spec, request, "decoded-image", preset, models, dirs, torch.device("cpu"), Reporter(spec.name))
        for f in spec.request_fields:
            assert getattr(inputs.request, f) == ("decoded-image" if f == "image" else getattr(request, f))
        for f in spec.preset_fields:
            assert getattr(inputs.preset, f) == getattr(preset, f)
        for f in {f.name for f in dataclasses.fields(GenerateRequest)} - set(spec.request_fields):
            with pytest.raises(UndeclaredInput, match=f"{spec.name} reads request.{f}"):
                getattr(inputs.request, f)
        for f in {f.name for f in dataclasses.fields(Preset)} - set(spec.preset_fields):
            with pytest.raises(UndeclaredInput, match=f"{spec.name} reads preset.{f}"):
                getattr(inputs.preset, f)
        for other in STAGE_SPECS:
            if other.name in spec.upstream:
                assert inputs.upstream(other.name) == Path(other.name)
            else:
                with pytest.raises(UndeclaredInput):
                    inputs.upstream(other.name)
        if "multiview" not in spec.models:
            with pytest.raises(UndeclaredInput):
                with models.multiview():
                    pass
        if "personalized" not in spec.models:
            with pytest.raises(UndeclaredInput):
                with models.personalized():
                    pass
        if not spec.uses_segmenter:
            with pytest.raises(UndeclaredInput):
                models.segmenter()


def test_the_subject_description_misses_the_subject_it_masks():
    """The background remover is prompted with the subject description, so a new description must
    recompute the masked subject and the views made from it (the views' key left it out before)."""
    base, changed = _keys(), _keys(request=_request(subject="a plush dog"))
    assert base["subject"] != changed["subject"] and base["subject_views"] != changed["subject_views"]


def test_generator_misses_the_cache_after_an_upgrade_and_rejects_a_bad_recon_key_first(tiny_models: Path, tmp_path, example_image, monkeypatch):
    """End to end: the same inputs hit the cache, a new package version misses every stage, and an
    unknown reconstruction setting is a bad request before any stage runs."""
    from make_your_3d.errors import BadRequest
    from make_your_3d.pipeline import generate as gen

    generator = gen.Generator(tiny_models, tmp_path / "cache", "cpu", overrides=TEST_OVERRIDES)
    request = GenerateRequest(image=example_image.read_bytes(), prompt="wearing a red scarf", seed=0)
    first = generator.run(request, tmp_path / "a")
    assert first.cached_stages == []
    assert generator.run(request, tmp_path / "b").cached_stages == list(STAGES)
    monkeypatch.setattr(gen, "__version__", "99.0.0")
    assert generator.run(request, tmp_path / "c").cached_stages == []
    bad = gen.Generator(tiny_models, tmp_path / "cache", "cpu", overrides={**TEST_OVERRIDES, "recon": {"no_such_knob": 1}})
    with pytest.raises(BadRequest, match="no_such_knob"):
        bad.run(request, tmp_path / "d")
    assert not (tmp_path / "d").exists()
