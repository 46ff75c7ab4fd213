"""The remote listener (issue 25): `serve --allow-remote` on loopback over TLS with a generated
certificate, per-user tokens, owner isolation, files over HTTP with Range, and the service's
protections (Host/Origin, size limits, slow clients) checked on that listener.

One real backend process on the tiny model set serves the module; the add-on's client (standard
library, loaded by path: no bpy) is exercised against it for pinning and resumable downloads.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from make_your_3d.errors import BadRequest
from make_your_3d.service.server import ServeOptions, serve
from make_your_3d.service.tls import fingerprint_of_der, generate_self_signed, normalise_fingerprint
from make_your_3d.service.users import UserStore
from test_service import HEAD_TIMEOUT_S, job_body, service_config, subject_image

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 90.0


def load_addon_client():
    """blender_addon/client.py is bpy-free (standard library only): load it by path."""
    name = "_make_your_3d_addon_client"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "blender_addon" / "client.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------
# A remote backend process
# ---------------------------------------------------------------------------------------------
@dataclass
class Remote:
    proc: subprocess.Popen
    data_dir: Path
    state: dict
    log: Path
    cert: Path | None = None  # the operator's certificate (None: the generated one in DATA/tls/)

    @property
    def url(self) -> str:
        return self.state["url"]

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def tls_context(self) -> ssl.SSLContext:
        """Trust exactly this backend's certificate (and check the host name against its names)."""
        return ssl.create_default_context(cafile=str(self.cert or self.data_dir / "tls" / "cert.pem"))

    def client(self, token: str | None, timeout: float = 30.0, **headers: str) -> httpx.Client:
        auth = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers={**auth, **headers}, timeout=timeout, verify=self.tls_context())

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM: the operator's way to stop a shared backend (a user token may not)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def start_remote(models: Path, data: Path, *extra: str, config: dict | None = None) -> Remote:
    data.mkdir(parents=True, exist_ok=True)
    state_file = data.parent / f"{data.name}-state.json"
    state_file.unlink(missing_ok=True)
    args = ["--allow-remote", "--host", "127.0.0.1", *extra]
    if config is not None:
        cfg = data.parent / f"{data.name}-config.json"
        cfg.write_text(json.dumps(config))
        args += ["--config", str(cfg)]
    log = data.parent / f"{data.name}-stderr.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "make_your_3d", "serve", "--models", str(models), "--data", str(data), "--port", "0",
           "--state-file", str(state_file), "--device", "cpu", *args]
    with open(log, "ab") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
        if state_file.exists():
            return Remote(proc, data, json.loads(state_file.read_text()), log)
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"no state file after {START_TIMEOUT_S} s:\n{log.read_text(errors='replace')}")


def users_cli(data: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "make_your_3d", "users", *args, "--data", str(data)], capture_output=True, text=True,
                          timeout=60)


def add_user(data: Path, name: str) -> str:
    out = users_cli(data, "add", name, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["token"]


@dataclass
class Studio:
    remote: Remote
    alice: str
    bob: str


@pytest.fixture(scope="module")
def studio(tiny_models, tmp_path_factory):
    data = tmp_path_factory.mktemp("remote") / "data"
    data.mkdir()
    alice, bob = add_user(data, "alice"), add_user(data, "bob")
    remote = start_remote(tiny_models, data, config=service_config())
    yield Studio(remote, alice, bob)
    assert remote.stop() == 0, remote.output()


def wait_for(c: httpx.Client, job_id: str, statuses: set[str], timeout: float = 300.0) -> dict:
    deadline = time.monotonic() + timeout
    rec: dict = {}
    while time.monotonic() < deadline:
        rec = c.get(f"/v1/jobs/{job_id}").json()
        if rec.get("status") in statuses:
            return rec
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not reach {statuses}: {rec}")


def peer_der(port: int) -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, ctx.wrap_socket(raw) as tls:
        return tls.getpeercert(binary_form=True)


# ---------------------------------------------------------------------------------------------
# TLS
# ---------------------------------------------------------------------------------------------
def test_remote_listener_speaks_tls_only_with_the_printed_fingerprint(studio):
    r = studio.remote
    assert r.url.startswith("https://127.0.0.1:")
    assert "token" not in r.state, "the remote listener takes user tokens only; the state file carries none"
    tls = r.data_dir / "tls"
    assert (tls / "key.pem").stat().st_mode & 0o077 == 0, "the private key is the backend's alone"
    der = peer_der(r.port)
    assert r.state["fingerprint"] == fingerprint_of_der(der) == ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())
    assert r.state["fingerprint"] in r.output(), "the fingerprint is printed for the artists to pin"
    # plain HTTP on the TLS port gets no HTTP answer
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{r.port}/v1/health", timeout=5).raise_for_status()
    # the certificate names this address: a client that checks names and trusts only this cert connects
    with r.client(None) as c:
        assert c.get("/v1/health").json()["status"] == "ok"


