"""The GPU chain benchmark's code path on the CPU: the random model set (published configs on the
meta device, tiny sizes written and loaded by the real loaders) and the whole script at tiny sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from bench_scripts import load_script
from safetensors import safe_open

from make_your_3d.models import random_set
from make_your_3d.models.registry import ROLES


def _bench():
    return load_script("gpu_chain_bench")


def test_published_configs_build_on_meta_with_published_parameter_counts():
    counts = random_set.parameter_counts("published")
    # Counts stated independently of random_set's table: SD 1.5's UNet and Wonder3D v1.0's UNet
    # (issue 16), the IP-Adapter ViT-H image encoder (h94/IP-Adapter model card: 632.08M).
    assert counts["personalized/unet"] == 859_520_964
    assert counts["multiview/unet"] == 910_785_284
    assert round(counts["image_encoder"] / 1e6, 2) == 632.08
    assert counts == random_set.PUBLISHED_PARAMETERS
    net = next(n for n in random_set.NETWORKS if n.name == "normal_estimator/unet")
    module = random_set.build_on_meta(net, random_set.network_config(net))
    assert {p.device.type for p in module.parameters()} == {"meta"}  # nothing was allocated


@pytest.mark.parametrize("sizes", ["published", "tiny"])
def test_cross_attention_widths_match_their_encoders(sizes):
    cfg = {net.name: random_set.network_config(net, sizes) for net in random_set.NETWORKS}
    assert cfg["personalized/unet"]["cross_attention_dim"] == cfg["personalized/text_encoder"]["hidden_size"]
    assert cfg["multiview/unet"]["cross_attention_dim"] == cfg["multiview/image_encoder"]["projection_dim"]
    assert cfg["normal_estimator/unet"]["cross_attention_dim"] == cfg["normal_estimator/text_encoder"]["hidden_size"]
    assert cfg["multiview/unet"]["in_channels"] == 8 and cfg["normal_estimator/unet"]["in_channels"] == 8


def test_step_time_ignores_the_stage_marks():
    bench = _bench()
    Event = bench.Event
    # "starting" (0/1) at t=0, then model loading; steps every 0.5 s from t=10.
    events = [Event("identity", 0, 1, 0.0)] + [Event("identity", i, 4, 10.0 + 0.5 * i) for i in range(1, 5)]
    assert bench.step_time(events, 4) == (0.5, 3)
    row = bench.estimate_stage("identity", 12.0, False, events, {"identity": 4}, {"identity": 200})
    assert row["estimated_s"] == pytest.approx(12.0 + 196 * 0.5)
    # A stage whose events do not report the expected total is left unextrapolated, with a warning.
    row = bench.estimate_stage("identity", 12.0, False, events, {"identity": 5}, {"identity": 200})
    assert row["estimated_s"] == 12.0 and "warning" in row["parts"]["identity"]
    assert bench.estimate_stage("identity", 0.01, True, [], {"identity": 4}, {"identity": 200})["estimated_s"] == 0.01


def test_a_failed_run_keeps_the_stage_spans_its_events_measured():
    bench = _bench()
    rec = bench.Recorder(cuda=False)
    rec.events = [bench.Event("subject_views", 0, 1, 1.0), bench.Event("subject_views", 3, 3, 4.0), bench.Event("identity", 0, 1, 4.5),
                  bench.Event("identity", 1, 3, 6.0)]
    out = bench.failed_scenario(RuntimeError("boom"), rec, cuda=False)
    assert out == {"error": "RuntimeError: boom", "stage_spans_s": {"subject_views": 3.0, "identity": 1.5}, "last_stage": "identity", "peak_gb": None}


def test_whole_script_at_tiny_sizes_on_cpu(tmp_path):
    bench = _bench()
    out = tmp_path / "result.json"
    res = bench.main(["--sizes", "tiny", "--device", "cpu", "--steps-scale", "0.01", "--work", str(tmp_path / "work"), "--json", str(out)])
    assert json.loads(out.read_text())["scenarios"].keys() == {"new subject", "new prompt", "new seed"}

    models = tmp_path / "work" / "models-tiny"
    for role in ROLES.values():
        assert role.complete(models), role.name
        assert (role.path(models) / "checksums.json").is_file()
    # Weights were written from the meta build's names and shapes, in the requested dtype.
    net = next(n for n in random_set.NETWORKS if n.name == "multiview/unet")
    meta = random_set.build_on_meta(net, random_set.network_config(net, "tiny")).state_dict()
    with safe_open(str(models / "multiview" / "unet" / net.weights), framework="pt") as fh:
        assert set(fh.keys()) == set(meta)
        assert all(fh.get_slice(k).get_shape() == list(meta[k].shape) for k in meta)
        assert fh.get_tensor("conv_in.weight").dtype == torch.float32

    assert res["run_steps"] == {"identity_steps": 3, "prior_steps": 3, "sd_steps": 4, "mv_steps": 3, "normal_steps": 2}
    assert res["full_steps"] == {"identity_steps": 200, "prior_steps": 200, "sd_steps": 30, "mv_steps": 50, "normal_steps": 4}
    sc = res["scenarios"]
    assert sc["new subject"]["cached_stages"] == []
    assert sc["new prompt"]["cached_stages"] == ["subject", "subject_views", "identity"]
    assert sc["new seed"]["cached_stages"] == ["subject", "subject_views", "identity", "edited_views", "subject_prior"]
    first = sc["new subject"]["stages"]
    for stage in ("subject_views", "identity", "edited_views", "subject_prior", "front_view", "multiview"):
        parts = first[stage]["parts"]
        assert parts and all("warning" not in p and p["s_per_step"] > 0 for p in parts.values()), (stage, parts)
        expected = first[stage]["measured_s"] + sum((p["steps_full"] - p["steps_run"]) * p["s_per_step"] for p in parts.values())
        assert first[stage]["estimated_s"] == pytest.approx(expected)
    assert set(first["edited_views"]["parts"]) == {"edited_views", "edited_normals"}
    assert first["identity"]["parts"]["identity"] | {"s_per_step": None} == {"steps_run": 3, "steps_full": 200, "s_per_step": None, "gaps": 2}
    assert first["reconstruct"]["parts"] == {} and first["reconstruct"]["estimated_s"] == first["reconstruct"]["measured_s"]
    for name, scenario in sc.items():
        assert scenario["estimated_s"] > scenario["measured_s"] > 0, name
        assert (tmp_path / "work" / "out-default" / name.replace(" ", "_") / "subject.glb").is_file()
    # Cached stages are not extrapolated.
    assert sc["new seed"]["stages"]["identity"]["estimated_s"] == sc["new seed"]["stages"]["identity"]["measured_s"]


def test_flop_floor_counts_the_backward_from_the_first_trained_layer_only():
    floor = load_script("flop_floor")
    # SD 1.5's PNDM scheduler runs PLMS steps: img2img at strength 0.8 of 30 steps makes 25 UNet calls.
    assert floor.img2img_unet_calls(30, 0.8) == 25
    nets = floor.Networks()
    forward = nets.sd_unet_row(256)
    trained = nets.sd_unet_row(256, backward=True)
    assert 1.8 < trained / forward < 2.3  # activation gradients ~ one more forward, weight gradients only at to_v
    # Wrong variant: every weight trained adds the weight gradients, ~ a third forward.
    nets.sd_unet.requires_grad_(True)
    unet = nets.sd_unet
    everything = floor.count(lambda: unet(torch.empty(1, 4, 32, 32, device="meta"), torch.empty(1, device="meta"),
                                          encoder_hidden_states=torch.empty(1, 81, 768, device="meta")).sample.float().square().mean().backward())
    assert everything / forward > 2.6


def test_one_step_memory_run_of_the_first_scenario(tmp_path):
    """The memory run of issue 24: the first scenario only, one step per loop, each stage's peak
    resident memory from the sampler and the memory planner's choice from job.json. Fails if
    --scenarios runs more, if a stage has no RSS peak, or if one-step seconds are extrapolated."""
    bench = _bench()
    res = bench.main(["--sizes", "tiny", "--device", "cpu", "--one-step", "--scenarios", "1", "--work", str(tmp_path / "work")])
    assert list(res["scenarios"]) == ["new subject"] and res["one_step"] and not res["extrapolated"]
    sc = res["scenarios"]["new subject"]
    assert sc["batches"]["edit_batch"] == 6 and "why" in sc["batches"]
    for stage in ("subject_views", "identity", "edited_views", "subject_prior", "front_view", "multiview", "reconstruct"):
        row = sc["stages"][stage]
        assert 0.1 < row["rss"]["peak_rss_gb"] <= sc["ru_maxrss_gb"] + 0.01, (stage, row["rss"])
        assert row["estimated_s"] == row["measured_s"] and len(row["load_avg_at_start"]) == 3
    assert res["run_steps"]["identity_steps"] == 1 and res["ru_maxrss_gb"] >= sc["ru_maxrss_gb"]


def test_the_machine_guard_stops_the_run_and_keeps_what_it_measured(tmp_path):
    """Under the reserve the run kills itself (the machine must not go down with it) after writing its
    partial results. A reserve no machine has makes it stop at once."""
    import os
    import subprocess
    import sys

    out = tmp_path / "partial.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_chain_bench.py"), "--sizes", "tiny", "--device", "cpu", "--one-step", "--scenarios", "1",
                           "--work", str(tmp_path / "work"), "--json", str(out), "--reserve-gb", "1e6"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
    partial = json.loads(out.read_text())
    assert partial["stopped"].startswith("stopped in ") and "reserve 1000000.0 GB" in partial["stopped"]
    assert partial["ru_maxrss_gb"] > 0 and "rss_by_stage" in partial
