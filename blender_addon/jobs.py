"""Main-thread side of the job flow: worker events become history items, progress and imports.

`drain()` applies everything queued (synchronous; used in background mode and tests); `tick` is
the `bpy.app.timers` function that does the same every 0.2 s while Blender's UI runs.
"""

from __future__ import annotations

import time
from pathlib import Path

import bpy

from . import history, quad, runtime
from .runtime import EventKind
from .importer import ImportProblem, blocking_objects, free_spot, import_glb

TICK_SECONDS = 0.2


def _scene(name: str) -> bpy.types.Scene | None:
    if name and name in bpy.data.scenes:
        return bpy.data.scenes[name]
    return bpy.context.scene


def _set_error(scene: bpy.types.Scene | None, message: str) -> None:
    for sc in ([scene] if scene is not None else list(bpy.data.scenes)):
        if hasattr(sc, "make_your_3d"):
            sc.make_your_3d.last_error = message


def apply_event(rt: "runtime.Runtime", event: "runtime.Event") -> None:
    kind = event.kind
    if kind == EventKind.SUBMITTED:
        scene = _scene(event.scene)
        if scene is None:
            return
        props = scene.make_your_3d
        request = dict(event.data["request"])
        seeds = [int(s) for s in event.data.get("seeds") or []]  # drawn by the backend, one per job
        for i, job_id in enumerate(event.data["ids"]):
            req = {**request, "seed": seeds[i]} if i < len(seeds) else dict(request)
            if history.find_item(scene, job_id) is None:
                item = history.add_item(scene, job_id, event.data.get("group", ""), i, req)
                item.import_requested = props.auto_import
                item.backend = str(request.get("backend") or "local")
        if seeds:
            props.last_seed = seeds[0]
            span = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {seeds[0]}-{seeds[-1]}"
            props.last_info = f"Submitted {len(seeds)} job(s), {span}"
        props.last_error = ""
    elif kind in (EventKind.RECORD, EventKind.SYNC):
        record = event.data["record"]
        rt.saw_record(event.job_id)
        for scene, item in history.find_items(event.job_id):
            history.apply_record(item, record, rt.stage_times.expectation(item.preset, rt.stage_plan()))
            if item.status == "failed" and item.error_message:
                scene.make_your_3d.last_error = f"Job {item.job_id[:8]} failed: {item.error_message}"
            if item.status == "cancelled" and kind == EventKind.RECORD:
                scene.make_your_3d.last_info = f"Cancelled '{item.prompt}' seed {item.seed}. {history.CANCELLED_KEPT}"
            if kind == EventKind.SYNC:
                if history.is_active(item):
                    rt.watch(item.job_id)
                elif item.status == "done" and not item.folder:
                    _request_files(rt, item, then_import=item.import_requested and not item.imported)
    elif kind == EventKind.WANT_FILES:
        for _scene_, item in history.find_items(event.job_id):
            _request_files(rt, item, then_import=item.import_requested and not item.imported, files=event.data.get("files"))
            break
    elif kind == EventKind.FILES:
        folder = event.data["folder"]
        record = read_job_record(Path(folder))
        learned = False
        for scene, item in history.find_items(event.job_id):
            item.folder = folder
            if record:
                item.device = str(record.get("device") or "")
                item.tiny_models = bool(record.get("tiny_models"))
                if not learned:
                    learned = rt.stage_times.learn(item.preset, record)
            if event.data.get("import") and not item.imported:
                import_item(bpy.context, rt, scene, item)
            scene.make_your_3d.last_info = set_message(scene, item) or finished_message(item, record)
    elif kind == EventKind.LOST:
        message = event.data.get("message", "")
        for scene, item in history.find_items(event.job_id):
            if history.is_active(item):
                if event.data.get("crashed"):
                    history.mark_interrupted(item, message)
                else:
                    item.message = message
            scene.make_your_3d.last_error = (f"Job {event.job_id[:8]} was interrupted. {message}" if event.data.get("crashed") else message)
    elif kind == EventKind.CANCEL_FAILED:
        for _sc, item in history.find_items(event.job_id):
            item.cancel_requested = False
    elif kind == EventKind.ERROR:
        scene = _scene(event.scene) if event.scene else None
        _set_error(scene, event.data.get("message", "Unknown error"))
    elif kind == EventKind.INFO:
        for sc in bpy.data.scenes:
            if hasattr(sc, "make_your_3d"):
                sc.make_your_3d.last_info = event.data.get("message", "")
    # EventKind.MODELS: nothing to store in bpy; the redraw shows the new state