def test_generated_certificate_is_kept_across_restarts(tiny_models, tmp_path):
    first = start_remote(tiny_models, tmp_path / "data")
    try:
        fp = first.state["fingerprint"]
        assert "generated" in first.output()
    finally:
        assert first.stop() == 0
    second = start_remote(tiny_models, tmp_path / "data")
    try:
        assert second.state["fingerprint"] == fp, "a pinned fingerprint must survive a restart"
        assert fingerprint_of_der(peer_der(second.port)) == fp
    finally:
        assert second.stop() == 0


def test_operator_certificate_is_served(tiny_models, tmp_path):
    cert, key = tmp_path / "studio.pem", tmp_path / "studio.key"
    generate_self_signed(cert, key, ["127.0.0.1", "gpu-box.studio.example"])
    remote = start_remote(tiny_models, tmp_path / "data", "--tls-cert", str(cert), "--tls-key", str(key), "--public-name",
                          "gpu-box.studio.example")
    remote.cert = cert
    try:
        assert fingerprint_of_der(peer_der(remote.port)) == remote.state["fingerprint"]
        assert not (tmp_path / "data" / "tls" / "cert.pem").exists(), "no certificate is generated when one is given"
        token = add_user(tmp_path / "data", "carol")
        with remote.client(token, Host="gpu-box.studio.example") as c:
            assert c.get("/v1/jobs").status_code == 200, "a --public-name is a Host the listener answers to"
    finally:
        assert remote.stop() == 0


def _opts(tmp_path: Path, **kw) -> ServeOptions:
    return ServeOptions(models_dir=tmp_path / "m", data_dir=tmp_path / "d", state_file=tmp_path / "s.json", **kw)


def test_tls_options_are_checked_before_anything_starts(tmp_path):
    with pytest.raises(BadRequest, match="--allow-remote"):
        serve(_opts(tmp_path, host="0.0.0.0"))
    with pytest.raises(BadRequest, match="--allow-remote"):
        serve(_opts(tmp_path, tls_cert=tmp_path / "c.pem", tls_key=tmp_path / "k.pem"))
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    generate_self_signed(cert, key, ["127.0.0.1"])
    other_cert, other_key = tmp_path / "c2.pem", tmp_path / "k2.pem"
    generate_self_signed(other_cert, other_key, ["127.0.0.1"])
    for kw, word in ((dict(tls_cert=cert), "both"), (dict(tls_cert=cert, tls_key=other_key), "do not load together"),
                     (dict(tls_cert=tmp_path / "nope.pem", tls_key=key), "does not exist")):
        with pytest.raises(BadRequest, match=word):
            serve(_opts(tmp_path, allow_remote=True, **kw))
    assert not (tmp_path / "s.json").exists()


