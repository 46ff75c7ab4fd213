"""`make-your-3d` command line. Each subcommand's work lives in its own module (imported lazily,
so `--help` and `doctor` start fast); this file only declares the arguments."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from make_your_3d import __version__
from make_your_3d.errors import Make3DError

PRESETS = ("fast", "default", "quality", "lowvram")


def _models_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", metavar="DIR", help="models directory (default: $MAKE_YOUR_3D_MODELS or the user data folder)")


def _device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="make-your-3d", description="Subject image + text edit -> textured 3D mesh (Make-Your-3D).")
    parser.add_argument("--version", action="version", version=f"make-your-3d {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debugging detail")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    # models ---------------------------------------------------------------------------------
    models = sub.add_parser("models", help="fetch, verify, list or write model weights")
    msub = models.add_subparsers(dest="models_command", metavar="ACTION")
    tiny = msub.add_parser("tiny", help="write a tiny random-weight model set in the published formats")
    tiny.add_argument("--out", required=True, metavar="DIR")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(handler="make_your_3d.models.tiny:run_cli")
    fetch = msub.add_parser("fetch", help="download the published weights (the only command that downloads)")
    _models_arg(fetch)
    fetch.add_argument("--role", action="append", help="only this role (repeatable)")
    fetch.add_argument("--token", help="Hugging Face token for gated repositories")
    fetch.set_defaults(handler="make_your_3d.models.fetch:run_fetch_cli")
    verify = msub.add_parser("verify", help="check the files against the checksums recorded at fetch time")
    _models_arg(verify)
    verify.add_argument("--role", action="append")
    verify.set_defaults(handler="make_your_3d.models.fetch:run_verify_cli")
    mlist = msub.add_parser("list", help="show each role's state")
    _models_arg(mlist)
    mlist.set_defaults(handler="make_your_3d.models.fetch:run_list_cli")

    # reconstruct ----------------------------------------------------------------------------
    rec = sub.add_parser("reconstruct", help="views folder (cameras.json + PNGs) -> textured GLB")
    rec.add_argument("views", metavar="VIEWS_DIR")
    rec.add_argument("--out", required=True, metavar="OUT.glb")
    rec.add_argument("--preset", choices=("fast", "default", "quality"), default="default")
    _device_arg(rec)
    rec.add_argument("--faces", type=int, help="face budget")
    rec.add_argument("--texture-size", type=int, help="texture size in pixels")
    rec.add_argument("--seed", type=int, default=0)
    rec.set_defaults(handler="make_your_3d.recon.reconstruct:run_cli")

    # multiview ------------------------------------------------------------------------------
    mv = sub.add_parser("multiview", help="subject image -> six colour + normal views (views folder)")
    mv.add_argument("image", metavar="IMAGE")
    mv.add_argument("--out", required=True, metavar="VIEWS_DIR")
    _models_arg(mv)
    mv.add_argument("--steps", type=int, default=20)
    mv.add_argument("--guidance", type=float, default=3.0)
    mv.add_argument("--seed", type=int, default=0)
    _device_arg(mv)
    mv.set_defaults(handler="make_your_3d.pipeline.multiview_views:run_cli")

    # generate -------------------------------------------------------------------------------
    gen = sub.add_parser("generate", help="subject image + text edit -> subject.glb (the whole method)")
    gen.add_argument("image", metavar="IMAGE")
    gen.add_argument("--prompt", required=True, help='the change, e.g. "wearing a red scarf"')
    gen.add_argument("--subject", help='a short description of the subject, e.g. "a toy robot" (default: a generic word)')
    gen.add_argument("--negative-prompt", default="")
    gen.add_argument("--out", default="out", metavar="DIR")
    _models_arg(gen)
    gen.add_argument("--cache", metavar="DIR", help="stage cache (default: OUT/.cache)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--variants", type=int, default=1)
    gen.add_argument("--preset", choices=PRESETS, default="default")
    _device_arg(gen)
    gen.add_argument("--faces", type=int)
    gen.add_argument("--texture-size", type=int)
    gen.set_defaults(handler="make_your_3d.pipeline.generate:run_cli")

    # demo -----------------------------------------------------------------------------------
    demo = sub.add_parser("demo", help="run generate on the bundled example (real weights if present, else a tiny set)")
    _models_arg(demo)
    demo.add_argument("--out", default="out/demo", metavar="DIR")
    _device_arg(demo)
    demo.set_defaults(handler="make_your_3d.pipeline.demo:run_cli")

    # serve ----------------------------------------------------------------------------------
    serve = sub.add_parser("serve", help="run the local HTTP service the Blender add-on talks to")
    _models_arg(serve)
    serve.add_argument("--data", metavar="DIR", help="job database and outputs (default: the user data folder)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--allow-remote", action="store_true", help="required to bind anything but loopback")
    serve.add_argument("--port", type=int, default=0, help="0 picks a free port")
    serve.add_argument("--state-file", metavar="F", help="where to write url, token, pid (default: DATA/state.json)")
    serve.add_argument("--parent-pid", type=int, help="exit when this process is gone")
    serve.add_argument("--idle-timeout", type=float, help="exit after this many idle seconds")
    serve.add_argument("--preset", choices=PRESETS, default="default")
    serve.add_argument("--config", metavar="FILE", help='JSON settings: {"overrides": {preset values}, "progress_interval_s": S}')
    _device_arg(serve)
    serve.set_defaults(handler="make_your_3d.service.server:run_cli")

    # doctor ---------------------------------------------------------------------------------
    doctor = sub.add_parser("doctor", help="what this machine has and which model sets are complete")
    _models_arg(doctor)
    doctor.set_defaults(handler="make_your_3d.doctor:run_cli")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    module_name, func_name = handler.split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    try:
        return int(func(args) or 0)
    except Make3DError as exc:
        print(f"error [{exc.code}]: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
