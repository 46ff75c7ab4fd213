"""Add-on preferences: backend interpreter and process, models, device, output folder, port."""

from __future__ import annotations

import bpy
from bpy.props import BoolProperty, EnumProperty, IntProperty, StringProperty

from . import runtime

DEVICES = [
    ("auto", "Auto", "CUDA when available, then Apple's GPU, else CPU"),
    ("cuda", "CUDA", "NVIDIA GPU"),
    ("mps", "Apple GPU", "Apple Silicon's GPU (Metal); never tested on a Mac by the developers: press Test Device"),
    ("cpu", "CPU", "Slow, but works everywhere"),
]
PRECISIONS = [
    ("auto", "Auto", "fp16 on CUDA and Apple's GPU, fp32 on CPU"),
    ("fp16", "fp16", "Half precision (GPUs)"),
    ("bf16", "bf16", "bfloat16 (recent CUDA GPUs)"),
    ("fp32", "fp32", "Full precision: most memory, most exact"),
]
BACKEND_MODES = [
    ("LOCAL", "This computer", "Start the bundled backend here and talk to it over loopback"),
    ("REMOTE", "Remote backend", "A studio's GPU machine running `make-your-3d serve --allow-remote`: HTTPS, your own user token"),
]
TEXTURE_MODES = [
    ("PACK", "Pack into .blend", "The texture travels with the .blend file"),
    ("LINK", "Link to job folder", "The texture stays a file next to the job's results"),
]


def _remote_changed(self, context: bpy.types.Context) -> None:
    rt = runtime.get()
    if rt is not None:
        rt.configure_remote(self)


