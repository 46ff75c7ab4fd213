"""The command handlers: each turns parsed arguments into one library call and prints the outcome.

Arguments were already checked by `cli.checks` (before any heavy import); the heavy modules are
imported inside each handler, so `--help` and argument errors stay fast. The library modules hold
no command-line code. (`serve` is the service's own entry point: `service/server.py`.)
"""

from __future__ import annotations

import json
from pathlib import Path


def _progress_printer(every: int = 10, eta: bool = True):
    """A progress callback printing the start, the end and every `every`-th step of each stage."""

    def show(p) -> None:
        if p.step in (0, p.total) or p.step % every == 0:
            tail = f", eta {p.eta_s:.0f}s" if eta and p.eta_s else ""
            print(f"  [{p.stage}] {p.step}/{p.total} {p.message}{tail}", flush=True)

    return show


# --- models ----------------------------------------------------------------------------------


def models_tiny(args) -> int:
    from make_your_3d.models.tiny import write_tiny_set

    out = write_tiny_set(args.out, seed=args.seed)
    print(f"Wrote a tiny model set (random weights, seed {args.seed}) to {out}.")
    print("It exercises the real code paths but produces noise, not a real subject.")
    return 0


def models_fetch(args) -> int:
    from make_your_3d.errors import BadRequest
    from make_your_3d.models.fetch import fetch_from_hub, selected_roles
    from make_your_3d.models.registry import is_tiny
    from make_your_3d.paths import resolve_models_dir

    models_dir = resolve_models_dir(args.models)
    roles = selected_roles(args.role)
    if is_tiny(models_dir):
        raise BadRequest(f"{models_dir} holds a tiny test set; fetch the real weights into another folder (--models DIR).")
    for r in roles:
        print(f"{r.name}: {r.title} from {r.repo_id} (licence: {r.licence})")
        record = fetch_from_hub(r, models_dir, token=args.token)
        print(f"{r.name}: {len(record['files'])} files stored in {r.path(models_dir)} at revision {record['revision']}")
    print("Done. Check them any time with `make-your-3d models verify`.")
    return 0


def models_verify(args) -> int:
    from make_your_3d.models.fetch import has_recorded_files, selected_roles, verify_role
    from make_your_3d.models.registry import is_tiny
    from make_your_3d.paths import resolve_models_dir

    models_dir = resolve_models_dir(args.models)
    tiny = is_tiny(models_dir)
    failed = False
    for r in selected_roles(args.role):
        problems = verify_role(r, models_dir)
        if tiny and problems and r.complete(models_dir) and not has_recorded_files(r, models_dir):
            print(f"{r.name}: tiny set, no checksums recorded (nothing to verify)")
            continue
        if problems:
            failed = True
            print(f"{r.name}: PROBLEMS")
            for p in problems:
                print(f"  - {p}")
        else:
            print(f"{r.name}: ok")
    if failed:
        print("Fix with `make-your-3d models fetch --role ROLE` (it re-downloads damaged files).")
    return 1 if failed else 0


def models_list(args) -> int:
    from make_your_3d.files import human_bytes
    from make_your_3d.models.fetch import role_status
    from make_your_3d.models.registry import is_tiny
    from make_your_3d.paths import resolve_models_dir

    models_dir = resolve_models_dir(args.models)
    print(f"models directory: {models_dir}" + ("  (tiny test set: random weights)" if is_tiny(models_dir) else ""))
    for s in role_status(models_dir):
        state = "complete" if s["complete"] else "incomplete"
        kind = "tiny" if s["tiny"] else ("real" if s["size_bytes"] else "-")
        print(f"{s['name']:<17} {state:<10}  {kind:<4}  {human_bytes(s['size_bytes']):>10}  {s['licence']}  ({s['repo_id']})")
        if s["missing"]:
            shown = ", ".join(s["missing"][:4]) + (f" ... ({len(s['missing'])} files)" if len(s["missing"]) > 4 else "")
            print(f"{'':<19}missing: {shown}")
    return 0


