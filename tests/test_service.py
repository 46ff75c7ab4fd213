"""The local service, tested as a real `make-your-3d serve` process on loopback with the tiny model set.

Every test talks HTTP to a subprocess and reads its state file, the way the Blender add-on does.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import sqlite3
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image, ImageDraw

from make_your_3d.service.store import JobSpec, JobStore

START_TIMEOUT_S = 90.0


def tiny_overrides() -> dict:
    """The published tiny sizes (real configuration passed through `serve --config`)."""
    from make_your_3d.pipeline.presets import TEST_OVERRIDES

    return dict(TEST_OVERRIDES)


# ---------------------------------------------------------------------------------------------
# A server process
# ---------------------------------------------------------------------------------------------
@dataclass
class Server:
    proc: subprocess.Popen
    state_file: Path
    data_dir: Path
    url: str
    token: str
    log: Path

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def client(self, timeout: float = 30.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.auth, timeout=timeout)

    def healthy(self) -> bool:
        if self.proc.poll() is not None:
            return False
        try:
            r = httpx.get(f"{self.url}/v1/health", timeout=10)
        except httpx.HTTPError:
            return False
        return r.status_code == 200 and r.json()["status"] == "ok"

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            try:
                httpx.post(f"{self.url}/v1/shutdown", headers=self.auth, timeout=10)
            except httpx.HTTPError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def serve_command(models: Path, data: Path, state_file: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "make_your_3d", "serve", "--models", str(models), "--data", str(data),
            "--port", "0", "--state-file", str(state_file), "--device", "cpu", *extra]


def start_server(models: Path, data: Path, *extra: str, config: dict | None = None, name: str = "state.json") -> Server:
    """Start `make-your-3d serve` and wait for its state file (written only once it is ready)."""
    data.mkdir(parents=True, exist_ok=True)
    state_file = data.parent / f"{data.name}-{name}"
    state_file.unlink(missing_ok=True)
    args = list(extra)
    if config is not None:
        cfg = data.parent / f"{data.name}-config.json"
        cfg.write_text(json.dumps(config))
        args += ["--config", str(cfg)]
    log = data.parent / f"{data.name}-stderr.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    with open(log, "ab") as fh:
        proc = subprocess.Popen(serve_command(models, data, state_file, *args), stdout=fh, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
        if state_file.exists():
            try:
                state = json.loads(state_file.read_text())
            except ValueError:
                state = None  # cannot happen with an atomic write; retry rather than guess
            if state:
                return Server(proc, state_file, data, state["url"], state.get("token", ""), log)  # remote: user tokens only
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"no state file after {START_TIMEOUT_S} s:\n{log.read_text(errors='replace')}")


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------
def png_bytes(im: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def subject_image(size: int = 64, colour: tuple[int, int, int] = (200, 60, 40)) -> bytes:
    """An RGBA subject on a transparent background: a shaded disc with a darker stripe."""
    im = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    d = ImageDraw.Draw(im)
    d.ellipse((size * 0.2, size * 0.15, size * 0.8, size * 0.85), fill=(*colour, 255))
    d.rectangle((size * 0.3, size * 0.45, size * 0.7, size * 0.55), fill=(40, 40, 120, 255))
    return png_bytes(im)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def job_body(**changes: Any) -> dict[str, Any]:
    body = {"image_png_b64": b64(subject_image()), "prompt": "wearing a red scarf", "seed": 1}
    body.update(changes)
    return body


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims `width` x `height` (a decompression bomb is rejected from the header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tiny_models) -> Path:
    return tiny_models


HEAD_TIMEOUT_S = 2.0


def service_config() -> dict:
    """`serve --config` for the tests: the published tiny sizes, unthrottled progress (the cancel
    test reads every step) and a short request-head timeout (the slowloris test waits for it)."""
    return {"overrides": tiny_overrides(), "progress_interval_s": 0.0, "header_timeout_s": HEAD_TIMEOUT_S}


class Harness:
    """The module's server; the crash test replaces it with a restarted one on the same data folder."""

    def __init__(self, models: Path, data: Path):
        self.models = models
        self.data = data
        self.server = start_server(models, data, config=service_config())

    def restart(self) -> Server:
        self.server = start_server(self.models, self.data, config=service_config())
        return self.server


@pytest.fixture(scope="module")
def harness(models, tmp_path_factory):
    h = Harness(models, tmp_path_factory.mktemp("svc") / "data")
    yield h
    code = h.server.stop()
    assert code == 0, h.server.output()
    assert not h.server.state_file.exists(), "the state file must be removed on exit"


@pytest.fixture
def server(harness) -> Server:
    return harness.server


