"""Operators of the panel and preferences. Each poll() says why a button is disabled."""

from __future__ import annotations

import base64
import os
import sys
import tempfile
from pathlib import Path

import bpy
from bpy.props import BoolProperty, StringProperty
from bpy_extras.io_utils import ImportHelper

from . import history, jobs, runtime
from .props import OVERRIDE_FIELDS, job_overrides
from .backend import BackendError

IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")


# -- why a button cannot run --------------------------------------------------------------------
def backend_blocker(context: bpy.types.Context) -> str | None:
    """Why no backend can be used right now (None: it runs, starts, or can be started on demand)."""
    rt = runtime.get()
    if rt is None:
        return "Make-Your-3D is not enabled"
    rt.configure_remote(runtime.addon_prefs(context))
    problem = rt.remote_problem()
    if problem:
        return problem
    st = rt.backend_state()
    if st.status in ("running", "starting"):
        return None
    # stopped or crashed: Generate and Re-run start it again, unless its Python cannot run
    return rt.python_problem(runtime.addon_prefs(context))


def python_blocker(context: bpy.types.Context) -> str | None:
    """Why the backend's Python cannot run a command now (None: it can), whether or not a backend runs."""
    rt = runtime.get()
    return "Make-Your-3D is not enabled" if rt is None else rt.python_problem(runtime.addon_prefs(context))


def weights_blocker() -> str | None:
    rt = runtime.get()
    models = rt.models if rt is not None else None
    if not models or models.get("complete", True):
        return None
    missing = [str(r.get("name")) for r in models.get("roles", []) if not r.get("complete")]
    # Blender cuts poll messages at 200 characters: the fix first, then the role names
    return f"Model weights missing: press Fetch in Preferences > Add-ons > Make-Your-3D ({', '.join(missing)})"


def generate_blocker(context: bpy.types.Context) -> str | None:
    """The first reason Generate Subject cannot run, in the order an artist fixes them."""
    reason = backend_blocker(context)
    if reason:
        return reason
    props = context.scene.make_your_3d
    if props.image is None:
        return "No reference image: pick an image or open an image file"
    if tuple(props.image.size) == (0, 0):
        return f"Reference image '{props.image.name}' has no pixels (is its file missing?)"
    if not props.prompt.strip():
        return 'No prompt: type the change you want, e.g. "wearing a red scarf"'
    return weights_blocker()


def _allow(cls, reason: str | None) -> bool:
    """A poll's answer: True when nothing blocks the operator, else False with `reason` shown as why."""
    if reason:
        cls.poll_message_set(reason)
        return False
    return True


def _poll_backend_running(cls) -> bool:
    """The poll of operators that talk to the backend: it must be running; else say so."""
    rt = runtime.get()
    return _allow(cls, None if rt is not None and rt.backend_state().status == "running" else "The backend is not running")


def active_item(context: bpy.types.Context):
    props = context.scene.make_your_3d
    if 0 <= props.history_index < len(props.history):
        return props.history[props.history_index]
    return None


class _JobOperator:
    """Mixin of the operators on one history job: `job_id` names it (a row's button), empty means the
    selected row. Blender registers the annotation of a plain mixin class like the operator's own."""

    job_id: StringProperty(options={"SKIP_SAVE"})

    @classmethod
    def poll(cls, context):
        return _allow(cls, "Select a job in the history" if active_item(context) is None else None)

    def item(self, context: bpy.types.Context):
        return history.find_item(context.scene, self.job_id) if self.job_id else active_item(context)