def test_fingerprint_forms_normalise():
    hexes = "ab" * 32
    assert normalise_fingerprint(":".join(["AB"] * 32)) == hexes
    assert normalise_fingerprint(f"sha256/{hexes.upper()}") == hexes
    assert normalise_fingerprint("ab:cd") == ""
    assert load_addon_client().normalise_fingerprint(" ".join(["Ab"] * 32)) == hexes


# ---------------------------------------------------------------------------------------------
# Users
# ---------------------------------------------------------------------------------------------
def test_users_add_list_remove_store_only_salted_hashes(tmp_path):
    data = tmp_path / "data"
    token = add_user(data, "dana")
    assert token.startswith("m3d_") and len(token) >= 40
    twice = users_cli(data, "add", "dana")
    assert twice.returncode == 2 and "exists" in twice.stderr and "Traceback" not in twice.stderr
    bad = users_cli(data, "add", "../etc")
    assert bad.returncode == 2 and "not a user name" in bad.stderr
    other = add_user(data, "erin")
    raw = (data / "users.json").read_text()
    assert token not in raw and other not in raw, "tokens are never stored"
    assert (data / "users.json").stat().st_mode & 0o077 == 0
    entry = json.loads(raw)["users"]["dana"]
    assert entry["sha256"] == hashlib.sha256(bytes.fromhex(entry["salt"]) + token.encode()).hexdigest()
    assert entry["salt"] != json.loads(raw)["users"]["erin"]["salt"], "each user has their own salt"
    listed = users_cli(data, "list", "--json")
    assert [u["name"] for u in json.loads(listed.stdout)] == ["dana", "erin"]
    store = UserStore(data)
    assert store.authenticate(token) == "dana" and store.authenticate(other) == "erin"
    assert store.authenticate(token + "x") is None and store.authenticate("") is None and store.authenticate(token[:-1]) is None
    assert users_cli(data, "remove", "dana").returncode == 0
    assert store.authenticate(token) is None, "a removed user's token stops working without a restart"
    gone = users_cli(data, "remove", "dana")
    assert gone.returncode == 2 and "no user" in gone.stderr
    assert [u["name"] for u in json.loads(users_cli(data, "list", "--json").stdout)] == ["erin"]


def test_every_route_needs_a_user_token(studio):
    r = studio.remote
    routes = [("GET", "/v1/models"), ("GET", "/v1/jobs"), ("POST", "/v1/jobs"), ("GET", "/v1/jobs/abc"), ("GET", "/v1/jobs/abc/events"),
              ("POST", "/v1/jobs/abc/cancel"), ("GET", "/v1/jobs/abc/files/subject.glb"), ("POST", "/v1/shutdown")]
    for token in (None, "wrong", studio.alice + "x", r.state["instance"]):
        with r.client(token) as c:
            for method, path in routes:
                resp = c.request(method, path)
                assert resp.status_code == 401 and resp.json()["error"]["code"] == "unauthorized", (token, method, path, resp.text)
    with r.client(studio.alice) as c:
        assert c.get("/v1/jobs").status_code == 200
        for path in ("/v1/shutdown", "/v1/unload"):
            resp = c.post(path)
            assert resp.status_code == 403 and resp.json()["error"]["code"] == "forbidden", resp.text
    assert r.proc.poll() is None, "a user cannot stop the shared backend"


def test_user_added_and_removed_while_running(studio):
    token = add_user(studio.remote.data_dir, "frank")
    with studio.remote.client(token) as c:
        assert c.get("/v1/jobs").status_code == 200
        assert users_cli(studio.remote.data_dir, "remove", "frank").returncode == 0
        assert c.get("/v1/jobs").status_code == 401


