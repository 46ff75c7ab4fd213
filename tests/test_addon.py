"""The Blender add-on on the real `bpy` module, with a real backend process on the tiny model set.

bpy can be imported once per process and is heavy, so every Blender-side check runs in ONE
subprocess (this file run as a script with `--driver`), which installs the built extension zip into
a temporary user folder and writes one pass/fail record per check; each pytest test below asserts
one of those records. Zip building and manifest validation run in the pytest process (no bpy).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
import traceback
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ADDON_ID = "make_your_3d"
MODULE = f"bl_ext.user_default.{ADDON_ID}"

BASIC_CHECKS = (
    "installs_and_enables",
    "importer_import_again_beside_never_on_top",
    "wrong_backend_python_names_missing_packages",
    "recall_restores_every_field",
    "job_progress_one_bar_monotonic",
    "properties_and_operators_exist",
    "ui_layout_calls_match_blender_api",
    "poll_no_backend_python",
    "poll_missing_image",
    "poll_empty_prompt",
    "image_bytes_from_generated_image",
    "importer_textured_box_into_collection",
    "importer_link_mode_writes_texture",
    "importer_rejects_non_glb",
    "quad_remesh_bakes_colour_onto_quads",
    "import_respects_unit_scale_and_shares_results",
    "poll_missing_weights",
    "install_and_fetch_tasks_report_progress_and_failure",
    "history_persists_save_reload",
    "unregister_leaves_nothing",
)
E2E_CHECKS = (
    "e2e_generate_textured_mesh",
    "e2e_client_error_codes",
    "e2e_three_variants_side_by_side",
    "e2e_cancel_leaves_no_object",
    "e2e_history_survives_backend_restart",
    "e2e_restart_notice_and_cache",
    "e2e_test_device_button",
    "e2e_dead_backend_reason",
)


# ------------------------------------------------------------------------------------------------
# pytest side
# ------------------------------------------------------------------------------------------------
def _bpy_expected() -> bool:
    """bpy==5.0.1 (a test dependency) exists for Python 3.11 only; there it must import, never skip."""
    return sys.version_info[:2] == (3, 11)


if __name__ != "__main__":
    import pytest

    sys.path.insert(0, str(REPO))
    import build_addon  # noqa: E402
    from bench_scripts import load_script  # noqa: E402

    needs_bpy = pytest.mark.skipif(not _bpy_expected(), reason="bpy 5.0.1 exists only for Python 3.11")

    @pytest.fixture(scope="module")
    def built_zip(tmp_path_factory) -> Path:
        return build_addon.build(tmp_path_factory.mktemp("dist")).zip_path

    def test_zip_layout_and_validation(built_zip: Path, tmp_path: Path) -> None:
        with zipfile.ZipFile(built_zip) as zf:
            names = zf.namelist()
        assert "blender_manifest.toml" in names and "__init__.py" in names
        assert "backend_src/pyproject.toml" in names
        assert "backend_src/backend/make_your_3d/service/server.py" in names
        assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc") or "/tests/" in n or n.startswith("tests/")]
        assert build_addon.validate_zip(built_zip) == []
        # the validator must catch stray files and a broken manifest
        bad = tmp_path / "bad.zip"
        with zipfile.ZipFile(built_zip) as src, zipfile.ZipFile(bad, "w") as dst:
            for n in src.namelist():
                data = src.read(n)
                if n == "blender_manifest.toml":
                    data = data.replace(b'type = "add-on"', b'type = "theme"')
                dst.writestr(n, data)
            dst.writestr("backend_src/backend/make_your_3d/__pycache__/x.cpython-311.pyc", b"")
            dst.writestr("notes.txt", b"stray")
        problems = build_addon.validate_zip(bad)
        assert any("__pycache__" in p for p in problems), problems
        assert any("notes.txt" in p for p in problems), problems
        assert any("type must be 'add-on'" in p for p in problems), problems

    def test_manifest_fields() -> None:
        manifest = build_addon.load_manifest()
        assert build_addon.validate_manifest(manifest, build_addon.backend_version()) == []
        assert manifest["id"] == ADDON_ID and manifest["name"] == "Make-Your-3D"
        assert manifest["license"] == ["SPDX:GPL-3.0-or-later"]
        assert set(manifest["permissions"]) == {"network", "files"}
        broken = dict(manifest, tagline="Ends with a full stop.", permissions={"network": "x"})
        problems = build_addon.validate_manifest(broken)
        assert any("tagline" in p for p in problems) and any("'files'" in p for p in problems), problems

    @needs_bpy
    def test_blender_own_validator_accepts_zip(built_zip: Path) -> None:
        spec = importlib.util.find_spec("bpy")
        tool = next(Path(spec.origin).parent.glob("*/scripts/addons_core/bl_pkg/cli/blender_ext.py"), None)
        assert tool is not None, "this bpy build has no blender_ext.py"
        out = subprocess.run([sys.executable, str(tool), "validate", str(built_zip)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "error" not in (out.stdout + out.stderr).lower(), out.stdout + out.stderr

    def _textured_glb(path: Path, with_parent: bool) -> Path:
        import numpy as np
        import PIL.Image
        import trimesh

        box = trimesh.creation.box(extents=(1.0, 0.6, 0.4))
        rng = np.random.default_rng(0)
        uv = rng.random((len(box.vertices), 2))
        tex = PIL.Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8))
        box.visual = trimesh.visual.TextureVisuals(uv=uv, image=tex)
        if not with_parent:
            box.export(path)
            return path
        scene = trimesh.Scene()
        scene.graph.update(frame_from="world", frame_to="group", matrix=trimesh.transformations.translation_matrix((2.0, 0.0, 0.0)))
        scene.add_geometry(box, node_name="box", geom_name="box", parent_node_name="group")
        scene.export(path)
        return path

    @pytest.fixture(scope="module")
    def driver_results(built_zip: Path, tmp_path_factory, request) -> dict:
        """Run every Blender-side check in one bpy subprocess; returns {check: {ok, detail}}."""
        assert importlib.util.find_spec("bpy") is not None, "bpy (a test dependency) is not installed: pip install -e '.[test]'"
        work = tmp_path_factory.mktemp("addon")
        tiny = str(request.getfixturevalue("tiny_models"))
        # No `serve --config`: pointed at a tiny set, the backend picks the tiny sizes by itself
        # (presets.resolve_preset), as it must for an artist trying the add-on on `demo`'s set.
        args = {
            "zip": str(built_zip),
            "work": str(work),
            "box_glb": str(_textured_glb(work / "box.glb", with_parent=True)),
            "sphere_glb": str(load_script("quad_bench").sphere_glb(work / "sphere.glb", subdivisions=4)),
            "tiny_models": tiny,
            "config": "",
            "e2e": True,
            "results": str(work / "results.json"),
        }
        env = dict(os.environ, BLENDER_USER_RESOURCES=str(work / "blender_user"), HF_HUB_OFFLINE="1",
                   MAKE_YOUR_3D_CACHE=str(work / "stage_cache"),
                   TRANSFORMERS_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")
        env.pop("BLENDER_USER_SCRIPTS", None)
        t0 = time.monotonic()
        log = work / "driver.log"
        with open(log, "w") as fh:
            try:
                code = subprocess.run([sys.executable, __file__, "--driver", json.dumps(args)], stdout=fh,
                                      stderr=subprocess.STDOUT, timeout=600, env=env, cwd=str(work)).returncode
            except subprocess.TimeoutExpired:
                code = "timeout (600 s)"
        results = json.loads(Path(args["results"]).read_text()) if Path(args["results"]).is_file() else {}
        results["_meta"] = {"returncode": code, "seconds": time.monotonic() - t0, "tail": log.read_text()[-6000:]}
        print(f"add-on driver: {results['_meta']['seconds']:.0f} s, exit {code}; per check: "
              + ", ".join(f"{k} {v['seconds']}s" for k, v in results.items() if k != "_meta"))
        return results

    def _assert_check(results: dict, name: str) -> None:
        rec = results.get(name)
        meta = results.get("_meta", {})
        assert rec is not None, f"check {name} did not run (driver exit {meta.get('returncode')}):\n{meta.get('tail', '')}"
        assert rec["ok"], f"{name}: {rec['detail']}"

    @needs_bpy
    @pytest.mark.parametrize("check", BASIC_CHECKS)
    def test_addon_in_blender(driver_results: dict, check: str) -> None:
        _assert_check(driver_results, check)

    @needs_bpy
    @pytest.mark.parametrize("check", E2E_CHECKS)
    def test_addon_end_to_end(driver_results: dict, check: str) -> None:
        _assert_check(driver_results, check)


# ------------------------------------------------------------------------------------------------
# Blender side (runs in the subprocess)
# ------------------------------------------------------------------------------------------------
class Checks:
    """Records one result per named check; a failing check does not stop the others."""

    def __init__(self, path: Path):
        self.path = path
        self.results: dict[str, dict] = {}

    def run(self, name: str, fn) -> bool:
        t0 = time.monotonic()
        try:
            detail = fn() or ""
            ok = True
        except Exception as exc:  # recorded for the pytest side to report
            ok, detail = False, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-2500:]}"
        self.results[name] = {"ok": ok, "detail": str(detail), "seconds": round(time.monotonic() - t0, 2)}
        self.path.write_text(json.dumps(self.results, indent=1))
        print(f"[{'ok' if ok else 'FAIL'}] {name} ({time.monotonic() - t0:.1f}s) {'' if ok else detail[:300]}", flush=True)
        return ok


def _overlap(a, b) -> bool:
    """Do two world bounding boxes (lo, hi) overlap (touching does not count)?"""
    return all(a[0][i] < b[1][i] - 1e-6 and b[0][i] < a[1][i] - 1e-6 for i in range(3))


def _poll_message(op) -> str | None:
    """The reason Blender gives when an operator's poll() fails (None when it would run)."""
    if op.poll():
        return None
    try:
        op()
    except RuntimeError as exc:
        return str(exc)
    raise AssertionError("poll() was False but the operator ran")


