"""Issue 28.3: results in sight. In Blender's default scene the 2 m cube sits on the 3D cursor; a
0.3 m result imported there used to land inside it and render invisible. On the real `bpy` module
(in a subprocess: bpy loads once per process), the add-on's importer must put the result beside the
cube, and the framing of out-of-view results must be a no-op where no 3D view exists (background)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

DRIVER = r'''
import importlib.util, json, sys
from pathlib import Path
import bpy
bpy.ops.wm.read_factory_settings(use_empty=False)  # Blender's default scene: Cube, Light, Camera
spec = importlib.util.spec_from_file_location("mk3d_importer", sys.argv[1])
imp = importlib.util.module_from_spec(spec)
spec.loader.exec_module(imp)
scene = bpy.context.scene
cube = bpy.data.objects["Cube"]
out = {"cursor": list(scene.cursor.location), "cube": [list(v) for v in imp.world_bounds(cube)], "objects": []}
for seed in (0, 1):
    obj = imp.import_glb(bpy.context, Path(sys.argv[2]), job_id=f"j{seed}", seed=seed, prompt="a toy bear")
    bpy.context.view_layer.update()
    out["objects"].append({"name": obj.name, "bounds": [list(v) for v in imp.world_bounds(obj)],
                           "framed": imp.frame_if_out_of_view(bpy.context, obj)})
print("RESULT " + json.dumps(out))
'''


def _overlap(a, b) -> bool:
    return all(a[0][i] < b[1][i] - 1e-6 and b[0][i] < a[1][i] - 1e-6 for i in range(3))


@pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="bpy 5.0.1 exists only for Python 3.11")
def test_import_goes_beside_the_default_cube(tmp_path: Path) -> None:
    import trimesh

    glb = tmp_path / "subject.glb"
    trimesh.creation.box(extents=(1.2, 2.0, 0.8)).export(glb)  # centred on its origin, 2 units tall, as the backend's
    run = subprocess.run([sys.executable, "-c", DRIVER, str(REPO / "blender_addon" / "importer.py"), str(glb)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    line = next((ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert run.returncode == 0 and line, run.stdout[-2000:] + run.stderr[-2000:]
    res = json.loads(line[len("RESULT "):])
    assert res["cursor"] == [0.0, 0.0, 0.0] and res["cube"] == [[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]], res
    first, second = res["objects"]
    for item in res["objects"]:
        assert not _overlap(item["bounds"], res["cube"]), (item, res["cube"])  # not hidden inside the cube
        assert abs(item["bounds"][0][2]) < 1e-4  # still stands on the cursor's height
        assert abs(item["bounds"][1][2] - item["bounds"][0][2] - 0.3) < 1e-4  # scaled to the default height
        assert item["framed"] == 0  # background mode: no 3D view, nothing to move
    assert first["bounds"][0][0] < 1.0 + 0.5  # beside the cube, not far away
    assert not _overlap(first["bounds"], second["bounds"])
