"""The add-on's Remote backend preference on the real `bpy` module, against a real TLS backend
(`serve --allow-remote`) on loopback with a generated certificate and the tiny model set.

As in test_addon.py, every Blender-side check runs in ONE bpy subprocess (this file with
`--driver`), which installs the built extension zip and records one result per check. The add-on
never starts a backend of its own here: its backend Python points nowhere.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ADDON_ID = "make_your_3d"
MODULE = f"bl_ext.user_default.{ADDON_ID}"
CHECKS = (
    "remote_preference_problems_block_generate",
    "remote_wrong_fingerprint_sends_nothing",
    "remote_wrong_fingerprint_against_the_backend",
    "remote_job_finishes_downloads_and_imports",
)

if __name__ != "__main__":
    import pytest

    sys.path.insert(0, str(REPO))
    import build_addon  # noqa: E402
    from test_addon import _bpy_expected  # noqa: E402
    from test_remote import add_user, start_remote  # noqa: E402
    from test_service import service_config  # noqa: E402

    needs_bpy = pytest.mark.skipif(not _bpy_expected(), reason="bpy 5.0.1 exists only for Python 3.11")

    @pytest.fixture(scope="module")
    def driver_results(tiny_models, tmp_path_factory) -> dict:
        import importlib.util

        from make_your_3d.service.tls import generate_self_signed

        assert importlib.util.find_spec("bpy") is not None, "bpy (a test dependency) is not installed: pip install -e '.[test]'"
        work = tmp_path_factory.mktemp("addon_remote")
        zip_path = build_addon.build(work / "dist").zip_path
        data = work / "backend_data"
        data.mkdir()
        token = add_user(data, "artist")
        remote = start_remote(tiny_models, data, config=service_config())
        stub_cert, stub_key = work / "stub.pem", work / "stub.key"
        generate_self_signed(stub_cert, stub_key, ["127.0.0.1"])
        args = {"zip": str(zip_path), "work": str(work), "results": str(work / "results.json"), "url": remote.url, "token": token,
                "fingerprint": remote.state["fingerprint"], "backend_data": str(data), "stub_cert": str(stub_cert),
                "stub_key": str(stub_key)}
        env = dict(os.environ, BLENDER_USER_RESOURCES=str(work / "blender_user"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   PYTHONDONTWRITEBYTECODE="1")
        env.pop("BLENDER_USER_SCRIPTS", None)
        log = work / "driver.log"
        try:
            with open(log, "w") as fh:
                try:
                    code = subprocess.run([sys.executable, __file__, "--driver", json.dumps(args)], stdout=fh, stderr=subprocess.STDOUT,
                                          timeout=500, env=env, cwd=str(work)).returncode
                except subprocess.TimeoutExpired:
                    code = "timeout (500 s)"
            import httpx

            with remote.client(token) as c:
                server_jobs = c.get("/v1/jobs").json()["jobs"]
        finally:
            assert remote.stop() == 0, remote.output()
        results = json.loads(Path(args["results"]).read_text()) if Path(args["results"]).is_file() else {}
        results["_meta"] = {"returncode": code, "tail": log.read_text()[-6000:], "server_jobs": server_jobs}
        return results

    @needs_bpy
    @pytest.mark.parametrize("check", CHECKS)
    def test_addon_remote_backend(driver_results: dict, check: str) -> None:
        rec = driver_results.get(check)
        meta = driver_results["_meta"]
        assert rec is not None, f"check {check} did not run (driver exit {meta['returncode']}):\n{meta['tail']}"
        assert rec["ok"], f"{check}: {rec['detail']}"

    @needs_bpy
    def test_only_the_pinned_submission_reached_the_backend(driver_results: dict) -> None:
        """The wrong-fingerprint Generate queued nothing there; the right one queued exactly one job."""
        jobs = driver_results["_meta"]["server_jobs"]
        assert [j["request"]["prompt"] for j in jobs] == ["made of gold"], jobs


# ------------------------------------------------------------------------------------------------
# Blender side (runs in the subprocess)
# ------------------------------------------------------------------------------------------------
class Checks:
    def __init__(self, path: Path):
        self.path = path
        self.results: dict[str, dict] = {}

    def run(self, name: str, fn) -> bool:
        t0 = time.monotonic()
        try:
            detail = fn() or ""
            ok = True
        except Exception as exc:  # recorded for the pytest side
            ok, detail = False, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-2500:]}"
        self.results[name] = {"ok": ok, "detail": str(detail), "seconds": round(time.monotonic() - t0, 2)}
        self.path.write_text(json.dumps(self.results, indent=1))
        print(f"[{'ok' if ok else 'FAIL'}] {name} ({time.monotonic() - t0:.1f}s) {'' if ok else str(detail)[:300]}", flush=True)
        return ok


def _poll_message(op) -> str | None:
    if op.poll():
        return None
    try:
        op()
    except RuntimeError as exc:
        return str(exc)
    raise AssertionError("poll() was False but the operator ran")


class RecordingTlsServer:
    """A TLS listener that records every byte a client sends after the handshake (and answers
    nothing): what a client with a wrong pin must never send is the request, and so the token."""

    def __init__(self, cert: str, key: str):
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.5)
        self.port = self.sock.getsockname()[1]
        self.handshakes = 0
        self.received = b""
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                raw, _ = self.sock.accept()
            except OSError:
                continue
            try:
                with self.ctx.wrap_socket(raw, server_side=True) as tls:
                    self.handshakes += 1
                    tls.settimeout(3)
                    while True:
                        chunk = tls.recv(4096)
                        if not chunk:
                            break
                        self.received += chunk
            except (OSError, ssl.SSLError):
                pass

    def close(self) -> None:
        self._stop.set()
        self.thread.join(5)
        self.sock.close()


def driver(args: dict) -> None:
    import bpy

    work = Path(args["work"])
    checks = Checks(Path(args["results"]))

    def mod(name: str):
        return sys.modules[f"{MODULE}.{name}"]

    def prefs():
        return bpy.context.preferences.addons[MODULE].preferences

    def rt():
        return mod("runtime").get()

    def props():
        return bpy.context.scene.make_your_3d

    result = bpy.ops.extensions.package_install_files(filepath=args["zip"], repo="user_default", enable_on_install=True)
    assert "FINISHED" in result, result
    prefs().python_path = str(work / "no" / "such" / "python")  # no local backend can start: everything goes remote
    prefs().data_dir = str(work / "addon_data")
    img = bpy.data.images.new("reference", 64, 64, alpha=True)
    px = []
    for y in range(64):
        for x in range(64):
            inside = (x - 32) ** 2 + (y - 30) ** 2 < 20**2
            px += [0.8, 0.3 + 0.005 * y, 0.2 + 0.004 * x, 1.0] if inside else [0.0, 0.0, 0.0, 0.0]
    img.pixels[:] = px
    props().image = img
    props().prompt = "made of gold"
    props().seed_mode = "FIXED"
    props().seed = 3

    def use_remote(url: str, token: str, fingerprint: str) -> None:
        prefs().backend_mode = "REMOTE"
        prefs().remote_url = url
        prefs().remote_token = token
        prefs().remote_fingerprint = fingerprint

    def remote_preference_problems_block_generate():
        said = []
        for url, token, fp, word in (("", args["token"], args["fingerprint"], "URL"),
                                     ("http://gpu-box.example:8765", args["token"], args["fingerprint"], "https://"),
                                     (args["url"], "", args["fingerprint"], "token"),
                                     (args["url"], args["token"], "12:34", "fingerprint")):
            use_remote(url, token, fp)
            msg = _poll_message(bpy.ops.make_your_3d.generate)
            assert msg and word in msg, (url, fp, msg)
            said.append(msg)
        # local mode: the broken backend Python is what blocks, as before
        prefs().backend_mode = "LOCAL"
        msg = _poll_message(bpy.ops.make_your_3d.generate)
        assert msg and "Backend Python" in msg, msg
        return " | ".join(said)

    checks.run("remote_preference_problems_block_generate", remote_preference_problems_block_generate)

    def remote_wrong_fingerprint_sends_nothing():
        stub = RecordingTlsServer(args["stub_cert"], args["stub_key"])
        try:
            use_remote(f"https://127.0.0.1:{stub.port}", args["token"], args["fingerprint"])  # the real backend's pin, another cert
            known = len(props().history)
            assert bpy.ops.make_your_3d.generate() == {"FINISHED"}
            assert rt().wait_until(lambda: "fingerprint" in props().last_error, 30), props().last_error
            assert stub.handshakes >= 1, "the client never reached the stub"
            time.sleep(0.5)
            assert stub.received == b"", f"the client sent {stub.received[:120]!r} to a certificate it was not pinned to"
            assert args["token"].encode() not in stub.received
            assert len(props().history) == known, "no job may be recorded"
            return props().last_error
        finally:
            stub.close()

    checks.run("remote_wrong_fingerprint_sends_nothing", remote_wrong_fingerprint_sends_nothing)

    def remote_wrong_fingerprint_against_the_backend():
        use_remote(args["url"], args["token"], "AB:" * 31 + "AB")
        props().last_error = ""
        assert bpy.ops.make_your_3d.generate() == {"FINISHED"}
        assert rt().wait_until(lambda: "fingerprint" in props().last_error, 30), props().last_error
        assert args["fingerprint"] in props().last_error, "the message names the certificate the backend showed"
        props().last_error = ""
        assert bpy.ops.make_your_3d.remote_test() == {"FINISHED"}
        assert rt().wait_until(lambda: "fingerprint" in rt().remote_checked, 30), rt().remote_checked
        return rt().remote_checked

    checks.run("remote_wrong_fingerprint_against_the_backend", remote_wrong_fingerprint_against_the_backend)

    def remote_job_finishes_downloads_and_imports():
        use_remote(args["url"] + "/", args["token"], args["fingerprint"].lower().replace(":", " "))
        assert bpy.ops.make_your_3d.remote_test() == {"FINISHED"}
        assert rt().wait_until(lambda: rt().remote_checked.startswith("Connected"), 30), rt().remote_checked
        assert rt().wait_until(lambda: rt().models is not None, 30), "the remote backend's model state was not loaded"
        props().last_error = ""
        known = {i.job_id for i in props().history}
        assert bpy.ops.make_your_3d.generate() == {"FINISHED"}, props().last_error
        assert rt().wait_until(lambda: any(i.job_id not in known for i in props().history), 60), props().last_error
        item = next(i for i in props().history if i.job_id not in known)
        job_id = item.job_id
        ok = rt().wait_until(lambda: (lambda it: it.status in ("failed", "cancelled") or (it.status == "done" and it.imported))(
            mod("history").find_item(bpy.context.scene, job_id)), 300)
        item = mod("history").find_item(bpy.context.scene, job_id)
        assert ok and item.status == "done", (item.status, item.error_message, props().last_error)
        assert item.backend == args["url"], item.backend
        folder = Path(item.folder)
        assert folder.is_relative_to(work / "addon_data"), f"the result must be downloaded into the add-on's folder, not {folder}"
        assert not folder.is_relative_to(Path(args["backend_data"]))
        assert (folder / "subject.glb").read_bytes()[:4] == b"glTF" and (folder / "preview.png").is_file()
        assert not list(folder.glob("*.part*")), "no partial download is left"
        obj = bpy.data.objects[item.object_name]
        assert obj.type == "MESH" and len(obj.data.polygons) > 0 and obj["job_id"] == job_id
        assert args["url"] in props().last_info, props().last_info  # the artist is told where it ran
        # no local backend was started for any of this
        assert rt().backend.state().status == "stopped" and not rt().log_file.exists()
        return f"{item.object_name}: {len(obj.data.polygons)} faces; {props().last_info}"

    checks.run("remote_job_finishes_downloads_and_imports", remote_job_finishes_downloads_and_imports)
    bpy.ops.preferences.addon_disable(module=MODULE)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--driver":
    driver(json.loads(sys.argv[2]))