def wait_for(client: httpx.Client, job_id: str, statuses: set[str], timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rec = client.get(f"/v1/jobs/{job_id}").json()
        if rec["status"] in statuses:
            return rec
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not reach {statuses} in {timeout} s: {rec}")


# ---------------------------------------------------------------------------------------------
# Process, state file, auth
# ---------------------------------------------------------------------------------------------
def test_state_file_health_and_models(server, models):
    mode = server.state_file.stat().st_mode & 0o777
    assert mode == 0o600, oct(mode)
    state = json.loads(server.state_file.read_text())
    assert set(state) == {"url", "token", "pid", "version"}
    assert state["pid"] == server.proc.pid
    assert state["url"].startswith("http://127.0.0.1:") and int(state["url"].rsplit(":", 1)[1]) > 0
    assert len(state["token"]) >= 32
    r = httpx.get(f"{server.url}/v1/health")
    assert r.status_code == 200 and r.json() == {"status": "ok", "version": state["version"]}
    with server.client() as c:
        m = c.get("/v1/models").json()
    assert m["models_dir"] == str(models) and m["tiny"] is True
    assert {r["name"] for r in m["roles"]} >= {"personalized", "ip_adapter", "image_encoder"}
    assert all(set(r) == {"name", "title", "licence", "complete", "missing", "damaged"} for r in m["roles"])
    assert m["complete"] is True, m  # the tiny set has every role a job needs
    assert (server.data_dir / "jobs.sqlite3").exists()
    if os.name != "nt":  # private to the user: the folder, the database and the log
        assert server.data_dir.stat().st_mode & 0o777 == 0o700
        for path in (server.data_dir / "jobs.sqlite3", server.data_dir / "logs" / "serve.log"):
            assert path.stat().st_mode & 0o077 == 0, (path, oct(path.stat().st_mode))


AUTH_ROUTES = [
    ("GET", "/v1/models"),
    ("GET", "/v1/schema"),
    ("GET", "/v1/jobs"),
    ("POST", "/v1/jobs"),
    ("GET", "/v1/jobs/abc"),
    ("GET", "/v1/jobs/abc/events"),
    ("POST", "/v1/jobs/abc/cancel"),
    ("POST", "/v1/jobs/abc/rerun"),
    ("POST", "/v1/groups/abc/cancel"),
    ("GET", "/v1/jobs/abc/files/subject.glb"),
    ("POST", "/v1/unload"),
    ("POST", "/v1/shutdown"),
    ("GET", "/v1/openapi.json"),
]


def test_unauthenticated_and_wrong_token_refused(server):
    bad_headers = [
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": f"Bearer {server.token}x"},
        {"Authorization": f"Basic {server.token}"},
        {"Authorization": server.token},
        {"Authorization": "Bearer x"},
        {"X-Token": server.token},
    ]
    with httpx.Client(base_url=server.url, timeout=10) as c:
        for method, path in AUTH_ROUTES:
            for headers in bad_headers:
                r = c.request(method, path, headers=headers, json=job_body() if method == "POST" else None)
                assert r.status_code == 401, (method, path, headers, r.text)
                err = r.json()["error"]
                assert err["code"] == "unauthorized" and "Bearer" in err["message"]
                assert r.headers.get("www-authenticate") == "Bearer"
        # refused requests changed nothing; the right token works
        r = c.get("/v1/jobs", headers=server.auth)
        assert r.status_code == 200
        # the refused POSTs queued nothing (the shutdown was refused too: the server is still up)
        assert not any(j["request"]["prompt"] == "wearing a red scarf" and j["request"]["seed"] == 1 for j in r.json()["jobs"])
    assert server.healthy()


def test_openapi_schema_published(server):
    with server.client() as c:
        schema = c.get("/v1/openapi.json").json()
    assert schema["openapi"].startswith("3.")
    paths = schema["paths"]
    for p in ("/v1/health", "/v1/models", "/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/events", "/v1/jobs/{job_id}/cancel",
              "/v1/jobs/{job_id}/rerun", "/v1/jobs/{job_id}/files/{name}", "/v1/groups/{group}/cancel", "/v1/unload", "/v1/shutdown"):
        assert p in paths, p
    create = schema["components"]["schemas"]["JobCreate"]
    assert create["additionalProperties"] is False
    assert set(create["required"]) == {"image_png_b64", "prompt"}
    assert any("HTTPBearer" in s for s in schema["components"]["securitySchemes"])


def test_schema_route_publishes_request_fields_and_stages(server):
    """What the add-on reads instead of spelling it: the request schema, the stages with labels."""
    from make_your_3d.job_params import JOB_PARAMS, PRESET_NAMES
    from make_your_3d.pipeline.stages import published_stages

    with server.client() as c:
        published = c.get("/v1/schema").json()
    assert set(published["job_params"]["properties"]) == {p.name for p in JOB_PARAMS} | {"image_png_b64", "overrides"}
    assert published["stages"] == published_stages() and published["presets"] == list(PRESET_NAMES)


def test_the_backend_draws_the_seeds_and_returns_them(server):
    """A request without a seed gets one drawn here, once; the reply lists every variant's seed, as the
    jobs carry them (the add-on takes them from the reply instead of computing them)."""
    with server.client() as c:
        created = c.post("/v1/jobs", json=job_body(seed=None, variants=2)).json()
        for job_id in created["ids"]:
            c.post(f"/v1/jobs/{job_id}/cancel")
        seeds = [c.get(f"/v1/jobs/{i}").json()["request"]["seed"] for i in created["ids"]]
    assert created["seeds"] == seeds and seeds[1] == seeds[0] + 1 and 0 <= seeds[0] < 2**31


def test_refuses_non_loopback_without_allow_remote(models, tmp_path):
    state_file = tmp_path / "state.json"
    r = subprocess.run(serve_command(models, tmp_path / "data", state_file, "--host", "0.0.0.0"), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "--allow-remote" in r.stderr and "0.0.0.0" in r.stderr
    assert not state_file.exists()
    # with the explicit flag it binds, over HTTPS only (test_remote.py tests that listener); the state
    # file still gives local clients a loopback URL
    srv = start_server(models, tmp_path / "remote", "--host", "0.0.0.0", "--allow-remote")
    try:
        assert srv.url.startswith("https://127.0.0.1:")
        assert httpx.get(f"{srv.url}/v1/jobs", timeout=10, verify=False).status_code == 401
    finally:
        srv.proc.terminate()
        assert srv.proc.wait(30) == 0


def test_parent_pid_exit_and_data_dir_lock(models, tmp_path):
    parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        srv = start_server(models, tmp_path / "data", "--parent-pid", str(parent.pid))
        # a second backend on the same data folder would share (and corrupt) the queue: refused
        second = subprocess.run(serve_command(models, tmp_path / "data", tmp_path / "other.json"), capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and "already using the data folder" in second.stderr, second.stderr
        assert not (tmp_path / "other.json").exists()
        assert srv.healthy()
        parent.kill()
        parent.wait(10)
        assert srv.proc.wait(20) == 0
        assert not srv.state_file.exists()
    finally:
        parent.kill()


def _open_files_soft_limit(pid: int) -> tuple[int, int] | None:
    try:
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return int(soft), (10**9 if hard == "unlimited" else int(hard))
    except OSError:
        return None
    return None


def test_slow_request_heads_are_cut_off(server):
    """Slowloris: connections that send nothing, or trickle header lines, are closed once the
    request head is HEAD_TIMEOUT_S late; the service keeps answering meanwhile."""
    import socket

    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    socks = []
    for i in range(6):
        sock = socket.create_connection((host, int(port)), timeout=10)
        if i % 2:
            sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        socks.append(sock)
    t0 = time.monotonic()
    while time.monotonic() - t0 < HEAD_TIMEOUT_S + 0.5:  # trickling does not reset the clock
        for sock in socks[1::2]:
            try:
                sock.sendall(b"X-Slow: 1\r\n")
            except OSError:
                pass
        time.sleep(0.25)
    assert server.healthy()
    for sock in socks:
        sock.settimeout(HEAD_TIMEOUT_S + 10)
        try:
            assert sock.recv(1024) == b"", "the server must close the connection, not answer it"
        except ConnectionResetError:
            pass  # closed while we were still sending
        finally:
            sock.close()
    assert time.monotonic() - t0 < HEAD_TIMEOUT_S + 10
    limits = _open_files_soft_limit(server.proc.pid)
    if limits is not None:  # Linux: the soft open-files limit was raised for many connections
        soft, hard = limits
        assert soft >= min(8192, hard), limits


def test_second_backend_refuses_a_live_state_file(server, models, tmp_path):
    """Another data folder but the same state file: taking it over would cut clients off from the
    running backend (and delete the file on exit), so the second backend refuses with busy."""
    before = server.state_file.read_text()
    r = subprocess.run(serve_command(models, tmp_path / "other-data", server.state_file), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "[busy]" in r.stderr and str(server.proc.pid) in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert server.state_file.read_text() == before
    assert server.healthy()


def stage_cache_dir() -> Path:
    """The per-user stage cache the backends started by this module build in (conftest's own one)."""
    return Path(os.environ["MAKE_YOUR_3D_CACHE"])


def hidden_cache_entries(cache: Path) -> list[Path]:
    """Temporary (half-built) stage-cache folders: `<stage>/.<key>.*`."""
    return [p for stage in cache.iterdir() if stage.is_dir() and not stage.name.startswith(".") for p in stage.iterdir()
            if p.name.startswith(".")] if cache.is_dir() else []


def test_start_with_damaged_database_and_leftovers(models, tmp_path):
    """A database that is not SQLite is moved aside with a timestamp (and named in the log) and the
    job list is rebuilt from the job folders; the temporary folders of a killed run (job outputs,
    half-built entries of the stage cache the jobs use) are removed at start."""
    from test_cache_integrity import dead_pid

    data = tmp_path / "data"
    data.mkdir()
    (data / "jobs.sqlite3").write_bytes(b"garbage, not a database " * 100)
    leftovers = [stage_cache_dir() / "multiview" / f".0123456789ab.{dead_pid()}.k3j2", data / "jobs" / ".partial-out"]
    for path in leftovers:
        path.mkdir(parents=True)
        (path / "half.bin").write_bytes(b"x")
    old_jobs = {"0123456789abcdef": ("a red hat", 5, "2026-01-02T03:04:05+00:00"), "fedcba9876543210": ("a blue scarf", 9, "2026-01-01T00:00:00+00:00")}
    for job_id, (prompt, seed, created) in old_jobs.items():
        folder = data / "jobs" / job_id
        folder.mkdir(parents=True)
        (folder / "subject.glb").write_bytes(b"glTF")
        (folder / "job.json").write_text(json.dumps({
            "created_at": created, "inputs": {"prompt": prompt, "negative_prompt": "", "subject": "a toy", "seed": seed, "image_sha256": "ab" * 32,
                                              "overrides": {}},
            "preset": {"name": "fast"}, "files": ["job.json", "subject.glb"], "cached_stages": ["identity"], "timings": {"total": 12.5}}))
    srv = start_server(models, data)
    try:
        moved = list(data.glob("jobs.sqlite3.corrupt-*"))
        assert len(moved) == 1 and moved[0].read_bytes().startswith(b"garbage"), moved
        assert str(moved[0]) in srv.output() and "Traceback" not in srv.output()
        assert not any(p.exists() for p in leftovers)
        with srv.client() as c:
            jobs = c.get("/v1/jobs").json()["jobs"]
        assert [j["id"] for j in jobs] == ["fedcba9876543210", "0123456789abcdef"], "rebuilt from the folders, oldest first"
        for job in jobs:
            prompt, seed, _ = old_jobs[job["id"]]
            assert job["status"] == "done" and job["files"] == ["job.json", "subject.glb"] and job["cached_stages"] == ["identity"]
            assert job["request"]["prompt"] == prompt and job["request"]["seed"] == seed and job["request"]["preset"] == "fast"
            assert job["elapsed_s"] == 12.5
    finally:
        assert srv.stop() == 0


def test_idle_timeout_and_sigterm(models, tmp_path):
    srv = start_server(models, tmp_path / "idle", "--idle-timeout", "1.5")
    t0 = time.monotonic()
    assert srv.proc.wait(30) == 0
    assert 1.0 < time.monotonic() - t0 < 20
    assert not srv.state_file.exists()
    if os.name != "nt":
        srv = start_server(models, tmp_path / "term")
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(30) == 0
        assert not srv.state_file.exists()


def test_weights_missing_is_a_clear_error(tmp_path):
    srv = start_server(tmp_path / "no-models", tmp_path / "data")
    try:
        with srv.client() as c:
            r = c.post("/v1/jobs", json=job_body())
            assert r.status_code == 503
            err = r.json()["error"]
            assert err["code"] == "weights_missing" and "models fetch" in err["message"]
            assert c.get("/v1/jobs").json() == {"jobs": [], "next": None}
            assert c.get("/v1/models").json()["complete"] is False
    finally:
        assert srv.stop() == 0


# ---------------------------------------------------------------------------------------------
# Bad inputs: each a clear 4xx, nothing queued, server healthy
# ---------------------------------------------------------------------------------------------
def _truncated_png() -> bytes:
    return subject_image()[:120]


def _flat_rgb() -> bytes:
    return png_bytes(Image.new("RGB", (64, 64), (120, 130, 140)))


def _transparent() -> bytes:
    return png_bytes(Image.new("RGBA", (64, 64), (255, 0, 0, 0)))


def _gif() -> bytes:
    im = Image.new("RGB", (64, 64))
    ImageDraw.Draw(im).ellipse((10, 10, 50, 50), fill=(255, 0, 0))
    return png_bytes(im, "GIF")


# (name, method, path, kwargs for httpx, expected status, expected code, a word the message must contain)
BAD_INPUTS: list[tuple[str, str, str, dict, int, str, str]] = [
    ("broken_png", "POST", "/v1/jobs", {"json": job_body(image_png_b64=b64(_truncated_png()))}, 400, "bad_image", "damaged"),
    ("huge_dimensions", "POST", "/v1/jobs", {"json": job_body(image_png_b64=b64(png_header_only(9000, 9000)))}, 400, "bad_image", "9000x9000"),
    ("decompression_bomb", "POST", "/v1/jobs", {"json": job_body(image_png_b64=b64(png_header_only(100_000, 100_000)))}, 400, "decompression_bomb", "bomb"),
    ("huge_prompt_over_schema_limit", "POST", "/v1/jobs", {"json": job_body(prompt="x" * 100_000)}, 400, "bad_prompt", "characters"),
    ("format_chars_only_prompt", "POST", "/v1/jobs", {"json": job_body(prompt="\u200b\u2066\ufeff")}, 400, "bad_prompt", "empty"),
    ("zero_size_image", "POST", "/v1/jobs", {"json": job_body(image_png_b64="")}, 400, "bad_image", "empty"),
    ("non_image_bytes", "POST", "/v1/jobs", {"json": job_body(image_png_b64=b64(b"hello, I am a text file\n" * 10))}, 400, "bad_image", "not a readable image"),
    ("gif_format", "POST", "/v1/jobs", {"json": job_body(image_png_b64=b64(_gif()))}, 400, "bad_image", "GIF"),
    ("too_small_image", "POST", "/v1/jobs", {"json": job_body(image_png_b64=b64(png_bytes(Image.new("RGB", (8, 8), (255, 0, 0)))))}, 400, "bad_image", "at least"),
    ("not_base64", "POST", "/v1/jobs", {"json": job_body(image_png_b64="this is *not* base64!")}, 400, "bad_image", "base64"),
    ("no_subject_transparent", "POST", "/v1/jobs", {"json": job_body(image_png_b64=b64(_transparent()))}, 400, "no_subject", "alpha"),
    ("no_subject_flat_colour", "POST", "/v1/jobs", {"json": job_body(image_png_b64=b64(_flat_rgb()))}, 400, "no_subject", "flat colour"),
    ("empty_prompt", "POST", "/v1/jobs", {"json": job_body(prompt="")}, 400, "bad_prompt", "empty"),
    ("blank_prompt", "POST", "/v1/jobs", {"json": job_body(prompt="   \n ")}, 400, "bad_prompt", "empty"),
    ("huge_prompt", "POST", "/v1/jobs", {"json": job_body(prompt="scarf " * 5000)}, 400, "bad_prompt", "characters"),
    ("control_chars_prompt", "POST", "/v1/jobs", {"json": job_body(prompt="red\x00scarf")}, 400, "bad_prompt", "control"),
    ("lone_surrogate_prompt", "POST", "/v1/jobs",
     {"content": b'{"image_png_b64": "' + b64(subject_image()).encode() + b'", "prompt": "a \\ud800 b"}', "headers": {"Content-Type": "application/json"}},
     400, "bad_prompt", "control"),
    ("non_utf8_prompt", "POST", "/v1/jobs",
     {"content": b'{"image_png_b64": "' + b64(subject_image()).encode() + b'", "prompt": "caf\xe9 \xff"}', "headers": {"Content-Type": "application/json"}},
     422, "bad_request", "JSON"),
    ("huge_negative_prompt", "POST", "/v1/jobs", {"json": job_body(negative_prompt="x" * 2000)}, 400, "bad_prompt", "negative prompt"),
    ("control_chars_subject", "POST", "/v1/jobs", {"json": job_body(subject="robot\x07")}, 400, "bad_prompt", "subject"),
    ("prompt_wrong_type", "POST", "/v1/jobs", {"json": job_body(prompt=42)}, 422, "bad_request", "prompt"),
    ("seed_as_string", "POST", "/v1/jobs", {"json": job_body(seed="5")}, 422, "bad_request", "seed"),
    ("negative_seed", "POST", "/v1/jobs", {"json": job_body(seed=-1)}, 422, "bad_request", "seed"),
    ("seed_too_big", "POST", "/v1/jobs", {"json": job_body(seed=2**31)}, 422, "bad_request", "seed"),
    ("seed_plus_variants_overflow", "POST", "/v1/jobs", {"json": job_body(seed=2**31 - 1, variants=2)}, 400, "bad_request", "seed"),
    ("zero_variants", "POST", "/v1/jobs", {"json": job_body(variants=0)}, 422, "bad_request", "variants"),
    ("negative_variants", "POST", "/v1/jobs", {"json": job_body(variants=-3)}, 422, "bad_request", "variants"),
    ("too_many_variants", "POST", "/v1/jobs", {"json": job_body(variants=17)}, 422, "bad_request", "variants"),
    ("fractional_variants", "POST", "/v1/jobs", {"json": job_body(variants=2.5)}, 422, "bad_request", "variants"),
    ("boolean_variants", "POST", "/v1/jobs", {"json": job_body(variants=True)}, 422, "bad_request", "variants"),
    ("unknown_field", "POST", "/v1/jobs", {"json": job_body(output_path="/etc/passwd")}, 422, "bad_request", "output_path"),
    ("unknown_preset", "POST", "/v1/jobs", {"json": job_body(preset="turbo")}, 422, "bad_request", "preset"),
    ("faces_too_few", "POST", "/v1/jobs", {"json": job_body(faces=10)}, 422, "bad_request", "faces"),
    ("odd_texture_size", "POST", "/v1/jobs", {"json": job_body(texture_size=300)}, 422, "bad_request", "texture_size"),
    ("image_as_list", "POST", "/v1/jobs", {"json": job_body(image_png_b64=[1, 2, 3])}, 422, "bad_request", "image_png_b64"),
    ("missing_prompt", "POST", "/v1/jobs", {"json": {"image_png_b64": b64(subject_image())}}, 422, "bad_request", "prompt"),
    ("body_not_json", "POST", "/v1/jobs", {"content": b"prompt=scarf", "headers": {"Content-Type": "application/json"}}, 422, "bad_request", "JSON"),
    ("body_is_array", "POST", "/v1/jobs", {"json": [job_body()]}, 422, "bad_request", "object"),
    ("body_as_form", "POST", "/v1/jobs", {"data": {"prompt": "scarf"}}, 422, "bad_request", "application/json"),
    ("empty_body", "POST", "/v1/jobs", {}, 422, "bad_request", "body"),
    ("unknown_job", "GET", "/v1/jobs/0123456789abcdef", {}, 404, "not_found", "0123456789abcdef"),
    ("cancel_unknown_job", "POST", "/v1/jobs/nope/cancel", {}, 404, "not_found", "nope"),
    ("rerun_unknown_job", "POST", "/v1/jobs/nope/rerun", {"json": {"prompt": "hat"}}, 404, "not_found", "nope"),
    ("events_unknown_job", "GET", "/v1/jobs/nope/events", {}, 404, "not_found", "nope"),
    ("file_of_unknown_job", "GET", "/v1/jobs/nope/files/subject.glb", {}, 404, "not_found", "nope"),
    ("unknown_route", "GET", "/v1/secrets", {}, 404, "not_found", "/v1/secrets"),
    ("wrong_method", "DELETE", "/v1/jobs", {}, 405, "method_not_allowed", "DELETE"),
]


@pytest.mark.parametrize("name,method,path,kwargs,status,code,word", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_a_clear_4xx(server, name, method, path, kwargs, status, code, word):
    with server.client() as c:
        before = len(c.get("/v1/jobs", params={"limit": 500}).json()["jobs"])
        r = c.request(method, path, **kwargs)
        assert r.status_code == status, (name, r.status_code, r.text)
        body = r.json()
        assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
        assert body["error"]["code"] == code, body
        msg = body["error"]["message"]
        assert word.lower() in msg.lower(), msg
        assert "Traceback" not in r.text and 'File "' not in r.text
        assert len(c.get("/v1/jobs", params={"limit": 500}).json()["jobs"]) == before, "a refused request must not queue a job"
    assert server.healthy()


def test_oversized_bodies_refused(server):
    """An image over 32 MiB is refused by name; a body over the limit is refused before it is read."""
    from make_your_3d.service.app import MAX_BODY_BYTES, MAX_IMAGE_B64_CHARS

    with server.client(timeout=60) as c:
        r = c.post("/v1/jobs", json=job_body(image_png_b64="A" * (MAX_IMAGE_B64_CHARS + 4)))
        assert r.status_code == 400 and r.json()["error"]["code"] == "bad_image" and "MiB" in r.json()["error"]["message"]
        r = c.post("/v1/jobs", content=b"{" + b" " * (MAX_BODY_BYTES + 10) + b"}", headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"

        def chunks():  # no Content-Length: the limit applies while reading
            for _ in range((MAX_BODY_BYTES // (1 << 20)) + 2):
                yield b" " * (1 << 20)

        try:
            r = c.post("/v1/jobs", content=chunks(), headers={"Content-Type": "application/json"})
            assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
        except httpx.TransportError:
            pass  # the server may close the connection once it has answered; it must stay healthy
    assert server.healthy()


def test_path_traversal_and_foreign_files_refused(server):
    """File names must be listed for that job: `..`, absolute paths and the database are all 404."""
    with server.client() as c:
        # a real job (it may fail or finish; its record exists either way)
        job_id = c.post("/v1/jobs", json=job_body(prompt="traversal probe")).json()["ids"][0]
        for name in ("..%2F..%2Fjobs.sqlite3", "%2e%2e/%2e%2e/jobs.sqlite3", "../state.json", "%2Fetc%2Fpasswd", "views%2F..%2F..%2F..%2Fjobs.sqlite3",
                     "subject.glb%00.png", "job.json/", ""):
            r = c.get(f"/v1/jobs/{job_id}/files/{name}")
            assert r.status_code == 404, (name, r.status_code, r.text)
            assert r.json()["error"]["code"] == "not_found"
        c.post(f"/v1/jobs/{job_id}/cancel")
    assert server.healthy()


# ---------------------------------------------------------------------------------------------
# Store level: durability and crash recovery
# ---------------------------------------------------------------------------------------------
def _spec(i: int) -> JobSpec:
    return JobSpec(prompt=f"p{i}", negative_prompt="", subject=None, seed=i, preset="fast", faces=None, texture_size=None)


def test_store_recovery_marks_running_interrupted_keeps_queue(tmp_path):
    db = tmp_path / "jobs.sqlite3"
    store = JobStore(db)
    jobs = store.add_jobs([_spec(i) for i in range(5)], "0" * 64)
    running = store.claim_next()
    assert running is not None and running.id == jobs[0].id and running.status == "running"
    store.progress(running.id, "multiview", 3, 10, "step 3", 1.5, log_event=True)
    assert store.cancel_queued(jobs[2].id)
    # a crash: the connection is dropped without any shutdown step, then a new process opens the file
    del store
    store = JobStore(db)
    assert store.recover() == [jobs[0].id]
    after = {j.id: j for j in store.list()}
    assert [j.id for j in store.list()] == [j.id for j in jobs], "order is kept"
    assert after[jobs[0].id].status == "interrupted" and after[jobs[0].id].error["code"] == "interrupted"
    assert after[jobs[0].id].stage == "multiview" and after[jobs[0].id].step == 3
    assert after[jobs[2].id].status == "cancelled"
    assert [after[j.id].status for j in (jobs[1], jobs[3], jobs[4])] == ["queued"] * 3
    assert [store.claim_next().id for _ in range(3)] == [jobs[1].id, jobs[3].id, jobs[4].id]
    assert store.claim_next() is None
    kinds = [e["kind"] for e in store.events(jobs[0].id)]
    assert kinds == ["status", "status", "progress", "status"]
    rec = after[jobs[0].id].record()
    assert rec["request"]["prompt"] == "p0" and rec["created_at"].endswith("Z") and rec["eta_s"] is None
    store.close()


def test_store_concurrent_claims_never_share_a_job(tmp_path):
    import threading

    store = JobStore(tmp_path / "jobs.sqlite3")
    store.add_jobs([_spec(i) for i in range(60)], "0" * 64)
    claimed: list[str] = []
    lock = threading.Lock()

    def claimer():
        while (job := store.claim_next()) is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=claimer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(claimed) == 60 and len(set(claimed)) == 60
    store.close()


def test_failures_map_to_user_errors():
    """Out of memory anywhere in the cause chain -> out_of_memory with the lowvram hint; a full disk
    (files or the database) -> disk_full; anything else stays unclassified (internal)."""
    import errno

    from make_your_3d.service.worker import classify_exception

    def chained(inner: BaseException) -> BaseException:
        try:
            try:
                raise inner
            except BaseException as exc:
                raise ValueError("wrapper") from exc
        except ValueError as outer:
            return outer

    oom = classify_exception(chained(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")))
    assert oom is not None and oom.code == "out_of_memory" and "lowvram" in oom.message
    assert classify_exception(MemoryError()).code == "out_of_memory"
    full = classify_exception(chained(OSError(errno.ENOSPC, "No space left on device")))
    assert full is not None and full.code == "disk_full" and "Free some space" in full.message
    assert classify_exception(sqlite3.OperationalError("database or disk is full")).code == "disk_full"
    assert classify_exception(ValueError("shape mismatch")) is None
    assert classify_exception(OSError(errno.EACCES, "denied")) is None


# ---------------------------------------------------------------------------------------------
# SSE framing
# ---------------------------------------------------------------------------------------------
def read_events(server: Server, job_id: str, timeout: float = 120.0) -> list[dict]:
    events = []
    with httpx.Client(base_url=server.url, headers=server.auth, timeout=timeout) as c:
        with c.stream("GET", f"/v1/jobs/{job_id}/events") as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            buf = ""
            for text in r.iter_text():
                buf += text
                while "\n\n" in buf:
                    frame, buf = buf.split("\n\n", 1)
                    lines = frame.split("\n")
                    assert all(line.startswith("data: ") for line in lines), frame
                    events.append(json.loads("".join(line[6:] for line in lines)))
            assert buf == "", "the stream ends on a frame boundary"
    return events


def test_events_stream_ends_after_terminal_status(server):
    with server.client() as c:
        # two jobs: cancel the second while it is still queued behind the first
        ids = c.post("/v1/jobs", json=job_body(prompt="sse probe", variants=2)).json()["ids"]
        rec = c.post(f"/v1/jobs/{ids[1]}/cancel").json()
        assert rec["id"] == ids[1]
        c.post(f"/v1/jobs/{ids[0]}/cancel")
    events = read_events(server, ids[1], timeout=60)
    assert events and events[-1]["status"] == "cancelled" and events[-1]["id"] == ids[1]
    assert set(events[-1]) >= {"id", "group", "status", "stage", "step", "total", "message", "elapsed_s", "eta_s", "error", "files", "request",
                               "created_at", "cached_stages"}
    first = read_events(server, ids[0], timeout=120)
    assert first[-1]["status"] in ("cancelled", "done", "failed")
    assert server.healthy()


# ---------------------------------------------------------------------------------------------
# Job flows with the real Generator (tiny models, tiny sizes); they share one stage cache, in order
# ---------------------------------------------------------------------------------------------
def db_rows(server: Server, sql: str, *params: Any) -> list[sqlite3.Row]:
    """Read the service's own database (read-only), e.g. for start/finish times and events."""
    con = sqlite3.connect(f"file:{server.data_dir / 'jobs.sqlite3'}?mode=ro", uri=True, timeout=30)
    con.row_factory = sqlite3.Row
    try:
        return con.execute(sql, params).fetchall()
    finally:
        con.close()


GROUP_BODY = dict(prompt="wearing a red scarf", subject="a toy", seed=11)


def test_job_runs_to_done_and_glb_downloads(server):
    with server.client() as c:
        created = c.post("/v1/jobs", json=job_body(**GROUP_BODY, variants=3))
        assert created.status_code == 201, created.text
        ids = created.json()["ids"]
        assert len(ids) == 3 and len(set(ids)) == 3
        recs = [c.get(f"/v1/jobs/{i}").json() for i in ids]
        assert [r["request"]["seed"] for r in recs] == [11, 12, 13]
        assert {r["group"] for r in recs} == {created.json()["group"]}
    events = read_events(server, ids[0], timeout=600)
    statuses = [e["status"] for e in events]
    assert statuses[-1] == "done", events[-1]
    assert "running" in statuses and statuses.index("running") < len(statuses) - 1
    stages = [e["stage"] for e in events if e["status"] == "running" and e["stage"]]
    assert "reconstruct" in stages and stages.index("reconstruct") > 0
    assert any(e["total"] > 0 and 0 < e["step"] <= e["total"] for e in events)
    with server.client() as c:
        rec = c.get(f"/v1/jobs/{ids[0]}").json()
        assert rec["status"] == "done" and rec["error"] is None and rec["eta_s"] is None and rec["elapsed_s"] > 0
        assert {"subject.glb", "preview.png", "job.json"} <= set(rec["files"])
        assert any(f.startswith("views/") for f in rec["files"])
        glb = c.get(f"/v1/jobs/{ids[0]}/files/subject.glb")
        assert glb.status_code == 200 and glb.headers["content-type"] == "model/gltf-binary"
        assert glb.content[:4] == b"glTF" and struct.unpack("<I", glb.content[8:12])[0] == len(glb.content)
        png = c.get(f"/v1/jobs/{ids[0]}/files/preview.png")
        assert png.content[:8] == b"\x89PNG\r\n\x1a\n"
        job_json = c.get(f"/v1/jobs/{ids[0]}/files/job.json").json()
        assert job_json["inputs"]["prompt"] == "wearing a red scarf" and job_json["inputs"]["seed"] == 11
        # what the surface is (issue 27): watertight or not, holes, pieces, what each MeshFix run left
        mesh = job_json["mesh"]
        assert {"vertices", "faces", "watertight", "holes", "components", "meshfix"} <= set(mesh), mesh
        assert isinstance(mesh["watertight"], bool) and mesh["holes"] >= 0 and mesh["components"] >= 1
        assert not mesh["watertight"] or mesh["holes"] == 0
        assert "could not fix everything" not in server.output(), "MeshFix's misleading line stays out of the log"
        view = next(f for f in rec["files"] if f.startswith("views/"))
        assert c.get(f"/v1/jobs/{ids[0]}/files/{view}").status_code == 200
        # another job's file is not this job's file, even by a relative path
        other = ids[1]
        for name in (f"../{ids[0]}/subject.glb", f"..%2F{ids[0]}%2Fsubject.glb"):
            r = c.get(f"/v1/jobs/{other}/files/{name}")
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", name
        # files are written atomically: the job folder holds no temporary leftovers
        assert not [p for p in (server.data_dir / "jobs").iterdir() if p.name.startswith(".")]


def test_variants_share_subject_stages(server):
    with server.client() as c:
        group = [j for j in c.get("/v1/jobs", params={"limit": 500}).json()["jobs"] if j["request"]["seed"] in (11, 12, 13) and j["request"]["subject"] == "a toy"]
        assert len(group) == 3
        recs = [wait_for(c, j["id"], {"done", "failed"}, timeout=600) for j in group]
    assert [r["status"] for r in recs] == ["done"] * 3, [r["error"] for r in recs]
    subject_stages = {"subject", "subject_views", "identity", "edited_views", "subject_prior"}
    assert not subject_stages & set(recs[0]["cached_stages"]), "the first variant computes the subject stages"
    for r in recs[1:]:
        assert subject_stages <= set(r["cached_stages"]), r["cached_stages"]
        assert not {"front_view", "multiview", "reconstruct"} & set(r["cached_stages"]), "each seed renders its own result"
    with server.client() as c:
        job_jsons = [c.get(f"/v1/jobs/{r['id']}/files/job.json").json() for r in recs]
        glbs = [c.get(f"/v1/jobs/{r['id']}/files/subject.glb").content for r in recs]
    keys = [{s["name"]: s["key"] for s in j["stages"]} for j in job_jsons]
    for name in subject_stages:
        assert keys[0][name] == keys[1][name] == keys[2][name]
    assert len({k["multiview"] for k in keys}) == 3
    assert all(g[:4] == b"glTF" for g in glbs)


def test_rerun_with_new_prompt_reuses_subject_cache(server):
    with server.client() as c:
        first = next(j for j in c.get("/v1/jobs", params={"limit": 500}).json()["jobs"] if j["request"]["seed"] == 11 and j["status"] == "done")
        r = c.post(f"/v1/jobs/{first['id']}/rerun", json={"prompt": "wearing a blue hat"})
        assert r.status_code == 201, r.text
        new_id = r.json()["ids"][0]
        rec = c.get(f"/v1/jobs/{new_id}").json()
        assert rec["request"] == {**first["request"], "prompt": "wearing a blue hat"}
        rec = wait_for(c, new_id, {"done", "failed"}, timeout=600)
    assert rec["status"] == "done", rec["error"]
    assert {"subject", "subject_views", "identity"} <= set(rec["cached_stages"]), rec["cached_stages"]
    assert not {"edited_views", "subject_prior"} & set(rec["cached_stages"]), "the new prompt changes the edit stages"


def test_cancel_stops_a_running_job_within_one_step(server):
    with server.client() as c:
        for seed in (500, 501, 502):  # a new seed renders; retry only if a tiny job outran the poll
            job_id = c.post("/v1/jobs", json=job_body(**{**GROUP_BODY, "seed": seed})).json()["ids"][0]
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                rec = c.get(f"/v1/jobs/{job_id}").json()
                if rec["status"] != "running" and rec["status"] != "queued":
                    break
                if rec["status"] == "running" and rec["stage"] == "reconstruct" and rec["step"] >= 2:
                    break
                time.sleep(0.02)
            t0 = time.monotonic()
            rec = c.post(f"/v1/jobs/{job_id}/cancel").json()
            assert rec["id"] == job_id
            rec = wait_for(c, job_id, {"cancelled", "done", "failed"}, timeout=120)
            took = time.monotonic() - t0
            if rec["status"] != "done":
                break
    assert rec["status"] == "cancelled", rec
    assert rec["error"]["code"] == "cancelled" and rec["files"] == []
    assert rec["stage"] == "reconstruct"
    (event,) = db_rows(server, "SELECT data FROM events WHERE job_id=? AND kind='cancelled'", job_id)
    data = json.loads(event["data"])
    assert data["steps_after_request"] <= 1, data  # the generator stopped at its next step
    assert took < 60, took
    assert not (server.data_dir / "jobs" / job_id).exists()
    # a cancelled job can be cancelled again harmlessly, and re-run
    with server.client() as c:
        assert c.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelled"


def test_hundred_jobs_complete_in_order(server):
    """100 separate jobs queued at once. The first has a new seed (it renders); the other 99 repeat
    the first job's request, so each is a real Generator run whose stages are all cache hits (tiny):
    this measures the queue and the worker, not the model."""
    with server.client() as c:
        t0 = time.monotonic()
        ids = []
        for i in range(100):
            r = c.post("/v1/jobs", json=job_body(**{**GROUP_BODY, "seed": 700 if i == 0 else 11}))
            assert r.status_code == 201, r.text
            ids += r.json()["ids"]
        submitted = time.monotonic() - t0
        states = {j["id"]: j["status"] for j in c.get("/v1/jobs", params={"limit": 500}).json()["jobs"]}
        waiting = sum(states[i] == "queued" for i in ids)
        wait_for(c, ids[-1], {"done", "failed", "cancelled"}, timeout=900)
        recs = [c.get(f"/v1/jobs/{i}").json() for i in ids]
        total = time.monotonic() - t0
    assert [r["status"] for r in recs] == ["done"] * 100, {r["status"] for r in recs}
    assert "reconstruct" not in recs[0]["cached_stages"]
    assert all("reconstruct" in r["cached_stages"] for r in recs[1:])
    assert len({r["id"] for r in recs}) == 100
    rows = db_rows(server, f"SELECT id, started_at, finished_at FROM jobs WHERE id IN ({','.join('?' * 100)}) ORDER BY seq", *ids)
    assert [r["id"] for r in rows] == ids
    for prev, cur in zip(rows, rows[1:]):
        assert prev["finished_at"] <= cur["started_at"], "one worker, in queue order"
    print(f"\n100 jobs: submitted in {submitted:.1f} s ({waiting} still queued then), all done in {total:.1f} s")
    with server.client() as c:  # idle now: the models are freed at once (the next job reloads them)
        assert c.post("/v1/unload").json() == {"unloaded": True, "deferred": False}
    assert "models unloaded" in (server.data_dir / "logs" / "serve.log").read_text()
    assert server.healthy()


def test_kill9_during_a_job_then_restart(harness):
    server = harness.server
    with server.client() as c:
        before = {j["id"]: j for j in c.get("/v1/jobs", params={"limit": 500}).json()["jobs"]}
        ids = c.post("/v1/jobs", json=job_body(**{**GROUP_BODY, "seed": 900}, variants=3)).json()["ids"]
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            rec = c.get(f"/v1/jobs/{ids[0]}").json()
            if rec["status"] == "running" and rec["stage"] in ("multiview", "reconstruct"):
                break
            time.sleep(0.02)
        assert rec["status"] == "running", rec
    server.proc.kill()  # SIGKILL: no shutdown code runs
    server.proc.wait(30)
    server = harness.restart()
    with server.client() as c:
        after = {j["id"]: j for j in c.get("/v1/jobs", params={"limit": 500}).json()["jobs"]}
        assert set(before) | set(ids) == set(after), "no job record lost"
        assert not [p for p in (server.data_dir / "jobs").iterdir() if p.name.startswith(".")], "partial outputs are cleaned"
        for job_id, old in before.items():
            if old["status"] in ("done", "failed", "cancelled", "interrupted"):
                assert after[job_id]["status"] == old["status"] and after[job_id]["files"] == old["files"]
        first = after[ids[0]]
        assert first["status"] == "interrupted" and first["error"]["code"] == "interrupted" and "Re-run" in first["error"]["message"]
        assert first["stage"] in ("multiview", "reconstruct")
        # the queue is intact and in order: the second variant runs next, the third waits
        assert [after[i]["status"] for i in ids[1:]] in (["queued", "queued"], ["running", "queued"])
        assert [after[i]["request"]["seed"] for i in ids] == [900, 901, 902]
        wait_for(c, ids[1], {"running", "done"}, timeout=120)
        for i in ids[1:]:
            c.post(f"/v1/jobs/{i}/cancel")
        assert wait_for(c, ids[2], {"cancelled"}, timeout=30)["status"] == "cancelled"
        # the interrupted job can be re-run: a new queued job with the same request
        r = c.post(f"/v1/jobs/{ids[0]}/rerun", json={})
        assert r.status_code == 201
        rerun = c.get(f"/v1/jobs/{r.json()['ids'][0]}").json()
        assert rerun["request"] == first["request"]
        c.post(f"/v1/jobs/{rerun['id']}/cancel")
        assert c.post("/v1/unload").json()["unloaded"] is True
    assert server.healthy()


def test_kill9_mid_stage_leaves_no_half_built_cache_entry(models, tmp_path, monkeypatch):
    """kill -9 while a stage is being built leaves its temporary folder in the per-user stage cache
    (`$MAKE_YOUR_3D_CACHE`, where jobs really build); the restarted backend removes it."""
    cache = tmp_path / "stages"
    monkeypatch.setenv("MAKE_YOUR_3D_CACHE", str(cache))  # the backend processes below build here
    data = tmp_path / "data"
    srv = start_server(models, data, config=service_config())
    try:
        for seed in (4242, 4243, 4244):  # again only if the stage finished between the look and the kill
            with srv.client() as c:
                job_id = c.post("/v1/jobs", json=job_body(seed=seed)).json()["ids"][0]
                deadline = time.monotonic() + 600
                while not hidden_cache_entries(cache) and time.monotonic() < deadline:
                    assert c.get(f"/v1/jobs/{job_id}").json()["status"] in ("queued", "running")
                    time.sleep(0.005)
            srv.proc.kill()  # SIGKILL mid-stage: no clean-up code runs
            srv.proc.wait(30)
            half_built = hidden_cache_entries(cache)
            srv = start_server(models, data, config=service_config())
            if half_built:
                break
        assert half_built, "the kill left a half-built entry"
        assert hidden_cache_entries(cache) == [], "the restart removed it"
        assert "removed partial cache entry" in srv.output()
        with srv.client() as c:
            rec = c.get(f"/v1/jobs/{job_id}").json()
            assert rec["status"] == "interrupted", rec
    finally:
        srv.stop()


def test_damaged_database_lists_real_jobs_again(harness):
    """The module's real jobs (their job.json written by the generator) are listed again after the
    database is damaged, with their request, files and the re-run still working."""
    server = harness.server
    with server.client() as c:
        done = [j for j in c.get("/v1/jobs", params={"limit": 500}).json()["jobs"] if j["status"] == "done"]
        if not done:  # run alone: make one
            job_id = c.post("/v1/jobs", json=job_body(**GROUP_BODY)).json()["ids"][0]
            assert wait_for(c, job_id, {"done", "failed"}, timeout=600)["status"] == "done"
            done = [c.get(f"/v1/jobs/{job_id}").json()]
        for job in c.get("/v1/jobs", params={"limit": 500}).json()["jobs"]:
            if job["status"] in ("queued", "running"):
                c.post(f"/v1/jobs/{job['id']}/cancel")
    assert server.stop() == 0
    db = server.data_dir / "jobs.sqlite3"
    for side in (Path(f"{db}-wal"), Path(f"{db}-shm")):
        side.unlink(missing_ok=True)
    db.write_bytes(b"\x00" * 4096)  # damaged
    server = harness.restart()
    with server.client() as c:
        after = {j["id"]: j for j in c.get("/v1/jobs", params={"limit": 500}).json()["jobs"]}
        for job in done:
            again = after[job["id"]]
            assert again["status"] == "done" and again["files"] == job["files"], again
            assert {k: again["request"][k] for k in ("prompt", "negative_prompt", "subject", "seed", "preset")} == \
                   {k: job["request"][k] for k in ("prompt", "negative_prompt", "subject", "seed", "preset")}
        assert c.get(f"/v1/jobs/{done[0]['id']}/files/subject.glb").content[:4] == b"glTF"
        r = c.post(f"/v1/jobs/{done[0]['id']}/rerun", json={"seed": 77})
        assert r.status_code == 201, r.text
        c.post(f"/v1/jobs/{r.json()['ids'][0]}/cancel")
    assert server.healthy()
