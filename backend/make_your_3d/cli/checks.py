"""Argument types and input checks for the command line, run before any heavy import (torch,
diffusers), so a typo or a wrong path is answered in well under a second with a sentence, not a
traceback. Standard library only."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from make_your_3d.errors import BadImage, BadPrompt, BadRequest, BadViews, WeightsMissing
from make_your_3d.files import check_writable
from make_your_3d.job_params import FACES_RANGE, SEED_MAX, TEXTURE_SIZES, VARIANTS_RANGE  # noqa: F401 - used by the parser

DEVICES = ("auto", "cpu", "cuda", "mps")
IMAGE_MAGIC = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG"}


def device(value: str) -> str:
    """auto, cpu, cuda or cuda:N."""
    v = value.strip().lower()
    if v in DEVICES or (v.startswith("cuda:") and v[5:].isdigit()):
        return v
    raise argparse.ArgumentTypeError(f"invalid choice {value!r} (choose from auto, cpu, cuda, cuda:N, mps)")


def int_range(lo: int, hi: int | None = None, what: str = "value"):
    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
        if n < lo or (hi is not None and n > hi):
            bound = f"from {lo} to {hi}" if hi is not None else f"at least {lo}"
            raise argparse.ArgumentTypeError(f"{what} must be {bound}, not {n}")
        return n

    parse.__name__ = what  # argparse names the type in its messages
    return parse


def non_negative_float(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not math.isfinite(x) or x < 0:
        raise argparse.ArgumentTypeError(f"must be a number of at least 0, not {value}")
    return x


def texture_size(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n not in TEXTURE_SIZES:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(map(str, TEXTURE_SIZES))}, not {value}")
    return n


# --- checks of the things the arguments name ---------------------------------------------------
def image_file(path_arg: str) -> Path:
    """The subject image: an existing, readable PNG, JPEG or WebP file (checked from its header)."""
    path = Path(path_arg).expanduser()
    if path.is_dir():
        raise BadImage(f"{path} is a folder; give the path of one image file (PNG, JPEG or WebP).")
    if not path.exists():
        raise BadImage(f"The image {path} does not exist. Check the path.")
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
    except OSError as exc:
        raise BadImage(f"Cannot read the image {path}: {exc.strerror or exc}.") from None
    if not head:
        raise BadImage(f"The image {path} is empty (0 bytes). Pick a PNG, JPEG or WebP photo of the subject.")
    if not (any(head.startswith(m) for m in IMAGE_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")):
        raise BadImage(f"{path} is not a PNG, JPEG or WebP image. Convert it to one of those and try again.")
    return path


def folder_to_write(path_arg: str, what: str) -> Path:
    """A folder we will create or fill: not an existing file, and writable (a probe file), so a job
    does not run for minutes and then fail on its last write."""
    path = Path(path_arg).expanduser()
    if path.exists() and not path.is_dir():
        raise BadRequest(f"The {what} {path} is a file, not a folder. Give a folder path.")
    check_writable(path, what)
    return path


def file_to_write(path_arg: str, what: str) -> Path:
    path = Path(path_arg).expanduser()
    if path.is_dir():
        raise BadRequest(f"The {what} {path} is a folder; give a file path such as {path / 'subject.glb'}.")
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise BadRequest(f"Cannot write {path}: {parent} is a file, not a folder.")
    check_writable(parent, f"folder of the {what}")
    return path


def views_folder(path_arg: str) -> Path:
    path = Path(path_arg).expanduser()
    if not path.is_dir():
        raise BadViews(f"{path} is not a folder. Give the views folder that holds cameras.json and the view PNGs.")
    if not (path / "cameras.json").is_file():
        raise BadViews(f"{path} has no cameras.json: it is not a views folder (see `make-your-3d multiview`).")
    return path


def models_folder_not_a_file(path_arg: str | None) -> None:
    """A models folder that is given may be missing (fetch or the add-on makes it), but not a file."""
    if path_arg and Path(path_arg).expanduser().is_file():
        raise BadRequest(f"The models directory {Path(path_arg).expanduser()} is a file, not a folder.")


def models_folder(path_arg: str | None) -> None:
    """An explicitly given models folder must exist (the default may not exist yet: fetch makes it)."""
    if not path_arg:
        return
    models_folder_not_a_file(path_arg)
    path = Path(path_arg).expanduser()
    if not path.exists():
        raise WeightsMissing(f"The models directory {path} does not exist. Run `make-your-3d models fetch --models {path}` "
                             "(or `make-your-3d models tiny --out DIR` for a test set).")


def check_args(args: argparse.Namespace) -> None:
    """Every check that needs no heavy import, per command. Raises a Make3DError."""
    command = args.command
    if command in ("generate", "multiview"):
        image_file(args.image)
        models_folder(args.models)
    if command in ("generate", "demo"):
        folder_to_write(args.out, "output folder")
    if getattr(args, "cache", None):
        folder_to_write(args.cache, "cache folder")
    if command == "generate" and not args.prompt.strip():
        raise BadPrompt('The prompt is empty: say what to change, e.g. --prompt "wearing a red scarf".')
    if command == "multiview":
        folder_to_write(args.out, "views folder")
    if command == "reconstruct":
        views_folder(args.views)
        file_to_write(args.out, "output")
        if args.set:  # names and values checked against the config tree (standard library only)
            from make_your_3d.recon.config import parse_settings, preset_config

            preset_config(args.preset).with_overrides(parse_settings(args.set))
    if command == "models" and getattr(args, "models_command", None) == "tiny":
        folder_to_write(args.out, "output folder")
    if command in ("serve", "demo", "doctor"):  # a missing models folder is fine: serve's add-on offers Fetch, demo writes a tiny set
        models_folder_not_a_file(getattr(args, "models", None))
    if command == "serve":
        if args.config and not Path(args.config).expanduser().is_file():
            raise BadRequest(f"The config file {args.config} does not exist.")


def is_writable_dir(path: Path) -> bool:
    return path.is_dir() and os.access(path, os.W_OK)
