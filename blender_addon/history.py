"""Job history stored on the scene (a CollectionProperty), so it is saved with the .blend.

Each item mirrors one service job record (status, progress, request) plus what the add-on did
with it locally (download folder, imported object). The service keeps the jobs themselves, so
after a backend restart the items are refreshed from `GET /v1/jobs`.
"""

from __future__ import annotations

import json

import bpy
from bpy.props import BoolProperty, FloatProperty, IntProperty, StringProperty

from . import progress
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
    job_progress: FloatProperty(name="Progress", description="The whole job, 0 to 1", default=0.0, min=0.0, max=1.0)
    stage_label: StringProperty(name="Stage", description="The current stage, in words")
    job_eta_s: FloatProperty(name="Time left", default=-1.0)
    device: StringProperty(name="Device", description="Where the backend ran the job (from its job.json)")
    backend: StringProperty(name="Backend", description="Which backend ran the job: 'local', or the remote backend's URL")
    image_name: StringProperty(name="Reference image", description="The image datablock the job was made from")
    tiny_models: BoolProperty(name="Tiny models", default=False)
    overrides_json: StringProperty(name="Overrides", description="The job's own sampling settings (JSON)")
    cancel_requested: BoolProperty(name="Cancelling", description="Cancel was pressed; the step in flight finishes first", default=False)


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
        item.seed = int(request["seed"])  # the backend's seeds fit Blender's 32-bit ints (job_params.SEED_MAX)
    item.preset = str(request.get("preset") or "default")
    item.faces = int(request.get("faces") or 0)
    item.texture_size = int(request.get("texture_size") or 0)
    if request.get("image_name"):
        item.image_name = str(request["image_name"])
    overrides = request.get("overrides")
    item.overrides_json = json.dumps(overrides, sort_keys=True) if isinstance(overrides, dict) and overrides else ""


def overrides_of(item) -> dict:
    try:
        data = json.loads(item.overrides_json) if item.overrides_json else {}
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def apply_record(item, record: dict, expect: progress.Expectation | None = None) -> bool:
    """Copy a service job record into the item; returns True when the status changed.
    `expect`: the stages' expected seconds on this machine and the backend's stage list
    (progress.StageTimes.expectation); None: first-time estimates, no time left shown."""
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
    refresh_progress(item, expect)
    return changed


def elapsed_now(item, since_s: float = 0.0) -> float:
    """The job's elapsed seconds now: the last record's, plus `since_s` (the time since it arrived,
    runtime.Runtime.since_record) while it runs."""
    if item.elapsed_s < 0:
        return -1.0
    return item.elapsed_s + (max(since_s, 0.0) if item.status == "running" else 0.0)


def refresh_progress(item, expect: progress.Expectation | None = None, since_s: float = 0.0) -> None:
    """One bar for the whole job, from its last record and the `since_s` seconds since it arrived:
    never moves backwards. (The arrival time is not a property: Blender keeps floats in 32 bits,
    which hold a wall-clock time only to about two minutes.)"""
    if expect is None:
        expect = progress.Expectation(progress.estimated_seconds(item.preset), False)
    if item.status == "running":
        since = max(since_s, 0.0)
        jp = progress.job_progress(item.stage, item.step, item.total, item.eta_s if item.eta_s >= 0 else None, expect.seconds, expect.plan,
                                   measured=expect.measured, since_s=since)
        item.job_progress = max(item.job_progress, jp.fraction)
        item.stage_label = jp.label
        item.job_eta_s = jp.eta_s if jp.eta_s is not None else -1.0
    elif item.status == "queued":
        item.stage_label = "Waiting for the jobs before it"
        item.job_eta_s = -1.0
    elif item.status == "done":
        item.job_progress = 1.0
        item.stage_label = "Done"
        item.job_eta_s = 0.0
    elif item.status == "cancelled":
        item.stage_label = "Cancelled"
        item.message = CANCELLED_KEPT
        item.job_eta_s = -1.0
    else:
        item.stage_label = item.status.capitalize()
        item.job_eta_s = -1.0
    if item.cancel_requested and is_active(item):
        item.stage_label = CANCELLING  # until the backend's next check stops the step in flight
    elif not is_active(item):
        item.cancel_requested = False


CANCELLING = "Cancelling..."
CANCELLED_KEPT = "Cancelled. The stages it finished stay in the cache: a re-run reuses them"


def mark_interrupted(item, reason: str) -> None:
    """The job's backend died under it: say so, with the backend's own reason, and how to go on."""
    item.status = "interrupted"
    item.error_code = "backend_crashed"
    item.error_message = reason[:500]
    item.message = "Interrupted: the backend stopped. Re-run restarts it and runs the job again"
    item.cancel_requested = False
    item.stage_label = "Interrupted"
    item.job_eta_s = -1.0


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
