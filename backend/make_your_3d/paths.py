"""Where models, job data and the stage cache live by default (overridable by flags and
environment variables). One stage cache per user, not per output folder: a second `generate` into
another folder, the demo and the Blender service all reuse the same finished stages."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

APP_NAME = "make-your-3d"
MODELS_ENV = "MAKE_YOUR_3D_MODELS"
DATA_ENV = "MAKE_YOUR_3D_DATA"
CACHE_ENV = "MAKE_YOUR_3D_CACHE"


def default_models_dir() -> Path:
    env = os.environ.get(MODELS_ENV)
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_data_dir(APP_NAME)) / "models"


def default_data_dir() -> Path:
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_data_dir(APP_NAME)) / "data"


def default_cache_dir() -> Path:
    """The user's stage cache: $MAKE_YOUR_3D_CACHE, else the platform's user cache folder
    (~/.cache/make-your-3d/stages on Linux)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_cache_dir(APP_NAME)) / "stages"


def resolve_models_dir(arg: str | os.PathLike | None) -> Path:
    return Path(arg).expanduser() if arg else default_models_dir()


def resolve_cache_dir(arg: str | os.PathLike | None) -> Path:
    return Path(arg).expanduser() if arg else default_cache_dir()
