"""The stage graph, declared once: what each cached stage reads, the function that runs it, and the
cache key derived from the declaration.

A stage is one `StageSpec` (below) and one function `run(inputs: StageInputs, out: Path)`. The
function receives only what the spec declares: `inputs.request.<field>` and `inputs.preset.<field>`
raise `UndeclaredInput` for any field the spec does not name, `inputs.upstream(name)` only the
declared upstream stages' folders, `inputs.models` only the declared models, borrowed in a stated
state (pipeline/model_host.py). So the key, made from the same declaration by `stage_inputs`, cannot
miss what the stage reads: its upstream keys, those fields, the weights' fingerprints, the device
kind and dtype, the package version, and the source of every module in the **import closure** of
the stage function's module inside this package (found by reading the imports, not listed by hand,
so a change in a helper such as pipeline/training.py misses the stages that run it).

Adding a stage: one `StageSpec` in `STAGE_SPECS` and its function (docs/ARCHITECTURE.md).

Preset fields that cannot change a result are listed in `PRESET_FIELDS_OUTSIDE_KEYS` with the
reason; a test checks that every other field belongs to some stage.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from make_your_3d import __version__
from make_your_3d.pipeline.cache import digest
from make_your_3d.progress import CancelToken, ProgressFn, Reporter
from make_your_3d.seeds import derive_seed

if TYPE_CHECKING:  # stages.py stays free of torch: the service reads the stage list without it
    from make_your_3d.pipeline.model_host import StageModels

PACKAGE = "make_your_3d"
SUBJECT_SEED = 0  # the stages that do not read the job's seed draw from this one, so variants share them


class UndeclaredInput(RuntimeError):
    """A stage read something its declaration does not name (a bug: its cache key would not cover it)."""


@dataclass(frozen=True)
class StageSpec:
    name: str
    label: str  # what an artist sees while it runs (the service publishes it; the add-on shows it)
    what: str  # one line for logs and docs
    run: str  # "module:function" of the stage's body, run(inputs: StageInputs, out: Path) -> None
    upstream: tuple[str, ...] = ()
    request_fields: tuple[str, ...] = ()  # GenerateRequest fields (the image by its sha256)
    preset_fields: tuple[str, ...] = ()  # Preset fields
    models: tuple[str, ...] = ()  # model roles whose weights it reads (fingerprints)
    uses_segmenter: bool = False  # masks come from the optional segmenter when it is installed
    substages: tuple[str, ...] = ()  # names its reporter's children report progress under (in run order)
    version: int = 1  # bump when the output's meaning changes in a way the code hash would not show

    @property
    def module(self) -> str:
        return self.run.split(":")[0]

    def function(self) -> Callable[["StageInputs", Path], None]:
        module, name = self.run.split(":")
        return getattr(importlib.import_module(module), name)


STAGE_SPECS: tuple[StageSpec, ...] = (
    StageSpec(
        "subject", "Cutting out the subject", "the subject masked (alpha or the segmenter), cropped, centred, framed",
        run="make_your_3d.pipeline.preprocess:run_subject",
        request_fields=("image", "subject"),  # the subject description is the segmenter's text prompt
        preset_fields=("mv_size", "subject_fill"),
        uses_segmenter=True,
    ),
    StageSpec(
        "subject_views", "Seeing the subject from all sides", "the frozen multi-view model's six views of the subject",
        run="make_your_3d.pipeline.multiview_views:run_subject_views",
        upstream=("subject",),
        preset_fields=("mv_size", "mv_steps", "mv_guidance", "mv_eta", "mv_scheduler"),
        models=("multiview",),
        version=3,
    ),
    StageSpec(
        "identity", "Learning the subject", "IP-Adapter to_k_ip/to_v_ip fine-tuned on the subject views",
        run="make_your_3d.pipeline.identity:run_identity",
        upstream=("subject_views",),
        request_fields=("subject",),
        preset_fields=("sd_size", "identity_steps", "identity_lr", "identity_batch", "identity_augment_pool", "lr_schedule"),
        models=("personalized", "ip_adapter", "image_encoder"),
        version=2,
    ),
    StageSpec(
        "edited_views", "Editing views", "original personalized model edits the six views; their normals",
        run="make_your_3d.pipeline.edits:run_edited_views",
        upstream=("subject_views",),
        request_fields=("subject", "prompt", "negative_prompt"),
        preset_fields=("sd_size", "sd_steps", "sd_guidance", "edit_strength", "ip_scale", "normal_steps", "normal_resolution",
                       "edit_batch", "normal_batch"),  # batch sizes change the floats' summation order (last bits)
        models=("personalized", "ip_adapter", "image_encoder", "normal_estimator"),
        uses_segmenter=True,
        substages=("edited_normals",),
        version=2,
    ),
    StageSpec(
        "subject_prior", "Teaching the 3D model the edit", "LoRA on the multi-view cross-domain attention",
        run="make_your_3d.pipeline.subject_prior:run_subject_prior",
        upstream=("edited_views",),
        preset_fields=("mv_size", "prior_steps", "prior_lr", "lora_rank", "lr_schedule"),
        models=("multiview",),
        version=2,
    ),
    StageSpec(
        "front_view", "Painting the edited subject", "fine-tuned personalized model renders the edited front view",
        run="make_your_3d.pipeline.edits:run_front_view",
        upstream=("subject", "identity"),
        request_fields=("subject", "prompt", "negative_prompt", "seed"),
        preset_fields=("sd_size", "sd_steps", "sd_guidance", "edit_strength", "ip_scale", "mv_size", "subject_fill"),
        models=("personalized", "ip_adapter", "image_encoder"),
        uses_segmenter=True,
        version=2,
    ),
    StageSpec(
        "multiview", "Turning it into six views", "fine-tuned multi-view model: six colour + normal views",
        run="make_your_3d.pipeline.multiview_views:run_multiview",
        upstream=("front_view", "subject_prior"),
        request_fields=("seed",),
        preset_fields=("mv_size", "mv_steps", "mv_guidance", "mv_eta", "mv_scheduler", "lora_rank"),
        models=("multiview",),
        version=2,
    ),
    StageSpec(
        "reconstruct", "Building the mesh", "3D Gaussians -> mesh -> UVs -> texture -> GLB",
        run="make_your_3d.pipeline.reconstruct_stage:run_reconstruct",
        upstream=("multiview",),
        request_fields=("seed", "faces", "texture_size"),
        preset_fields=("recon_preset", "recon", "faces", "texture_size"),
        version=2,
    ),
)

STAGES: dict[str, StageSpec] = {s.name: s for s in STAGE_SPECS}


def published_stages() -> list[dict]:
    """The stage list as the service publishes it (GET /v1/schema): run order, labels, sub-stages, and
    whether the stage reads the seed (the variants of one request share every stage that does not)."""
    return [{"name": s.name, "label": s.label, "substages": list(s.substages), "reads_seed": "seed" in s.request_fields} for s in STAGE_SPECS]

# A stage borrows its models through the model host, which sets their state: its closure (the
# model loaders included) is part of the key of every stage that declares a model.
RUNNER_MODULES = ("make_your_3d.pipeline.model_host",)

# Preset fields no stage key needs, and why.
PRESET_FIELDS_OUTSIDE_KEYS: dict[str, str] = {
    "name": "a label; the values it stands for are keyed one by one",
    "precision": "keyed as the resolved dtype (auto differs by device)",
    "offload": "where models wait between uses; results are the same",
}

# GenerateRequest fields no stage key needs, and why.
REQUEST_FIELDS_OUTSIDE_KEYS: dict[str, str] = {
    "preset": "a name; keyed as the resolved preset's values",
    "extras": "free-form client metadata (not read by any stage)",
    "overrides": "per-job preset overrides; applied to the preset first, so keyed as its values",
}


@dataclass(frozen=True)
class KeyContext:
    """What every key shares: the run's device kind and dtype, the package version, the weights."""

    device_type: str
    dtype: str
    fingerprints: dict[str, str] = field(default_factory=dict)  # role -> fingerprint (segmenter when installed)
    version: str = __version__
    extra: dict[str, Any] = field(default_factory=dict)  # per-stage resolved settings, e.g. {"reconstruct": {...}}


