"""The Khronos glTF validator (npm package `gltf-validator`, its official build) on our GLBs.

    python benchmarks/gltf_validate.py [GLB ...] [--version 2.0.0-dev.3.10] [--json report.json]

Installs the validator with npm into a temporary folder (needs node and npm; CI has neither, so the
test suite checks the same structure in Python: tests/test_asset_maps.py), then validates each GLB
given, or, with none, one made here: a bumpy sphere simplified to 1500 faces and written with every
map (base colour, normal, ORM) by the reconstruction's own asset code. Prints each file's error,
warning, info and hint counts and every message; exits 1 when any file has an error or a warning.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "backend"))

RUNNER = """
import { readFileSync } from 'node:fs';
import validator from 'gltf-validator';
const out = [];
for (const path of process.argv.slice(2)) {
  const report = await validator.validateBytes(new Uint8Array(readFileSync(path)), {maxIssues: 100});
  out.push({path, validatorVersion: report.validatorVersion, issues: report.issues, info: report.info});
}
console.log(JSON.stringify(out));
"""


def sample_glb(path: Path) -> Path:
    """A bumpy sphere (icosphere of 20k faces) simplified to 1500 faces, with all three maps."""
    import dataclasses

    import numpy as np
    import trimesh

    from make_your_3d.recon.asset_maps import build_asset
    from make_your_3d.recon.config import BakeConfig
    from make_your_3d.recon.glb import write_asset
    from make_your_3d.recon.mesh import simplify
    from make_your_3d.recon.texture import unwrap

    s = trimesh.creation.icosphere(subdivisions=5, radius=0.8)
    d = s.vertices / np.linalg.norm(s.vertices, axis=1, keepdims=True)
    r = 0.8 + 0.03 * np.sin(9 * d[:, 0]) * np.sin(9 * d[:, 1]) * np.sin(9 * d[:, 2] + 1)
    fine = trimesh.Trimesh(d * r[:, None], s.faces, process=True)
    low, _ = simplify(fine, 1500)
    cfg = dataclasses.replace(BakeConfig(), texture_size=512)
    uvm = unwrap(low, 512, cfg)
    colour = (np.random.default_rng(0).random((512, 512, 3)) * 255).astype(np.uint8)
    asset, _ = build_asset(uvm, colour, fine, cfg, 1.6)
    return write_asset(asset, path)


def validate(paths: list[Path], version: str) -> list[dict]:
    if shutil.which("npm") is None or shutil.which("node") is None:
        raise SystemExit("node and npm are needed (the validator is the npm package gltf-validator)")
    with tempfile.TemporaryDirectory(prefix="gltf_validator_") as tmp:
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--silent", f"gltf-validator@{version}"], cwd=tmp,
                       check=True, capture_output=True, text=True, timeout=300)
        (Path(tmp) / "run.mjs").write_text(RUNNER)
        out = subprocess.run(["node", "run.mjs", *map(str, paths)], cwd=tmp, check=True, capture_output=True, text=True,
                             timeout=600)
    return json.loads(out.stdout)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("glbs", nargs="*", type=Path)
    ap.add_argument("--version", default="2.0.0-dev.3.10")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    paths = args.glbs or [sample_glb(Path(tempfile.mkdtemp(prefix="gltf_validate_")) / "bumpy_sphere.glb")]
    reports = validate(paths, args.version)
    bad = False
    for r in reports:
        i = r["issues"]
        print(f"{r['path']}: validator {r['validatorVersion']}: {i['numErrors']} errors, {i['numWarnings']} warnings, "
              f"{i['numInfos']} infos, {i['numHints']} hints")
        for m in i["messages"]:
            print(f"  [{('error', 'warning', 'info', 'hint')[m['severity']]}] {m['code']} {m.get('pointer', '')}: {m['message']}")
        bad |= i["numErrors"] > 0 or i["numWarnings"] > 0
    if args.json:
        args.json.write_text(json.dumps(reports, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
