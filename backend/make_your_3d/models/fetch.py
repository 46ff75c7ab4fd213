"""`make-your-3d models fetch | verify | list`: the only code that downloads weights.

Fetch plans each role's files from the hub's file list (the role's `allow_patterns`), downloads
them one by one with huggingface_hub (resumable, with progress), stores them under the role folder
with `strip_prefix` removed, and converts a published pickle `.bin` that has no safetensors sibling
to safetensors once, here, with `torch.load(weights_only=True)` (dtypes kept as published). The
sha256 of every stored file goes into `<role folder>/checksums.json`, which `verify` re-checks.

The download of one file is a `Source` (repo path -> local file), so tests drive the same planning,
conversion and checksum code from a local folder laid out like the hub repository.
"""

from __future__ import annotations

import datetime as _dt
import errno
import fnmatch
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from make_your_3d.errors import DiskFull, Make3DError, WeightsBroken, WeightsMissing
from make_your_3d.files import sha256_file
from make_your_3d.models.registry import ROLES, ModelRole, is_tiny, role as get_role

CHECKSUMS = "checksums.json"
PICKLE_SUFFIXES = (".bin",)

Source = Callable[[str], Path]  # repo path -> a local file holding its bytes
Log = Callable[[str], None]


# --- planning ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedFile:
    repo_path: str  # path inside the hub repository
    local_path: str  # path inside the role folder
    convert: bool  # a pickle .bin stored as safetensors


def safetensors_name(pickle_name: str) -> str:
    """The safetensors file name loaders expect for a published pickle weight file.

    `pytorch_model.bin` -> `model.safetensors` (transformers), `diffusion_pytorch_model.bin` ->
    `diffusion_pytorch_model.safetensors` (diffusers); variants keep their infix (`.fp16.`).
    """
    head, _, base = pickle_name.rpartition("/")
    stem = base[: -len(".bin")]
    if stem == "pytorch_model" or stem.startswith("pytorch_model."):
        stem = "model" + stem[len("pytorch_model") :]
    return (head + "/" if head else "") + stem + ".safetensors"


def _pickle_names(safetensors_path: str) -> list[str]:
    head, _, base = safetensors_path.rpartition("/")
    stem = base[: -len(".safetensors")]
    names = [stem + ".bin"]
    if stem == "model" or stem.startswith("model."):
        names.insert(0, "pytorch_model" + stem[len("model") :] + ".bin")
    return [(head + "/" if head else "") + n for n in names]


def _is_variant_of(path: str, planned: set[str]) -> bool:
    """`x/name.fp16.safetensors` is a variant when `x/name.safetensors` is planned too."""
    head, _, base = path.rpartition("/")
    parts = base.split(".")
    if len(parts) < 3:
        return False
    plain = ".".join(parts[:-2] + parts[-1:])
    return (head + "/" if head else "") + plain in planned


def plan_role(role: ModelRole, repo_files: Iterable[str]) -> list[PlannedFile]:
    """Which repo files to fetch for `role` and where each is stored. Raises WeightsMissing when a
    required file has no source in the repository (neither safetensors nor a pickle sibling)."""
    available = set(repo_files)
    matched = sorted(f for f in available if any(fnmatch.fnmatch(f, pat) for pat in role.allow_patterns))
    wanted: set[str] = set(matched)
    # A required safetensors file the patterns did not match may be published only as a pickle.
    for rel in role.required:
        repo_path = role.strip_prefix + rel
        if rel.endswith(".safetensors") and repo_path not in available:
            pickled = next((p for p in _pickle_names(repo_path) if p in available), None)
            if pickled is not None:
                wanted.add(pickled)
    # A pickle with a published safetensors sibling is never fetched: the sibling is.
    for path in sorted(wanted):
        if path.endswith(PICKLE_SUFFIXES):
            sibling = safetensors_name(path)
            if sibling in available:
                wanted.discard(path)
                wanted.add(sibling)
    wanted = {p for p in wanted if not _is_variant_of(p, wanted)}
    plan = []
    for path in sorted(wanted):
        if not path.startswith(role.strip_prefix):
            continue
        local = path[len(role.strip_prefix) :]
        convert = path.endswith(PICKLE_SUFFIXES)
        plan.append(PlannedFile(path, safetensors_name(local) if convert else local, convert))
    stored = {p.local_path for p in plan}
    unsourced = [rel for rel in role.required if rel not in stored]
    if unsourced:
        raise WeightsMissing(
            f"The hub repository {role.repo_id} has no file for {', '.join(unsourced)} (role {role.name}); "
            "its layout may have changed. Please report this."
        )
    return plan


# --- storing -----------------------------------------------------------------------------------


