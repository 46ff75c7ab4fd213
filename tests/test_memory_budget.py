"""The memory budget: measured per-stage peaks decide whether a job fits, which preset `auto` picks,
and how many images one batched call holds; a lowvram job keeps only the stage's models loaded."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from bench_scripts import load_script

from make_your_3d.errors import TooHeavy
from make_your_3d.pipeline import memory
from make_your_3d.pipeline.memory import GB, MEASURED_PEAK_GB, batches_for, check_fits, choose_batch, job_need, pick_preset
from make_your_3d.pipeline.presets import get_preset

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "memory_2026-12-05.json"
# Every per-stage results file (memory_<date>.json: one session's memory_bench rows each); not the
# whole-chain files (memory_chain_*) nor the kept pre-fix chain (memory_fp32_chain_before_trim_*).
PER_STAGE_RESULTS = sorted(RESULTS.parent.glob("memory_2*.json"))
DTYPE_NAMES = {"bf16": "bfloat16", "fp32": "float32"}


def test_the_table_is_the_measured_json():
    """Every figure in the backend's table is a measured row's peak (the source is the benchmark): the
    "after" rows that measured their preset as configured (not the planner's one-model-at-a-time runs)."""
    bench = load_script("memory_bench")
    rows = [r for path in PER_STAGE_RESULTS for r in json.loads(path.read_text())
            if r["status"] == "ok" and r.get("code") == "after" and bench.as_configured(r)]
    measured: dict = {}
    for r in rows:  # the first measurement of a cell, as memory_bench.table_rows keeps it
        measured.setdefault(("cpu", DTYPE_NAMES[r["precision"]], r["preset"], r["stage"]), r["peak_rss_gb"])
    # In-chain peaks (one whole-chain process, benchmarks/results/memory_chain_*.json) fill only the
    # stages that have no per-stage row, and memory.IN_CHAIN names exactly those.
    in_chain = set()
    for path in sorted(RESULTS.parent.glob("memory_chain_*.json")):
        for r in bench.chain_rows(json.loads(path.read_text()), path.name):
            key = ("cpu", DTYPE_NAMES[r["precision"]], r["preset"], r["stage"])
            if r["status"] == "ok" and bench.as_configured(r) and key not in measured:
                measured[key] = r["peak_rss_gb"]
                in_chain.add(key)
    table = {(k, d, p, s): gb for (k, d), presets in MEASURED_PEAK_GB.items() for p, stages in presets.items() for s, gb in stages.items()}
    assert table and table == measured
    assert {(k, d, p, s) for (k, d), presets in memory.IN_CHAIN.items() for p, stages in presets.items() for s in stages} == in_chain
    assert {"default", "lowvram"} <= set(MEASURED_PEAK_GB[("cpu", "bfloat16")])
    assert "edited_views" in MEASURED_PEAK_GB[("cpu", "bfloat16")]["lowvram"]


def test_the_measured_bf16_peaks_meet_the_targets():
    """Issue 24's targets, bf16 on the CPU at the published sizes: lowvram <= 8 GB and default <= 12 GB
    at the largest stage (a table refreshed with worse figures fails here)."""
    assert job_need("cpu", "bfloat16", "default").gb <= 12.0
    assert job_need("cpu", "bfloat16", "lowvram").gb <= 8.0


def test_the_fp32_default_chain_ran_to_the_end_within_24_gb():
    """Issue 24: default in fp32 on the CPU runs to the end at the published sizes on a 24 GB machine.
    The whole chain's result (one process, as a service job) finished every stage, and its largest
    in-chain stage is the fp32 admission figure. A stopped or failed run, or a table not refreshed
    from it, fails here."""
    res = json.loads((RESULTS.parent / "memory_chain_fp32_2026-12-05.json").read_text())
    sc = res["scenarios"]["new subject"]
    assert res["sizes"] == "published" and res["dtype"] == "float32" and "stopped" not in res and "error" not in sc
    assert set(sc["stages"]) == {*memory.MODEL_STAGES, "reconstruct"} and sc["cached_stages"] == []
    need = job_need("cpu", "float32", "default")
    assert need.gb == max(r["rss"]["peak_rss_gb"] for r in sc["stages"].values()) and sc["ru_maxrss_gb"] < 24.0


def test_fp32_default_that_does_not_fit_names_lowvram(monkeypatch):
    """fp32 default is measured (the chain's 16.9 GB) and lowvram in fp32 too now (its own stages in
    processes of their own, third session): a machine between the two is refused default with a sentence
    naming lowvram and its figure, and `auto` picks lowvram there. With lowvram's fp32 figures taken away
    the sentence still names it (unmeasured is not "does not fit"). Fails on the earlier table (lowvram
    fp32 had no need) and on the variant that skips unmeasured presets ("No preset fits")."""
    need, low = job_need("cpu", "float32", "default"), job_need("cpu", "float32", "lowvram")
    assert need is not None and low is not None and low.gb < need.gb
    budget = int((low.gb + 0.05) * GB)
    with pytest.raises(TooHeavy, match=f"Pick the lowvram preset \\(about {low.gb:.1f} GB\\)") as err:
        check_fits("cpu", "float32", "default", budget)
    assert "fp32" in str(err.value) and need.stage in str(err.value)
    check_fits("cpu", "float32", "default", int((need.gb + 0.1) * GB))
    check_fits("cpu", "float32", "lowvram", budget)
    assert pick_preset("cpu", "float32", budget) == "lowvram"
    table = {k: {p: dict(v) for p, v in t.items()} for k, t in MEASURED_PEAK_GB.items()}
    del table[("cpu", "float32")]["lowvram"]
    monkeypatch.setattr(memory, "MEASURED_PEAK_GB", table)
    assert job_need("cpu", "float32", "lowvram") is None
    with pytest.raises(TooHeavy, match="its peak in fp32 is not measured"):
        check_fits("cpu", "float32", "default", int(12 * GB))
    assert pick_preset("cpu", "float32", int(12 * GB)) == "lowvram"


@pytest.mark.parametrize("kind, dtype", [("cpu", "bfloat16"), ("mps", "float16")])
def test_default_that_does_not_fit_is_refused_naming_lowvram(kind, dtype):
    default, low = job_need(kind, dtype, "default"), job_need(kind, dtype, "lowvram")
    assert default is not None and low is not None and low.gb < default.gb
    budget = int((default.gb - 0.05) * GB)
    with pytest.raises(TooHeavy) as err:
        check_fits(kind, dtype, "default", budget)
    message = str(err.value)
    assert err.value.code == "too_heavy" and "Pick the lowvram preset" in message and default.stage in message
    check_fits(kind, dtype, "default", int(default.gb * GB) + 1)  # enough: no refusal
    check_fits(kind, dtype, "lowvram", budget)


def test_nothing_fits_says_so():
    low = job_need("cpu", "bfloat16", "lowvram")
    with pytest.raises(TooHeavy, match="No preset fits"):
        check_fits("cpu", "bfloat16", "default", int((low.gb - 0.05) * GB))


def test_auto_picks_lowvram_when_default_does_not_fit():
    default = job_need("cpu", "bfloat16", "default")
    assert pick_preset("cpu", "bfloat16", int(default.gb * GB) + 1) == "default"
    assert pick_preset("cpu", "bfloat16", int((default.gb - 0.05) * GB)) == "lowvram"
    assert pick_preset("cpu", "bfloat16", None) == "default"


def test_fast_shares_default_figures_and_unmeasured_is_not_refused():
    default = memory.stage_peaks("cpu", "bfloat16", "default")
    low = memory.stage_peaks("cpu", "bfloat16", "lowvram")
    # fast's reconstruction preset is lowvram's (the same computation), its model stages default's
    assert memory.stage_peaks("cpu", "bfloat16", "fast") == {**default, "reconstruct": low["reconstruct"]}
    assert job_need("cpu", "bfloat16", "fast").gb == default["edited_views"]
    check_fits("cpu", "float64", "default", 1)  # no figures for this precision: nothing to refuse on
    assert job_need("cuda", "float16", "default") is None  # VRAM not measured: CPU RSS would over-refuse
    check_fits("cuda", "float16", "default", 1)


def test_batch_is_lowered_until_the_batched_stage_fits():
    assert choose_batch(6, 5.0, 0.5, int(20 * GB)) == 6
    assert choose_batch(6, 5.0, 0.5, int(6.0 * GB)) == 3
    assert choose_batch(6, 5.0, 0.5, int(1.0 * GB)) == 1
    preset = get_preset("default")
    one = MEASURED_PEAK_GB[("cpu", "bfloat16")]["lowvram"]["edited_views"]
    plenty = batches_for("cpu", "bfloat16", preset, int(100 * GB))
    assert (plenty["edit_batch"], plenty["normal_batch"]) == (6, 6)
    tight = batches_for("cpu", "bfloat16", preset, int(one * GB) + 1)
    assert (tight["edit_batch"], tight["normal_batch"]) == (1, 1) and "lowered" in tight["why"]
    unknown = batches_for("cpu", "bfloat16", preset, None)
    assert unknown["edit_batch"] == 6


def test_release_keeps_only_the_declared_roles():
    from make_your_3d.pipeline.model_host import ModelHost

    host = ModelHost("/nonexistent", torch.device("cpu"))
    host._loaded = {"multiview:torch.float32": object(), "personalized:torch.float32": object(), "normal_estimator:torch.float32": object()}
    host._original_ip = {}
    dropped = host.release({"personalized", "ip_adapter", "image_encoder"})
    assert sorted(dropped) == ["multiview", "normal_estimator"] and list(host._loaded) == ["personalized:torch.float32"]
    assert host._original_ip == {}


def test_service_refuses_before_the_job_starts(tmp_path, monkeypatch):
    """The service's admission check: default on a CPU whose budget is under default's largest
    stage is refused with the sentence naming lowvram; lowvram passes."""
    from make_your_3d.service.app import ServiceContext
    from make_your_3d.service.store import JobSpec

    need = job_need("cpu", "bfloat16", "default")
    low = job_need("cpu", "bfloat16", "lowvram")
    assert need is not None and low is not None
    budget = int((need.gb + low.gb) / 2 * GB)
    ctx = ServiceContext(None, None, tmp_path, "default", None, budget, {"precision": "bf16"}, "cpu")
    spec = JobSpec("wearing a red scarf", "", None, 0, "default", None, None)
    with pytest.raises(TooHeavy, match="lowvram"):
        ctx.check_memory(spec)
    ctx.check_memory(JobSpec("wearing a red scarf", "", None, 0, "lowvram", None, None))
    ctx.check_memory(JobSpec("wearing a red scarf", "", None, 0, "auto", None, None))  # auto picks lowvram here
    monkeypatch.setattr(memory, "MEASURED_PEAK_GB", {})
    ctx.check_memory(spec)  # without figures only the reconstruction estimate applies


def test_auto_resolves_to_the_preset_that_fits(monkeypatch):
    from make_your_3d.pipeline.memory import resolve_preset_name

    default = job_need("cpu", "bfloat16", "default")
    cpu = torch.device("cpu")
    bf16 = lambda _name: "bf16"  # noqa: E731
    monkeypatch.setattr(memory, "capacity_bytes", lambda device, ram=None: int((default.gb - 0.05) * GB))
    assert resolve_preset_name("auto", cpu, bf16) == "lowvram"
    assert resolve_preset_name("auto", cpu, bf16, tiny=True) == "default"  # toy sizes fit anywhere
    assert resolve_preset_name("quality", cpu, bf16) == "quality"  # a named preset is never changed
    monkeypatch.setattr(memory, "capacity_bytes", lambda device, ram=None: int(default.gb * GB) + 1)
    assert resolve_preset_name("auto", cpu, bf16) == "default"


def test_requests_may_ask_for_auto():
    from make_your_3d.errors import BadRequest
    from make_your_3d.pipeline.request import GenerateRequest, validate_request

    image = (Path(__file__).resolve().parents[1] / "examples" / "toy_bear.png").read_bytes()
    validate_request(GenerateRequest(image=image, prompt="wearing a red scarf", preset="auto"))
    with pytest.raises(BadRequest, match="auto"):
        validate_request(GenerateRequest(image=image, prompt="wearing a red scarf", preset="huge"))


def test_normals_run_in_bf16_on_the_cpu_at_a_processing_resolution(tiny_models):
    """The published 768 px processing resolution in bf16 on the CPU (the memory benchmark's proxy
    for fp16): the pipeline's own half-precision antialiased resize does not exist there."""
    import numpy as np
    from PIL import Image

    from make_your_3d.models.normals import estimate_normals, load_normal_estimator
    from make_your_3d.models.registry import ROLES

    pipe = load_normal_estimator(ROLES["normal_estimator"].path(tiny_models), "cpu", torch.bfloat16)
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 40, 3), dtype=np.uint8)) for i in range(2)]
    normals = estimate_normals(pipe, images, steps=1, processing_resolution=64, generator=torch.Generator().manual_seed(0))
    assert normals.shape == (2, 40, 40, 3) and np.isfinite(normals).all()
    np.testing.assert_allclose(np.linalg.norm(normals, axis=-1), 1.0, atol=1e-3)


