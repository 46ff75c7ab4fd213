"""Make-Your-3D backend: subject image + text edit -> textured GLB.

No bpy anywhere in this package; the Blender add-on talks to it over the local HTTP API.
"""

__version__ = "0.1.0"