# ---------------------------------------------------------------------------------------------
# Owners, uploads, downloads
# ---------------------------------------------------------------------------------------------
def test_users_see_and_cancel_only_their_own_jobs(studio):
    r = studio.remote
    with r.client(studio.alice) as a, r.client(studio.bob) as b:
        created = a.post("/v1/jobs", json=job_body(prompt="alice's queued job", variants=2))
        assert created.status_code == 201, created.text
        ids, group = created.json()["ids"], created.json()["group"]
        mine = b.post("/v1/jobs", json=job_body(prompt="bob's job"))
        bob_id = mine.json()["ids"][0]
        assert {j["id"] for j in a.get("/v1/jobs").json()["jobs"]} >= set(ids)
        assert not {j["id"] for j in b.get("/v1/jobs").json()["jobs"]} & set(ids), "bob's list must not show alice's jobs"
        assert bob_id not in {j["id"] for j in a.get("/v1/jobs").json()["jobs"]}
        missing = b.get("/v1/jobs/0123456789abcdef").json()["error"]
        for method, path in (("GET", f"/v1/jobs/{ids[0]}"), ("GET", f"/v1/jobs/{ids[0]}/events"), ("POST", f"/v1/jobs/{ids[0]}/cancel"),
                             ("POST", f"/v1/jobs/{ids[0]}/rerun"), ("GET", f"/v1/jobs/{ids[0]}/files/job.json"),
                             ("POST", f"/v1/groups/{group}/cancel")):
            resp = b.request(method, path)
            assert resp.status_code == 404, (method, path, resp.status_code, resp.text)
            assert resp.json()["error"]["code"] == "not_found"
        # the same sentence as an id that does not exist: nothing tells bob the id is real
        other = b.get(f"/v1/jobs/{ids[0]}").json()["error"]["message"]
        assert other.replace(ids[0], "X") == missing["message"].replace("0123456789abcdef", "X")
        assert {a.get(f"/v1/jobs/{i}").json()["status"] for i in ids} <= {"queued", "running", "done"}, "bob's cancel did nothing"
        # alice cancels her own group; bob's job goes on
        assert a.post(f"/v1/groups/{group}/cancel").status_code == 200
        assert b.post(f"/v1/jobs/{bob_id}/cancel").status_code == 200
        for i in ids:
            assert wait_for(a, i, {"cancelled", "done", "failed"})["status"] in ("cancelled", "done")
    rows = _owners(r.data_dir)
    assert all(rows[i] == "alice" for i in ids) and rows[bob_id] == "bob"


def _owners(data: Path) -> dict[str, str]:
    import sqlite3

    con = sqlite3.connect(f"file:{data / 'jobs.sqlite3'}?mode=ro", uri=True)
    try:
        return dict(con.execute("SELECT id, owner FROM jobs").fetchall())
    finally:
        con.close()


def test_a_path_is_refused_and_the_uploaded_image_is_used(studio):
    with studio.remote.client(studio.alice) as c:
        for field in ("image_path", "path", "output_dir"):
            resp = c.post("/v1/jobs", json={**job_body(), field: "/etc/passwd"})
            assert resp.status_code == 422 and resp.json()["error"]["code"] == "bad_request", resp.text
            assert field in resp.json()["error"]["message"]
        resp = c.post("/v1/jobs", json={"prompt": "no image", "image_path": str(REPO / "examples" / "toy_bear.png")})
        assert resp.status_code in (400, 422) and "Traceback" not in resp.text
        before = len(c.get("/v1/jobs").json()["jobs"])
        assert before == len(c.get("/v1/jobs").json()["jobs"])


