"""`make-your-3d` command line. Each subcommand's work lives in its own module, imported only after
the arguments and the files they name have been checked (cli/checks.py), so `--help`, a typo or a
missing file is answered in well under a second and never with a traceback."""

from __future__ import annotations

import argparse
import importlib
import sys

from make_your_3d import __version__
from make_your_3d.cli import checks
from make_your_3d.errors import Make3DError

from make_your_3d.job_params import AUTO_PRESET, PRESET_NAMES as PRESETS
# Commands that load diffusion models at once: quieting diffusers/transformers costs them nothing (they
# import torch anyway). Not `serve`: it starts in a second and loads models on its first job, and its
# output goes to the backend log, not the artist's console.
MODEL_COMMANDS = ("generate", "demo", "multiview")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default; options without a meaningful default say so in their help."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.default == "" or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def _sub(sub, name: str, **kw) -> argparse.ArgumentParser:
    return sub.add_parser(name, formatter_class=_Formatter, **kw)


def _models_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", metavar="DIR", help="models directory (default: $MAKE_YOUR_3D_MODELS or the user data folder)")


def _device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", type=checks.device, metavar="{auto,cpu,cuda,cuda:N,mps}",
                   help="where to run: auto picks CUDA, then Apple's GPU (mps), then the CPU")


def _seed_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=checks.int_range(0, checks.SEED_MAX, "seed"), default=0, help="random seed (same seed, same result)")


def _faces_texture_args(p: argparse.ArgumentParser) -> None:
    lo, hi = checks.FACES_RANGE
    p.add_argument("--faces", type=checks.int_range(lo, hi, "face budget"), metavar="N",
                   help=f"triangles in the mesh, {lo} to {hi} (default: the preset's)")
    p.add_argument("--texture-size", type=checks.texture_size, metavar="PX",
                   help=f"texture size in pixels: {', '.join(map(str, checks.TEXTURE_SIZES))} (default: the preset's)")


def _cache_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache", metavar="DIR", help="stage cache (default: $MAKE_YOUR_3D_CACHE or the user cache folder)")


def _role_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--role", action="append", help="only this role (repeatable; default: every role)")