def image_bytes(image: bpy.types.Image) -> bytes:
    """Encoded bytes (PNG/JPEG/WebP) of an image datablock: its packed or on-disk file when unchanged,
    else a PNG copy written by Blender (generated or painted images)."""
    if image.packed_file is not None:
        data = bytes(image.packed_file.data)
        if data.startswith(IMAGE_MAGIC) or data[8:12] == b"WEBP":
            return data
    if image.source == "FILE" and not image.is_dirty and image.filepath:
        path = bpy.path.abspath(image.filepath, library=image.library)
        if os.path.isfile(path):
            data = Path(path).read_bytes()
            if data.startswith(IMAGE_MAGIC) or data[8:12] == b"WEBP":
                return data
    if tuple(image.size) == (0, 0):
        raise ValueError(f"Reference image '{image.name}' has no pixels (is its file missing?)")
    with tempfile.TemporaryDirectory(prefix="make_your_3d_") as tmp:
        out = Path(tmp) / "reference.png"
        if "save_copy" in bpy.types.Image.bl_rna.functions["save"].parameters:
            fmt = image.file_format
            try:
                image.file_format = "PNG"
                image.save(filepath=str(out), save_copy=True)
            finally:
                image.file_format = fmt
        else:  # older Blender: save a throwaway copy so the artist's datablock keeps its path and source
            copy = image.copy()
            try:
                copy.filepath_raw = str(out)
                copy.file_format = "PNG"
                copy.save()
            finally:
                bpy.data.images.remove(copy)
        return out.read_bytes()


# -- generate ----------------------------------------------------------------------------------
class MAKE_YOUR_3D_OT_generate(bpy.types.Operator):
    """Generate a textured 3D mesh of the reference subject with the prompt's change"""

    bl_idname = "make_your_3d.generate"
    bl_label = "Generate Subject"
    bl_options = {"REGISTER"}

    @classmethod
    def poll(cls, context):
        return _allow(cls, generate_blocker(context))

    def execute(self, context):
        props = context.scene.make_your_3d
        prefs = runtime.addon_prefs(context)
        try:
            data = image_bytes(props.image)
        except (ValueError, RuntimeError) as exc:
            props.last_error = str(exc)
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        seed = props.seed if props.seed_mode == "FIXED" else None  # None: the backend draws it (and reports it back)
        payload = {
            "image_png_b64": base64.b64encode(data).decode("ascii"),
            "prompt": props.prompt.strip(),
            "negative_prompt": props.negative_prompt.strip(),
            "subject": props.subject.strip() or None,
            "seed": seed,
            "variants": props.variants,
            "preset": props.preset,
            "faces": props.faces or None,
            "texture_size": int(props.texture_size) or None,
        }
        overrides = job_overrides(props)
        if overrides:
            payload["overrides"] = overrides
        try:
            runtime.get().submit(context.scene.name, payload, prefs, local={"image_name": props.image.name})
        except BackendError as exc:
            props.last_error = str(exc)
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        props.last_error = ""
        props.last_info = f"Submitting {props.variants} job(s)..."  # the seeds follow when the backend accepts them
        guess = expected_duration(context)
        if guess is not None and guess.warn:  # said plainly, with the fast preset offered
            props.last_info += f". {guess.text}"
            self.report({"WARNING"}, guess.text)
        return {"FINISHED"}


def last_device(props) -> str:
    """The device the most recent finished job ran on (what the backend really used)."""
    for item in reversed(list(props.history)):
        if item.device:
            return item.device
    return ""


def expected_duration(context):
    """The backend's estimate.py for the panel's preset and device, before Generate; None on the tiny
    set (its figures do not apply) or while the device kind is unknown."""
    rt = runtime.get()
    models = rt.models if rt is not None else None
    if rt is None or (models and models.get("tiny")):
        return None
    props = context.scene.make_your_3d
    prefs = runtime.addon_prefs(context)
    try:
        return rt.job_estimate(props.preset, prefs.device if prefs is not None else "auto", last_device(props))
    except BackendError:
        return None


class MAKE_YOUR_3D_OT_cancel_job(_JobOperator, bpy.types.Operator):
    """Cancel this job (it stops within one step)"""

    bl_idname = "make_your_3d.cancel_job"
    bl_label = "Cancel"
    bl_options = {"INTERNAL"}

    @classmethod
    def poll(cls, context):
        return _poll_backend_running(cls)

    def execute(self, context):
        item = self.item(context)
        if item is None or not history.is_active(item):
            self.report({"WARNING"}, "That job is not running")
            return {"CANCELLED"}
        item.cancel_requested = True
        item.stage_label = history.CANCELLING  # at once: the step in flight may take a few seconds to stop
        context.scene.make_your_3d.last_info = f"Cancelling '{item.prompt}' seed {item.seed}..."
        runtime.get().cancel(item.job_id)
        return {"FINISHED"}


