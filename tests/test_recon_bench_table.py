"""The reconstruction benchmark's comparison table: each row beside the earlier method's row of the same
shape and noise, flagging what got more than 10% worse (issue 23's "no row of today's table worse by 10%")."""

from __future__ import annotations

import json

from bench_scripts import load_script

rb = load_script("recon_bench")


def _row(shape, noise, chamfer, f, iou, psnr, **extra):
    return {"set": "tuning", "shape": shape, "noise": noise, "preset": "default", "chamfer_l1": chamfer, "fscore": f,
            "heldout_iou": iou, "heldout_psnr": psnr, "watertight": True, "components": 1, "seconds": 200.0,
            "load_avg": [1.0, 1.0, 1.0], "misses": [], **extra}


def test_earlier_rows_read_both_result_formats_and_skip_the_fit(tmp_path):
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"rows": [_row("chair", "mild", 0.004, 0.99, 0.98, 25.0)]}))
    harness = tmp_path / "harness.json"
    harness.write_text(json.dumps({"rows": [{"shape": "cubby_strong", "surf": False, "chamfer_l1": 0.05, "fscore": 0.5},
                                            {"shape": "cubby_strong", "surf": True, "chamfer_l1": 0.02, "fscore": 0.7}]}))
    got = rb.earlier_rows([str(bench), str(harness)])
    assert set(got) == {("chair", "mild"), ("cubby", "strong")}
    assert got[("cubby", "strong")]["chamfer_l1"] == 0.05  # the method before the fit, not the fit's row


def test_beside_table_flags_only_what_got_more_than_ten_percent_worse():
    before = {("chair", "none"): _row("chair", "none", 0.0040, 0.990, 0.980, 26.0),
              ("ring", "none"): _row("ring", "none", 0.0040, 0.990, 0.980, 26.0)}
    rows = [_row("chair", "none", 0.0043, 0.900, 0.975, 25.7),  # Chamfer +7.5%, F -9.1%, PSNR -0.3 dB (+7% error)
            _row("ring", "none", 0.0045, 0.880, 0.870, 25.0),  # Chamfer +12.5%, F -11%, IoU -11%, PSNR +26% error
            _row("comb", "none", 0.0038, 1.000, 0.990, 30.0)]  # no earlier row
    lines = rb.beside_table(rows, before).splitlines()
    assert lines[2].endswith("| - |") and "0.0043 (0.0040)" in lines[2]
    assert lines[3].endswith("| Chamfer, F, IoU, PSNR |")
    assert "0.0038 (-)" in lines[4] and lines[4].endswith("| - |")


def _ortho_camera(size: int = 64, scale: float = 24.0):
    import torch

    from make_your_3d.recon.camera import Cameras

    K = torch.tensor([[scale, 0, size / 2], [0, scale, size / 2], [0, 0, 1.0]])
    return Cameras(torch.eye(4)[None], K[None], size, size, "ortho")  # looks along +z (OpenCV axes)


def test_interior_depth_scores_a_step_the_convex_hull_hides():
    import trimesh

    ide = load_script("interior_depth")
    # a step seen head-on: the left block's face at z = 0, the right block's tread 0.5 behind it
    left = trimesh.creation.box(bounds=[[-1, -0.5, 0], [0, 0.5, 1]])
    right = trimesh.creation.box(bounds=[[0, -0.5, 0.5], [1, 0.5, 1]])
    step = trimesh.util.concatenate([left, right])
    cams = [_ortho_camera()]
    exact = ide.interior_errors(step, step, cams, margin_px=2.0)
    assert exact["interior_pixels"] > 100 and exact["interior_px"] == 0 and exact["interior_missed"] == 0
    lidded = ide.interior_errors(step.convex_hull, step, cams, margin_px=2.0)  # the step filled to its hull
    assert lidded["interior_px"] > 2.0  # the tread is up to 0.25 x 24 = 6 px behind the hull's slope
    box = trimesh.creation.box(bounds=[[-1, -0.5, 0], [1, 0.5, 1]])
    assert ide.interior_errors(box, box, cams, margin_px=2.0)["interior_pixels"] == 0  # convex: nothing interior
