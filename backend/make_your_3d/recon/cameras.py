"""Kept for importers outside recon/ (models/multiview_pipeline.py, benchmarks/render_gt.py): the poses
live in recon/camera.py, the one camera module."""

from make_your_3d.recon.camera import look_at, orbit_c2w  # noqa: F401
