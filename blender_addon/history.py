"""Job history stored on the scene (a CollectionProperty), so it is saved with the .blend.

Each item mirrors one service job record (status, progress, request) plus what the add-on did
with it locally (download folder, imported object). The service keeps the jobs themselves, so
after a backend restart the items are refreshed from `GET /v1/jobs`.
"""

from __future__ import annotations

import bpy
from bpy.props import BoolProperty, FloatProperty, IntProperty, StringProperty

from .client import TERMINAL

ACTIVE = frozenset({"queued", "running"})


class MAKE_YOUR_3D_PG_history_item(bpy.types.PropertyGroup):
    """One generation job (one variant)."""

    job_id: StringProperty(name="Job ID")
    group: StringProperty(name="Group")
    index_in_group: IntProperty(name="Variant", default=0, min=0)
    status: StringProperty(name="Status", default="queued")
    stage: StringProperty(name="Stage")
    step: IntProperty(name="Step", default=0)
    total: IntProperty(name="Total", default=0)
    message: StringProperty(name="Message")
    elapsed_s: FloatProperty(name="Elapsed", default=-1.0)
    eta_s: FloatProperty(name="ETA", default=-1.0)
    error_code: StringProperty(name="Error code")
    error_message: StringProperty(name="Error")
    prompt: StringProperty(name="Prompt")
    negative_prompt: StringProperty(name="Negative prompt")
    subject: StringProperty(name="Subject")
    seed: IntProperty(name="Seed", default=0)
    preset: StringProperty(name="Preset", default="default")
    faces: IntProperty(name="Faces", default=0)
    texture_size: IntProperty(name="Texture size", default=0)
    created_at: StringProperty(name="Created")
    folder: StringProperty(name="Folder", subtype="DIR_PATH")
    imported: BoolProperty(name="Imported", default=False)
    object_name: StringProperty(name="Object")
    import_requested: BoolProperty(name="Import when done", default=True)


def find_item(scene: bpy.types.Scene, job_id: str):
    for item in scene.make_your_3d.history:
        if item.job_id == job_id:
            return item
    return None


def find_items(job_id: str):
    """Every (scene, item) that tracks this job, in any open scene."""
    return [(scene, item) for scene in bpy.data.scenes if hasattr(scene, "make_your_3d")
            for item in scene.make_your_3d.history if item.job_id == job_id]


def add_item(scene: bpy.types.Scene, job_id: str, group: str, index: int, request: dict):
    props = scene.make_your_3d
    item = props.history.add()
    item.job_id = job_id
    item.group = group
    item.index_in_group = index
    item.status = "queued"
    apply_request(item, request)
    props.history_index = len(props.history) - 1
    return item


def apply_request(item, request: dict) -> None:
    item.prompt = str(request.get("prompt") or "")
    item.negative_prompt = str(request.get("negative_prompt") or "")
    item.subject = str(request.get("subject") or "")
    if request.get("seed") is not None:
        item.seed = int(request["seed"]) % (2**31)
    item.preset = str(request.get("preset") or "default")
    item.faces = int(request.get("faces") or 0)
    item.texture_size = int(request.get("texture_size") or 0)


def apply_record(item, record: dict) -> bool:
    """Copy a service job record into the item; returns True when the status changed."""
    changed = item.status != record.get("status")
    item.status = str(record.get("status") or item.status)
    item.group = str(record.get("group") or item.group)
    item.stage = str(record.get("stage") or "")
    item.step = int(record.get("step") or 0)
    item.total = int(record.get("total") or 0)
    item.message = str(record.get("message") or "")[:500]
    item.elapsed_s = float(record["elapsed_s"]) if record.get("elapsed_s") is not None else -1.0
    item.eta_s = float(record["eta_s"]) if record.get("eta_s") is not None else -1.0
    err = record.get("error") or {}
    item.error_code = str(err.get("code") or "")
    item.error_message = str(err.get("message") or "")[:500]
    if record.get("created_at"):
        item.created_at = str(record["created_at"])
    if isinstance(record.get("request"), dict):
        apply_request(item, record["request"])
    return changed


def is_terminal(item) -> bool:
    return item.status in TERMINAL


def is_active(item) -> bool:
    return item.status in ACTIVE


def format_seconds(seconds: float) -> str:
    if seconds < 0:
        return "--"
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


def status_icon(status: str) -> str:
    return {
        "done": "CHECKMARK",
        "failed": "ERROR",
        "cancelled": "CANCEL",
        "interrupted": "UNLINKED",
        "running": "SORTTIME",
        "queued": "TIME",
    }.get(status, "QUESTION")


CLASSES = (MAKE_YOUR_3D_PG_history_item,)