class MAKE_YOUR_3D_OT_rerun_job(_JobOperator, bpy.types.Operator):
    """Run the selected job again (same image, settings and seed), or with the panel's current prompt"""

    bl_idname = "make_your_3d.rerun_job"
    bl_label = "Re-run"
    use_current_prompt: BoolProperty(name="Use current prompt", default=False, options={"SKIP_SAVE"})

    @classmethod
    def poll(cls, context):
        reason = backend_blocker(context)  # a stopped or crashed backend is started by the re-run itself
        if reason is None and active_item(context) is None:
            reason = "Select a job in the history"
        return _allow(cls, reason)

    def execute(self, context):
        props = context.scene.make_your_3d
        item = self.item(context)
        if item is None:
            return {"CANCELLED"}
        changes: dict = {}
        if self.use_current_prompt:
            if not props.prompt.strip():
                self.report({"ERROR"}, "No prompt: type the change you want first")
                return {"CANCELLED"}
            changes = {"prompt": props.prompt.strip(), "negative_prompt": props.negative_prompt.strip()}
        request = {"prompt": item.prompt, "negative_prompt": item.negative_prompt, "subject": item.subject or None,
                   "seed": item.seed, "preset": item.preset, "overrides": history.overrides_of(item) or None,
                   "image_name": item.image_name}
        try:
            runtime.get().rerun(context.scene.name, item.job_id, changes, request, runtime.addon_prefs(context))
        except BackendError as exc:
            props.last_error = str(exc)
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        props.last_error = ""
        props.last_info = "Re-running (starting the backend first)..." if runtime.get().backend_state().status == "starting" else "Re-running..."
        return {"FINISHED"}


class MAKE_YOUR_3D_OT_import_job(_JobOperator, bpy.types.Operator):
    """Import the selected job's mesh; when it is already in the scene, select it (or add a linked copy)"""

    bl_idname = "make_your_3d.import_job"
    bl_label = "Import"
    bl_options = {"REGISTER", "UNDO"}
    duplicate: BoolProperty(name="Add a copy", default=False, options={"SKIP_SAVE"},
                            description="Add a linked copy beside the one already in the scene (mesh and textures shared)")

    @classmethod
    def poll(cls, context):
        item = active_item(context)
        reason = None
        if item is None:
            reason = "Select a job in the history"
        elif item.status != "done":
            reason = f"The job is {item.status}: only finished jobs have a mesh"
        elif not (item.folder and (Path(item.folder) / "subject.glb").is_file()) and \
                (runtime.get() is None or runtime.get().backend_state().status != "running"):
            reason = "The result is not downloaded yet: start the backend"
        return _allow(cls, reason)

    def execute(self, context):
        rt = runtime.get()
        item = self.item(context)
        if item is None:
            return {"CANCELLED"}
        if item.folder and (Path(item.folder) / "subject.glb").is_file():
            obj = jobs.import_item(context, rt, context.scene, item, duplicate=self.duplicate)
            if obj is None:
                self.report({"ERROR"}, context.scene.make_your_3d.last_error or "Import failed")
                return {"CANCELLED"}
            return {"FINISHED"}
        item.imported = False
        item.import_requested = True
        rt.download(item.job_id, rt.results_dir(runtime.addon_prefs(context), item.job_id), [], True)
        return {"FINISHED"}


class MAKE_YOUR_3D_OT_open_job_folder(_JobOperator, bpy.types.Operator):
    """Open the selected job's result folder in the file browser"""

    bl_idname = "make_your_3d.open_job_folder"
    bl_label = "Open Folder"

    @classmethod
    def poll(cls, context):
        item = active_item(context)
        has_folder = item is not None and item.folder and os.path.isdir(item.folder)
        return _allow(cls, None if has_folder else "This job has no downloaded results yet")

    def execute(self, context):
        item = self.item(context)
        bpy.ops.wm.path_open(filepath=item.folder)
        return {"FINISHED"}


