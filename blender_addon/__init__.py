# SPDX-License-Identifier: GPL-3.0-or-later
"""Make-Your-3D for Blender: subject image + text edit -> textured mesh, from the 3D viewport.

bpy and the standard library only. The heavy lifting runs in the backend service (a separate
Python process with torch), which this add-on starts on demand and talks to over loopback HTTP.
"""

from __future__ import annotations

import bpy
from bpy.app.handlers import persistent

from . import history, jobs, operators, panel, preferences, props, quad, runtime

_CLASSES = (*history.CLASSES, *props.CLASSES, *preferences.CLASSES, *operators.CLASSES, *quad.CLASSES, *panel.CLASSES)


@persistent
def _on_load_post(*_args) -> None:
    """After opening a .blend: follow its unfinished jobs again if the backend runs."""
    rt = runtime.get()
    if rt is not None and rt.backend_state().status == "running":
        rt.sync()


def register() -> None:
    for cls in _CLASSES:
        bpy.utils.register_class(cls)
    props.register()
    runtime.set_current(runtime.Runtime(runtime.user_dir(), jobs.apply_event))
    bpy.app.timers.register(jobs.tick, first_interval=jobs.TICK_SECONDS, persistent=True)
    bpy.app.handlers.load_post.append(_on_load_post)


def unregister() -> None:
    if _on_load_post in bpy.app.handlers.load_post:
        bpy.app.handlers.load_post.remove(_on_load_post)
    if bpy.app.timers.is_registered(jobs.tick):
        bpy.app.timers.unregister(jobs.tick)
    rt = runtime.get()
    runtime.set_current(None)
    if rt is not None:
        rt.shutdown()
    props.unregister()
    for cls in reversed(_CLASSES):
        bpy.utils.unregister_class(cls)
