"""The panel's settings, stored per scene (`scene.make_your_3d`)."""

from __future__ import annotations

import bpy
from bpy.props import (BoolProperty, CollectionProperty, EnumProperty, FloatProperty, IntProperty, PointerProperty,
                       StringProperty)

from .history import MAKE_YOUR_3D_PG_history_item
from .importer import DEFAULT_HEIGHT

PRESETS = [
    ("fast", "Fast", "Fewer steps and a smaller mesh: a quick look"),
    ("default", "Default", "The published settings"),
    ("quality", "Quality", "More steps, a larger mesh and texture"),
    ("lowvram", "Low VRAM", "Slower, for GPUs with little memory"),
]
TEXTURE_SIZES = [
    ("0", "Preset", "The preset's texture size"),
    ("512", "512", ""),
    ("1024", "1024", ""),
    ("2048", "2048", ""),
    ("4096", "4096", ""),
]


def _unit_scale(props) -> float:
    scene = props.id_data
    scale = scene.unit_settings.scale_length if isinstance(scene, bpy.types.Scene) else 1.0
    return scale if scale > 0 else 1.0


def _get_height(self) -> float:
    """The height in scene units (what a LENGTH property holds): metres / unit scale."""
    return self.height_m / _unit_scale(self)


def _set_height(self, value: float) -> None:
    self.height_m = value * _unit_scale(self)


class MAKE_YOUR_3D_PG_scene(bpy.types.PropertyGroup):
    image: PointerProperty(name="Reference image", type=bpy.types.Image,
                           description="The subject: an image with the subject on a plain or transparent background")
    prompt: StringProperty(name="Prompt", description='The change you want, e.g. "wearing a red scarf"')
    negative_prompt: StringProperty(name="Negative prompt", description="What to avoid")
    subject: StringProperty(name="Subject", description='A short description of the subject, e.g. "a toy robot" (optional)')
    seed_mode: EnumProperty(name="Seed", items=[("RANDOM", "Random", "A new seed every click"),
                                                ("FIXED", "Fixed", "Use the seed below")], default="RANDOM")
    seed: IntProperty(name="Seed", default=0, min=0, max=2**31 - 1)
    last_seed: IntProperty(name="Last seed", default=-1)
    variants: IntProperty(name="Variants", description="Jobs per click, with seeds seed, seed+1, ...", default=1, min=1, max=16)
    preset: EnumProperty(name="Preset", items=PRESETS, default="default")
    faces: IntProperty(name="Face budget", description="Triangles in the mesh (500 to 500000; 0: the preset's count)",
                       default=0, min=0, max=500_000, soft_max=200_000)
    texture_size: EnumProperty(name="Texture size", items=TEXTURE_SIZES, default="0")
    auto_import: BoolProperty(name="Import when done", default=True)
    quad_remesh: BoolProperty(name="Quad remesh", default=False,
                              description="After import, make a quad-dominant copy (QuadriFlow) with colour and shading baked onto it; "
                                          "the triangle original stays hidden")
    quad_faces: IntProperty(name="Quad faces", description="Target face count of the quad remesh", default=10_000, min=100, max=200_000)
    # The height is kept in metres (a physical size, whatever the scene's unit scale) and shown through
    # `height` in the scene's units: Blender stores a LENGTH property in scene units and displays it
    # times the unit scale, so a plain 0.3 default was 3 mm in a centimetre scene.
    height_m: FloatProperty(name="Height (metres)", default=DEFAULT_HEIGHT, min=0.0, options={"HIDDEN"})
    height: FloatProperty(name="Height", min=0.0, soft_max=10.0, subtype="DISTANCE", unit="LENGTH", get=_get_height, set=_set_height,
                          description="Height of the imported mesh, standing on the 3D cursor (0: keep the size it comes with, about 2 m)")
    # Advanced: the job's own sampling settings (0: the preset's value); the backend checks the ranges too
    mv_steps: IntProperty(name="Multi-view steps", description="Diffusion steps of the multi-view model (0: preset)",
                          default=0, min=0, max=200)
    mv_guidance: FloatProperty(name="Multi-view guidance", description="Guidance scale of the multi-view model (0: preset)",
                               default=0.0, min=0.0, max=30.0)
    sd_steps: IntProperty(name="Edit steps", description="Diffusion steps of the personalized model (0: preset)",
                          default=0, min=0, max=200)
    sd_guidance: FloatProperty(name="Edit guidance", description="How strongly the prompt steers the edit (0: preset)",
                               default=0.0, min=0.0, max=30.0)
    edit_strength: FloatProperty(name="Edit strength", description="How far an edit may move away from the subject (0: preset)",
                                 default=0.0, min=0.0, max=1.0)
    ip_scale: FloatProperty(name="Subject weight", description="How much the subject image counts (IP-Adapter scale; 0: preset)",
                            default=0.0, min=0.0, max=2.0)
    history: CollectionProperty(type=MAKE_YOUR_3D_PG_history_item)
    history_index: IntProperty(name="History index", default=-1)
    last_error: StringProperty(name="Last error")
    last_info: StringProperty(name="Last info")


# Advanced fields sent as the job's `overrides` when set (the service's names); 0 means "the preset's".
OVERRIDE_FIELDS = ("mv_steps", "mv_guidance", "sd_steps", "sd_guidance", "edit_strength", "ip_scale")


def job_overrides(props) -> dict:
    """The Advanced fields the artist set, as the API's `overrides` object."""
    return {name: getattr(props, name) for name in OVERRIDE_FIELDS if getattr(props, name) > 0}


CLASSES = (MAKE_YOUR_3D_PG_scene,)


def register() -> None:
    bpy.types.Scene.make_your_3d = PointerProperty(type=MAKE_YOUR_3D_PG_scene)


def unregister() -> None:
    del bpy.types.Scene.make_your_3d
