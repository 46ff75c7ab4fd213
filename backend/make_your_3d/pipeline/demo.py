"""`make-your-3d demo`: the README's main job. `generate` on the bundled example image, on the real
weights when they are installed, otherwise on a freshly written tiny model set (and it says so)."""

from __future__ import annotations

from pathlib import Path

from make_your_3d.models.registry import ROLES
from make_your_3d.paths import resolve_cache_dir, resolve_models_dir
from make_your_3d.pipeline.generate import REQUIRED_ROLES, Generator, variant_dir
from make_your_3d.pipeline.request import GenerateRequest

DEMO_PROMPT = "wearing a red scarf"
DEMO_SUBJECT = "a toy bear"


def example_image() -> Path:
    """The bundled example: in a source checkout it sits in examples/ at the repository root."""
    for base in Path(__file__).resolve().parents:
        candidate = base / "examples" / "toy_bear.png"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError("examples/toy_bear.png was not found next to the backend source")


def run_cli(args) -> int:
    from make_your_3d.models.tiny import write_tiny_set

    out = Path(args.out)
    models_dir = resolve_models_dir(args.models)
    missing = [name for name in REQUIRED_ROLES if not ROLES[name].complete(models_dir)]
    tiny = bool(missing)
    if tiny:
        models_dir = out / "tiny-models"
        print(f"The real weights are not installed (missing roles: {', '.join(missing)}).")
        print(f"Writing a TINY model set to {models_dir}: real architectures at toy sizes with random weights.")
        print("The whole chain runs and writes a real GLB, but the result is noise, not a bear in a scarf.")
        print("For real results: `make-your-3d models fetch` (several GB), then run the demo again.")
        write_tiny_set(models_dir, seed=0)  # the tiny sizes follow from the set itself (presets.resolve_preset)
    else:
        print(f"Using the real weights in {models_dir}.")
    generator = Generator(models_dir, resolve_cache_dir(getattr(args, "cache", None)), args.device)
    request = GenerateRequest(image=example_image().read_bytes(), prompt=DEMO_PROMPT, subject=DEMO_SUBJECT, seed=0,
                              preset="fast" if tiny else "default")
    target = variant_dir(out, DEMO_PROMPT, 0)

    def show(p) -> None:
        if p.step in (0, p.total) or p.step % 10 == 0:
            print(f"  [{p.stage}] {p.step}/{p.total} {p.message}", flush=True)

    result = generator.run(request, target, progress=show)
    print(f"Done in {result.timings['total']:.1f}s: {target / 'subject.glb'} (preview: {target / 'preview.png'}).")
    return 0