def test_lowvram_holds_one_model_at_a_time_on_the_cpu(tiny_models, tmp_path, monkeypatch):
    """lowvram on the CPU: when a model loads, no other pipeline is alive anywhere (not in the host,
    not in a stage's local names), so its memory is really given back."""
    import gc

    from diffusers import DiffusionPipeline

    from make_your_3d.pipeline.generate import Generator
    from make_your_3d.pipeline.model_host import ModelHost
    from make_your_3d.pipeline.request import GenerateRequest

    alive: list[tuple[str, list[str]]] = []
    real_load = ModelHost.load

    def load(self, name, dtype, offload=False):
        model = real_load(self, name, dtype, offload)
        gc.collect()
        others = sorted({type(o).__name__ for o in gc.get_objects() if isinstance(o, DiffusionPipeline) and o is not model})
        alive.append((name, others))
        return model

    monkeypatch.setattr(ModelHost, "load", load)
    image = (Path(__file__).resolve().parents[1] / "examples" / "toy_bear.png").read_bytes()
    Generator(tiny_models, tmp_path / "cache", "cpu").run(GenerateRequest(image=image, prompt="wearing a red scarf", preset="lowvram"), tmp_path / "out")
    assert {"multiview", "personalized", "normal_estimator"} <= {name for name, _ in alive}
    assert all(others == [] for name, others in alive if name != "segmenter"), alive