# --- the stages on their own -------------------------------------------------------------------


def reconstruct(args) -> int:
    """`make-your-3d reconstruct VIEWS_DIR --out OUT.glb ...`: writes OUT.glb and OUT.json."""
    from make_your_3d.recon.config import parse_settings
    from make_your_3d.recon.reconstruct import ReconOptions
    from make_your_3d.recon.reconstruct import reconstruct as run_reconstruct

    opts = ReconOptions(preset=args.preset, device=args.device, faces=args.faces, texture_size=args.texture_size,
                        seed=args.seed, **parse_settings(args.set or []))

    def show(p) -> None:
        if p.step == p.total or p.step % 50 == 0 or not p.message.startswith("fitting"):
            eta = f", eta {p.eta_s:.0f}s" if p.eta_s is not None else ""
            print(f"[{p.stage}] {p.step}/{p.total} {p.message} ({p.elapsed_s:.1f}s{eta})", flush=True)

    result = run_reconstruct(args.views, args.out, opts, progress=show)
    rec_path = Path(args.out).with_suffix(".json")
    tmp = rec_path.with_name(f".{rec_path.name}.tmp")
    tmp.write_text(json.dumps(result.record, indent=2))
    tmp.replace(rec_path)
    print(f"wrote {result.glb_path} ({result.vertices} vertices, {result.faces} faces) in {result.timings['total']:.1f}s")
    return 0


def multiview(args) -> int:
    """`make-your-3d multiview IMAGE --out VIEWS_DIR`: the frozen multi-view model on one image, with
    the default preset's sampling settings except the steps and guidance given."""
    from make_your_3d.device import resolve_device, resolve_dtype
    from make_your_3d.models.multiview import load_multiview
    from make_your_3d.models.registry import ROLES, is_tiny
    from make_your_3d.paths import resolve_models_dir
    from make_your_3d.pipeline.multiview_views import generate_views
    from make_your_3d.pipeline.preprocess import has_transparency, subject_from_bytes
    from make_your_3d.pipeline.presets import get_preset
    from make_your_3d.pipeline.request import load_image_bytes
    from make_your_3d.progress import Reporter
    from make_your_3d.views import save_views

    data = Path(args.image).read_bytes()
    models_dir = resolve_models_dir(args.models)
    device = resolve_device(args.device)
    pipe = load_multiview(ROLES["multiview"].path(models_dir), device, resolve_dtype(device))
    segmenter = None
    if not has_transparency(load_image_bytes(data)) and ROLES["segmenter"].complete(models_dir):
        from make_your_3d.models.segmenter import load_segmenter

        segmenter = load_segmenter(ROLES["segmenter"].path(models_dir), device)
    preset = get_preset("default", {"mv_size": pipe.image_size, "mv_steps": args.steps, "mv_guidance": args.guidance})
    subject = subject_from_bytes(data, pipe.image_size, segmenter=segmenter, fill=preset.subject_fill)

    def show(p) -> None:
        print(f"\r{p.stage}: {p.step}/{p.total} {p.message}", end="", flush=True)

    views = generate_views(pipe, subject, preset, int(args.seed), Reporter("multiview", show))
    print()
    views.extras["multiview"]["tiny_models"] = is_tiny(models_dir)
    folder = save_views(args.out, views)
    print(f"Wrote {len(views.views)} colour + normal views to {folder}.")
    return 0


# --- the whole method ------------------------------------------------------------------------