def read_job_record(folder: Path) -> dict:
    try:
        import json

        data = json.loads((folder / "job.json").read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def finished_message(item, record: dict) -> str:
    """What the panel says when a job is done: which, where it ran, how long it took, where it went."""
    where = f" on {item.device}" if item.device else ""
    if item.backend and item.backend != "local":
        where += f" at {item.backend}"
    took = ""
    timings = record.get("timings") if isinstance(record, dict) else None
    if isinstance(timings, dict) and isinstance(timings.get("total"), (int, float)):
        took = f" in {history.format_seconds(float(timings['total']))}"
    placed = f", imported as '{item.object_name}'" if item.imported and item.object_name else ""
    tiny = " (tiny test models: the mesh is noise)" if item.tiny_models else ""
    return f"Finished '{item.prompt}' seed {item.seed}{where}{took}{placed}{tiny}"


def set_message(scene: bpy.types.Scene, item) -> str | None:
    """When the last job of a set of variants finishes, one sentence for the whole set (the message
    named only the last one); None for a single job or while others of the set still run."""
    siblings = [i for i in scene.make_your_3d.history if item.group and i.group == item.group]
    if len(siblings) < 2 or any(not history.is_terminal(i) for i in siblings):
        return None
    done = sorted((i for i in siblings if i.status == "done"), key=lambda i: i.index_in_group)
    seeds = ", ".join(str(i.seed) for i in done)
    placed = [i.object_name for i in done if i.imported and i.object_name]
    names = f", imported as {', '.join(repr(n) for n in placed)}" if placed else ""
    other = len(siblings) - len(done)
    rest = f"; {other} did not finish" if other else ""
    return f"Finished {len(done)} of {len(siblings)} variants of '{item.prompt}' (seeds {seeds}){names}{rest}"


def _request_files(rt: "runtime.Runtime", item, then_import: bool, files: list[str] | None = None) -> None:
    prefs = runtime.addon_prefs()
    rt.download(item.job_id, rt.results_dir(prefs, item.job_id), list(files or []), then_import)


def result_key(folder: Path) -> str:
    """What identifies a job's mesh: its reconstruction stage's cache key (job.json). Two jobs with the
    same key made the same mesh (an unchanged Re-run), so one object in the scene serves both."""
    for stage in read_job_record(folder).get("stages") or []:
        if isinstance(stage, dict) and stage.get("name") == "reconstruct":
            return str(stage.get("key") or "")
    return ""


def existing_result(scene: bpy.types.Scene, job_id: str, key: str) -> bpy.types.Object | None:
    """An object of this job, or of the same mesh, already in the scene (visible ones first)."""
    found = [o for o in scene.objects if o.get("job_id") == job_id or (key and o.get("result_key") == key)]
    found.sort(key=lambda o: (o.hide_get(), "quad_of" not in o))  # visible first, the quad version before its hidden original
    return found[0] if found else None


def import_item(context: bpy.types.Context, rt: "runtime.Runtime", scene: bpy.types.Scene, item,
                duplicate: bool = False) -> bpy.types.Object | None:
    """Import a finished job's GLB into `scene` (must be the context's scene); errors go to the panel.

    When the job's mesh is already in the scene (this job, or another with the same result), it is
    selected instead of imported again; `duplicate` adds a linked copy beside it (the mesh, materials
    and textures are shared, not copied)."""
    if context.scene != scene:
        return None  # imported when the artist presses Import in that scene
    prefs = runtime.addon_prefs(context)
    key = result_key(Path(item.folder))
    existing = existing_result(scene, item.job_id, key)
    if existing is not None:
        if duplicate:
            copy = existing.copy()  # linked: the same mesh, materials and textures
            for coll in existing.users_collection:
                coll.objects.link(copy)
            copy.hide_set(False)
            context.view_layer.update()
            copy.location = free_spot(scene.cursor.location, copy, blocking_objects(context, copy))
            existing = copy
        quad.only_selected(context, existing, active=existing)
        item.imported = True
        item.object_name = existing.name
        if not duplicate:
            scene.make_your_3d.last_info = f"'{existing.name}' is already in the scene: selected it (Add a Copy makes a linked duplicate)"
        return existing
    glb = Path(item.folder) / "subject.glb"
    try:
        obj = import_glb(context, glb, job_id=item.job_id, seed=item.seed, prompt=item.prompt,
                         variant_index=item.index_in_group,
                         texture_mode=prefs.texture_mode if prefs is not None else "PACK", folder=Path(item.folder),
                         height=scene.make_your_3d.height, frame_view=prefs.frame_new if prefs is not None else True)
    except ImportProblem as exc:
        scene.make_your_3d.last_error = str(exc)
        return None
    obj["result_key"] = key
    item.imported = True
    item.object_name = obj.name
    if scene.make_your_3d.quad_remesh:
        try:
            obj = quad.quad_remesh(context, obj, scene.make_your_3d.quad_faces)
        except quad.QuadProblem as exc:
            scene.make_your_3d.last_error = f"Imported, but the quad remesh failed: {exc}"
            return obj
        item.object_name = obj.name
    return obj


def drain(max_items: int | None = None) -> int:
    """Apply every queued worker event now (main thread). Returns how many were applied."""
    rt = runtime.get()
    return rt.drain(max_items) if rt is not None else 0


def tag_redraw() -> None:
    wm = bpy.context.window_manager
    if wm is None:
        return
    for window in wm.windows:
        for area in window.screen.areas:
            if area.type in {"VIEW_3D", "PREFERENCES"}:
                area.tag_redraw()


def refresh_running(rt: "runtime.Runtime") -> bool:
    """Move every running job's bar, elapsed time and time left on with the clock between the
    backend's records (at most once a second); True when a bar was moved."""
    second = int(time.time())
    if second == rt.fill_second:
        return False
    rt.fill_second = second
    moved = False
    for scene in bpy.data.scenes:
        if not hasattr(scene, "make_your_3d"):
            continue
        for item in scene.make_your_3d.history:
            if item.status == "running":
                history.refresh_progress(item, rt.stage_times.expectation(item.preset, rt.stage_plan()), rt.since_record(item.job_id))
                moved = True
    return moved


def tick() -> float | None:
    """bpy.app.timers callback: drain events, move the bars on, and redraw when anything changed."""
    rt = runtime.get()
    if rt is None:
        return None
    try:
        rt.configure_remote(runtime.addon_prefs())  # the Remote backend preference, for the worker threads
        changed = rt.drain(max_items=200) > 0
        changed |= refresh_running(rt)
        changed |= rt.status_changed()
        changed |= any(t is not None and t.state().running for t in (rt.install_task, rt.fetch_task))
        if changed:
            tag_redraw()
    except Exception as exc:  # a timer that raises is unregistered by Blender: report, keep ticking
        print(f"Make-Your-3D: {exc!r}")
    return TICK_SECONDS