class MAKE_YOUR_3D_OT_remove_job(_JobOperator, bpy.types.Operator):
    """Remove the selected job from this scene's history (the imported object stays)"""

    bl_idname = "make_your_3d.remove_job"
    bl_label = "Remove"
    bl_options = {"REGISTER", "UNDO"}

    def execute(self, context):
        props = context.scene.make_your_3d
        item = self.item(context)
        if item is None:
            return {"CANCELLED"}
        index = next(i for i, it in enumerate(props.history) if it.job_id == item.job_id)
        job_id = item.job_id
        props.history.remove(index)
        props.history_index = min(props.history_index, len(props.history) - 1)
        rt = runtime.get()
        if rt is not None:
            rt.forget_preview(job_id)
        return {"FINISHED"}


class MAKE_YOUR_3D_OT_refresh_history(bpy.types.Operator):
    """Refresh job states from the backend (after a restart, interrupted jobs show up as such)"""

    bl_idname = "make_your_3d.refresh_history"
    bl_label = "Refresh"

    @classmethod
    def poll(cls, context):
        return _poll_backend_running(cls)

    def execute(self, context):
        runtime.get().sync()
        return {"FINISHED"}


class MAKE_YOUR_3D_OT_reuse_last_seed(bpy.types.Operator):
    """Use the last job's seed again (fixed seed)"""

    bl_idname = "make_your_3d.reuse_last_seed"
    bl_label = "Reuse Last Seed"
    bl_options = {"REGISTER", "UNDO"}

    @classmethod
    def poll(cls, context):
        return _allow(cls, "No job has run yet" if context.scene.make_your_3d.last_seed < 0 else None)

    def execute(self, context):
        props = context.scene.make_your_3d
        props.seed_mode = "FIXED"
        props.seed = props.last_seed
        return {"FINISHED"}


class MAKE_YOUR_3D_OT_open_image(bpy.types.Operator, ImportHelper):
    """Open an image file as the reference image"""

    bl_idname = "make_your_3d.open_image"
    bl_label = "Open Reference Image"
    bl_options = {"REGISTER", "UNDO"}

    filter_glob: StringProperty(default="*.png;*.jpg;*.jpeg;*.webp", options={"HIDDEN"})

    def execute(self, context):
        try:
            image = bpy.data.images.load(self.filepath, check_existing=True)
        except RuntimeError as exc:
            self.report({"ERROR"}, f"Cannot open {self.filepath}: {exc}")
            return {"CANCELLED"}
        context.scene.make_your_3d.image = image
        return {"FINISHED"}


class MAKE_YOUR_3D_OT_recall_job(_JobOperator, bpy.types.Operator):
    """Load this job's image, prompt, subject, seed and preset back into the panel, to tweak and run again"""

    bl_idname = "make_your_3d.recall_job"
    bl_label = "Recall Settings"
    bl_options = {"REGISTER", "UNDO"}

    def execute(self, context):
        item = self.item(context)
        if item is None:
            return {"CANCELLED"}
        note = recall(context.scene.make_your_3d, item)
        self.report({"INFO"}, note)
        return {"FINISHED"}


def recall(props, item) -> str:
    """Copy a history item's inputs into the panel; returns a sentence saying what was loaded."""
    props.prompt = item.prompt
    props.negative_prompt = item.negative_prompt
    props.subject = item.subject
    props.seed_mode = "FIXED"
    props.seed = max(int(item.seed), 0)
    if item.preset in {e.identifier for e in props.bl_rna.properties["preset"].enum_items}:
        props.preset = item.preset
    props.faces = item.faces
    sizes = {e.identifier for e in props.bl_rna.properties["texture_size"].enum_items}
    props.texture_size = str(item.texture_size) if str(item.texture_size) in sizes else "0"
    overrides = history.overrides_of(item)
    for name in OVERRIDE_FIELDS:
        setattr(props, name, overrides.get(name, 0))
    image = bpy.data.images.get(item.image_name) if item.image_name else None
    where = "its reference image"
    if image is None and item.folder and (Path(item.folder) / "input.png").is_file():
        image = bpy.data.images.load(str(Path(item.folder) / "input.png"), check_existing=True)
        image.name = f"{item.prompt[:40] or 'subject'} input"
        where = "the job's prepared input image (the original image is no longer in this file)"
    if image is not None:
        props.image = image
    else:
        where = "no image (the original is gone and the result is not downloaded): pick one"
    props.last_error = ""
    props.last_info = f"Recalled '{item.prompt}' seed {item.seed}, preset {item.preset}, with {where}"
    return props.last_info


