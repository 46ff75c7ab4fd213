"""Where models and job data live by default (overridable by flags and environment variables)."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

MODELS_ENV = "MAKE_YOUR_3D_MODELS"
DATA_ENV = "MAKE_YOUR_3D_DATA"


def default_models_dir() -> Path:
    env = os.environ.get(MODELS_ENV)
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_data_dir("make-your-3d")) / "models"


def default_data_dir() -> Path:
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_data_dir("make-your-3d")) / "data"


def resolve_models_dir(arg: str | os.PathLike | None) -> Path:
    return Path(arg).expanduser() if arg else default_models_dir()