def driver(args: dict) -> None:  # noqa: C901 (one linear scenario)
    import bpy

    work = Path(args["work"])
    checks = Checks(Path(args["results"]))
    state: dict = {}

    def mod(name: str):
        return sys.modules[f"{MODULE}.{name}"]

    def prefs():
        return bpy.context.preferences.addons[MODULE].preferences

    def rt():
        return mod("runtime").get()

    def props():
        return bpy.context.scene.make_your_3d

    # -- install ------------------------------------------------------------------------------
    def installs_and_enables():
        result = bpy.ops.extensions.package_install_files(filepath=args["zip"], repo="user_default", enable_on_install=True)
        assert "FINISHED" in result, result
        assert MODULE in bpy.context.preferences.addons, [a.module for a in bpy.context.preferences.addons]
        installed = Path(bpy.utils.user_resource("EXTENSIONS")) / "user_default" / ADDON_ID
        assert (installed / "backend_src" / "backend" / "make_your_3d" / "__main__.py").is_file()
        assert mod("backend").bundled_backend_root() == installed / "backend_src"
        assert rt() is not None
        return f"installed at {installed}"

    if not checks.run("installs_and_enables", installs_and_enables):
        return

    def properties_and_operators_exist():
        scene_props = {p.identifier for p in bpy.types.Scene.bl_rna.properties["make_your_3d"].fixed_type.properties}
        need = {"image", "prompt", "negative_prompt", "subject", "seed_mode", "seed", "variants", "preset", "faces",
                "texture_size", "history", "history_index", "last_error"}
        assert need <= scene_props, need - scene_props
        pref_props = {p.identifier for p in prefs().bl_rna.properties}
        need = {"python_path", "models_dir", "data_dir", "device", "precision", "port", "texture_mode"}
        assert need <= pref_props, need - pref_props
        ops = ("generate", "cancel_job", "rerun_job", "import_job", "open_job_folder", "remove_job", "refresh_history",
               "reuse_last_seed", "open_image", "backend_start", "backend_stop", "backend_open_log", "install_backend",
               "models_refresh", "models_fetch")
        for op in ops:
            getattr(bpy.ops.make_your_3d, op).get_rna_type()  # KeyError when missing
        panel = bpy.types.Panel.bl_rna_get_subclass_py("VIEW3D_PT_make_your_3d")
        assert panel is not None and panel.bl_category == "Make-Your-3D" and panel.bl_region_type == "UI"
        assert bpy.types.UIList.bl_rna_get_subclass_py("MAKE_YOUR_3D_UL_history") is not None
        assert bpy.app.timers.is_registered(mod("jobs").tick)
        # preset and texture size choices match the service's values
        presets = {i.identifier for i in props().bl_rna.properties["preset"].enum_items}
        assert presets == {"fast", "default", "quality", "lowvram"}, presets
        # install needs online access; Blender in background mode has it off
        msg = _poll_message(bpy.ops.make_your_3d.install_backend)
        assert bpy.app.online_access or (msg and "Online access is off" in msg), msg

    checks.run("properties_and_operators_exist", properties_and_operators_exist)

    def ui_layout_calls_match_blender_api():
        """Panels cannot be drawn without a window, so check every layout call against Blender's API:
        method and keyword names, operator idnames, and the property names given to prop()."""
        import ast

        api = bpy.types.UILayout.bl_rna.functions
        owners = {"props": props().bl_rna, "self": prefs().bl_rna, "item": None}
        installed = Path(bpy.utils.user_resource("EXTENSIONS")) / "user_default" / ADDON_ID
        n = 0
        for fname in ("panel.py", "preferences.py"):
            tree = ast.parse((installed / fname).read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "_text_prop":
                    assert node.args[2].value in props().bl_rna.properties, f"{fname}:{node.lineno} {node.args[2].value}"
                    n += 1
                if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                    continue
                name = node.func.attr
                if name not in api:
                    continue
                params = set(api[name].parameters.keys())
                bad = [kw.arg for kw in node.keywords if kw.arg not in params]
                assert not bad, f"{fname}:{node.lineno} {name}() has no keyword(s) {bad}"
                consts = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
                if name == "operator" and consts:
                    mod_name, op_name = consts[0].split(".")
                    getattr(getattr(bpy.ops, mod_name), op_name).get_rna_type()
                if name in ("prop", "template_ID", "template_list") and node.args and isinstance(node.args[0], ast.Name):
                    owner = owners.get(node.args[0].id)
                    if owner is not None and consts:
                        assert consts[0] in owner.properties, f"{fname}:{node.lineno} no property {consts[0]!r}"
                n += 1
        assert n > 40, n
        return f"{n} layout calls checked"

    checks.run("ui_layout_calls_match_blender_api", ui_layout_calls_match_blender_api)

    gen = mod("operators").generate_blocker

    def poll_no_backend_python():
        prefs().python_path = ""
        msg = _poll_message(bpy.ops.make_your_3d.generate)
        assert msg and "No backend Python is set" in msg, msg
        prefs().python_path = str(work / "no" / "such" / "python")
        msg = _poll_message(bpy.ops.make_your_3d.generate)
        assert msg and "does not exist" in msg and "no/such/python" in msg, msg
        assert gen(bpy.context) in msg  # the panel shows the same sentence under the button
        assert _poll_message(bpy.ops.make_your_3d.backend_start) and "does not exist" in _poll_message(bpy.ops.make_your_3d.backend_start)
        return msg

    checks.run("poll_no_backend_python", poll_no_backend_python)

    def wrong_backend_python_names_missing_packages():
        bare = work / "bare_venv"
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True, timeout=120)
        prefs().python_path = str(mod("backend").venv_python(bare))
        msg = _poll_message(bpy.ops.make_your_3d.generate)
        assert msg and "lacks packages" in msg and "torch" in msg and "Install Backend" in msg, msg
        start_msg = _poll_message(bpy.ops.make_your_3d.backend_start)
        assert start_msg and "lacks packages" in start_msg, start_msg
        try:
            rt().start_backend(prefs())
            raise AssertionError("a backend without packages was started")
        except mod("backend").BackendError as exc:
            assert "lacks packages" in str(exc), exc
        # a crashed backend's log naming a missing module says the same in words
        text = "Traceback (most recent call last):\nModuleNotFoundError: No module named 'fastapi'\n"
        assert mod("backend").missing_module_in_log(text) == "fastapi"
        return msg

    checks.run("wrong_backend_python_names_missing_packages", wrong_backend_python_names_missing_packages)
    prefs().python_path = sys.executable
    prefs().data_dir = str(work / "data")
    prefs().config_file = args["config"]

    def poll_missing_image():
        props().image = None
        props().prompt = "wearing a red scarf"
        msg = _poll_message(bpy.ops.make_your_3d.generate)
        assert msg and "No reference image" in msg, msg
        return msg

    checks.run("poll_missing_image", poll_missing_image)

    # the reference: a generated (never saved) image with a coloured disc on a transparent ground
    img = bpy.data.images.new("reference", 64, 64, alpha=True)
    px = []
    for y in range(64):
        for x in range(64):
            inside = (x - 32) ** 2 + (y - 30) ** 2 < 20**2
            px += [0.8, 0.3 + 0.005 * y, 0.2 + 0.004 * x, 1.0] if inside else [0.0, 0.0, 0.0, 0.0]
    img.pixels[:] = px

    def poll_empty_prompt():
        props().image = img
        props().prompt = "   "
        msg = _poll_message(bpy.ops.make_your_3d.generate)
        assert msg and "No prompt" in msg, msg
        props().prompt = "wearing a red scarf"
        assert bpy.ops.make_your_3d.generate.poll(), gen(bpy.context)
        return msg

    checks.run("poll_empty_prompt", poll_empty_prompt)

    def image_bytes_from_generated_image():
        data = mod("operators").image_bytes(img)
        assert data.startswith(b"\x89PNG\r\n\x1a\n"), data[:8]
        assert img.source == "GENERATED" and not img.filepath, (img.source, img.filepath)  # the datablock is untouched
        probe = bpy.data.images.new("probe", 4, 4)
        tmp = work / "probe.png"
        tmp.write_bytes(data)
        probe.filepath = str(tmp)
        probe.source = "FILE"
        assert tuple(probe.size) == (64, 64)
        a = list(probe.pixels[:])
        centre = (30 * 64 + 32) * 4
        assert a[centre + 3] > 0.99 and a[3] < 0.01 and abs(a[centre] - 0.8) < 0.02, (a[centre:centre + 4], a[:4])
        bpy.data.images.remove(probe)

    checks.run("image_bytes_from_generated_image", image_bytes_from_generated_image)

    # -- importer on a GLB made with trimesh (a textured box under a parent node) ----------------------
    def importer_textured_box_into_collection():
        imp = mod("importer")
        bpy.context.scene.cursor.location = (1.0, 2.0, 3.0)
        before = set(bpy.data.objects)
        a = imp.import_glb(bpy.context, Path(args["box_glb"]), job_id="job-a", seed=11, prompt="a red box!", variant_index=0,
                           texture_mode="PACK", folder=work / "job-a")
        b = imp.import_glb(bpy.context, Path(args["box_glb"]), job_id="job-b", seed=12, prompt="a red box!", variant_index=1,
                           texture_mode="PACK", folder=work / "job-b")
        new = [o for o in bpy.data.objects if o not in before]
        assert sorted(o.name for o in new) == sorted([a.name, b.name]), [o.name for o in new]  # no empties left
        assert all(o.type == "MESH" for o in new)
        coll = bpy.data.collections["Make-Your-3D"]
        assert set(coll.objects) == {a, b} and [c.name for c in a.users_collection] == ["Make-Your-3D"]
        assert a.name == "a red box s11" and b.name == "a red box s12", (a.name, b.name)
        assert (a["job_id"], a["seed"], a["prompt"]) == ("job-a", 11, "a red box!")
        assert tuple(round(v, 4) for v in a.location) == (1.0, 2.0, 3.0), tuple(a.location)
        # stands on the cursor: origin at the bottom centre, scaled to the default height
        lo, hi = imp.world_bounds(a)
        assert abs(lo.z - 3.0) < 1e-4, lo.z
        assert abs((lo.x + hi.x) / 2 - 1.0) < 1e-4 and abs((lo.y + hi.y) / 2 - 2.0) < 1e-4, (lo, hi)
        assert abs(a.dimensions.z - imp.DEFAULT_HEIGHT) < 1e-4 and tuple(a.scale) == (1.0, 1.0, 1.0), (a.dimensions, a.scale)
        assert b.location.y == a.location.y and b.location.x > a.location.x
        assert not _overlap(imp.world_bounds(a), imp.world_bounds(b)), "variant b sits on top of a"
        # mesh, material and texture are named after the job
        assert a.data.name == a.name and a.material_slots[0].material.name == a.name, (a.data.name, a.material_slots[0].material.name)
        assert imp._images_of(a)[0].name == f"{a.name} texture", imp._images_of(a)[0].name
        imgs = imp.keep_textures(a, "PACK", None)
        assert imgs and all(i.packed_file is not None and tuple(i.size) == (16, 16) for i in imgs), [(i.name, i.size[:]) for i in imgs]
        assert len(a.data.polygons) == 12 or len(a.data.polygons) == 6, len(a.data.polygons)
        state["box_objects"] = [a.name, b.name]

    checks.run("importer_textured_box_into_collection", importer_textured_box_into_collection)

    def importer_link_mode_writes_texture():
        imp = mod("importer")
        folder = work / "job-c"
        c = imp.import_glb(bpy.context, Path(args["box_glb"]), job_id="job-c", seed=13, prompt="linked", variant_index=2,
                           texture_mode="LINK", folder=folder)
        imgs = imp.keep_textures(c, "LINK", folder)
        assert imgs, "no texture"
        for image in imgs:
            assert image.packed_file is None, image.name
            path = Path(bpy.path.abspath(image.filepath))
            assert path.is_file() and path.parent == folder / "textures", path
            assert tuple(image.size) == (16, 16) and image.has_data
        state["box_objects"].append(c.name)

    checks.run("importer_link_mode_writes_texture", importer_link_mode_writes_texture)

    def importer_import_again_beside_never_on_top():
        """Import again (same job, same cursor) lands beside what is there; height 0 keeps the size."""
        imp = mod("importer")
        bpy.context.scene.cursor.location = (1.0, 2.0, 3.0)
        again = imp.import_glb(bpy.context, Path(args["box_glb"]), job_id="job-a", seed=11, prompt="a red box!",
                               texture_mode="PACK", folder=work / "job-a", height=0.0)
        bpy.context.view_layer.update()
        others = [bpy.data.objects[n] for n in state["box_objects"]]
        for other in others:
            assert not _overlap(imp.world_bounds(again), imp.world_bounds(other)), (again.name, other.name)
        assert abs(imp.world_bounds(again)[0].z - 3.0) < 1e-4
        assert abs(again.dimensions.z - 0.6) < 1e-4, again.dimensions  # the box's own height (glTF +Y 0.6)
        # the wrong variant: placed at the cursor itself it would have overlapped the first import
        from mathutils import Vector

        cur, d = bpy.context.scene.cursor.location, again.dimensions
        at_cursor = (cur - Vector((d.x / 2, d.y / 2, 0.0)), cur + Vector((d.x / 2, d.y / 2, d.z)))
        assert _overlap(imp.world_bounds(others[0]), at_cursor)
        state["box_objects"].append(again.name)
        return f"x of imports: {[round(bpy.data.objects[n].location.x, 3) for n in state['box_objects']]}"

    checks.run("importer_import_again_beside_never_on_top", importer_import_again_beside_never_on_top)

    def quad_remesh_bakes_colour_onto_quads():
        """Issue 26.3: QuadriFlow makes a quad copy, Cycles bakes colour and shading onto it; the
        original stays hidden. The baked colour is checked against what the gradient says each
        quad's direction must show."""
        import math

        import numpy as np

        imp, quad = mod("importer"), mod("quad")
        src = imp.import_glb(bpy.context, Path(args["sphere_glb"]), job_id="job-q", seed=3, prompt="gradient", height=1.0)
        n_objects = len(bpy.data.collections["Make-Your-3D"].objects)
        t0 = time.monotonic()
        q = quad.quad_remesh(bpy.context, src, target_faces=2000, texture_size=256)
        seconds = time.monotonic() - t0
        polys = q.data.polygons
        share = sum(len(p.vertices) == 4 for p in polys) / len(polys)
        assert share >= 0.95 and 1000 <= len(polys) <= 4000, (share, len(polys))
        assert src.hide_get() and src.hide_render and src.name in bpy.data.collections["Make-Your-3D"].objects
        assert len(bpy.data.collections["Make-Your-3D"].objects) == n_objects + 1 and q["job_id"] == "job-q"
        images = {n.image.name: n.image for n in q.data.materials[0].node_tree.nodes if n.type == "TEX_IMAGE"}
        color = next(i for name, i in images.items() if "base colour" in name)
        normal = next(i for name, i in images.items() if name.endswith("normal"))
        assert color.packed_file is not None and normal.packed_file is not None
        px = np.array(color.pixels[:]).reshape(color.size[1], color.size[0], 4)
        nm = np.array(normal.pixels[:]).reshape(normal.size[1], normal.size[0], 4)
        assert px[..., :3].std() > 0.1 and 0.4 < nm[..., 2][nm[..., 3] > 0].mean() <= 1.0  # a tangent-space map is mostly +Z (blue)
        uvs = q.data.uv_layers.active.data
        lo, hi = imp._local_bounds(q.data)
        centre = (lo + hi) / 2  # the sphere's centre in the mesh (the importer put the origin at its bottom)
        errors, swapped = [], []
        for p in polys:
            d = (p.center - centre).normalized()
            x, y, z = d.x, d.z, -d.y  # Blender's Z-up -> the glTF/trimesh Y-up the texture was made in
            u = (math.atan2(y, x) / (2 * math.pi)) % 1.0
            w = math.acos(max(-1.0, min(1.0, z))) / math.pi
            if min(u, 1 - u) < 0.05 or not 0.1 < w < 0.9:  # the texture's seam and poles
                continue
            uv = np.mean([uvs[i].uv[:] for i in p.loop_indices], axis=0)
            got = px[min(int(uv[1] * color.size[1]), color.size[1] - 1), min(int(uv[0] * color.size[0]), color.size[0] - 1), :2]
            errors.append(float(np.abs(got - (u, 1 - w)).mean()))
            swapped.append(float(np.abs(got - (1 - w, u)).mean()))  # wrong variant: the check must see a wrong colour
        assert len(errors) > 500 and np.mean(errors) < 0.03 and np.percentile(errors, 90) < 0.06, (len(errors), np.mean(errors))
        assert np.mean(swapped) > 0.15, np.mean(swapped)
        return f"{share:.0%} quads of {len(polys)}, colour error mean {np.mean(errors):.4f} (n={len(errors)}), {seconds:.1f} s"

    checks.run("quad_remesh_bakes_colour_onto_quads", quad_remesh_bakes_colour_onto_quads)

    def import_respects_unit_scale_and_shares_results():
        """Issue 27.4: the Height is a physical size in any unit scale (a centimetre scene got a 3 mm
        subject), and two jobs with the same result (an unchanged Re-run) share one object."""
        import shutil

        h, jobs = mod("history"), mod("jobs")
        scene = bpy.context.scene
        folder = work / "same_result"
        folder.mkdir(exist_ok=True)
        shutil.copy(args["box_glb"], folder / "subject.glb")
        (folder / "job.json").write_text(json.dumps({"stages": [{"name": "reconstruct", "key": "k-same", "cached": True, "seconds": 0.0}]}))
        first = h.add_item(scene, "units-1", "g", 0, {"prompt": "units", "seed": 1, "preset": "fast"})
        second = h.add_item(scene, "units-2", "g", 0, {"prompt": "units", "seed": 1, "preset": "fast"})
        first.folder = second.folder = str(folder)
        scene.unit_settings.scale_length = 0.01  # centimetres
        try:
            props().height_m = 0.3
            assert abs(props().height - 30.0) < 1e-4  # shown in scene units: 30 cm
            obj = jobs.import_item(bpy.context, rt(), scene, first)
            bpy.context.view_layer.update()
            metres = obj.dimensions.z * scene.unit_settings.scale_length
            assert abs(metres - 0.3) < 1e-3, metres
            images = len(bpy.data.images)
            again = jobs.import_item(bpy.context, rt(), scene, second)  # another job, the same mesh
            assert again == obj and second.object_name == obj.name and len(bpy.data.images) == images
        finally:
            scene.unit_settings.scale_length = 1.0
        props().height = 0.3  # set through the scene units (1.0 now): metres again
        assert abs(props().height_m - 0.3) < 1e-6  # float32 storage
        for job_id in ("units-1", "units-2"):  # by id: removing one item invalidates references to the others
            props().history.remove([i.job_id for i in props().history].index(job_id))
        bpy.data.objects.remove(obj)
        return f"{metres:.3f} m tall in a centimetre scene; the second job selected the first's object"

    checks.run("import_respects_unit_scale_and_shares_results", import_respects_unit_scale_and_shares_results)

    def importer_rejects_non_glb():
        imp = mod("importer")
        bad = work / "not_a.glb"
        bad.write_bytes(b"PK\x03\x04 this is a zip, not a glb")
        count = len(bpy.data.objects)
        try:
            imp.import_glb(bpy.context, bad, job_id="x", seed=0, prompt="x")
        except imp.ImportProblem as exc:
            assert "not a GLB" in str(exc), exc
        else:
            raise AssertionError("a non-GLB file was imported")
        truncated = work / "truncated.glb"
        truncated.write_bytes(Path(args["box_glb"]).read_bytes()[:200])
        try:
            imp.check_glb(truncated)
        except imp.ImportProblem as exc:
            assert "truncated" in str(exc), exc
        else:
            raise AssertionError("a truncated GLB passed the check")
        assert len(bpy.data.objects) == count

    checks.run("importer_rejects_non_glb", importer_rejects_non_glb)
    for name in state.get("box_objects", []):
        if name in bpy.data.objects:
            bpy.data.objects.remove(bpy.data.objects[name])
    bpy.context.scene.cursor.location = (0.0, 0.0, 0.0)

    # -- a real backend ------------------------------------------------------------------------------
    def start_backend(models_dir: str, timeout: float = 90.0):
        prefs().models_dir = models_dir
        assert bpy.ops.make_your_3d.backend_start() == {"FINISHED"}
        ok = rt().wait_until(lambda: rt().backend_state().status == "running" and rt().models is not None, timeout)
        assert ok, f"backend did not come up: {rt().backend_state().message}\n{mod('backend').log_tail(rt().log_file, 20)}"

    def stop_backend():
        if rt().backend_state().status in ("running", "starting"):
            bpy.ops.make_your_3d.backend_stop()
        assert rt().backend_state().status == "stopped"

    def poll_missing_weights():
        empty_models = work / "empty_models"
        empty_models.mkdir(exist_ok=True)
        try:
            start_backend(str(empty_models))
            models = rt().models
            assert models["complete"] is False, models
            msg = _poll_message(bpy.ops.make_your_3d.generate)
            assert msg and "Model weights missing" in msg and "Fetch" in msg, msg
            missing_titles = [r["name"] for r in models["roles"] if not r["complete"]]
            assert missing_titles and all(t in msg for t in missing_titles), (msg, missing_titles)
            return msg
        finally:
            stop_backend()

    # The install button's task, for real, with pip cut off from any index (so it fails at the
    # dependency step instead of downloading gigabytes) and the fetch task offline: both must walk
    # their steps, keep a log, and end with a sentence, not hang or raise.
    def start_tasks():
        empty_links = work / "no_wheels"
        empty_links.mkdir(exist_ok=True)
        os.environ.update(PIP_NO_INDEX="1", PIP_FIND_LINKS=str(empty_links), HF_HUB_OFFLINE="1")
        msg = _poll_message(bpy.ops.make_your_3d.models_fetch)
        assert bpy.app.online_access or (msg and "Online access is off" in msg), msg
        state["install"] = rt().install_backend(sys.executable)
        prefs().models_dir = str(work / "empty_models")
        state["fetch"] = rt().fetch_models(prefs())

    checks.run("poll_missing_weights", poll_missing_weights)
    start_tasks()

    if args["e2e"]:
        run_e2e(bpy, args, checks, state, mod, prefs, rt, props, start_backend, stop_backend, img)

    def install_and_fetch_tasks_report_progress_and_failure():
        inst, fetch = state["install"], state["fetch"]
        inst.join(240)
        fetch.join(60)
        st = inst.state()
        cb = mod("runtime").load_cuda_builds()
        rtx50 = cb.parse_nvidia_smi("NVIDIA GeForce RTX 5080, 12.0, 580.95.05")
        steps = mod("runtime").install_steps("py0", "py", "src", "venv", {}, rtx50, cb.choose(rtx50))
        torch_step = [st for st in steps if st.title.startswith("Install PyTorch") and "RTX 5080" in st.title]
        assert torch_step and torch_step[0].command[-3:] == [f"torch=={cb.TORCH_VERSION}", "--index-url", "https://download.pytorch.org/whl/cu130"], steps
        assert steps.index(torch_step[0]) < [st.title for st in steps].index("Install backend and dependencies")
        assert steps[-1].title == "Check the GPU" and "device='cuda'" in steps[-1].command[-1], steps[-1]
        assert not any("--index-url" in st.command for st in mod("runtime").install_steps("py0", "py", "src", "venv", {}))
        old_driver = cb.parse_nvidia_smi("NVIDIA GeForce RTX 5080, 12.0, 570.86.10")
        no_build = mod("runtime").install_steps("py0", "py", "src", "venv", {}, old_driver, cb.choose(old_driver))
        assert no_build[-1].title == "Check the PyTorch build" and not any("--index-url" in st.command for st in no_build)
        gpu = cb.query_gpu()
        nvidia = gpu is not None and cb.choose(gpu).build is not None
        # the expected duration (issue 28.2), from the same bundled estimate.py the CLI imports
        guess = rt().job_estimate("default", "cpu")
        assert guess is not None and guess.warn and "fast preset" in guess.text, guess
        assert rt().job_estimate("fast", "auto", "cuda:0").measured is False
        assert not st.running and st.step == (4 if nvidia else 3) and st.total == (5 if nvidia else 4), st
        assert st.error and "Install backend and dependencies failed" in st.error, st.error
        assert Path(rt().venv_dir / ("Scripts" if os.name == "nt" else "bin")).is_dir()
        assert st.factor == 1.0 or st.factor > 0.6, st.factor
        log = inst.log_file.read_text()
        assert "Create virtual environment" in log and "pip install" in log, log[-500:]
        fst = fetch.state()
        assert not fst.running and fst.error and "Download model weights failed" in fst.error, fst
        return f"install: {st.error[:160]} | fetch: {fst.error[:160]}"

    checks.run("install_and_fetch_tasks_report_progress_and_failure", install_and_fetch_tasks_report_progress_and_failure)

    # -- history persists through save + reload ----------------------------------------------------------
    def history_persists_save_reload():
        h = mod("history")
        item = h.add_item(bpy.context.scene, "saved-job-1", "grp", 0, {"prompt": "keep me", "seed": 42, "preset": "fast"})
        item.status = "done"
        item.folder = str(work / "somewhere")
        expected = [(i.job_id, i.status, i.prompt, i.seed, i.folder, i.imported) for i in props().history]
        path = work / "saved.blend"
        bpy.ops.wm.save_as_mainfile(filepath=str(path))
        bpy.ops.wm.read_homefile(use_empty=True)
        assert not props().history
        bpy.ops.wm.open_mainfile(filepath=str(path))
        got = [(i.job_id, i.status, i.prompt, i.seed, i.folder, i.imported) for i in props().history]
        assert got == expected, (got, expected)
        assert rt() is not None and bpy.app.timers.is_registered(mod("jobs").tick)  # still alive after loading
        return f"{len(got)} history item(s) restored"

    checks.run("history_persists_save_reload", history_persists_save_reload)

    def recall_restores_every_field():
        h = mod("history")
        img = bpy.data.images["reference"]  # the .blend was reloaded: look the datablock up again
        request = {"prompt": "made of gold", "negative_prompt": "blurry", "subject": "a toy robot", "seed": 1234,
                   "preset": "quality", "faces": 20000, "texture_size": 2048, "image_name": img.name,
                   "overrides": {"mv_steps": 35, "ip_scale": 0.5}}
        item = h.add_item(bpy.context.scene, "recall-job", "grp", 0, request)
        p = props()
        p.prompt, p.negative_prompt, p.subject, p.seed_mode, p.seed = "other", "", "", "RANDOM", 1
        p.preset, p.faces, p.texture_size, p.image = "fast", 0, "0", None
        p.mv_steps, p.sd_steps, p.ip_scale = 3, 7, 1.5
        p.history_index = list(p.history).index(item)
        assert bpy.ops.make_your_3d.recall_job() == {"FINISHED"}
        got = (p.prompt, p.negative_prompt, p.subject, p.seed_mode, p.seed, p.preset, p.faces, p.texture_size, p.image)
        assert got == ("made of gold", "blurry", "a toy robot", "FIXED", 1234, "quality", 20000, "2048", img), got
        assert (p.mv_steps, p.ip_scale, p.sd_steps) == (35, 0.5, 0), (p.mv_steps, p.ip_scale, p.sd_steps)
        assert mod("props").job_overrides(p) == {"mv_steps": 35, "ip_scale": 0.5}
        assert "Recalled" in p.last_info, p.last_info
        # the original datablock gone: the job's downloaded input.png stands in
        folder = work / "recall-job"
        folder.mkdir(exist_ok=True)
        probe = bpy.data.images.new("probe-input", 8, 8)
        probe.filepath_raw = str(folder / "input.png")
        probe.file_format = "PNG"
        probe.save()
        bpy.data.images.remove(probe)
        item.image_name, item.folder = "no-such-image", str(folder)
        p.image = None
        assert bpy.ops.make_your_3d.recall_job() == {"FINISHED"}
        assert p.image is not None and Path(bpy.path.abspath(p.image.filepath)) == folder / "input.png", p.image
        assert "prepared input image" in p.last_info
        p.history.remove(list(p.history).index(item))
        p.image = img
        p.prompt = "wearing a red scarf"
        for name in mod("props").OVERRIDE_FIELDS:
            setattr(p, name, 0)
        return p.last_info

    checks.run("recall_restores_every_field", recall_restores_every_field)

    def job_progress_one_bar_monotonic():
        """A job's records, stage by stage (with a cached stage and a sub-stage), make one bar that only
        moves forward, with human stage names and one ETA that shrinks."""
        h, progress = mod("history"), mod("progress")
        item = h.add_item(bpy.context.scene, "progress-job", "grp", 0, {"prompt": "p", "seed": 1, "preset": "default"})
        seconds = progress.Expectation(progress.estimated_seconds("default"), True)
        seq = [("subject", 1, 1, None), ("subject_views", 1, 1, None)]  # reused from cache
        seq += [("identity", s, 4, 3.0 * (4 - s)) for s in range(0, 5)]
        seq += [("edited_views", s, 2, None) for s in range(3)] + [("edited_normals", s, 2, None) for s in range(3)]
        seq += [(st, s, 3, None) for st in ("subject_prior", "front_view", "multiview", "reconstruct") for s in range(4)]
        fractions, labels, etas = [], [], []
        for stage, step, total, eta in seq:
            h.apply_record(item, {"status": "running", "stage": stage, "step": step, "total": total, "eta_s": eta}, seconds)
            fractions.append(item.job_progress)
            labels.append(item.stage_label)
            etas.append(item.job_eta_s)
        assert all(b >= a for a, b in zip(fractions, fractions[1:])), fractions
        assert 0.0 < fractions[0] < 0.1 and fractions[-1] > 0.99, (fractions[0], fractions[-1])
        assert len(set(fractions)) > 15, "the bar must move within stages, not only between them"
        assert "Learning the subject" in labels and "Editing views" in labels and "Building the mesh" in labels, set(labels)
        assert not any("_" in label for label in labels), set(labels)
        assert etas[-1] < etas[1] and all(e >= 0 for e in etas), etas
        # an out-of-order (older) record never moves the bar back
        h.apply_record(item, {"status": "running", "stage": "identity", "step": 1, "total": 4}, seconds)
        assert item.job_progress == fractions[-1]
        h.apply_record(item, {"status": "done", "stage": "reconstruct", "step": 3, "total": 3}, seconds)
        assert item.job_progress == 1.0 and item.stage_label == "Done"
        props().history.remove(list(props().history).index(item))
        # issue 27.2: no invented time left before this machine has measured the preset; between
        # records the bar, the elapsed time and the time left move on with the clock
        fill = h.add_item(bpy.context.scene, "fill-job", "grp", 0, {"prompt": "p", "seed": 1, "preset": "default"})
        guessed = progress.Expectation(progress.estimated_seconds("default"), False)
        h.apply_record(fill, {"status": "running", "stage": "multiview", "step": 1, "total": 4, "elapsed_s": 10.0}, guessed)
        assert fill.job_eta_s == -1.0 and fill.job_progress > 0.0
        bar, elapsed = fill.job_progress, h.elapsed_now(fill)
        h.refresh_progress(fill, progress.Expectation(progress.estimated_seconds("default"), True), since_s=3.0)  # 3 s, no record
        assert fill.job_progress > bar and fill.job_eta_s > 0 and h.elapsed_now(fill, 3.0) == elapsed + 3.0
        props().history.remove([i.job_id for i in props().history].index("fill-job"))
        return f"{len(seq)} records, {len(set(labels))} stage names"

    checks.run("job_progress_one_bar_monotonic", job_progress_one_bar_monotonic)

    # -- disable: nothing left behind ------------------------------------------------------------------
    def unregister_leaves_nothing():
        import threading

        tick = mod("jobs").tick
        runtime_mod = mod("runtime")
        backend_mod = mod("backend")
        pid = None
        start_backend(args["tiny_models"] or str(work / "empty_models"))
        pid = rt().backend_state().info.pid
        state_file = rt().state_file
        for cycle in range(2):
            bpy.ops.preferences.addon_disable(module=MODULE)
            assert MODULE not in bpy.context.preferences.addons
            assert not hasattr(bpy.types.Scene, "make_your_3d")
            for cls in ("VIEW3D_PT_make_your_3d", "VIEW3D_PT_make_your_3d_history"):
                assert bpy.types.Panel.bl_rna_get_subclass_py(cls) is None, cls
            try:
                bpy.ops.make_your_3d.generate.get_rna_type()
                raise AssertionError("operator still registered")
            except KeyError:
                pass
            assert not bpy.app.timers.is_registered(tick)
            assert not [f for f in bpy.app.handlers.load_post if getattr(f, "__module__", "").startswith(MODULE)]
            assert runtime_mod.get() is None
            deadline = time.monotonic() + 5
            while [t for t in threading.enumerate() if t.name.startswith("make_your_3d:")] and time.monotonic() < deadline:
                time.sleep(0.1)
            left = [t.name for t in threading.enumerate() if t.name.startswith("make_your_3d:")]
            assert not left, left
            if pid is not None:
                assert not backend_mod.pid_alive(pid), "backend process still running"
                assert not state_file.exists()
                pid = None
            if cycle == 0:
                bpy.ops.preferences.addon_enable(module=MODULE)
                assert hasattr(bpy.types.Scene, "make_your_3d") and runtime_mod.get() is not None
                tick = sys.modules[f"{MODULE}.jobs"].tick
                runtime_mod = sys.modules[f"{MODULE}.runtime"]

    checks.run("unregister_leaves_nothing", unregister_leaves_nothing)