# -- stage cache -----------------------------------------------------------------------------------
class MAKE_YOUR_3D_OT_cache_refresh(bpy.types.Operator):
    """Measure the stage cache (one per user: the finished stages a new prompt or seed reuses)"""

    bl_idname = "make_your_3d.cache_refresh"
    bl_label = "Measure Cache"

    @classmethod
    def poll(cls, context):
        return _allow(cls, python_blocker(context))

    def execute(self, context):
        runtime.get().cache_command(runtime.addon_prefs(context), "info")
        return {"FINISHED"}


class MAKE_YOUR_3D_OT_cache_clear(bpy.types.Operator):
    """Delete the cached stages (results already imported or downloaded stay); the next job computes every stage"""

    bl_idname = "make_your_3d.cache_clear"
    bl_label = "Clear Cache"

    @classmethod
    def poll(cls, context):
        reason = python_blocker(context)
        if reason is None and any(history.is_active(i) for sc in bpy.data.scenes if hasattr(sc, "make_your_3d")
                                  for i in sc.make_your_3d.history):
            reason = "Jobs are running: clear the cache once they finish"
        return _allow(cls, reason)

    def invoke(self, context, event):
        return context.window_manager.invoke_confirm(self, event)

    def execute(self, context):
        runtime.get().cache_command(runtime.addon_prefs(context), "clear")
        return {"FINISHED"}


# -- backend and models (preferences) -------------------------------------------------------------
class MAKE_YOUR_3D_OT_remote_test(bpy.types.Operator):
    """Connect to the remote backend with the URL, token and fingerprint set here (nothing is sent if the certificate differs)"""

    bl_idname = "make_your_3d.remote_test"
    bl_label = "Test Connection"

    @classmethod
    def poll(cls, context):
        rt = runtime.get()
        if rt is None:
            return _allow(cls, "Make-Your-3D is not enabled")
        rt.configure_remote(runtime.addon_prefs(context))
        return _allow(cls, rt.remote_problem() or (None if rt.remote is not None else "Choose the Remote backend first"))

    def execute(self, context):
        runtime.get().test_remote()
        self.report({"INFO"}, "Testing the connection...")
        return {"FINISHED"}



class MAKE_YOUR_3D_OT_backend_start(bpy.types.Operator):
    """Start the backend service"""

    bl_idname = "make_your_3d.backend_start"
    bl_label = "Start"

    @classmethod
    def poll(cls, context):
        rt = runtime.get()
        if rt is None:
            return False
        st = rt.backend_state()
        if st.status in ("running", "starting"):
            return _allow(cls, f"The backend is already {st.status}")
        return _allow(cls, rt.python_problem(runtime.addon_prefs(context)))

    def execute(self, context):
        try:
            runtime.get().start_backend(runtime.addon_prefs(context))
        except BackendError as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        return {"FINISHED"}


class MAKE_YOUR_3D_OT_backend_stop(bpy.types.Operator):
    """Stop the backend service (running jobs come back as interrupted)"""

    bl_idname = "make_your_3d.backend_stop"
    bl_label = "Stop"

    @classmethod
    def poll(cls, context):
        rt = runtime.get()
        running = rt is not None and rt.backend_state().status in ("running", "starting")
        return _allow(cls, None if running else "The backend is not running")

    def execute(self, context):
        runtime.get().stop_backend()
        return {"FINISHED"}