def _module_file(name: str) -> Path | None:
    """The source file of module `name` of this package (None: not a module of ours)."""
    if name != PACKAGE and not name.startswith(PACKAGE + "."):
        return None
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    return Path(spec.origin) if spec is not None and spec.origin and spec.origin.endswith(".py") else None


def _executed_nodes(tree: ast.AST):
    """Every node of `tree` except those under `if TYPE_CHECKING:` (imports for type hints only,
    never run)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))


def _imported_modules(path: Path, module: str) -> set[str]:
    """Every module an `import` anywhere in `path` names (function-level imports included), with
    relative imports resolved and `from pkg import sub` counted as `pkg.sub` when that is a module."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in _executed_nodes(ast.parse(path.read_bytes(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


@lru_cache(maxsize=None)
def import_closure(modules: tuple[str, ...]) -> tuple[Path, ...]:
    """The source files of `modules` and of every module of this package they import, directly or
    not, with the `__init__.py` of each package on the way (importing a module runs them)."""
    files: dict[Path, str] = {}
    todo = list(modules)
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # the module and its parent packages
            prefix = ".".join(parts[:i])
            path = _module_file(prefix)
            if path is None or path in files:
                continue
            files[path] = prefix
            todo.extend(_imported_modules(path, prefix))
    if any(_module_file(m) is None for m in modules):
        raise ValueError(f"stage code module not found among {modules}")
    return tuple(sorted(files))


def code_fingerprint(modules: tuple[str, ...], read: Callable[[Path], bytes] = Path.read_bytes) -> str:
    """sha256 over the source of the import closure of `modules` (file paths relative to the package
    and contents). Reads files only (no import), so it is cheap and runs before any model loads;
    `read` lets the tests change a file's content without touching the tree."""
    root = Path(importlib.util.find_spec(PACKAGE).origin).parent
    h = hashlib.sha256()
    for path in import_closure(tuple(sorted(modules))):
        rel = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name
        h.update(rel.encode() + b"\0")
        h.update(hashlib.sha256(read(path)).digest())
    return h.hexdigest()