def run_e2e(bpy, args, checks, state, mod, prefs, rt, props, start_backend, stop_backend, img) -> None:
    """Generate Subject against a real backend on the tiny models."""

    def coll_objects():
        coll = bpy.data.collections.get("Make-Your-3D")
        return list(coll.objects) if coll else []

    def items_of(ids):
        return [i for i in props().history if i.job_id in ids]

    def submit_and_wait(variants: int, seed: int, timeout: float):
        props().variants = variants
        props().seed_mode = "FIXED"
        props().seed = seed
        known = {i.job_id for i in props().history}
        assert bpy.ops.make_your_3d.generate() == {"FINISHED"}
        ok = rt().wait_until(lambda: len([i for i in props().history if i.job_id not in known]) == variants, 60)
        assert ok, f"jobs were not created: {props().last_error}"
        ids = [i.job_id for i in props().history if i.job_id not in known]
        seen = state.setdefault("progress_seen", set())
        bars = state.setdefault("bars", {})

        def finished() -> bool:
            seen.update((i.status, i.stage, i.step > 0, i.total > 0) for i in items_of(ids))
            for i in items_of(ids):
                bars.setdefault(i.job_id, []).append((i.status, i.job_progress, i.stage_label))
            return all(i.status in ("failed", "cancelled", "interrupted") or (i.status == "done" and i.imported)
                       for i in items_of(ids))

        ok = rt().wait_until(finished, timeout)
        summary = [(i.status, i.stage, i.error_message, i.imported) for i in items_of(ids)]
        assert ok, f"jobs did not finish: {summary}; last error {props().last_error!r}"
        assert all(i.status == "done" for i in items_of(ids)), summary
        return ids

    start_backend(args["tiny_models"])

    def e2e_generate_textured_mesh():
        props().image = img
        props().prompt = "wearing a red scarf"
        bpy.context.scene.cursor.location = (0.5, -1.0, 0.0)
        props().mv_steps = 3  # an Advanced setting: sent as the job's overrides, recorded in job.json
        t0 = time.monotonic()
        try:
            ids = submit_and_wait(1, 7, 240)
        finally:
            props().mv_steps = 0
        item = items_of(ids)[0]
        record = json.loads((Path(item.folder) / "job.json").read_text())
        assert record["inputs"]["overrides"] == {"mv_steps": 3} and record["preset"]["mv_steps"] == 3, record["inputs"]
        assert mod("history").overrides_of(item) == {"mv_steps": 3}
        seen = state["progress_seen"]
        running = {stage for status, stage, stepped, totalled in seen if status == "running" and stepped and totalled}
        assert len(running) >= 2, f"progress of a running job never reached the history item: {sorted(seen)}"
        obj = bpy.data.objects[item.object_name]
        assert obj in coll_objects() and obj.type == "MESH" and len(obj.data.polygons) > 0
        assert obj["job_id"] == item.job_id and obj["seed"] == 7 and obj["prompt"] == "wearing a red scarf"
        assert obj.name.startswith("wearing a red scarf s7"), obj.name
        # on the cursor's line, beside the default scene's cube that occupies the cursor (issue 28.3)
        assert tuple(round(v, 4) for v in obj.location)[1:] == (-1.0, 0.0), tuple(obj.location)
        cube = bpy.data.objects.get("Cube")
        assert cube is not None and obj.location.x > 0.5, "the default cube should push the result beside it"
        assert not _overlap(mod("importer").world_bounds(obj), mod("importer").world_bounds(cube)), tuple(obj.location)
        images = mod("importer")._images_of(obj)
        assert images and all(im.size[0] >= 16 and im.packed_file is not None for im in images), \
            [(im.name, im.size[:], im.packed_file) for im in images]
        texels = images[0].pixels[0:40000]
        assert len(set(round(v, 3) for v in texels)) > 8, "the texture is flat"  # a real baked texture
        assert obj.data.uv_layers, "the mesh has no UVs"
        assert (Path(item.folder) / "preview.png").is_file() and (Path(item.folder) / "subject.glb").is_file()
        assert item.total > 0 and item.elapsed_s >= 0, (item.total, item.elapsed_s)
        # one bar for the whole job: only forward, human stage names, full when done
        bar = state["bars"][item.job_id]
        fractions = [f for _, f, _ in bar]
        assert all(b >= a for a, b in zip(fractions, fractions[1:])) and fractions[-1] == 1.0, bar
        names = {label for status, _, label in bar if status == "running"}
        assert names and not any("_" in n for n in names), names
        # the artist is told: tiny models (results are noise), the job finished, where it ran
        assert rt().models["tiny"] is True
        assert item.device == "cpu" and item.tiny_models, (item.device, item.tiny_models)
        info = props().last_info
        assert info.startswith("Finished 'wearing a red scarf' seed 7 on cpu") and "noise" in info, info
        assert mod("panel").last_device(props()) == "cpu"
        # this machine's stage times now drive the next job's estimate
        assert rt().stage_times.learned(item.preset), "no stage times learned from job.json"
        state["first"] = (item.job_id, obj.name)
        return f"{len(obj.data.polygons)} faces, texture {images[0].size[:]}, {time.monotonic() - t0:.1f}s, stages seen {sorted(running)}"

    checks.run("e2e_generate_textured_mesh", e2e_generate_textured_mesh)

    def e2e_client_error_codes():
        client_mod = mod("client")
        info = rt().backend_state().info
        try:
            client_mod.Client(client_mod.Endpoint(info.url, "wrong-token")).models()
            raise AssertionError("a wrong token was accepted")
        except client_mod.ApiError as exc:
            assert exc.code == "unauthorized" and exc.status == 401 and exc.message, (exc.code, exc.message)
        try:
            rt().client().job("no-such-job")
            raise AssertionError("an unknown job was found")
        except client_mod.ApiError as exc:
            assert exc.code == "not_found" and exc.status == 404, (exc.code, exc.message)
        import socket

        with socket.socket() as s:  # a port nobody listens on
            s.bind(("127.0.0.1", 0))
            dead = f"http://127.0.0.1:{s.getsockname()[1]}"
        try:
            client_mod.Client(client_mod.Endpoint(dead, "t"), timeout=2).health()
            raise AssertionError("a closed port answered")
        except client_mod.ApiError as exc:
            assert exc.code == "unreachable" and "Cannot reach the backend" in exc.message, (exc.code, exc.message)
        # the timer callback drains the same queue and asks to be called again
        assert mod("jobs").tick() == mod("jobs").TICK_SECONDS

    checks.run("e2e_client_error_codes", e2e_client_error_codes)

    def e2e_three_variants_side_by_side():
        bpy.context.scene.cursor.location = (0.0, 3.0, 0.0)
        t0 = time.monotonic()
        ids = submit_and_wait(3, 100, 300)
        items = sorted(items_of(ids), key=lambda i: i.index_in_group)
        assert [i.seed for i in items] == [100, 101, 102], [i.seed for i in items]
        assert len({i.group for i in items}) == 1
        objs = [bpy.data.objects[i.object_name] for i in items]
        assert len(set(objs)) == 3 and all(o in coll_objects() for o in objs)
        xs = [o.location.x for o in objs]
        assert xs[0] == 0.0 and xs[0] < xs[1] < xs[2], xs
        assert all(abs(o.location.y - 3.0) < 1e-5 for o in objs)
        # the finish message names the whole set, not only the last variant (issue 27)
        info = props().last_info
        assert info.startswith("Finished 3 of 3 variants") and all(o.name in info for o in objs), info
        bpy.context.view_layer.update()
        for left, right in zip(objs, objs[1:]):  # bounding boxes do not overlap along X
            lmax = max((left.matrix_world @ __import__("mathutils").Vector(c)).x for c in left.bound_box)
            rmin = min((right.matrix_world @ __import__("mathutils").Vector(c)).x for c in right.bound_box)
            assert lmax < rmin, (left.name, lmax, right.name, rmin)
        return f"x = {[round(x, 3) for x in xs]}, {time.monotonic() - t0:.1f}s"

    checks.run("e2e_three_variants_side_by_side", e2e_three_variants_side_by_side)

    def e2e_cancel_leaves_no_object():
        props().variants = 2
        props().seed = 500
        known = {i.job_id for i in props().history}
        objects_before = set(coll_objects())
        assert bpy.ops.make_your_3d.generate() == {"FINISHED"}
        ok = rt().wait_until(lambda: len([i for i in props().history if i.job_id not in known]) == 2, 60)
        assert ok, props().last_error
        ids = [i.job_id for i in props().history if i.job_id not in known]
        for job_id in reversed(ids):  # the queued one first, then the running one
            assert bpy.ops.make_your_3d.cancel_job(job_id=job_id) == {"FINISHED"}
            cancelling = mod("history").find_item(bpy.context.scene, job_id)
            # feedback at once, before the backend's answer: the step in flight finishes first
            assert cancelling.stage_label == "Cancelling..." and props().last_info.startswith("Cancelling"), props().last_info
        ok = rt().wait_until(lambda: all(i.status in ("done", "failed", "cancelled") for i in items_of(ids))
                             and all(i.imported for i in items_of(ids) if i.status == "done"), 120)
        statuses = [(i.status, i.stage) for i in items_of(ids)]
        assert ok, statuses
        cancelled = [i for i in items_of(ids) if i.status == "cancelled"]
        assert cancelled, f"nothing was cancelled: {statuses}"
        rt().wait_until(lambda: False, 1.0)  # a late download would land now
        new_objects = set(coll_objects()) - objects_before
        done_ids = {i.job_id for i in items_of(ids) if i.status == "done"}
        assert {o["job_id"] for o in new_objects} == done_ids, ([o.name for o in new_objects], statuses)
        assert all(not i.imported and not i.object_name for i in cancelled)
        assert all(i.stage_label == "Cancelled" and "cache" in i.message for i in cancelled), [(i.stage_label, i.message) for i in cancelled]
        assert props().last_info.startswith("Cancelled") or any(i.status == "done" for i in items_of(ids)), props().last_info
        return f"statuses {statuses}"

    checks.run("e2e_cancel_leaves_no_object", e2e_cancel_leaves_no_object)

    def e2e_history_survives_backend_restart():
        first_id, first_obj = state["first"]
        stop_backend()
        start_backend(args["tiny_models"])
        before = {i.job_id: i.status for i in props().history}
        # forget the local state of the first job, as if this .blend came from another machine
        item = mod("history").find_item(bpy.context.scene, first_id)
        item.status = "running"
        item.folder = ""
        item.imported = True
        assert bpy.ops.make_your_3d.refresh_history() == {"FINISHED"}
        ok = rt().wait_until(lambda: item.status == "done" and item.folder and (Path(item.folder) / "subject.glb").is_file(), 30)
        assert ok, (item.status, item.folder, props().last_error)
        assert {i.job_id: i.status for i in props().history} == before
        props().history_index = list(props().history).index(item)
        n = len(coll_objects())
        before_objs = set(coll_objects())
        images_before = len(bpy.data.images)
        # Import again of a result already in the scene selects it (issue 27.4: no silent ".001" copy)
        assert bpy.ops.make_your_3d.import_job() == {"FINISHED"}, props().last_error
        selected = bpy.context.view_layer.objects.active
        assert len(coll_objects()) == n and selected is not None and selected["job_id"] == first_id, props().last_info
        assert "already in the scene" in props().last_info
        # Add a Copy: a linked duplicate beside the others, its mesh and textures shared, not copied
        assert bpy.ops.make_your_3d.import_job(duplicate=True) == {"FINISHED"}, props().last_error
        assert len(coll_objects()) == n + 1 and len(bpy.data.images) == images_before
        bpy.context.view_layer.update()
        imp = mod("importer")
        (new_obj,) = set(coll_objects()) - before_objs
        assert new_obj.data.name == selected.data.name and new_obj["job_id"] == first_id
        for other in before_objs:  # Import again lands beside what is there, never on top
            assert not _overlap(imp.world_bounds(new_obj), imp.world_bounds(other)), (new_obj.name, other.name)
        assert abs(imp.world_bounds(new_obj)[0].z - bpy.context.scene.cursor.location.z) < 1e-4
        # re-run with the current prompt goes through the restarted backend
        props().prompt = "wearing a blue hat"
        known = {i.job_id for i in props().history}
        assert bpy.ops.make_your_3d.rerun_job(use_current_prompt=True) == {"FINISHED"}
        ok = rt().wait_until(lambda: any(i.job_id not in known for i in props().history), 30)
        assert ok, props().last_error
        new = [i for i in props().history if i.job_id not in known][0]
        assert new.prompt == "wearing a blue hat" and new.seed == 7, (new.prompt, new.seed)
        # no need to run it through (a new prompt recomputes most stages): cancel it
        assert bpy.ops.make_your_3d.cancel_job(job_id=new.job_id) == {"FINISHED"}
        ok = rt().wait_until(lambda: new.status in ("done", "failed", "cancelled"), 60)
        assert ok and new.status in ("cancelled", "done"), (new.status, new.error_message)
        # the history row's thumbnail is the job's preview.png; Open Folder is offered; Remove drops the row only
        props().history_index = list(props().history).index(item)
        rt().preview_icon(item)  # the icon id itself is 0 without a window (background mode)
        assert item.job_id in rt().previews() and len(rt().previews()[item.job_id].image_pixels) > 0
        assert bpy.ops.make_your_3d.open_job_folder.poll()
        n_items = len(props().history)
        assert bpy.ops.make_your_3d.remove_job() == {"FINISHED"}
        assert len(props().history) == n_items - 1 and mod("history").find_item(bpy.context.scene, first_id) is None
        assert first_obj in bpy.data.objects

    checks.run("e2e_history_survives_backend_restart", e2e_history_survives_backend_restart)

    def e2e_restart_notice_and_cache():
        """A preference the backend reads at start asks for a restart; the cache shows its size and clears."""
        assert not rt().restart_needed(prefs())
        old = prefs().device
        prefs().device = "cuda" if old != "cuda" else "cpu"
        assert rt().restart_needed(prefs())
        prefs().device = old
        assert not rt().restart_needed(prefs())
        assert bpy.ops.make_your_3d.cache_refresh() == {"FINISHED"}
        assert rt().wait_until(lambda: (rt().cache_info or {}).get("entries", 0) >= 7, 60), (rt().cache_info, props().last_error)
        info = rt().cache_info
        assert info["path"] == str(Path(args["work"]) / "stage_cache") and info["entries"] >= 7 and info["bytes"] > 0, info
        assert bpy.ops.make_your_3d.cache_clear.poll()
        assert bpy.ops.make_your_3d.cache_clear("EXEC_DEFAULT") == {"FINISHED"}
        assert rt().wait_until(lambda: "Cleared the stage cache" in props().last_info, 60), props().last_error
        assert rt().cache_info["entries"] == 0
        left = [p for p in (Path(args["work"]) / "stage_cache").rglob(".complete")]
        assert not left, left
        return f"cache was {info['entries']} entries, {info['bytes']} bytes"

    checks.run("e2e_restart_notice_and_cache", e2e_restart_notice_and_cache)

    def e2e_test_device_button():
        """Issue 24.5: Preferences > Test Device runs the tiny chain on the chosen device and reports."""
        prefs().device, prefs().precision = "cpu", "bf16"
        try:
            assert bpy.ops.make_your_3d.test_device.poll()
            assert bpy.ops.make_your_3d.test_device() == {"FINISHED"}
            assert not bpy.ops.make_your_3d.test_device.poll()  # one at a time
            task = rt().selftest_task
            task.join(240)
            assert rt().wait_until(lambda: "Self-test" in props().last_info, 10), (task.state(), props().last_info)
        finally:
            prefs().device, prefs().precision = "auto", "auto"
        report = rt().selftest_report
        assert report.startswith("Self-test on cpu (bfloat16): passed in") and "peak memory" in report, report
        return report[:160]

    checks.run("e2e_test_device_button", e2e_test_device_button)

    def e2e_dead_backend_reason():
        """The backend killed mid-job: the job is marked interrupted with the real reason (not a progress
        line, not "continues there"), Generate is not blocked, and Re-run restarts the backend and runs it."""
        import signal

        hist = mod("history")
        props().variants, props().seed_mode, props().seed = 1, "FIXED", 4242
        props().mv_steps = 40  # long enough to be caught running
        known = {i.job_id for i in props().history}
        try:
            assert bpy.ops.make_your_3d.generate() == {"FINISHED"}
            assert rt().wait_until(lambda: any(i.job_id not in known for i in props().history), 60), props().last_error
            item = next(i for i in props().history if i.job_id not in known)
            assert rt().wait_until(lambda: item.status == "running" and item.stage not in ("", "subject"), 120), (item.status, item.stage)
        finally:
            props().mv_steps = 0
        os.kill(rt().backend_state().info.pid, signal.SIGKILL)
        t0 = time.monotonic()
        ok = rt().wait_until(lambda: item.status == "interrupted", 15)
        seconds = time.monotonic() - t0
        assert ok, (item.status, item.message, props().last_error)
        assert item.error_code == "backend_crashed" and "SIGKILL" in item.error_message, item.error_message
        assert "%|" not in item.error_message and "continues there" not in props().last_error, (item.error_message, props().last_error)
        assert item.stage_label == "Interrupted" and "Re-run" in item.message
        assert rt().backend_state().status == "crashed"
        # nothing is blocked: Generate and Re-run start the backend themselves
        assert _poll_message(bpy.ops.make_your_3d.generate) is None and bpy.ops.make_your_3d.generate.poll()
        props().history_index = list(props().history).index(item)
        dead_id = item.job_id  # by id: new history items may move the collection, and `item` with it
        assert bpy.ops.make_your_3d.rerun_job.poll()
        known = {i.job_id for i in props().history}
        assert bpy.ops.make_your_3d.rerun_job() == {"FINISHED"}
        assert rt().wait_until(lambda: any(i.job_id not in known for i in props().history), 120), props().last_error
        again = next(i for i in props().history if i.job_id not in known)
        assert again.seed == 4242
        assert rt().wait_until(lambda: again.status in ("done", "failed") and (again.status != "done" or again.imported), 240), \
            (again.status, again.error_message)
        assert again.status == "done", again.error_message
        assert hist.find_item(bpy.context.scene, dead_id).status == "interrupted"
        stop_backend()  # as the checks after this one expect to find it
        return f"interrupted after {seconds:.1f} s: {item.error_message[:120]}"

    checks.run("e2e_dead_backend_reason", e2e_dead_backend_reason)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--driver":
    driver(json.loads(sys.argv[2]))