def test_upload_runs_and_files_download_with_ranges(studio):
    image = subject_image(colour=(30, 160, 90))
    r = studio.remote
    with r.client(studio.alice, timeout=60) as c:
        created = c.post("/v1/jobs", json={"image_png_b64": base64.b64encode(image).decode(), "prompt": "made of jade", "seed": 5})
        assert created.status_code == 201, created.text
        job_id = created.json()["ids"][0]
        rec = wait_for(c, job_id, {"done", "failed"}, timeout=600)
        assert rec["status"] == "done", rec
        job_json = c.get(f"/v1/jobs/{job_id}/files/job.json")
        assert job_json.headers["content-type"] == "application/json"
        assert job_json.json()["inputs"]["image_sha256"] == hashlib.sha256(image).hexdigest(), "the job ran on the uploaded bytes"
        full = c.get(f"/v1/jobs/{job_id}/files/subject.glb")
        assert full.status_code == 200 and full.headers["content-type"] == "model/gltf-binary"
        assert full.headers["accept-ranges"] == "bytes" and full.content[:4] == b"glTF"
        etag = full.headers["etag"]
        head = c.get(f"/v1/jobs/{job_id}/files/subject.glb", headers={"Range": "bytes=0-99"})
        assert head.status_code == 206 and head.content == full.content[:100]
        assert head.headers["content-range"] == f"bytes 0-99/{len(full.content)}"
        rest = c.get(f"/v1/jobs/{job_id}/files/subject.glb", headers={"Range": "bytes=100-", "If-Range": etag})
        assert rest.status_code == 206 and head.content + rest.content == full.content
        stale = c.get(f"/v1/jobs/{job_id}/files/subject.glb", headers={"Range": "bytes=100-", "If-Range": '"not-the-etag"'})
        assert stale.status_code == 200 and stale.content == full.content, "a changed file is sent whole"
        beyond = c.get(f"/v1/jobs/{job_id}/files/subject.glb", headers={"Range": f"bytes={len(full.content) + 10}-"})
        assert beyond.status_code == 416
        png = c.get(f"/v1/jobs/{job_id}/files/preview.png")
        assert png.headers["content-type"] == "image/png" and png.content[:8] == b"\x89PNG\r\n\x1a\n"
    studio.glb = full.content  # type: ignore[attr-defined]
    studio.done_job = job_id  # type: ignore[attr-defined]


def test_addon_client_pins_and_resumes(studio, tmp_path):
    """The add-on's own client: the pinned fingerprint admits the backend, a broken download resumes
    with a Range request, and a wrong fingerprint is refused before anything is sent."""
    job_id = getattr(studio, "done_job", None)
    assert job_id, "test_upload_runs_and_files_download_with_ranges must run first (it makes the job)"
    client_mod = load_addon_client()
    r = studio.remote
    ep = client_mod.Endpoint(r.url, studio.alice, r.state["fingerprint"])
    client = client_mod.Client(ep)
    assert client.job(job_id)["status"] == "done"
    dest = tmp_path / "subject.glb"
    part = tmp_path / "subject.glb.part"
    # a broken first attempt: the first 1000 bytes and the validator it was started with
    part.write_bytes(studio.glb[:1000])
    etag = httpx.get(f"{r.url}/v1/jobs/{job_id}/files/subject.glb", headers={"Authorization": f"Bearer {studio.alice}"},
                     verify=r.tls_context()).headers["etag"]
    (tmp_path / "subject.glb.part.json").write_text(json.dumps({"validator": etag}))
    seen: list[str] = []
    original = client_mod.Client._open

    def spy(self, method, path, body=None, timeout=None, headers=None):
        seen.append((headers or {}).get("Range", ""))
        return original(self, method, path, body, timeout, headers)

    client_mod.Client._open = spy
    try:
        client.download(job_id, "subject.glb", dest)
    finally:
        client_mod.Client._open = original
    assert seen == ["bytes=1000-"], seen
    assert dest.read_bytes() == studio.glb and not part.exists()
    # a part whose validator is stale is replaced by the whole file
    part.write_bytes(b"x" * 500)
    (tmp_path / "subject.glb.part.json").write_text(json.dumps({"validator": '"old"'}))
    dest.unlink()
    client.download(job_id, "subject.glb", dest)
    assert dest.read_bytes() == studio.glb
    wrong = client_mod.Client(client_mod.Endpoint(r.url, studio.alice, "00" * 32))
    with pytest.raises(client_mod.ApiError) as err:
        wrong.jobs()
    assert err.value.code == "fingerprint_mismatch" and r.state["fingerprint"] in err.value.message