class MAKE_YOUR_3D_OT_backend_open_log(bpy.types.Operator):
    """Open the backend's log file"""

    bl_idname = "make_your_3d.backend_open_log"
    bl_label = "Open Log"

    @classmethod
    def poll(cls, context):
        rt = runtime.get()
        has_log = rt is not None and rt.log_file.is_file()
        return _allow(cls, None if has_log else "No log yet: the backend has not been started")

    def execute(self, context):
        bpy.ops.wm.path_open(filepath=str(runtime.get().log_file))
        return {"FINISHED"}


class MAKE_YOUR_3D_OT_install_backend(bpy.types.Operator):
    """Create a Python virtual environment and install the bundled backend with its dependencies (downloads several GB)"""

    bl_idname = "make_your_3d.install_backend"
    bl_label = "Install Backend"

    @classmethod
    def poll(cls, context):
        rt = runtime.get()
        if not bpy.app.online_access:
            return _allow(cls, "Online access is off: allow it in Preferences > System > Network")
        installing = rt is None or (rt.install_task is not None and rt.install_task.state().running)
        return _allow(cls, "An installation is already running" if installing else None)

    def execute(self, context):
        try:
            runtime.get().install_backend(sys.executable)
        except BackendError as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        return {"FINISHED"}


class MAKE_YOUR_3D_OT_models_refresh(bpy.types.Operator):
    """Ask the backend which model weights are present"""

    bl_idname = "make_your_3d.models_refresh"
    bl_label = "Refresh"

    @classmethod
    def poll(cls, context):
        return _poll_backend_running(cls)

    def execute(self, context):
        runtime.get().refresh_models()
        return {"FINISHED"}


class MAKE_YOUR_3D_OT_models_fetch(bpy.types.Operator):
    """Download the published model weights into the models directory (models fetch)"""

    bl_idname = "make_your_3d.models_fetch"
    bl_label = "Fetch Weights"

    @classmethod
    def poll(cls, context):
        rt = runtime.get()
        if not bpy.app.online_access:
            reason = "Online access is off: allow it in Preferences > System > Network"
        elif rt is not None and rt.fetch_task is not None and rt.fetch_task.state().running:
            reason = "A download is already running"
        else:
            reason = python_blocker(context)
        return _allow(cls, reason)

    def execute(self, context):
        runtime.get().fetch_models(runtime.addon_prefs(context))
        return {"FINISHED"}


class MAKE_YOUR_3D_OT_test_device(bpy.types.Operator):
    """Run the whole chain on tiny random models on the chosen device and precision (about a minute, no weights needed) and report pass or fail, seconds and peak memory"""

    bl_idname = "make_your_3d.test_device"
    bl_label = "Test Device"

    @classmethod
    def poll(cls, context):
        rt = runtime.get()
        if rt is not None and rt.selftest_task is not None and rt.selftest_task.state().running:
            return _allow(cls, "The device test is running")
        return _allow(cls, python_blocker(context))

    def execute(self, context):
        runtime.get().test_device(runtime.addon_prefs(context))
        return {"FINISHED"}


CLASSES = (
    MAKE_YOUR_3D_OT_generate,
    MAKE_YOUR_3D_OT_cancel_job,
    MAKE_YOUR_3D_OT_rerun_job,
    MAKE_YOUR_3D_OT_import_job,
    MAKE_YOUR_3D_OT_open_job_folder,
    MAKE_YOUR_3D_OT_remove_job,
    MAKE_YOUR_3D_OT_refresh_history,
    MAKE_YOUR_3D_OT_reuse_last_seed,
    MAKE_YOUR_3D_OT_open_image,
    MAKE_YOUR_3D_OT_recall_job,
    MAKE_YOUR_3D_OT_cache_refresh,
    MAKE_YOUR_3D_OT_cache_clear,
    MAKE_YOUR_3D_OT_remote_test,
    MAKE_YOUR_3D_OT_backend_start,
    MAKE_YOUR_3D_OT_backend_stop,
    MAKE_YOUR_3D_OT_backend_open_log,
    MAKE_YOUR_3D_OT_install_backend,
    MAKE_YOUR_3D_OT_models_refresh,
    MAKE_YOUR_3D_OT_models_fetch,
    MAKE_YOUR_3D_OT_test_device,
)