def convert_pickle_to_safetensors(src: Path, dst: Path) -> int:
    """Read a pickle state dict once with `weights_only=True` and write it as safetensors; returns
    the tensor count. Dtypes are kept; tensors sharing storage are copied (safetensors forbids it)."""
    import torch
    from safetensors.torch import save_file

    state = torch.load(src, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise WeightsMissing(f"{src.name} is not a flat state dict of tensors; it cannot be converted to safetensors.")
    seen: set[int] = set()
    tensors = {}
    for key in sorted(state):
        tensor = state[key]
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen or not tensor.is_contiguous():
            tensor = tensor.contiguous().clone()
        seen.add(ptr)
        tensors[key] = tensor
    tmp = dst.with_name(dst.name + ".partial")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, dst)
    return len(tensors)


def _store(planned: PlannedFile, src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        if planned.convert:
            convert_pickle_to_safetensors(src, dst)
        else:
            tmp = dst.with_name(dst.name + ".partial")
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise DiskFull(f"The disk is full while storing {dst}. Free some space and run `models fetch` again (it resumes).") from exc
        raise


def _read_record(folder: Path) -> dict:
    path = folder / CHECKSUMS
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_record(folder: Path, record: dict) -> None:
    tmp = folder / (CHECKSUMS + ".partial")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, folder / CHECKSUMS)


def record_checksums(folder: Path, role_name: str, *, repo_id: str, revision: str | None = None, licence: str | None = None) -> dict:
    """Hash every file of a role folder into its checksums.json (used for sets not fetched from the
    hub, e.g. the tiny set: no date is written, so the file is deterministic)."""
    folder = Path(folder)
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS):
        rel = path.relative_to(folder).as_posix()
        files[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size, "source": rel, "converted_from_pickle": False}
    record = {
        "role": role_name,
        "repo_id": repo_id,
        "revision": revision,
        "fetched_at": None,
        "licence": licence if licence is not None else ROLES[role_name].licence,
        "files": files,
    }
    _write_record(folder, record)
    return record


def fetch_role(
    role: ModelRole,
    models_dir: Path,
    source: Source,
    repo_files: Iterable[str],
    *,
    revision: str | None = None,
    hub_licence: str | None = None,
    release: Callable[[Path], None] | None = None,
    log: Log = print,
) -> dict:
    """Fetch one role through `source`; returns the checksums record written to the role folder.

    Files already stored from the same revision with a matching hash are skipped, so an interrupted
    fetch resumes where it stopped (huggingface_hub also resumes a partly downloaded file).
    """
    plan = plan_role(role, repo_files)
    folder = role.path(models_dir)
    folder.mkdir(parents=True, exist_ok=True)
    old = _read_record(folder)
    same_revision = old.get("repo_id") == role.repo_id and old.get("revision") == revision and revision is not None
    record = {
        "role": role.name,
        "repo_id": role.repo_id,
        "revision": revision,
        "fetched_at": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "licence": role.licence,
        "hub_licence": hub_licence,
        "files": {},
    }
    for i, planned in enumerate(plan, 1):
        dst = folder / planned.local_path
        prev = old.get("files", {}).get(planned.local_path) if same_revision else None
        if prev and prev.get("source") == planned.repo_path and dst.is_file() and dst.stat().st_size == prev.get("size") and sha256_file(dst) == prev.get("sha256"):
            log(f"[{role.name}] ({i}/{len(plan)}) {planned.local_path}: already fetched")
            record["files"][planned.local_path] = prev
            continue
        log(f"[{role.name}] ({i}/{len(plan)}) {planned.repo_path}" + (" -> safetensors" if planned.convert else ""))
        src = Path(source(planned.repo_path))
        _store(planned, src, dst)
        if release is not None:
            release(src)
        record["files"][planned.local_path] = {
            "sha256": sha256_file(dst),
            "size": dst.stat().st_size,
            "source": planned.repo_path,
            "converted_from_pickle": planned.convert,
        }
        _write_record(folder, record)  # after every file, so an interruption keeps finished ones
    _write_record(folder, record)
    return record


# --- hub ---------------------------------------------------------------------------------------


def _hub_offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return bool(constants.HF_HUB_OFFLINE) or env in ("1", "on", "yes", "true")