def test_wrong_fingerprint_sends_nothing(tmp_path):
    """Against a TLS server that records every byte it receives after the handshake: a client with
    the wrong pin sends none (so not the token); with the right pin the request arrives."""
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    generate_self_signed(cert, key, ["127.0.0.1"])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    received: list[bytes] = []

    def serve_once() -> None:
        for _ in range(2):
            raw, _addr = listener.accept()
            try:
                with ctx.wrap_socket(raw, server_side=True) as tls:
                    tls.settimeout(5)
                    data = b""
                    try:
                        while b"\r\n\r\n" not in data:
                            chunk = tls.recv(4096)
                            if not chunk:
                                break
                            data += chunk
                    except (OSError, ssl.SSLError):
                        pass
                    received.append(data)
                    if data:
                        body = b'{"jobs": []}'
                        tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                                    + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            except (OSError, ssl.SSLError):
                received.append(b"")

    thread = threading.Thread(target=serve_once, daemon=True)
    thread.start()
    client_mod = load_addon_client()
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    right = fingerprint_of_der(x509.load_pem_x509_certificate(cert.read_bytes()).public_bytes(Encoding.DER))
    secret = "m3d_secret-token-that-must-not-leak"
    with pytest.raises(client_mod.ApiError) as err:
        client_mod.Client(client_mod.Endpoint(f"https://127.0.0.1:{port}", secret, "11" * 32)).jobs()
    assert err.value.code == "fingerprint_mismatch"
    assert client_mod.Client(client_mod.Endpoint(f"https://127.0.0.1:{port}", secret, right)).jobs() == []
    thread.join(10)
    listener.close()
    assert received[0] == b"", f"the wrong pin let the client send {received[0][:80]!r}"
    assert secret.encode() in received[1], "with the right pin the request (and its token) arrives"


# ---------------------------------------------------------------------------------------------
# The service's protections, on the TLS listener
# ---------------------------------------------------------------------------------------------
def test_host_and_origin_checks_on_the_remote_listener(studio):
    with studio.remote.client(studio.alice) as c:
        for host in ("evil.example", "127.0.0.1.evil.example", "attacker:443"):
            resp = c.get("/v1/jobs", headers={"Host": host})
            assert resp.status_code == 403 and resp.json()["error"]["code"] == "bad_host", (host, resp.text)
        for host in (f"127.0.0.1:{studio.remote.port}", "localhost", socket.gethostname()):
            assert c.get("/v1/jobs", headers={"Host": host}).status_code == 200, host
        for origin in ("https://evil.example", f"https://127.0.0.1:{studio.remote.port}", "null"):
            resp = c.get("/v1/jobs", headers={"Origin": origin})
            assert resp.status_code == 403 and resp.json()["error"]["code"] == "bad_origin", (origin, resp.text)


