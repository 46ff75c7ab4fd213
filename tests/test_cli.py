"""The command line a user meets first: fast, clear errors (no traceback, no torch import), defaults
in every help text, one rule for the tiny model set, and the per-user stage cache."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from make_your_3d.cli import build_parser
from make_your_3d.cli.cache import cache_info, clear_cache
from make_your_3d.paths import CACHE_ENV, default_cache_dir, resolve_cache_dir
from make_your_3d.pipeline.cache import StageCache
from make_your_3d.pipeline.presets import PRESETS, TEST_OVERRIDES, resolve_preset

CLI = [sys.executable, "-m", "make_your_3d"]
FAST_S = 2.0  # a wrong argument or path is answered before torch/diffusers load (those alone take several s)


def run_cli(*args: str, env: dict | None = None, timeout: float = 60) -> tuple[subprocess.CompletedProcess, float]:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    t0 = time.monotonic()
    res = subprocess.run([*CLI, *args], capture_output=True, text=True, env=full_env, timeout=timeout)
    return res, time.monotonic() - t0


def assert_clear_error(res: subprocess.CompletedProcess, seconds: float, *needles: str) -> None:
    out = res.stdout + res.stderr
    assert res.returncode == 2, out
    assert "Traceback" not in out, out
    assert seconds < FAST_S, f"took {seconds:.2f} s: {out}"
    for needle in needles:
        assert needle in out, (needle, out)


# ------------------------------------------------------------------------------------------------
# errors in under a second, never a traceback
# ------------------------------------------------------------------------------------------------


def test_reconstruct_settings_are_checked_before_torch_loads(tmp_path: Path):
    views = tmp_path / "views"
    views.mkdir()
    (views / "cameras.json").write_text("{}")
    res, s = run_cli("reconstruct", str(views), "--out", str(tmp_path / "x.glb"), "--set", "lift.no_such=1")
    assert_clear_error(res, s, "error [bad_request]", "lift.no_such")
    res, s = run_cli("reconstruct", str(views), "--out", str(tmp_path / "x.glb"), "--set", "lift.contact_px=oops")
    assert_clear_error(res, s, "error [bad_request]", "lift.contact_px")
def test_missing_image_is_answered_fast_without_importing_torch(tmp_path: Path):
    res, s = run_cli("generate", str(tmp_path / "nope.png"), "--prompt", "wearing a hat")
    assert_clear_error(res, s, "error [bad_image]", "does not exist")
    # the check runs before any heavy import: the same process never loaded torch
    code = ("import sys; from make_your_3d.cli import main; rc = main(['generate', 'nope.png', '--prompt', 'x']); "
            "print('torch' in sys.modules, rc)")
    probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert probe.stdout.split() == ["False", "2"], probe.stdout + probe.stderr


def test_folder_given_as_image(tmp_path: Path):
    res, s = run_cli("generate", str(tmp_path), "--prompt", "wearing a hat")
    assert_clear_error(res, s, "is a folder", "one image file")
    res, s = run_cli("multiview", str(tmp_path), "--out", str(tmp_path / "v"))
    assert_clear_error(res, s, "is a folder")


def test_not_an_image(tmp_path: Path):
    bad = tmp_path / "notes.png"
    bad.write_text("hello")
    res, s = run_cli("generate", str(bad), "--prompt", "wearing a hat")
    assert_clear_error(res, s, "not a PNG, JPEG or WebP")


def test_bad_numbers_and_choices(tmp_path: Path, example_image: Path):
    img = str(example_image)
    res, s = run_cli("multiview", img, "--out", str(tmp_path / "v"), "--steps", "0")
    assert_clear_error(res, s, "--steps", "from 1")
    res, s = run_cli("generate", img, "--prompt", "x", "--device", "gpu")
    assert_clear_error(res, s, "--device", "auto, cpu, cuda")
    res, s = run_cli("generate", img, "--prompt", "x", "--variants", "0")
    assert_clear_error(res, s, "--variants")
    res, s = run_cli("generate", img, "--prompt", "   ")
    assert_clear_error(res, s, "error [bad_prompt]", "The prompt is empty")
    for cmd in (["generate", img, "--prompt", "x"], ["reconstruct", str(tmp_path), "--out", str(tmp_path / "o.glb")]):
        res, s = run_cli(*cmd, "--faces", "12")
        assert_clear_error(res, s, "face budget must be from 500")
        res, s = run_cli(*cmd, "--texture-size", "300")
        assert_clear_error(res, s, "--texture-size", "1024")


def test_cache_on_a_file_and_views_folder_checks(tmp_path: Path, example_image: Path):
    afile = tmp_path / "cache.txt"
    afile.write_text("x")
    res, s = run_cli("generate", str(example_image), "--prompt", "x", "--cache", str(afile))
    assert_clear_error(res, s, "cache folder", "is a file")
    res, s = run_cli("reconstruct", str(tmp_path), "--out", str(tmp_path / "o.glb"))
    assert_clear_error(res, s, "error [bad_views]", "cameras.json")
    res, s = run_cli("generate", str(example_image), "--prompt", "x", "--models", str(tmp_path / "none"))
    assert_clear_error(res, s, "error [weights_missing]", "models fetch")


def test_device_accepts_the_documented_values():
    parser = build_parser()
    for value in ("auto", "cpu", "cuda", "cuda:1", "CUDA"):
        args = parser.parse_args(["generate", "x.png", "--prompt", "p", "--device", value])
        assert args.device == value.lower()


def test_every_option_has_help_and_a_default_where_one_exists():
    parser = build_parser()

    def walk(p):
        yield p
        for action in p._actions:
            if action.choices and isinstance(action.choices, dict):
                for sub in action.choices.values():
                    yield from walk(sub)

    n = 0
    for p in walk(parser):
        helptext = p.format_help()
        for action in p._actions:
            if action.dest in ("help", "version") or action.option_strings == [] and action.choices:
                continue
            assert action.help, f"{p.prog} {action.option_strings or action.dest} has no help"
            if action.option_strings and not (action.default is None or action.default is False or action.default == "") \
                    and action.required is False:
                n += 1
                # the help line names the default (argparse's "(default: X)" or the text's own "default")
                assert "default" in action.help or f"(default: {action.default})" in " ".join(helptext.split()), \
                    (p.prog, action.option_strings)
    assert n > 15, n


@pytest.mark.parametrize("group", ["models", "cache"])
def test_group_alone_prints_its_own_help(group: str):
    res, s = run_cli(group)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert f"usage: make-your-3d {group}" in res.stdout and "ACTION" in res.stdout, res.stdout
    assert s < FAST_S


# ------------------------------------------------------------------------------------------------
# one tiny rule for generate, demo and serve
# ------------------------------------------------------------------------------------------------
def test_resolve_preset_applies_tiny_sizes_only_for_a_tiny_set(tiny_models: Path, tmp_path: Path):
    tiny = resolve_preset("default", tiny_models)
    assert tiny.mv_size == TEST_OVERRIDES["mv_size"] == 64 and tiny.faces == TEST_OVERRIDES["faces"]
    real = resolve_preset("default", tmp_path)  # no tiny marker: the preset's own sizes
    assert real == PRESETS["default"] and real.mv_size == 256
    # explicit overrides win over the tiny sizes
    assert resolve_preset("fast", tiny_models, {"mv_steps": 5}).mv_steps == 5
    assert resolve_preset("fast", tiny_models).mv_steps == TEST_OVERRIDES["mv_steps"]


def test_job_overrides_are_validated():
    from make_your_3d.errors import BadRequest
    from make_your_3d.pipeline.presets import validate_job_overrides

    assert validate_job_overrides({"mv_steps": 30, "mv_guidance": 2, "edit_strength": 0.6}) == \
        {"mv_steps": 30, "mv_guidance": 2.0, "edit_strength": 0.6}
    assert validate_job_overrides(None) == {}
    for bad, words in (({"mv_steps": 2.5}, "whole number"), ({"sd_steps": 0}, "from 1 to 200"), ({"ip_scale": True}, "ip_scale"),
                       ({"edit_strength": 1.5}, "0.05 to 1"), ({"faces": 900}, "Unknown override")):
        with pytest.raises(BadRequest, match=words):
            validate_job_overrides(bad)


def _post(url: str, token: str, path: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(url + path, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def test_serve_on_a_tiny_set_without_config_completes_a_job(tiny_models: Path, tmp_path: Path, example_image: Path):
    """The add-on pointed at the tiny set `demo` writes: no --config, no overrides; the job runs at the
    tiny sizes and the models answer says the set is tiny."""
    state = tmp_path / "state.json"
    log = tmp_path / "serve.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([*CLI, "serve", "--models", str(tiny_models), "--data", str(tmp_path / "data"), "--port", "0",
                                 "--state-file", str(state), "--device", "cpu"], stdout=fh, stderr=subprocess.STDOUT,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.monotonic() + 90
        while not state.exists():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        st = json.loads(state.read_text())
        url, token = st["url"], st["token"]
        assert _post(url, token, "/v1/models")["tiny"] is True
        body = {"image_png_b64": base64.b64encode(example_image.read_bytes()).decode(), "prompt": "wearing a red scarf", "seed": 3,
                "overrides": {"mv_steps": 3, "ip_scale": 0.5}}
        for bad in ({"mv_steps": 0}, {"ip_scale": "high"}, {"lora_rank": 4}):  # out of range, wrong type, not a job setting
            try:
                _post(url, token, "/v1/jobs", {**body, "overrides": bad})
                raise AssertionError(f"override {bad} was accepted")
            except urllib.error.HTTPError as exc:
                err = json.loads(exc.read())["error"]
                assert exc.code in (400, 422) and err["code"] and err["message"], (bad, exc.code, err)
        job_id = _post(url, token, "/v1/jobs", body)["ids"][0]
        assert _post(url, token, f"/v1/jobs/{job_id}")["request"]["overrides"] == {"mv_steps": 3, "ip_scale": 0.5}
        deadline = time.monotonic() + 240
        while True:
            rec = _post(url, token, f"/v1/jobs/{job_id}")
            if rec["status"] not in ("queued", "running"):
                break
            assert time.monotonic() < deadline, rec
            time.sleep(0.3)
        assert rec["status"] == "done", (rec, log.read_text()[-3000:])
        record = json.loads((tmp_path / "data" / "jobs" / job_id / "job.json").read_text()) \
            if (tmp_path / "data" / "jobs" / job_id / "job.json").is_file() else None
        if record is None:  # the service's files route is the contract; the folder layout is not
            with urllib.request.urlopen(urllib.request.Request(f"{url}/v1/jobs/{job_id}/files/job.json",
                                                               headers={"Authorization": f"Bearer {token}"}), timeout=30) as r:
                record = json.loads(r.read())
        assert record["tiny_models"] is True and record["preset"]["mv_size"] == 64
        # the job's own overrides went over the tiny sizes and are recorded
        assert record["preset"]["mv_steps"] == 3 and record["preset"]["ip_scale"] == 0.5
        assert record["inputs"]["overrides"] == {"mv_steps": 3, "ip_scale": 0.5}
    finally:
        proc.terminate()
        proc.wait(30)


# ------------------------------------------------------------------------------------------------
# one stage cache per user
# ------------------------------------------------------------------------------------------------
def test_default_cache_is_per_user_and_overridable(monkeypatch, tmp_path: Path):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    if sys.platform.startswith("linux"):
        assert default_cache_dir() == tmp_path / "xdg" / "make-your-3d" / "stages"
    assert resolve_cache_dir(None) == default_cache_dir()
    assert resolve_cache_dir(str(tmp_path / "c")) == tmp_path / "c"
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "env"))
    assert default_cache_dir() == tmp_path / "env"


def test_cache_info_and_clear_touch_only_cache_entries(tmp_path: Path):
    root = tmp_path / "cache"
    cache = StageCache(root)
    cache.build("identity", "a" * 64, lambda d: (d / "w.bin").write_bytes(b"x" * 1000), {"k": 1})
    cache.build("multiview", "b" * 64, lambda d: (d / "v.png").write_bytes(b"y" * 500), {"k": 2})
    keep = root / "identity" / "notes"  # not a cache entry: no marker, no inputs.json
    keep.mkdir()
    (keep / "mine.txt").write_text("keep me")
    (root / "README.txt").write_text("keep me too")

    info = cache_info(root)
    assert info.entries == 2 and set(info.stages) == {"identity", "multiview"}
    assert info.bytes >= 1500 and info.stages["identity"]["bytes"] >= 1000

    res, _ = run_cli("cache", "info", "--cache", str(root), "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["entries"] == 2, res.stderr
    res, _ = run_cli("cache", "clear", "--cache", str(root))
    assert res.returncode == 0 and "Removed 2" in res.stdout, res.stdout + res.stderr
    assert cache_info(root).entries == 0 and cache.get("identity", "a" * 64) is None
    assert (keep / "mine.txt").read_text() == "keep me" and (root / "README.txt").is_file()
    assert not (root / "multiview").exists()  # emptied stage folders go too
    assert clear_cache(tmp_path / "nowhere").entries == 0


# ------------------------------------------------------------------------------------------------
# CUDA without the toolkit: the torch rasterizer on the GPU, said once, shown by doctor
# ------------------------------------------------------------------------------------------------
def _choice_with(monkeypatch, cuda: bool, backend):
    """rasterizer_choice() on a machine with (cuda) a CUDA device, where gsplat's kernel module
    `backend` is a module object (its _C None: not built, no nvcc) or an exception its import raises."""
    import types

    import torch

    import gsplat.cuda  # noqa: F401 - the real package; only its kernel module is replaced
    from make_your_3d.recon import rasterize

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    if isinstance(backend, Exception):
        class Failing(types.ModuleType):
            def __getattr__(self, name):
                raise backend

        mod = Failing("gsplat.cuda._backend")
    else:
        mod = types.ModuleType("gsplat.cuda._backend")
        mod._C = backend
    monkeypatch.setitem(sys.modules, "gsplat.cuda._backend", mod)
    rasterize.rasterizer_choice.cache_clear()
    try:
        return rasterize.rasterizer_choice(), rasterize.cuda_available()
    finally:
        rasterize.rasterizer_choice.cache_clear()


def test_cuda_without_toolkit_uses_the_torch_rasterizer_and_says_so_once(monkeypatch, caplog):
    import logging

    from make_your_3d.recon import rasterize

    with caplog.at_level(logging.INFO, logger="make_your_3d.recon.rasterize"):
        choice, fast = _choice_with(monkeypatch, True, None)
    assert not fast and not choice.gsplat_cuda and "no CUDA toolkit" in choice.reason and "on the GPU" in choice.reason
    assert [r.levelname for r in caplog.records] == ["WARNING"], caplog.records

    choice, fast = _choice_with(monkeypatch, True, ImportError("gsplat_cuda.so: cannot open shared object file"))
    assert not fast and "could not be built" in choice.reason and "cannot open shared object" in choice.reason

    # the wrong variant: kernels that load are used
    choice, fast = _choice_with(monkeypatch, True, object())
    assert fast and choice.gsplat_cuda
    choice, fast = _choice_with(monkeypatch, False, object())
    assert not fast and "no CUDA device" in choice.reason

    # decided once per process: a second call neither re-imports nor logs again
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="make_your_3d.recon.rasterize"):
        monkeypatch.setattr(__import__("torch").cuda, "is_available", lambda: False)
        rasterize.rasterizer_choice.cache_clear()
        rasterize.rasterizer_choice()
        rasterize.rasterizer_choice()
    assert len(caplog.records) == 1
    rasterize.rasterizer_choice.cache_clear()


def test_doctor_names_the_rasterizer(tmp_path: Path):
    res, _ = run_cli("doctor", "--models", str(tmp_path))
    assert "Rasterizer:" in res.stdout and "Traceback" not in res.stdout + res.stderr, res.stdout + res.stderr


def test_doctor_selftest_runs_the_chain_on_this_device_and_reports(tmp_path: Path):
    """Issue 24.5: an artist learns in a minute, with no weights, whether the backend works on the
    device and precision they picked: pass/fail, seconds, peak memory, the GLB checked."""
    import re

    res, seconds = run_cli("doctor", "--models", str(tmp_path), "--selftest", "--device", "cpu", "--precision", "bf16", timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode == 0 and "Traceback" not in out, out[-2000:]
    line = next(x for x in res.stdout.splitlines() if x.startswith("Self-test on"))
    assert re.match(r"Self-test on cpu \(bfloat16\): passed in [0-9.]+ s, peak memory [0-9.]+ GiB\.", line), line
    assert "faces with UVs" in res.stdout and seconds < 120


def test_doctor_selftest_failure_is_a_sentence(tmp_path: Path):
    """A device that cannot run says so, as the report (exit 1), never as a traceback."""
    res, _ = run_cli("doctor", "--models", str(tmp_path), "--selftest", "--device", "cuda:7", timeout=120)
    out = res.stdout + res.stderr
    assert res.returncode == 1 and "Traceback" not in out, out[-2000:]
    assert "FAILED" in res.stdout and "no CUDA GPU" in res.stdout and "--device cpu --precision fp32" in res.stdout, res.stdout


def test_auto_device_picks_cuda_then_apples_gpu_then_the_cpu():
    import torch

    from make_your_3d.device import auto_device_kind, resolve_dtype

    assert [auto_device_kind(c, m) for c, m in ((True, True), (True, False), (False, True), (False, False))] == ["cuda", "cuda", "mps", "cpu"]
    assert resolve_dtype(torch.device("mps")) == torch.float16 and resolve_dtype(torch.device("cpu")) == torch.float32
    assert resolve_dtype(torch.device("mps"), "fp32") == torch.float32


# ------------------------------------------------------------------------------------------------
# tidy outputs: a quiet console, a GLB that says what made it
# ------------------------------------------------------------------------------------------------
def test_generate_on_tiny_set_is_quiet_and_stamps_the_glb(tiny_models: Path, tmp_path: Path, example_image: Path):
    from make_your_3d.recon.glb import _chunks

    res, _ = run_cli("generate", str(example_image), "--prompt", "wearing a red scarf", "--models", str(tiny_models),
                     "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache"), "--device", "cpu", "--seed", "5",
                     timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "TINY model set" in out and "Wrote" in out
    # each of these shows with -v (measured: transformers' torchvision notices, diffusers' loading bars)
    for noise in ("Loading pipeline components", "it/s]", "[transformers]", "requires torchvision", "FutureWarning", "Traceback"):
        assert noise not in out, (noise, out)
    (glb,) = (tmp_path / "out").glob("*/subject.glb")
    doc, _ = _chunks(glb.read_bytes())
    assert doc["asset"]["generator"].startswith("Make-Your-3D ")
    extras = doc["asset"]["extras"]
    assert extras["job"] == glb.parent.name and extras["prompt"] == "wearing a red scarf" and extras["seed"] == 5, extras
    assert doc["meshes"][0]["name"] == "wearing a red scarf s5"
    assert doc["materials"][0]["name"] == "wearing a red scarf s5 material" and doc["images"][0]["name"] == "wearing a red scarf s5 texture"
    assert (tmp_path / "cache").is_dir() and not (tmp_path / "out" / ".cache").exists()  # the cache is not per output folder


def test_retag_glb_keeps_the_binary_chunk(tmp_path: Path):
    import trimesh

    from make_your_3d.recon.glb import _chunks, retag_glb

    data = trimesh.exchange.gltf.export_glb(trimesh.Scene({"box": trimesh.creation.box()}))
    before, bin_before = _chunks(data)
    assert not before["asset"].get("generator", "").startswith("Make-Your-3D")  # the wrong variant: trimesh's own tag
    out = retag_glb(data, name="a hat s1", extras={"job": "j1", "prompt": "a hat", "seed": 1, "subject": None})
    doc, bin_after = _chunks(out)
    assert bin_after == bin_before and len(out) % 4 == 0
    assert doc["asset"]["extras"] == {"job": "j1", "prompt": "a hat", "seed": 1} and doc["asset"]["version"] == "2.0"
    assert doc["nodes"][0]["name"] == "a hat s1"
    path = tmp_path / "x.glb"
    path.write_bytes(out)
    assert len(trimesh.load(path, force="mesh").faces) == 12  # still a valid GLB


def test_multiview_command_writes_views_with_the_given_settings(tiny_models: Path, example_image: Path, tmp_path: Path):
    """The command goes through the same view generation as the pipeline: the views contract,
    with the steps and guidance asked for and the default preset's eta and scheduler."""
    from make_your_3d.pipeline.presets import PRESETS
    from make_your_3d.views import load_views

    out = tmp_path / "views"
    res, _ = run_cli("multiview", str(example_image), "--out", str(out), "--models", str(tiny_models), "--steps", "2",
                     "--guidance", "3", "--device", "cpu", "--seed", "5", timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    views = load_views(out)
    assert [v.name for v in views.views] == ["front", "front_right", "right", "back", "left", "front_left"]
    default = PRESETS["default"]
    assert views.extras["multiview"] == {"steps": 2, "guidance": 3.0, "eta": default.mv_eta, "scheduler": default.mv_scheduler,
                                         "seed": 5, "tiny_models": True}