def test_edits_keep_the_pipeline_dtype(tiny_models):
    """diffusers' `from_pipe` casts the components it shares to float32 unless told otherwise: a bf16
    pipeline must still be bf16 after an edit (it was silently turned into float32 in place: twice
    the memory at published sizes, and every later stage ran in float32)."""
    from PIL import Image

    from make_your_3d.models.personalized import load_personalized
    from make_your_3d.pipeline.edits import edit_images

    pipe = load_personalized(tiny_models, torch.device("cpu"), torch.bfloat16)
    image = Image.open(Path(__file__).resolve().parents[1] / "examples" / "toy_bear.png")
    [out] = edit_images(pipe, [image], ["a bear"], "", size=32, steps=2, guidance=7.5, strength=0.8, seed=0)
    assert out.size == (32, 32)
    dtypes = {p.dtype for module in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.image_encoder) for p in module.parameters()}
    assert dtypes == {torch.bfloat16}


SYNTHETIC = {("cpu", "float32"): {"default": {"edited_views": 20.0}, "lowvram": {"edited_views": 10.0}}}


def test_both_models_that_do_not_fit_are_held_one_at_a_time(monkeypatch):
    """Default keeps both edited-views models loaded when its measured peak fits the free memory; when it
    does not, the stage holds one model at a time and the batches come from the one-model figures."""
    monkeypatch.setattr(memory, "MEASURED_PEAK_GB", SYNTHETIC)
    preset = get_preset("default")
    roomy = batches_for("cpu", "float32", preset, int(20.5 * GB))
    assert roomy["one_model_at_a_time"] is False and (roomy["edit_batch"], roomy["normal_batch"]) == (6, 6)
    short = batches_for("cpu", "float32", preset, int(19.5 * GB))  # per image (20 - 10) / 5 = 2 GB: 10 + 5 x 2 > 19.5
    assert short["one_model_at_a_time"] is True and (short["edit_batch"], short["normal_batch"]) == (5, 5)
    assert "one model at a time" in short["why"]
    low = batches_for("cpu", "float32", get_preset("lowvram"), int(100 * GB))
    assert low["one_model_at_a_time"] is True and low["edit_batch"] == 1