def test_size_limits_on_the_remote_listener(studio):
    from make_your_3d.service.app import MAX_BODY_BYTES, MAX_IMAGE_B64_CHARS

    with studio.remote.client(studio.alice, timeout=60) as c:
        resp = c.post("/v1/jobs", json=job_body(image_png_b64="A" * (MAX_IMAGE_B64_CHARS + 4)))
        assert resp.status_code == 400 and resp.json()["error"]["code"] == "bad_image"
        # a declared length over the limit is refused from the head, before any body byte is sent
        answer = raw_tls_request(studio.remote.port, f"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {studio.alice}\r\n"
                                 f"Content-Type: application/json\r\nContent-Length: {MAX_BODY_BYTES + 10}\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 413") and b'"too_large"' in answer, answer[:300]

        def chunks():  # no Content-Length: the limit applies while reading
            for _ in range((MAX_BODY_BYTES // (1 << 20)) + 2):
                yield b" " * (1 << 20)

        try:
            resp = c.post("/v1/jobs", content=chunks(), headers={"Content-Type": "application/json"})
            assert resp.status_code == 413 and resp.json()["error"]["code"] == "too_large"
        except httpx.TransportError:
            pass  # the server may close once it has answered
    # no token: refused before the (huge) body is read
    answer = raw_tls_request(studio.remote.port, f"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                             f"Content-Length: {MAX_BODY_BYTES * 4}\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 401") and b'"unauthorized"' in answer, answer[:300]
    with studio.remote.client(None) as c:
        assert c.get("/v1/health").status_code == 200


def raw_tls_request(port: int, head: str, timeout: float = 10.0) -> bytes:
    """Send a request head (no body) over TLS and read the answer until the server closes or 2 s pass."""
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=timeout)) as tls:
        tls.sendall(head.encode("latin-1"))
        tls.settimeout(2.0)
        data = b""
        try:
            while b"}" not in data:
                chunk = tls.recv(65536)
                if not chunk:
                    break
                data += chunk
        except (socket.timeout, ssl.SSLError, OSError):
            pass
        return data


def test_slow_clients_are_cut_off_on_the_tls_listener(studio):
    """Slowloris over TLS: a connection that never starts the handshake, and one that finishes it and
    then trickles header lines, are both closed once HEAD_TIMEOUT_S has passed; health still answers."""
    port = studio.remote.port
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    silent = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(3)]
    trickling = []
    for _ in range(3):
        tls = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10))
        tls.sendall(b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        trickling.append(tls)
    t0 = time.monotonic()
    while time.monotonic() - t0 < HEAD_TIMEOUT_S + 0.5:
        for tls in trickling:
            try:
                tls.sendall(b"X-Slow: 1\r\n")
            except OSError:
                pass
        time.sleep(0.25)
    with studio.remote.client(None) as c:
        assert c.get("/v1/health").status_code == 200
    for sock in silent + trickling:
        sock.settimeout(HEAD_TIMEOUT_S + 10)
        try:
            assert sock.recv(1024) == b"", "the server must close the connection, not answer it"
        except (ConnectionResetError, ssl.SSLError, ssl.SSLEOFError):
            pass  # closed mid-handshake or while we were still sending
        finally:
            sock.close()
    assert time.monotonic() - t0 < HEAD_TIMEOUT_S + 10, "closed by the head/handshake timeout, not asyncio's 60 s default"


def test_a_database_from_before_users_is_migrated(tmp_path):
    """A job database written before per-user tokens gains the owner column; its jobs are the local
    token's (listed locally) and no remote user's."""
    import sqlite3

    from make_your_3d.service.store import JobSpec, JobStore

    old = tmp_path / "jobs.sqlite3"
    con = sqlite3.connect(old)
    con.executescript("""
        CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, grp TEXT NOT NULL, status TEXT NOT NULL,
            stage TEXT, step INTEGER NOT NULL DEFAULT 0, total INTEGER NOT NULL DEFAULT 0, message TEXT NOT NULL DEFAULT '',
            eta_s REAL, error_code TEXT, error_message TEXT, files TEXT NOT NULL DEFAULT '[]', cached_stages TEXT NOT NULL DEFAULT '[]',
            request TEXT NOT NULL, image_sha256 TEXT NOT NULL, created_at REAL NOT NULL, started_at REAL, finished_at REAL);
        INSERT INTO jobs(id, grp, status, request, image_sha256, created_at)
            VALUES ('oldjob', 'g', 'queued', '{"prompt": "p", "negative_prompt": "", "seed": 1, "preset": "fast"}', 'x', 1.0);
        PRAGMA user_version=1;
    """)
    con.close()
    store = JobStore(old)
    try:
        assert store.get("oldjob").owner is None
        new = store.add_jobs([JobSpec("q", "", None, 2, "fast", None, None)], "y", owner="alice")[0]
        assert [j.id for j in store.page(10)[0]] == ["oldjob", new.id]
        assert [j.id for j in store.page(10, owner="alice")[0]] == [new.id]
        assert store.page(10, owner="bob")[0] == []
    finally:
        store.close()
