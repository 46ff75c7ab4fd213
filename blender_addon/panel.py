"""The "Make-Your-3D" tab in the 3D viewport's sidebar (N panel)."""

from __future__ import annotations

import bpy

from . import history, operators, progress, runtime


class MAKE_YOUR_3D_UL_history(bpy.types.UIList):
    """History rows: preview thumbnail, name from prompt and seed, status."""

    def draw_item(self, context, layout, data, item, icon, active_data, active_property, index=0, flt_flag=0):
        rt = runtime.get()
        icon_id = rt.preview_icon(item) if rt is not None else 0
        row = layout.row(align=True)
        if icon_id:
            row.label(text="", icon_value=icon_id)
        else:
            row.label(text="", icon=history.status_icon(item.status))
        row.label(text=f"{item.prompt or '(no prompt)'}  s{item.seed}")
        status = item.status
        if item.status == "running":
            status = f"{int(round(item.job_progress * 100))}%"
        row.label(text=status, icon=history.status_icon(item.status) if icon_id else "NONE")


class _SidebarPanel:
    """Mixin: where every panel of the add-on sits (the 3D viewport's sidebar, its own tab)."""

    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "Make-Your-3D"


class VIEW3D_PT_make_your_3d(_SidebarPanel, bpy.types.Panel):
    bl_label = "Make-Your-3D"
    bl_idname = "VIEW3D_PT_make_your_3d"

    def draw(self, context):
        layout = self.layout
        props = context.scene.make_your_3d
        rt = runtime.get()

        if rt is not None and rt.remote is not None:
            layout.label(text=f"Backend: remote, {rt.remote.url}", icon="URL")
        elif rt is not None and rt.remote_problem():
            layout.label(text=rt.remote_problem()[:180], icon="ERROR")
        elif rt is not None:
            st = rt.backend_state()
            if st.status == "running" and rt.restart_needed(runtime.addon_prefs(context)):
                layout.label(text="Preferences changed: restart the backend to apply them", icon="FILE_REFRESH")
            row = layout.row(align=True)
            icon = {"running": "CHECKMARK", "starting": "TIME", "crashed": "ERROR"}.get(st.status, "RADIOBUT_OFF")
            device = last_device(props)
            row.label(text=f"Backend: {st.status}" + (f" (last job on {device})" if device and st.status == "running" else ""), icon=icon)
            if st.status in ("running", "starting"):
                row.operator("make_your_3d.backend_stop", text="", icon="SNAP_FACE")
            else:
                row.operator("make_your_3d.backend_start", text="", icon="PLAY")

        col = layout.column(align=True)
        col.label(text="Reference image")
        col.template_ID(props, "image", open="make_your_3d.open_image")
        if props.image is not None:
            preview = props.image.preview_ensure() if hasattr(props.image, "preview_ensure") else props.image.preview
            if preview is not None:
                col.template_icon(icon_value=preview.icon_id, scale=6.0)

        col = layout.column(align=True)
        _text_prop(col, props, "prompt", "the change, e.g. wearing a red scarf")
        _text_prop(col, props, "negative_prompt", "what to avoid")
        _text_prop(col, props, "subject", "optional, e.g. a toy robot")

        col = layout.column(align=True)
        row = col.row(align=True)
        row.prop(props, "seed_mode", expand=True)
        row = col.row(align=True)
        sub = row.row(align=True)
        sub.enabled = props.seed_mode == "FIXED"
        sub.prop(props, "seed")
        row.operator("make_your_3d.reuse_last_seed", text="", icon="RECOVER_LAST")
        col.prop(props, "variants")
        col.prop(props, "preset")
        col.prop(props, "faces")
        col.prop(props, "texture_size")
        col.prop(props, "height")
        col.prop(props, "auto_import")
        row = col.row(align=True)
        row.prop(props, "quad_remesh")
        sub = row.row(align=True)
        sub.active = props.quad_remesh
        sub.prop(props, "quad_faces", text="Faces")
        col.operator("make_your_3d.quad_remesh", icon="MOD_REMESH")

        col = layout.column()
        col.scale_y = 1.5
        col.operator("make_your_3d.generate", icon="MESH_MONKEY")
        reason = operators.generate_blocker(context)
        if reason:
            layout.label(text=reason, icon="INFO")
        guess = operators.expected_duration(context)
        if guess is not None:
            _message_box(layout, guess.text, "ERROR" if guess.warn else "TIME")
        if rt is not None and rt.pending:
            layout.label(text="Submitting (starting the backend if needed)...", icon="TIME")
        models = rt.models if rt is not None else None
        if models and models.get("tiny"):
            _message_box(layout, TINY_WARNING, "ERROR")
        if props.last_error:
            _message_box(layout, props.last_error, "ERROR")
        elif props.last_info:
            _message_box(layout, props.last_info, "INFO")


class VIEW3D_PT_make_your_3d_advanced(_SidebarPanel, bpy.types.Panel):
    """The job's own sampling settings; 0 keeps the preset's value."""

    bl_label = "Advanced"
    bl_idname = "VIEW3D_PT_make_your_3d_advanced"
    bl_parent_id = "VIEW3D_PT_make_your_3d"
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context):
        layout = self.layout
        props = context.scene.make_your_3d
        layout.label(text="0 keeps the preset's value", icon="INFO")
        col = layout.column(align=True)
        col.prop(props, "mv_steps")
        col.prop(props, "mv_guidance")
        col = layout.column(align=True)
        col.prop(props, "sd_steps")
        col.prop(props, "sd_guidance")
        col.prop(props, "edit_strength")
        col.prop(props, "ip_scale")