def test_unmeasured_fp32_is_planned_from_bf16_doubled(monkeypatch):
    """fp32's two-model figure cannot be measured on a 24 GB machine: the planner doubles bf16's (every
    byte twice), so a default fp32 job that would not fit holds one model at a time; a precision with
    no figures at all keeps the preset's settings."""
    monkeypatch.setattr(memory, "MEASURED_PEAK_GB", {("cpu", "bfloat16"): {"default": {"edited_views": 9.0}, "lowvram": {"edited_views": 4.0}}})
    preset = get_preset("default")
    assert memory.batched_figure("cpu", "float32", "default") == (18.0, "estimated: bfloat16 x 2")
    assert memory.row_gb("cpu", "float32") == pytest.approx(2.0)
    short = batches_for("cpu", "float32", preset, int(17 * GB))
    assert short["one_model_at_a_time"] is True and short["edit_batch"] == 5 and "estimated" in short["why"]
    assert batches_for("cpu", "float32", preset, int(18.5 * GB))["one_model_at_a_time"] is False
    assert batches_for("cpu", "float64", preset, int(1 * GB)) == {"edit_batch": 6, "normal_batch": 6, "one_model_at_a_time": False,
                                                                  "why": "the preset's (no figures or free memory for this device)"}


def test_unmeasurable_two_model_stage_needs_the_one_model_figure(monkeypatch):
    """Default's fp32 two-model edited views cannot be measured on a 24 GB machine; the planner runs them
    one model at a time there, so the admission check counts lowvram's one-model figure for that stage
    (and still nothing when any other model stage is missing)."""
    others = {"subject": 0.5, "subject_views": 8.0, "identity": 12.0, "subject_prior": 11.0, "front_view": 9.0, "multiview": 8.5}
    table = {("cpu", "float32"): {"default": dict(others), "lowvram": {"edited_views": 13.0}}}
    monkeypatch.setattr(memory, "MEASURED_PEAK_GB", table)
    need = job_need("cpu", "float32", "default")
    assert need.gb == 13.0 and need.stage == "edited_views (one model at a time)"
    with pytest.raises(TooHeavy, match="edited_views"):
        check_fits("cpu", "float32", "default", int(12.5 * GB))
    del table[("cpu", "float32")]["default"]["subject_prior"]
    assert job_need("cpu", "float32", "default") is None


