"""The model roles of the method, where each comes from and which local files make it complete.

Every role lives in its own folder under the models directory. A role is *complete* when each of
its `required` files exists there and none is damaged (`ModelRole.damaged`); loaders, `doctor`,
`models list`, the service and the tiny-set writer all read this one table.
"""

from __future__ import annotations

import json
import os
import shutil
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

# Parameters of each published network, from the published configs built on the meta device
# (published_configs/SOURCES.md; models/random_set.py builds them, tests/test_gpu_chain_bench.py checks).
PUBLISHED_PARAMETERS: dict[str, int] = {
    "personalized/unet": 859_520_964,
    "personalized/vae": 83_653_863,
    "personalized/text_encoder": 123_060_480,
    "image_encoder": 632_076_800,
    "ip_adapter": 22_319_616,
    "multiview/unet": 910_785_284,
    "multiview/vae": 83_653_863,
    "multiview/image_encoder": 303_966_208,
    "normal_estimator/unet": 865_922_244,
    "normal_estimator/vae": 83_653_863,
    "normal_estimator/text_encoder": 340_387_840,
    "segmenter": 150_747_746,
}
# Where the demo says it wrote its tiny set, inside the models folder it found incomplete, so a later
# missing-weights error can point at it (models/registry.missing_weights_advice).
DEMO_TINY_POINTER = "demo_tiny_set.json"


def download_bytes(names: list[str] | tuple[str, ...] | None = None) -> int:
    """Download size of the given roles (all by default) at 2 bytes per parameter (fp16), the
    published configs' parameter counts; a repository storing fp32 files downloads up to twice that."""
    names = list(ROLES) if names is None else list(names)
    return sum(n for key, n in PUBLISHED_PARAMETERS.items() if key.split("/")[0] in names) * 2


def record_demo_tiny_set(models_dir: Path, tiny_dir: Path) -> None:
    """Note in the (incomplete) models folder where the demo wrote its tiny set; atomic, best effort."""
    try:
        Path(models_dir).mkdir(parents=True, exist_ok=True)
        tmp = Path(models_dir) / f".{DEMO_TINY_POINTER}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps({"tiny_models": str(Path(tiny_dir).resolve())}), encoding="utf-8")
        os.replace(tmp, Path(models_dir) / DEMO_TINY_POINTER)
    except OSError:
        pass  # only a hint for a later error message


def demo_tiny_set(models_dir: Path) -> Path | None:
    """The tiny set the demo wrote for this models folder, if it is still there."""
    try:
        path = Path(json.loads((Path(models_dir) / DEMO_TINY_POINTER).read_text(encoding="utf-8"))["tiny_models"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return path if is_tiny(path) else None


def missing_weights_advice(models_dir: Path) -> str:
    """What to do about missing roles: `models fetch` with its download size (every incomplete role,
    as fetch takes them) and the free disk space, and, after `demo`, the tiny set it wrote."""
    from make_your_3d.files import nearest_existing

    free = shutil.disk_usage(nearest_existing(Path(models_dir))).free
    need = download_bytes([name for name, role in ROLES.items() if not role.complete(models_dir)])
    text = (f"Run `make-your-3d models fetch` to download them (about {need / 1e9:.1f} GB; "
            f"{free / 1e9:.1f} GB free on the disk of {models_dir}"
            + (", not enough: free some space or pass --models DIR on another disk" if free < need * 1.1 else "") + ").")
    tiny = demo_tiny_set(models_dir)
    if tiny is not None:
        text += (f" The demo wrote a TINY model set to {tiny} (random weights: the chain runs, the pictures are noise); "
                 f"to try it, add `--models {tiny}`.")
    else:
        text += " (`make-your-3d models tiny --out DIR` writes a random-weight test set.)"
    return text


def role(name: str) -> ModelRole:
    try:
        return ROLES[name]
    except KeyError:
        raise KeyError(f"unknown model role {name!r}; known roles: {', '.join(ROLES)}") from None


def is_tiny(models_dir: Path) -> bool:
    """A tiny set carries a marker file so a run can say it used random toy weights."""
    return (Path(models_dir) / TINY_MARKER).is_file()