class VIEW3D_PT_make_your_3d_jobs(_SidebarPanel, bpy.types.Panel):
    bl_label = "Running"
    bl_idname = "VIEW3D_PT_make_your_3d_jobs"
    bl_parent_id = "VIEW3D_PT_make_your_3d"

    def draw(self, context):
        layout = self.layout
        active = [item for item in context.scene.make_your_3d.history if history.is_active(item)]
        if not active:
            layout.label(text="No running jobs")
            return
        rt = runtime.get()
        shown_sets: set[str] = set()
        for item in active:
            box = layout.box()
            siblings = [i for i in active if i.group and i.group == item.group]
            if len(siblings) > 1 and item.group not in shown_sets and rt is not None:
                shown_sets.add(item.group)
                left_all = progress.set_seconds_left([(i.status, i.job_eta_s if i.job_eta_s >= 0 else None) for i in siblings],
                                                     rt.stage_times.expectation(item.preset, rt.stage_plan()))
                total = f"about {history.format_seconds(left_all)} left in all" if left_all is not None else "estimating the time left"
                box.label(text=f"Set of {len(siblings)} variants: {total}", icon="TIME")
            row = box.row(align=True)
            label = item.stage_label or item.status.capitalize()
            row.progress(factor=item.job_progress, type="BAR", text=f"{label}  {int(round(item.job_progress * 100))}%")
            op = row.operator("make_your_3d.cancel_job", text="", icon="CANCEL")
            op.job_id = item.job_id
            left = f"about {history.format_seconds(item.job_eta_s)} left" if item.job_eta_s >= 0 else "estimating time left"
            box.label(text=f"{item.prompt[:28]}  s{item.seed}  {history.format_seconds(history.elapsed_now(item, rt.since_record(item.job_id) if rt else 0.0))} elapsed, {left}")


class VIEW3D_PT_make_your_3d_history(_SidebarPanel, bpy.types.Panel):
    bl_label = "History"
    bl_idname = "VIEW3D_PT_make_your_3d_history"
    bl_parent_id = "VIEW3D_PT_make_your_3d"

    def draw(self, context):
        layout = self.layout
        props = context.scene.make_your_3d
        row = layout.row()
        row.template_list("MAKE_YOUR_3D_UL_history", "", props, "history", props, "history_index", rows=4)
        col = row.column(align=True)
        col.operator("make_your_3d.refresh_history", text="", icon="FILE_REFRESH")
        col.operator("make_your_3d.remove_job", text="", icon="X")
        item = operators.active_item(context)
        if item is None:
            return
        rt = runtime.get()
        icon_id = rt.preview_icon(item) if rt is not None else 0
        if icon_id:
            layout.template_icon(icon_value=icon_id, scale=5.0)
        box = layout.box()
        box.label(text=f"{item.status}: {item.prompt}", icon=history.status_icon(item.status))
        box.label(text=f"seed {item.seed}, preset {item.preset}" + (f", ran on {item.device}" if item.device else "")
                  + f", job {item.job_id[:8]}")
        if item.backend:
            box.label(text="backend: this computer" if item.backend == "local" else f"backend: {item.backend}", icon="URL"
                      if item.backend != "local" else "CONSOLE")
        if item.subject:
            box.label(text=f"subject: {item.subject}")
        if item.error_message:
            for line in _wrap(item.error_message, 48):
                box.label(text=line)
        grid = layout.grid_flow(columns=2, align=True)
        down = rt is None or rt.backend_state().status not in ("running", "starting")
        rerun_text = "Restart and re-run" if item.status == "interrupted" and down else "Re-run"
        grid.operator("make_your_3d.rerun_job", text=rerun_text, icon="FILE_REFRESH")
        op = grid.operator("make_your_3d.rerun_job", text="Re-run, current prompt", icon="GREASEPENCIL")
        op.use_current_prompt = True
        grid.operator("make_your_3d.import_job", text="Import again", icon="IMPORT")
        grid.operator("make_your_3d.import_job", text="Add a Copy", icon="DUPLICATE").duplicate = True
        grid.operator("make_your_3d.open_job_folder", icon="FILE_FOLDER")
        grid.operator("make_your_3d.recall_job", icon="RECOVER_LAST")


TINY_WARNING = ("Tiny test models in use: the results are noise, not your subject. "
                "For real results press Fetch Weights in Preferences > Add-ons > Make-Your-3D.")


def last_device(props) -> str:
    """The device the most recent finished job ran on (what the backend really used)."""
    return operators.last_device(props)


def _text_prop(layout: bpy.types.UILayout, data, name: str, hint: str) -> None:
    """A text field with a grey hint where this Blender supports placeholders (newer than 4.2)."""
    if "placeholder" in bpy.types.UILayout.bl_rna.functions["prop"].parameters:
        layout.prop(data, name, placeholder=hint)
    else:
        layout.prop(data, name)


def _message_box(layout: bpy.types.UILayout, text: str, icon: str) -> None:
    """A box with `text` wrapped to the sidebar's width, `icon` on its first line."""
    box = layout.box()
    for i, line in enumerate(_wrap(text, 48)):
        box.label(text=line, icon=icon if i == 0 else "BLANK1")


def _wrap(text: str, width: int) -> list[str]:
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    if line:
        lines.append(line)
    return lines or [""]


CLASSES = (MAKE_YOUR_3D_UL_history, VIEW3D_PT_make_your_3d, VIEW3D_PT_make_your_3d_advanced, VIEW3D_PT_make_your_3d_jobs,
           VIEW3D_PT_make_your_3d_history)