def test_default_short_of_memory_runs_one_model_at_a_time(tiny_models, tmp_path, monkeypatch):
    """The whole chain under a default job whose two edited-views models do not fit the free memory:
    the planner holds one model at a time (no other pipeline alive when a model loads), lowers the
    batches, and job.json records the choice. The tiny set stands in for the published one here
    (its figures: SYNTHETIC; free memory: 15 GB)."""
    import gc

    from diffusers import DiffusionPipeline

    from make_your_3d.pipeline import generate
    from make_your_3d.pipeline.generate import Generator
    from make_your_3d.pipeline.model_host import ModelHost
    from make_your_3d.pipeline.request import GenerateRequest

    monkeypatch.setattr(memory, "MEASURED_PEAK_GB", SYNTHETIC)
    monkeypatch.setattr(generate, "is_tiny", lambda _dir: False)
    monkeypatch.setattr(generate, "available_bytes", lambda _device: int(15 * GB))
    alive: list[tuple[str, list[str]]] = []
    real_load = ModelHost.load

    def load(self, name, dtype, offload=False):
        model = real_load(self, name, dtype, offload)
        gc.collect()
        alive.append((name, sorted({type(o).__name__ for o in gc.get_objects() if isinstance(o, DiffusionPipeline) and o is not model})))
        return model

    monkeypatch.setattr(ModelHost, "load", load)
    image = (Path(__file__).resolve().parents[1] / "examples" / "toy_bear.png").read_bytes()
    out = tmp_path / "out"
    Generator(tiny_models, tmp_path / "cache", "cpu").run(GenerateRequest(image=image, prompt="wearing a red scarf", preset="default"), out)
    record = json.loads((out / "job.json").read_text())
    assert record["batches"]["one_model_at_a_time"] is True and record["preset"]["offload"] is True
    assert (record["batches"]["edit_batch"], record["preset"]["edit_batch"]) == (3, 3)  # 10 + 2 x 2 <= 15 < 10 + 3 x 2
    assert {"multiview", "personalized", "normal_estimator"} <= {name for name, _ in alive}
    assert all(others == [] for name, others in alive if name != "segmenter"), alive


# --- the per-request reconstruction estimate (request.estimate_job_memory) against the measured table ---

def _measured_recon(preset: str) -> float:
    """The largest measured reconstruct figure of `preset` in any precision (the stage loads no model)."""
    return max(t[preset]["reconstruct"] for t in MEASURED_PEAK_GB.values() if "reconstruct" in t.get(preset, {}))


def test_recon_estimate_is_the_measured_peak_at_the_preset_defaults():
    """At a reconstruction preset's own faces and texture the estimate is the measured peak of that
    preset's grid (default's 512 points, fast's 320 through lowvram). The earlier formula put default
    at 1.9 GB against 9.71 measured: it fails here."""
    from make_your_3d.pipeline.request import estimate_job_memory

    assert estimate_job_memory("default", None, None) == int(_measured_recon("default") * GB)
    assert estimate_job_memory("fast", None, None) == int(_measured_recon("lowvram") * GB)
    assert estimate_job_memory("default", 40_000, 2048) == estimate_job_memory("default", None, None)  # the preset's own


def test_recon_estimate_grows_only_with_what_is_asked_beyond_the_preset():
    """More faces and a larger texture add their own cost on top of the measured peak; fewer and
    smaller do not lower it (the peak is the surface extraction on the grid). Fails on a variant that
    scales the whole figure with the texture or subtracts for a smaller request."""
    from make_your_3d.pipeline import request

    base = request.estimate_job_memory("default", None, None)
    more = request.estimate_job_memory("default", 80_000, 4096)
    assert more - base == request._BYTES_PER_TEXEL * (4096**2 - 2048**2) + request._BYTES_PER_FACE * 40_000
    assert request.estimate_job_memory("default", 5_000, 512) == base


