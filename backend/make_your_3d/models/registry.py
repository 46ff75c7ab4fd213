"""The model roles of the method, where each comes from and which local files make it complete.

Every role lives in its own folder under the models directory. A role is *complete* when each of
its `required` files exists there and none is damaged (`ModelRole.damaged`); loaders, `doctor`,
`models list`, the service and the tiny-set writer all read this one table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from make_your_3d.files import sha256_file

CHECKSUMS_FILE = "checksums.json"  # written by models/fetch.py (sha256 and size of every stored file)


@dataclass(frozen=True)
class ModelRole:
    name: str
    title: str
    repo_id: str
    licence: str
    folder: str
    required: tuple[str, ...]
    # Hub files to download, as (repo path glob, local prefix to strip) pairs; see models/fetch.py.
    allow_patterns: tuple[str, ...] = field(default=())
    strip_prefix: str = ""

    def path(self, models_dir: Path) -> Path:
        return Path(models_dir) / self.folder

    def missing(self, models_dir: Path) -> list[str]:
        root = self.path(models_dir)
        return [rel for rel in self.required if not (root / rel).is_file()]

    def complete(self, models_dir: Path) -> bool:
        """Every required file is there and none is damaged (see `damaged`; no hashing here)."""
        return not self.missing(models_dir) and not self.damaged(models_dir)

    def damaged(self, models_dir: Path, hash_below: int = 0) -> list[str]:
        """Required files that are present but not whole. Cheap checks always: the size recorded in
        the role's checksums.json at fetch time, and a safetensors file's own length (its header
        says how long the file is: catches truncation and a damaged header with no record at all).
        Files smaller than `hash_below` bytes are also hashed against the recorded sha256 (a
        flipped byte); `models verify` hashes everything."""
        root = self.path(models_dir)
        try:
            record = json.loads((root / CHECKSUMS_FILE).read_text(encoding="utf-8"))
            files = record["files"]
            files = files if isinstance(files, dict) else {}
        except (OSError, ValueError, KeyError, TypeError):
            files = {}  # nothing recorded (a hand-made folder or the tiny set): only the file itself can tell
        bad = []
        for rel in self.required:
            path = root / rel
            try:
                size = path.stat().st_size
            except OSError:
                continue  # missing() reports it
            entry = files.get(rel)
            entry = entry if isinstance(entry, dict) else {}
            if isinstance(entry.get("size"), int) and size != entry["size"]:
                bad.append(rel)
            elif rel.endswith(".safetensors") and not safetensors_intact(path, size):
                bad.append(rel)
            elif size < hash_below and isinstance(entry.get("sha256"), str) and sha256_file(path) != entry["sha256"]:
                bad.append(rel)
        return bad


def safetensors_intact(path: Path, size: int | None = None) -> bool:
    """Whether a safetensors file is as long as its header says: 8 bytes of header length, the
    JSON header, then exactly the tensors' bytes (the end of the last `data_offsets`). Reads the
    header only."""
    size = path.stat().st_size if size is None else size
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return False
            n = int.from_bytes(head, "little")
            if n > min(size - 8, 100 * 2**20):  # the format caps the header at 100 MB
                return False
            header = json.loads(fh.read(n))
        ends = [int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"]
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return False
    return 8 + n + max(ends, default=0) == size


_SD_FOLDERS = (
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "tokenizer/tokenizer_config.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
)

ROLES: dict[str, ModelRole] = {
    role.name: role
    for role in (
        ModelRole(
            name="personalized",
            title="Stable Diffusion 1.5 (personalized model base)",
            repo_id="stable-diffusion-v1-5/stable-diffusion-v1-5",
            licence="CreativeML OpenRAIL-M",
            folder="personalized",
            required=_SD_FOLDERS + ("feature_extractor/preprocessor_config.json",),
            allow_patterns=(
                "model_index.json",
                "feature_extractor/preprocessor_config.json",
                "scheduler/*.json",
                "text_encoder/config.json",
                "text_encoder/model.safetensors",
                "tokenizer/*",
                "unet/config.json",
                "unet/diffusion_pytorch_model.safetensors",
                "vae/config.json",
                "vae/diffusion_pytorch_model.safetensors",
            ),
        ),
        ModelRole(
            name="ip_adapter",
            title="IP-Adapter for SD 1.5",
            repo_id="h94/IP-Adapter",
            licence="Apache-2.0",
            folder="ip_adapter",
            required=("ip-adapter_sd15.safetensors",),
            allow_patterns=("models/ip-adapter_sd15.safetensors",),
            strip_prefix="models/",
        ),
        ModelRole(
            name="image_encoder",
            title="CLIP image encoder (IP-Adapter, ViT-H/14)",
            repo_id="h94/IP-Adapter",
            licence="Apache-2.0",
            folder="image_encoder",
            required=("config.json", "model.safetensors"),
            allow_patterns=("models/image_encoder/config.json", "models/image_encoder/model.safetensors"),
            strip_prefix="models/image_encoder/",
        ),
        ModelRole(
            name="multiview",
            title="Wonder3D v1.0 multi-view diffusion",
            repo_id="flamehaze1115/wonder3d-v1.0",
            licence="AGPL-3.0 (weights); MIT (Wonder3D code)",
            folder="multiview",
            required=(
                "unet/config.json",
                "unet/diffusion_pytorch_model.safetensors",
                "vae/config.json",
                "vae/diffusion_pytorch_model.safetensors",
                "image_encoder/config.json",
                "image_encoder/model.safetensors",
                "feature_extractor/preprocessor_config.json",
                "scheduler/scheduler_config.json",
            ),
            allow_patterns=("*.json", "unet/*", "vae/*", "image_encoder/*", "feature_extractor/*", "scheduler/*"),
        ),
        ModelRole(
            name="normal_estimator",
            title="Marigold normals v1.1 (single-view normal estimator)",
            repo_id="prs-eth/marigold-normals-v1-1",
            licence="Apache-2.0",
            folder="normal_estimator",
            required=_SD_FOLDERS,
            allow_patterns=(
                "model_index.json",
                "scheduler/*.json",
                "text_encoder/config.json",
                "text_encoder/model.safetensors",
                "tokenizer/*",
                "unet/config.json",
                "unet/diffusion_pytorch_model.safetensors",
                "vae/config.json",
                "vae/diffusion_pytorch_model.safetensors",
            ),
        ),
        ModelRole(
            name="segmenter",
            title="CLIPSeg background removal (used only for images without alpha)",
            repo_id="CIDAS/clipseg-rd64-refined",
            licence="Apache-2.0",
            folder="segmenter",
            required=(
                "config.json",
                "model.safetensors",
                "preprocessor_config.json",
                "vocab.json",
                "merges.txt",
                "tokenizer_config.json",
            ),
            allow_patterns=("*.json", "*.txt", "model.safetensors"),
        ),
    )
}

TINY_MARKER = "TINY_MODEL_SET"


def role(name: str) -> ModelRole:
    try:
        return ROLES[name]
    except KeyError:
        raise KeyError(f"unknown model role {name!r}; known roles: {', '.join(ROLES)}") from None


def is_tiny(models_dir: Path) -> bool:
    """A tiny set carries a marker file so a run can say it used random toy weights."""
    return (Path(models_dir) / TINY_MARKER).is_file()