def generate(args) -> int:
    from make_your_3d.models.registry import is_tiny
    from make_your_3d.paths import resolve_cache_dir, resolve_models_dir
    from make_your_3d.pipeline.generate import Generator, variant_dir
    from make_your_3d.pipeline.request import GenerateRequest

    out = Path(args.out)
    models_dir = resolve_models_dir(args.models)
    generator = Generator(models_dir, resolve_cache_dir(args.cache), args.device)
    if is_tiny(models_dir):
        print(f"Using the TINY model set in {models_dir}: random weights at toy sizes. The chain runs for real, the pictures are noise.")
    else:
        from make_your_3d.estimate import estimate

        guess = estimate(args.preset, generator.device.type)
        if guess is not None:
            print(("WARNING: " if guess.warn else "") + guess.text
                  + (" Stop with Ctrl+C and add --preset fast to run it faster." if guess.warn and args.preset != "fast" else ""))
    data = Path(args.image).read_bytes()
    for k in range(args.variants):
        seed = args.seed + k
        request = GenerateRequest(image=data, prompt=args.prompt, subject=args.subject, negative_prompt=args.negative_prompt,
                                  seed=seed, preset=args.preset, faces=args.faces, texture_size=args.texture_size)
        target = variant_dir(out, request.prompt, seed)
        result = generator.run(request, target, progress=_progress_printer())
        reused = ", ".join(result.cached_stages) or "none"
        print(f"Wrote {target / 'subject.glb'} in {result.timings['total']:.1f}s (reused stages: {reused}).")
    return 0


def demo(args) -> int:
    from make_your_3d.models.registry import ROLES, download_bytes, record_demo_tiny_set
    from make_your_3d.models.tiny import write_tiny_set
    from make_your_3d.paths import resolve_cache_dir, resolve_models_dir
    from make_your_3d.pipeline.demo import DEMO_PROMPT, DEMO_SUBJECT, example_image
    from make_your_3d.pipeline.generate import REQUIRED_ROLES, Generator, variant_dir
    from make_your_3d.pipeline.request import GenerateRequest

    out = Path(args.out)
    models_dir = resolve_models_dir(args.models)
    missing = [name for name in REQUIRED_ROLES if not ROLES[name].complete(models_dir)]
    tiny = bool(missing)
    if tiny:
        tiny_dir = out / "tiny-models"
        print(f"The real weights are not installed (missing roles: {', '.join(missing)}).")
        print(f"Writing a TINY model set to {tiny_dir}: real architectures at toy sizes with random weights.")
        print("The whole chain runs and writes a real GLB, but the result is noise, not a bear in a scarf.")
        print(f"For real results: `make-your-3d models fetch` (about {download_bytes() / 1e9:.1f} GB), then run the demo again.")
        write_tiny_set(tiny_dir, seed=0)  # the tiny sizes follow from the set itself (presets.resolve_preset)
        record_demo_tiny_set(models_dir, tiny_dir)  # so generate's missing-weights error can point at it
        models_dir = tiny_dir
    else:
        print(f"Using the real weights in {models_dir}.")
    generator = Generator(models_dir, resolve_cache_dir(args.cache), args.device)
    request = GenerateRequest(image=example_image().read_bytes(), prompt=DEMO_PROMPT, subject=DEMO_SUBJECT, seed=0,
                              preset="fast" if tiny else "default")
    target = variant_dir(out, DEMO_PROMPT, 0)
    result = generator.run(request, target, progress=_progress_printer(eta=False))
    print(f"Done in {result.timings['total']:.1f}s: {target / 'subject.glb'} (preview: {target / 'preview.png'}).")
    return 0


def doctor(args) -> int:
    import platform
    import sys

    from make_your_3d import __version__
    from make_your_3d.doctor import gpu_report, models_report
    from make_your_3d.paths import resolve_models_dir

    print(f"make-your-3d {__version__} on Python {sys.version.split()[0]} ({platform.system()} {platform.machine()})")
    for line in gpu_report():
        print(line)
    lines, complete = models_report(resolve_models_dir(args.models))
    for line in lines:
        print(line)
    if getattr(args, "selftest", False):
        from make_your_3d.selftest import run_selftest

        print("Running the self-test: the whole chain on the tiny models (random weights)...", flush=True)
        result = run_selftest(args.device, args.precision)
        for line in result.lines():
            print(line)
        return 0 if result.passed else 1
    return 0 if complete else 1
