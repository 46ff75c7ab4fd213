"""Wonder3D v1.0's six views: the ideal poses we reconstruct with, and the class labels it was trained on.

Two different sets of numbers describe each view, and mixing them up is a silent quality bug:

- **Poses** (`azimuth_deg`): the cameras of the generated images are orthographic at elevation 0
  and azimuths 0, 45, 90, 180, -90, -45 degrees. Wonder3D's own reconstruction (instant-nsr-pl)
  uses these ideal poses, and so does ours (`to_viewset`).
- **Labels** (`label_elevation`, `label_azimuth`, radians): the UNet's only pose signal is a
  10-d class label, and Wonder3D computed it, in training and at inference, from its fixed
  `nine_views` cameras, which are the ideal six turned by one global rotation. So the relative
  angles are *not* 0/45/90/... at elevation 0. The values below are exactly the float16 entries of
  the reference pipeline's built-in `camera_embedding` table (`pipeline_mvdiffusion_image.py`,
  xxlong0/Wonder3D d894f82), which `single_image_dataset.get_T` reproduces to float16 rounding;
  `tests/golden/wonder3d/camera_table.json` holds the same table and is checked in the tests.

This module is the multi-view model's: it imports nothing from `recon/` or `pipeline/`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NORMAL_DOMAIN = (1.0, 0.0)
COLOR_DOMAIN = (0.0, 1.0)


@dataclass(frozen=True)
class Wonder3DView:
    name: str
    azimuth_deg: float  # ideal camera azimuth (pose), degrees; 0 = front (+Z), 90 = +X
    label_elevation: float  # class-label elevation offset, radians (nine_views, float16-exact)
    label_azimuth: float  # class-label azimuth offset, radians (nine_views, float16-exact)


# Order = the UNet batch order of every published Wonder3D pipeline.
WONDER3D_VIEW_TABLE: tuple[Wonder3DView, ...] = (
    Wonder3DView("front", 0.0, 0.0, 0.0),
    Wonder3DView("front_right", 45.0, -0.2362060546875, 0.8125),
    Wonder3DView("right", 90.0, -0.1685791015625, 1.693359375),
    Wonder3DView("back", 180.0, 0.52197265625, 3.140625),
    Wonder3DView("left", -90.0, 0.6904296875, 4.8359375),
    Wonder3DView("front_left", -45.0, 0.373291015625, 5.5859375),
)

# (name, ideal azimuth in degrees): the poses, for code that places cameras.
WONDER3D_VIEWS: tuple[tuple[str, float], ...] = tuple((v.name, v.azimuth_deg) for v in WONDER3D_VIEW_TABLE)

# Elevation of the input (condition) view: Wonder3D always uses 0.
CONDITION_ELEVATION = 0.0


def label_table(views: tuple[Wonder3DView, ...] = WONDER3D_VIEW_TABLE) -> torch.Tensor:
    """(2*V, 5) float16 table `[elevation_cond, elevation, azimuth, task_normal, task_color]`,
    rows `[normals(V), colours(V)]`: the reference pipeline's `camera_embedding`, value for value."""
    rows = [
        [CONDITION_ELEVATION, v.label_elevation, v.label_azimuth, *domain]
        for domain in (NORMAL_DOMAIN, COLOR_DOMAIN)
        for v in views
    ]
    return torch.tensor(rows, dtype=torch.float16)


def class_labels(batch: int, dtype: torch.dtype, device: torch.device | str = "cpu", views: tuple[Wonder3DView, ...] = WONDER3D_VIEW_TABLE) -> torch.Tensor:
    """(2*batch*V, 10) UNet class labels in the `[normals(batch*V), colours(batch*V)]` layout.

    As the reference does (`prepare_camera_embedding`): the float16 table is cast to the UNet's
    dtype and `sin`/`cos` are taken in that dtype, so an fp16 pipeline sees the same labels as
    Wonder3D's own fp16 pipeline.
    """
    table = label_table(views).to(device=device, dtype=dtype)
    v = len(views)
    per_domain = [table[d * v:(d + 1) * v].repeat(batch, 1) for d in range(2)]
    raw = torch.cat(per_domain)
    return torch.cat([torch.sin(raw), torch.cos(raw)], dim=-1)
