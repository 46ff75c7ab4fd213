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
    height: FloatProperty(name="Height", default=DEFAULT_HEIGHT, min=0.0, soft_max=10.0, subtype="DISTANCE", unit="LENGTH",
                          description="Height of the imported mesh, standing on the 3D cursor (0: keep the size it comes with, about 2 m)")
    history: CollectionProperty(type=MAKE_YOUR_3D_PG_history_item)
    history_index: IntProperty(name="History index", default=-1)
    last_error: StringProperty(name="Last error")
    last_info: StringProperty(name="Last info")


CLASSES = (MAKE_YOUR_3D_PG_scene,)


def register() -> None:
    bpy.types.Scene.make_your_3d = PointerProperty(type=MAKE_YOUR_3D_PG_scene)


def unregister() -> None:
    del bpy.types.Scene.make_your_3d