def fetch_from_hub(role: ModelRole, models_dir: Path, token: str | None = None, log: Log = print) -> dict:
    """Resolve the role's repository at its current commit and fetch it with huggingface_hub."""
    if _hub_offline():
        raise Make3DError(
            "`models fetch` needs the network, but Hugging Face offline mode is on (HF_HUB_OFFLINE=1). "
            "Unset HF_HUB_OFFLINE and run it again, or copy the weights into the models folder by hand.",
            code="offline",
        )
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    api = HfApi(token=token)
    try:
        info = api.model_info(role.repo_id, token=token)
        revision = info.sha
        repo_files = api.list_repo_files(role.repo_id, revision=revision, token=token)
    except GatedRepoError as exc:
        raise WeightsMissing(
            f"{role.repo_id} is gated: accept its licence ({role.licence}) on https://huggingface.co/{role.repo_id} "
            "and pass a token with --token."
        ) from exc
    except RepositoryNotFoundError as exc:
        raise WeightsMissing(f"The hub repository {role.repo_id} was not found (or needs --token).") from exc
    except Exception as exc:  # network layer errors differ by transport; say what failed
        raise Make3DError(
            f"Could not reach the Hugging Face hub for {role.repo_id} ({type(exc).__name__}: {exc}). Check the network and try again.",
            code="network",
        ) from exc
    card = getattr(info, "card_data", None)
    hub_licence = card.get("license") if card is not None else None
    staging = Path(models_dir) / ".download" / role.folder

    def source(repo_path: str) -> Path:
        try:
            return Path(hf_hub_download(role.repo_id, repo_path, revision=revision, token=token, local_dir=staging))
        except Exception as exc:
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                raise DiskFull(f"The disk is full while downloading {repo_path}. Free some space and run `models fetch` again (it resumes).") from exc
            raise Make3DError(
                f"Downloading {role.repo_id}/{repo_path} failed ({type(exc).__name__}: {exc}). Run `models fetch` again; it resumes.",
                code="network",
            ) from exc

    def release(path: Path) -> None:
        if staging in path.parents:
            path.unlink(missing_ok=True)

    record = fetch_role(role, models_dir, source, repo_files, revision=revision, hub_licence=hub_licence, release=release, log=log)
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.parent.rmdir()
    except OSError:
        pass
    return record


# --- verify / status ---------------------------------------------------------------------------


def verify_role(role: ModelRole, models_dir: Path) -> list[str]:
    """Problems with one role's files against its recorded checksums ([] when all is well)."""
    folder = role.path(models_dir)
    if not folder.is_dir():
        return [f"not fetched ({folder} does not exist)"]
    record = _read_record(folder)
    problems = [f"missing: {rel}" for rel in role.missing(models_dir)]
    if not record.get("files"):
        problems.append(f"no {CHECKSUMS} recorded: the files were not stored by `models fetch`")
        return problems
    for rel, entry in sorted(record["files"].items()):
        path = folder / rel
        if not path.is_file():
            if f"missing: {rel}" not in problems:
                problems.append(f"missing: {rel}")
            continue
        size = path.stat().st_size
        if size != entry.get("size"):
            problems.append(f"size mismatch: {rel} is {size} bytes, expected {entry.get('size')} (truncated or replaced)")
        elif sha256_file(path) != entry.get("sha256"):
            problems.append(f"checksum mismatch: {rel} (the file is corrupted or was changed)")
    unrecorded = [rel for rel in role.required if rel not in record["files"] and (folder / rel).is_file()]
    problems += [f"not in {CHECKSUMS}: {rel}" for rel in unrecorded]
    return problems


def _folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def role_status(models_dir: Path) -> list[dict]:
    """Each role's state for `GET /v1/models`, `doctor` and `models list` (no hashing: cheap)."""
    models_dir = Path(models_dir)
    tiny = is_tiny(models_dir)
    out = []
    for r in ROLES.values():
        missing = r.missing(models_dir)
        record = _read_record(r.path(models_dir))
        out.append(
            {
                "name": r.name,
                "title": r.title,
                "repo_id": r.repo_id,
                "licence": r.licence,
                "folder": str(r.path(models_dir)),
                "complete": not missing,
                "missing": missing,
                "tiny": tiny,
                "revision": record.get("revision"),
                "size_bytes": _folder_size(r.path(models_dir)),
            }
        )
    return out


def check_weight_files(folder: Path, rels: Iterable[str], role_name: str) -> None:
    """Open each safetensors file's header and check its length, so a truncated or damaged file
    fails loading with its name instead of a deep library error. (Flipped bytes inside tensor data
    are only caught by `models verify`.)"""
    from safetensors import safe_open

    for rel in rels:
        path = Path(folder) / rel
        try:
            with safe_open(str(path), framework="pt") as fh:
                keys = list(fh.keys())
        except Exception as exc:
            raise WeightsBroken(
                f"The weight file {path} is damaged or truncated ({exc}). "
                f"Run `make-your-3d models fetch --role {role_name}` again, then `make-your-3d models verify`."
            ) from exc
        if not keys:
            raise WeightsMissing(f"The weight file {path} holds no tensors. Run `make-your-3d models fetch --role {role_name}` again.")


# --- CLI ---------------------------------------------------------------------------------------


def selected_roles(names: list[str] | None) -> list[ModelRole]:
    if not names:
        return list(ROLES.values())
    try:
        return [get_role(n) for n in names]
    except KeyError as exc:
        raise Make3DError(str(exc.args[0]), code="bad_request") from None


def has_recorded_files(role: ModelRole, models_dir: Path) -> bool:
    """Whether the role's fetch record lists files (a tiny set records none, so there is nothing to verify)."""
    return bool(_read_record(role.path(models_dir)).get("files"))