def test_quality_recon_is_measured_and_an_unmeasured_grid_lies_on_the_line(monkeypatch):
    """quality's reconstruction is measured (576-point grid): its estimate at its own faces and texture is
    that figure. Without it, the estimate is the straight line in grid points through the measured
    grids (default 512, fast 320), here on synthetic figures. Fails if an unmeasured preset falls back
    to the earlier base (about 2.3 GB for quality) or to the nearest measured figure."""
    from make_your_3d.pipeline.request import estimate_job_memory
    from make_your_3d.recon.config import PRESETS as RECON

    gb, source = memory.recon_peak_gb("quality")
    assert source == "measured" and gb == MEASURED_PEAK_GB[("cpu", "bfloat16")]["quality"]["reconstruct"]
    assert estimate_job_memory("quality", None, None) == int(gb * GB)
    monkeypatch.setattr(memory, "MEASURED_PEAK_GB", {("cpu", "bfloat16"): {"default": {"reconstruct": 10.0}, "lowvram": {"reconstruct": 4.0}}})
    n = {name: RECON[name].fuse.grid_res ** 3 for name in ("fast", "default", "quality")}
    line = 10.0 + (10.0 - 4.0) / (n["default"] - n["fast"]) * (n["quality"] - n["default"])
    gb, source = memory.recon_peak_gb("quality")
    assert source.startswith("estimated") and gb == pytest.approx(line) and gb > 10.0
    assert estimate_job_memory("quality", None, None) == int(gb * GB)


def test_recon_too_heavy_names_what_fits():
    """The admission check of the reconstruction against a RAM budget between the measured fast and
    default figures: default is refused with a sentence naming lowvram (whose fast reconstruction fits),
    lowvram's is accepted; a request whose preset fits only at its own faces and texture is told to
    lower them. With the earlier 1.9 GB estimate default was accepted here."""
    from make_your_3d.pipeline.request import check_job_memory

    budget = int((_measured_recon("default") + _measured_recon("lowvram")) / 2 * GB)
    with pytest.raises(TooHeavy, match="Pick the lowvram preset") as err:
        check_job_memory("default", None, None, budget)
    assert err.value.code == "too_heavy" and "default reconstruction" in str(err.value)
    check_job_memory("fast", None, None, budget)
    roomy = int((_measured_recon("default") + 0.5) * GB)
    check_job_memory("default", None, None, roomy)
    with pytest.raises(TooHeavy, match="Lower the face count or the texture size"):
        check_job_memory("default", 40_000, 4096, roomy)
    with pytest.raises(TooHeavy, match="No preset's reconstruction fits"):
        check_job_memory("default", None, None, int((_measured_recon("lowvram") - 0.1) * GB))


def test_release_before_a_stage_uses_the_estimate_where_fp32_is_not_measured(monkeypatch):
    """`Generator._make_room` drops the models a stage does not need when free memory is under the stage's
    figure. Where fp32 has no figure for a stage it must still have one (bf16's doubled): with none,
    an fp32 chain kept the multi-view model loaded into the edited views and ran out of memory there.
    Fails on a variant that reads the measured table only (None for fp32's edited views)."""
    monkeypatch.setattr(memory, "MEASURED_PEAK_GB", {("cpu", "bfloat16"): {"default": {"edited_views": 9.0, "subject": 0.5}},
                                                    ("cpu", "float32"): {"default": {"subject": 0.6}}})
    assert memory.stage_need_gb("cpu", "float32", "default", "edited_views") == 18.0
    assert memory.stage_need_gb("cpu", "float32", "default", "subject") == 0.6  # measured wins
    assert memory.stage_need_gb("cpu", "float64", "default", "edited_views") is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's heap: malloc_trim is Linux's (elsewhere the call is a no-op)")