def _json_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object (for the Blender add-on)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="make-your-3d", description="Subject image + text edit -> textured 3D mesh (Make-Your-3D).",
                                     formatter_class=_Formatter)
    parser.add_argument("--version", action="version", version=f"make-your-3d {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debugging detail and every library warning")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    # models ---------------------------------------------------------------------------------
    models = _sub(sub, "models", help="fetch, verify, list or write model weights",
                  description="Fetch, verify, list or write model weights. Pick an action:")
    models.set_defaults(help_parser=models)
    msub = models.add_subparsers(dest="models_command", metavar="ACTION")
    tiny = _sub(msub, "tiny", help="write a tiny random-weight model set in the published formats")
    tiny.add_argument("--out", required=True, metavar="DIR", help="folder to write the set into")
    tiny.add_argument("--seed", type=checks.int_range(0, checks.SEED_MAX, "seed"), default=0, help="seed of the random weights")
    tiny.set_defaults(handler="make_your_3d.cli.commands:models_tiny")
    fetch = _sub(msub, "fetch", help="download the published weights (the only command that downloads)")
    _models_arg(fetch)
    _role_arg(fetch)
    fetch.add_argument("--token", help="Hugging Face token for gated repositories")
    fetch.set_defaults(handler="make_your_3d.cli.commands:models_fetch")
    verify = _sub(msub, "verify", help="check the files against the checksums recorded at fetch time")
    _models_arg(verify)
    _role_arg(verify)
    verify.set_defaults(handler="make_your_3d.cli.commands:models_verify")
    mlist = _sub(msub, "list", help="show each role's state")
    _models_arg(mlist)
    mlist.set_defaults(handler="make_your_3d.cli.commands:models_list")

    # reconstruct ----------------------------------------------------------------------------
    rec = _sub(sub, "reconstruct", help="views folder (cameras.json + PNGs) -> textured GLB")
    rec.add_argument("views", metavar="VIEWS_DIR", help="folder with cameras.json and the view PNGs")
    rec.add_argument("--out", required=True, metavar="OUT.glb", help="the GLB to write (its record goes next to it as OUT.json)")
    rec.add_argument("--preset", choices=("fast", "default", "quality"), default="default", help="reconstruction quality")
    _device_arg(rec)
    _faces_texture_args(rec)
    _seed_arg(rec)
    rec.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE",
                     help="override one reconstruction setting, e.g. lift.contact_px=1.0 (repeatable; "
                          "names and units in backend/make_your_3d/recon/config.py)")
    rec.set_defaults(handler="make_your_3d.cli.commands:reconstruct")

    # multiview ------------------------------------------------------------------------------
    mv = _sub(sub, "multiview", help="subject image -> six colour + normal views (views folder)")
    mv.add_argument("image", metavar="IMAGE", help="the subject image (PNG, JPEG or WebP)")
    mv.add_argument("--out", required=True, metavar="VIEWS_DIR", help="views folder to write")
    _models_arg(mv)
    mv.add_argument("--steps", type=checks.int_range(1, 1000, "steps"), default=50, help="diffusion steps (the default preset's)")
    mv.add_argument("--guidance", type=checks.non_negative_float, default=1.0, help="classifier-free guidance scale (the default preset's)")
    _seed_arg(mv)
    _device_arg(mv)
    mv.set_defaults(handler="make_your_3d.cli.commands:multiview")

    # generate -------------------------------------------------------------------------------
    gen = _sub(sub, "generate", help="subject image + text edit -> subject.glb (the whole method)")
    gen.add_argument("image", metavar="IMAGE", help="the subject image (PNG, JPEG or WebP)")
    gen.add_argument("--prompt", required=True, help='the change, e.g. "wearing a red scarf"')
    gen.add_argument("--subject", help='a short description of the subject, e.g. "a toy robot" (default: a generic word)')
    gen.add_argument("--negative-prompt", default="", help="what to avoid")
    gen.add_argument("--out", default="out", metavar="DIR", help="output folder (one sub-folder per variant)")
    _models_arg(gen)
    _cache_arg(gen)
    _seed_arg(gen)
    gen.add_argument("--variants", type=checks.int_range(*checks.VARIANTS_RANGE, "variants"), default=1,
                     help="results per run, with seeds seed, seed+1, ...")
    gen.add_argument("--preset", choices=(*PRESETS, AUTO_PRESET), default="default",
                     help="speed and quality settings; auto: default, or lowvram when default does not fit this device")
    _device_arg(gen)
    _faces_texture_args(gen)
    gen.set_defaults(handler="make_your_3d.cli.commands:generate")

    # demo -----------------------------------------------------------------------------------
    demo = _sub(sub, "demo", help="run generate on the bundled example (real weights if present, else a tiny set)")
    _models_arg(demo)
    demo.add_argument("--out", default="out/demo", metavar="DIR", help="output folder")
    _cache_arg(demo)
    _device_arg(demo)
    demo.set_defaults(handler="make_your_3d.cli.commands:demo")

    # serve ----------------------------------------------------------------------------------
    serve = _sub(sub, "serve", help="run the local HTTP service the Blender add-on talks to")
    _models_arg(serve)
    serve.add_argument("--data", metavar="DIR", help="job database and outputs (default: the user data folder)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--allow-remote", action="store_true",
                       help="the remote listener (required to bind anything but loopback): HTTPS, per-user tokens (`users add`)")
    serve.add_argument("--tls-cert", metavar="PEM", help="with --allow-remote: your certificate (default: one generated into DATA/tls/)")
    serve.add_argument("--tls-key", metavar="PEM", help="with --allow-remote: the key of --tls-cert (unencrypted PEM)")
    serve.add_argument("--public-name", action="append", metavar="NAME",
                       help="with --allow-remote: a DNS name or address clients use for this machine (repeatable)")
    serve.add_argument("--port", type=checks.int_range(0, 65535, "port"), default=0, help="port to listen on (0 picks a free one)")
    serve.add_argument("--state-file", metavar="F", help="where to write url, token, pid (default: DATA/state.json)")
    serve.add_argument("--parent-pid", type=int, help="exit when this process is gone")
    serve.add_argument("--idle-timeout", type=checks.non_negative_float, help="exit after this many idle seconds (default: never)")
    serve.add_argument("--preset", choices=(*PRESETS, AUTO_PRESET), default="default",
                       help="preset of jobs that name none; auto: default, or lowvram when default does not fit this device")
    serve.add_argument("--config", metavar="FILE", help='JSON settings: {"overrides": {preset values}, "progress_interval_s": S}')
    serve.add_argument("--ray", metavar="ADDRESS", help="run jobs on a farm of Ray workers, one per GPU: a Ray cluster's address, or auto to "
                       "start Ray here (needs the farm extra; more settings in --config's \"farm\" object)")
    _device_arg(serve)
    serve.set_defaults(handler="make_your_3d.service.server:run_cli")

    # users ----------------------------------------------------------------------------------
    users = _sub(sub, "users", help="per-user tokens for the remote backend (serve --allow-remote)",
                 description="Who may use the remote backend. Each user gets one token, printed once. Pick an action:")
    users.set_defaults(help_parser=users)
    usub = users.add_subparsers(dest="users_command", metavar="ACTION")
    for action, text in (("add", "add a user and print their token (shown once; stored hashed)"), ("list", "show the users"),
                         ("remove", "remove a user (their token stops working at once)")):
        p = _sub(usub, action, help=text)
        if action != "list":
            p.add_argument("name", metavar="NAME", help="user name: letters, digits, '.', '_', '-', '@'")
        p.add_argument("--data", metavar="DIR", help="the backend's data folder (default: the user data folder)")
        _json_arg(p)
        p.set_defaults(handler=f"make_your_3d.cli.users:run_{action}")

    # cache ----------------------------------------------------------------------------------
    cache = _sub(sub, "cache", help="show or clear the stage cache (one per user)",
                 description="The stage cache keeps each finished stage, so a new prompt or seed reuses the rest. Pick an action:")
    cache.set_defaults(help_parser=cache)
    csub = cache.add_subparsers(dest="cache_command", metavar="ACTION")
    info = _sub(csub, "info", help="where the cache is and how much it holds")
    _cache_arg(info)
    _json_arg(info)
    info.set_defaults(handler="make_your_3d.cli.cache:run_info")
    clear = _sub(csub, "clear", help="delete every cached stage (results already written stay)")
    _cache_arg(clear)
    _json_arg(clear)
    clear.set_defaults(handler="make_your_3d.cli.cache:run_clear")

    # doctor ---------------------------------------------------------------------------------
    doctor = _sub(sub, "doctor", help="what this machine has and which model sets are complete")
    _models_arg(doctor)
    doctor.add_argument("--selftest", action="store_true",
                        help="also run the whole chain on the tiny models (about a minute, no weights needed) and report pass/fail, seconds, peak memory")
    _device_arg(doctor)
    doctor.add_argument("--precision", default="auto", choices=("auto", "fp32", "fp16", "bf16"), help="precision for --selftest")
    doctor.set_defaults(handler="make_your_3d.cli.commands:doctor")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        (getattr(args, "help_parser", None) or parser).print_help()
        return 2
    try:
        checks.check_args(args)
    except Make3DError as exc:
        print(f"error [{exc.code}]: {exc.message}", file=sys.stderr)
        return 2
    from make_your_3d import quiet

    quiet.setup_console_logging(verbose=args.verbose)
    module_name, func_name = handler.split(":")
    try:
        if not args.verbose and args.command in MODEL_COMMANDS:
            quiet.quiet_diffusion_libraries()
        func = getattr(importlib.import_module(module_name), func_name)
        return int(func(args) or 0)
    except Make3DError as exc:
        print(f"error [{exc.code}]: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`... | head`): nothing left to say
        sys.stderr.close()
        return 141
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").split(".")[0]
        if not missing or missing == "make_your_3d":
            raise
        print(f"error [missing_package]: this Python lacks the package {missing!r} the backend needs. "
              "Install the backend with `pip install make-your-3d` (or press Install Backend in Blender's add-on preferences).",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