class MAKE_YOUR_3D_AP_preferences(bpy.types.AddonPreferences):
    bl_idname = runtime.PACKAGE

    python_path: StringProperty(
        name="Backend Python", subtype="FILE_PATH",
        description="Python interpreter with the backend's dependencies (empty: the one Install backend creates)")
    models_dir: StringProperty(name="Models directory", subtype="DIR_PATH",
                               description="Where model weights live (empty: the backend's default user folder)")
    data_dir: StringProperty(name="Output directory", subtype="DIR_PATH",
                             description="Job database and results (empty: the add-on's user folder)")
    device: EnumProperty(name="Device", items=DEVICES, default="auto")
    precision: EnumProperty(name="Precision", items=PRECISIONS, default="auto")
    port: IntProperty(name="Port", description="Backend port on 127.0.0.1 (0: any free port)", default=0, min=0, max=65535)
    config_file: StringProperty(name="Backend config", subtype="FILE_PATH",
                                description='Optional JSON for `serve --config`: {"overrides": {preset values}, "progress_interval_s": s}')
    texture_mode: EnumProperty(name="Textures", items=TEXTURE_MODES, default="PACK")
    frame_new: BoolProperty(name="Frame new results", default=True,
                            description="After an import, move a 3D view that does not show the new object so it does")
    hf_token: StringProperty(name="Hugging Face token", subtype="PASSWORD",
                             description="Only for gated model repositories; used by Fetch, never stored in .blend files")
    backend_mode: EnumProperty(name="Backend", items=BACKEND_MODES, default="LOCAL", update=_remote_changed,
                               description="Where jobs run: this computer, or a remote backend")
    remote_url: StringProperty(name="URL", update=_remote_changed,
                               description="The remote backend's address, e.g. https://gpu-box.studio:8765 (its operator gives it)")
    remote_token: StringProperty(name="Token", subtype="PASSWORD", update=_remote_changed,
                                 description="Your user token from `make-your-3d users add NAME` (kept in the preferences, never in .blend files)")
    remote_fingerprint: StringProperty(name="Certificate fingerprint", update=_remote_changed,
                                       description="The SHA-256 fingerprint the backend printed when it started; the connection is refused, "
                                                   "before the token is sent, if the backend shows another certificate. Empty: trust "
                                                   "certificates signed by an authority this computer knows")

    def draw(self, context: bpy.types.Context) -> None:
        rt = runtime.get()
        layout = self.layout

        layout.prop(self, "backend_mode", expand=True)
        if self.backend_mode == "REMOTE":
            box = layout.box()
            box.label(text="Remote backend", icon="URL")
            box.prop(self, "remote_url")
            box.prop(self, "remote_token")
            box.prop(self, "remote_fingerprint")
            box.operator("make_your_3d.remote_test", icon="LINKED")
            problem = rt.remote_problem() if rt is not None else None
            if problem:
                box.label(text=problem[:180], icon="ERROR")
            elif rt is not None and rt.remote_checked:
                box.label(text=rt.remote_checked[:180], icon="INFO")

        box = layout.box()
        box.label(text="Backend on this computer", icon="CONSOLE")
        box.prop(self, "python_path")
        problem = rt.python_problem(self) if rt is not None else None
        if problem:
            box.label(text=problem[:180], icon="ERROR")
        row = box.row(align=True)
        row.operator("make_your_3d.install_backend", icon="IMPORT")
        if rt is not None:
            _draw_task(box, rt.install_task, "Install")
            st = rt.backend_state()
            icon = {"running": "CHECKMARK", "starting": "TIME", "crashed": "ERROR"}.get(st.status, "RADIOBUT_OFF")
            box.label(text=st.message, icon=icon)
        row = box.row(align=True)
        row.operator("make_your_3d.backend_start", icon="PLAY")
        row.operator("make_your_3d.backend_stop", icon="SNAP_FACE")
        row.operator("make_your_3d.backend_open_log", icon="TEXT")
        if rt is not None and st.status == "running" and rt.restart_needed(self):
            box.label(text="Device, precision, port, models or output changed: Stop and Start the backend to apply", icon="FILE_REFRESH")
        col = box.column(align=True)
        col.prop(self, "device")
        col.prop(self, "precision")
        row = box.row(align=True)
        row.operator("make_your_3d.test_device", icon="EXPERIMENTAL")
        if rt is not None and rt.selftest_task is not None:
            st = rt.selftest_task.state()
            if st.running:
                box.label(text=f"Testing the device: {st.line[:100] or 'starting'}", icon="TIME")
            else:
                box.label(text=rt.selftest_report or (st.error or "")[:160], icon="ERROR" if st.error else "CHECKMARK")
        col.prop(self, "port")
        col.prop(self, "config_file")

        box = layout.box()
        box.label(text="Models", icon="FILE_3D")
        box.prop(self, "models_dir")
        models = rt.models if rt is not None else None
        if models:
            tiny = " (tiny test set)" if models.get("tiny") else ""
            box.label(text=f"{models.get('models_dir', '')}{tiny}", icon="FILE_FOLDER")
            for role in models.get("roles", []):
                r = box.row()
                ok = bool(role.get("complete"))
                r.label(text=str(role.get("title") or role.get("name")), icon="CHECKMARK" if ok else "ERROR")
                r.label(text=str(role.get("licence", "")))
                if not ok:
                    r.label(text=f"missing {len(role.get('missing', []))} file(s)")
        elif rt is not None and rt.models_error:
            box.label(text=rt.models_error, icon="ERROR")
        else:
            box.label(text="Start the backend to see which weights are present", icon="INFO")
        row = box.row(align=True)
        row.operator("make_your_3d.models_refresh", icon="FILE_REFRESH")
        row.operator("make_your_3d.models_fetch", icon="URL")
        box.prop(self, "hf_token")
        if rt is not None:
            _draw_task(box, rt.fetch_task, "Fetch")

        box = layout.box()
        box.label(text="Results", icon="OUTPUT")
        box.prop(self, "data_dir")
        box.prop(self, "texture_mode")
        box.prop(self, "frame_new")
        cache = rt.cache_info if rt is not None else None
        row = box.row(align=True)
        if cache:
            row.label(text=f"Stage cache: {runtime.format_bytes(int(cache.get('bytes', 0)))} "
                           f"({int(cache.get('entries', 0))} stage results) in {cache.get('path', '')}", icon="DISK_DRIVE")
        else:
            row.label(text="Stage cache: press Measure to see its size", icon="DISK_DRIVE")
        row = box.row(align=True)
        row.operator("make_your_3d.cache_refresh", icon="FILE_REFRESH")
        row.operator("make_your_3d.cache_clear", icon="TRASH")


def _draw_task(layout: bpy.types.UILayout, task, label: str) -> None:
    if task is None:
        return
    st = task.state()
    if st.running:
        layout.progress(factor=st.factor, type="BAR", text=f"{label}: step {st.step}/{st.total} {st.title}")
        layout.label(text=st.line[:120] or "...")
    elif st.error:
        layout.label(text=st.error[:160], icon="ERROR")
    else:
        layout.label(text=f"{label}: done", icon="CHECKMARK")


CLASSES = (MAKE_YOUR_3D_AP_preferences,)