def test_freed_memory_goes_back_to_the_system():
    """Tensors under glibc's (raised) mmap threshold live in the heap, and freeing them keeps the memory
    resident (the fp32 chain held 17 GB with no model loaded); `return_freed_memory` hands it back.
    In a fresh interpreter so the heap's layout is this test's. Fails on a no-op variant (the 0.8 GB
    stay resident)."""
    import subprocess

    code = (
        "import gc, json, psutil, torch\n"
        "from make_your_3d.pipeline.memory import return_freed_memory\n"
        "p = psutil.Process(); rss = lambda: p.memory_info().rss / 1e9\n"
        "big = torch.ones(30 * 2**20 // 4); del big  # freeing a 30 MB mmapped block raises the threshold to 30 MB\n"
        "base = rss(); ts = [torch.ones(2**20) for _ in range(200)]  # 200 x 4 MB: in the heap now\n"
        "keep = torch.ones(2**18)  # a live block above them: the heap's top cannot shrink by itself\n"
        "del ts; gc.collect(); freed = rss(); ran = return_freed_memory()\n"
        "print(json.dumps([base, freed, rss(), ran]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    base, freed, trimmed, ran = json.loads(out.stdout.strip().splitlines()[-1])
    assert ran and freed - base > 0.5, (base, freed)  # the retention this guards against happens here
    assert trimmed - base < 0.1, (base, freed, trimmed)


def test_shared_figures_are_only_where_no_shape_differs():
    """A preset shares another's figure for a stage (memory.SAME_SHAPES) only where every preset field
    the stage reads (its StageSpec's preset_fields) is equal in both presets or changes no shape
    (memory.SHAPE_FREE_FIELDS). Fails if quality's subject_views or multiview (guidance 3: the guided
    batch of twice the rows) or subject_prior (LoRA rank 16) borrowed default's figure, or if
    lowvram's identity (batch 1) borrowed default's."""
    from make_your_3d.pipeline.presets import PRESETS
    from make_your_3d.pipeline.stages import STAGES

    shared = 0
    for preset, likes in memory.SAME_SHAPES.items():
        for like, stages in likes:
            for stage in stages:
                differ = {f for f in STAGES[stage].preset_fields if getattr(PRESETS[preset], f) != getattr(PRESETS[like], f)}
                assert differ <= set(memory.SHAPE_FREE_FIELDS), (preset, like, stage, differ)
                shared += 1
    assert shared >= 13
    for field in ("mv_guidance", "lora_rank", "identity_batch", "edit_batch", "normal_batch", "recon_preset", "mv_size", "sd_size"):
        assert field not in memory.SHAPE_FREE_FIELDS
    # quality's own stages are the ones its guidance and rank change
    quality_own = {s for s in memory.MODEL_STAGES if any(
        getattr(PRESETS["quality"], f) != getattr(PRESETS["default"], f) and f not in memory.SHAPE_FREE_FIELDS for f in STAGES[s].preset_fields)}
    assert quality_own == {"subject_views", "subject_prior", "multiview"}


def test_an_incomplete_table_is_not_a_need(monkeypatch):
    """A preset's need counts only when every model stage has a figure (its own or shared): quality in
    fp32 shares default's identity and edited views but its guided multi-view stages have no fp32 figure,
    so it has no need there (nothing is refused on a floor). Fails on the earlier rule that counted a
    table as complete once it had the edited views."""
    table = {("cpu", "float32"): {"default": {s: 5.0 for s in memory.MODEL_STAGES}, "quality": {"subject_views": 7.0}}}
    monkeypatch.setattr(memory, "MEASURED_PEAK_GB", table)
    assert memory.stage_peaks("cpu", "float32", "quality")["edited_views"] == 5.0
    assert job_need("cpu", "float32", "quality") is None
    table[("cpu", "float32")]["quality"].update(subject_prior=6.0, multiview=8.0)
    assert job_need("cpu", "float32", "quality") == memory.Need(8.0, "multiview")


def test_in_chain_figures_stand_only_for_a_preset_that_releases_alike(monkeypatch):
    """default's fp32 figures after subject_views are in-chain (what its earlier stages left loaded:
    front_view 16.1 GB holds the multi-view model too). lowvram holds one model at a time, so they do not
    stand for its stages; fast releases as default does, so they do. Fails on the variant that shares
    every figure alike (lowvram in fp32 would need default's in-chain front view and `auto` would find no
    preset for a 12 GB machine)."""
    table = {("cpu", "float32"): {"default": {**{s: 6.0 for s in memory.MODEL_STAGES}, "front_view": 16.0},
                                  "lowvram": {"identity": 9.0, "edited_views": 10.0}}}
    monkeypatch.setattr(memory, "MEASURED_PEAK_GB", table)
    monkeypatch.setattr(memory, "IN_CHAIN", {("cpu", "float32"): {"default": ("identity", "edited_views", "subject_prior", "front_view", "multiview")}})
    low = memory.stage_peaks("cpu", "float32", "lowvram")
    assert set(low) == {"subject", "subject_views", "identity", "edited_views"} and job_need("cpu", "float32", "lowvram") is None
    assert memory.stage_peaks("cpu", "float32", "fast")["front_view"] == 16.0
    monkeypatch.setattr(memory, "IN_CHAIN", {})  # the same figures from processes of their own: shared
    assert job_need("cpu", "float32", "lowvram") == memory.Need(16.0, "front_view")


def test_quality_is_admission_checked_from_its_measured_stages():
    """quality in bf16 has a figure for every stage now (its guided multi-view stages measured on their own):
    its need is its largest stage, and a machine short of it is told to pick default, or lowvram where
    default does not fit either. `auto` never picks quality (it tries default, then lowvram). Fails when
    quality has no need (the earlier table: only its reconstruction) or borrows default's multi-view figures."""
    peaks = memory.stage_peaks("cpu", "bfloat16", "quality")
    own = MEASURED_PEAK_GB[("cpu", "bfloat16")]["quality"]
    assert {s: peaks[s] for s in ("subject_views", "subject_prior", "multiview")} == {s: own[s] for s in ("subject_views", "subject_prior", "multiview")}
    need, default = job_need("cpu", "bfloat16", "quality"), job_need("cpu", "bfloat16", "default")
    assert need is not None and need.gb == max(peaks.values()) and need.gb > default.gb
    check_fits("cpu", "bfloat16", "quality", int(need.gb * GB) + 1)
    with pytest.raises(TooHeavy, match="Pick the default preset") as err:
        check_fits("cpu", "bfloat16", "quality", int((need.gb - 0.05) * GB))
    assert need.stage in str(err.value)
    with pytest.raises(TooHeavy, match="Pick the lowvram preset"):
        check_fits("cpu", "bfloat16", "quality", int((default.gb - 0.05) * GB))
    assert pick_preset("cpu", "bfloat16", int((need.gb - 0.05) * GB)) == "default"


def test_the_report_shows_every_preset_with_where_each_figure_comes_from():
    """memory_bench's report has a column for every preset (fast too, which has no rows of its own): each
    stage's figure the backend uses and its source. Fails if fast's stages are not default's figures or its
    reconstruction not lowvram's, or if the report leaves the module's table changed."""
    bench = load_script("memory_bench")
    before = memory.MEASURED_PEAK_GB
    table = {("cpu", "bfloat16"): {"default": {s: 4.0 for s in memory.MODEL_STAGES} | {"reconstruct": 9.0},
                                   "lowvram": {"identity": 3.0, "edited_views": 3.5, "reconstruct": 2.0}}}
    lines = bench.backend_view(table, {}).splitlines()
    assert memory.MEASURED_PEAK_GB is before
    head = [c.strip() for c in lines[0].split("|")[1:-1]]
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in lines[2:]}
    fast = head.index("fast bf16") - 1
    assert cells["identity"][fast] == "4.00 = default" and cells["reconstruct"][fast] == "2.00 = lowvram"
    lowvram = head.index("lowvram bf16") - 1
    assert cells["identity"][lowvram] == "3.00" and cells["multiview"][lowvram] == "4.00 = default"
    assert cells["**job's need (`job_need`: its largest stage)**"][head.index("default bf16") - 1] == "9.00 (reconstruct)"
    assert cells["subject"][head.index("default fp32") - 1] == "none"