def stage_code_modules(spec: StageSpec) -> tuple[str, ...]:
    """The modules whose import closure is stage `spec`'s code: its function's module, and the
    model host that sets its models' state when it borrows any."""
    return (spec.module, *(RUNNER_MODULES if spec.models or spec.uses_segmenter else ()))


def _request_value(request, name: str) -> Any:
    value = getattr(request, name)
    return digest(value) if name == "image" else value


def stage_inputs(name: str, request, preset, context: KeyContext, upstream_keys: dict[str, str]) -> dict:
    """Everything stage `name` depends on, as JSON-able data; its cache key is `digest` of this."""
    spec = STAGES[name]
    missing = [u for u in spec.upstream if u not in upstream_keys]
    if missing:
        raise ValueError(f"stage {name} needs the keys of {', '.join(missing)} first")
    inputs = {
        "stage": name,
        "stage_version": spec.version,
        "package_version": context.version,
        "code": code_fingerprint(stage_code_modules(spec)),
        "device_type": context.device_type,
        "dtype": context.dtype,
        "upstream": {u: upstream_keys[u] for u in spec.upstream},
        "request": {f: _request_value(request, f) for f in spec.request_fields},
        "preset": {f: getattr(preset, f) for f in spec.preset_fields},
        "models": {m: context.fingerprints[m] for m in spec.models},
    }
    if spec.uses_segmenter:
        inputs["segmenter"] = context.fingerprints.get("segmenter")
    if name in context.extra:
        inputs["resolved"] = context.extra[name]
    return inputs


def stage_keys(request, preset, context: KeyContext) -> dict[str, tuple[str, dict]]:
    """(key, inputs) of every stage in graph order."""
    keys: dict[str, str] = {}
    out: dict[str, tuple[str, dict]] = {}
    for spec in STAGE_SPECS:
        inputs = stage_inputs(spec.name, request, preset, context, keys)
        keys[spec.name] = digest(inputs)
        out[spec.name] = (keys[spec.name], inputs)
    return out


class DeclaredFields:
    """Read-only view of a request or preset that lets a stage read only the fields it declared."""

    def __init__(self, stage: str, what: str, values: dict[str, Any]):
        object.__setattr__(self, "_stage", stage)
        object.__setattr__(self, "_what", what)
        object.__setattr__(self, "_values", values)

    def __getattr__(self, name: str) -> Any:
        values = object.__getattribute__(self, "_values")
        if name in values:
            return values[name]
        stage, what = object.__getattribute__(self, "_stage"), object.__getattribute__(self, "_what")
        raise UndeclaredInput(f"stage {stage} reads {what}.{name} but does not declare it (pipeline/stages.py)")

    def __setattr__(self, name: str, value: Any) -> None:
        raise UndeclaredInput(f"stage inputs are read-only (tried to set {name})")


@dataclass(frozen=True)
class StageInputs:
    """Everything one stage run may read: built from its declaration, nothing more."""

    spec: StageSpec
    request: DeclaredFields  # the declared GenerateRequest fields (`image`: the decoded PIL image)
    preset: DeclaredFields  # the declared Preset fields
    models: "StageModels"  # the declared models, borrowed in a stated state
    upstream_dirs: dict[str, Path]
    device: Any  # torch.device the stage runs on
    reporter: Reporter  # this stage's steps (progress and cancel checks)
    cancel: CancelToken | None = None
    progress: ProgressFn | None = None  # the job's raw callback, for steps that report their own stages

    def upstream(self, name: str) -> Path:
        if name not in self.upstream_dirs:
            raise UndeclaredInput(f"stage {self.spec.name} reads the {name} stage's result but does not declare it upstream")
        return self.upstream_dirs[name]

    @property
    def seed(self) -> int:
        return stage_seed(self.spec, self.request.seed if "seed" in self.spec.request_fields else SUBJECT_SEED)


def stage_seed(spec: StageSpec, job_seed: int) -> int:
    """The seed of every random draw of stage `spec`: derived from the job's seed when the stage
    reads it (else the fixed subject seed, so variants share the stage) and from the stage's name."""
    return derive_seed(job_seed if "seed" in spec.request_fields else SUBJECT_SEED, spec.name)


def build_stage_inputs(spec: StageSpec, request, image, preset, models: "StageModels", upstream_dirs: dict[str, Path], device,
                       reporter: Reporter, cancel: CancelToken | None = None, progress: ProgressFn | None = None) -> StageInputs:
    """The `StageInputs` of `spec` for one job (`image`: the request's image, decoded)."""
    values = {f: (image if f == "image" else getattr(request, f)) for f in spec.request_fields}
    return StageInputs(
        spec=spec,
        request=DeclaredFields(spec.name, "request", values),
        preset=DeclaredFields(spec.name, "preset", {f: getattr(preset, f) for f in spec.preset_fields}),
        models=models,
        upstream_dirs={u: upstream_dirs[u] for u in spec.upstream},
        device=device,
        reporter=reporter,
        cancel=cancel,
        progress=progress,
    )