def test_a_shared_in_chain_figure_is_not_undercut_by_a_per_stage_one(monkeypatch):
    """quality in fp32 has per-stage rows of its own (identity 11.6 GB: only its model) for stages it shares
    with default, whose fp32 figures are in-chain (16.9 GB: what a job also holds from earlier stages).
    quality releases models as default does, so a quality job holds the in-chain amount: the larger
    stands. Where the shared figure is per-stage, the preset's own row stands even when smaller. Fails on
    the variant where the own row always wins (quality fp32 admitted 0.9 GB short)."""
    table = {("cpu", "float32"): {"default": {**{s: 6.0 for s in memory.MODEL_STAGES}, "identity": 16.9},
                                  "quality": {**{s: 7.0 for s in memory.MODEL_STAGES}, "identity": 11.6, "front_view": 5.0}}}
    monkeypatch.setattr(memory, "MEASURED_PEAK_GB", table)
    monkeypatch.setattr(memory, "IN_CHAIN", {("cpu", "float32"): {"default": ("identity",)}})
    peaks = memory.stage_peaks("cpu", "float32", "quality")
    assert peaks["identity"] == 16.9 and peaks["front_view"] == 5.0 and peaks["multiview"] == 7.0
    assert job_need("cpu", "float32", "quality") == memory.Need(16.9, "identity")
    monkeypatch.setattr(memory, "IN_CHAIN", {})
    assert memory.stage_peaks("cpu", "float32", "quality")["identity"] == 11.6
