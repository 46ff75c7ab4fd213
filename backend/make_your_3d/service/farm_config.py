"""Settings of `serve --ray`: where the Ray cluster is and how the farm of workers uses it.

Kept free of Ray (and of torch) so the serve command can read and check them before it decides
whether to import Ray at all; local mode never imports Ray.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from make_your_3d.errors import BadRequest


@dataclass
class FarmConfig:
    """How the serving process runs its jobs on Ray actors (service/farm.py)."""

    # The Ray cluster: an address `ray.init` accepts ("10.0.0.5:6379", "ray://head:10001"), or "auto"
    # to start a Ray instance inside the serving process (this machine's GPUs become the workers).
    address: str = "auto"
    # How many workers (actors) to run; None: one per unit of `resource` the cluster has.
    workers: int | None = None
    # What one worker holds one unit of: "GPU" is `num_gpus=1` (a real farm); any other name is a
    # custom Ray resource (the tests declare "mk3d_gpu" on the CPU so two workers fit one machine).
    resource: str = "GPU"
    # CPUs each worker reserves besides its GPU (image decoding, reconstruction run on the CPU).
    worker_cpus: float = 1.0
    # Seconds between two reads of a running job's progress from its worker (the reads are cheap
    # actor calls; this bounds how late a progress record, a cancel or a finished job is seen).
    poll_s: float = 0.1
    # A job is started at most this many times when its workers are lost under it; then it fails
    # with worker_lost (a job that kills its worker every time must not loop for ever).
    max_attempts: int = 3
    # The weights' folder on the worker nodes; None: serve's --models (the same path on every node).
    models_dir: str | None = None
    # Root of the workers' stage caches on their nodes (worker i uses ROOT/slot-i); None: beside the
    # node's per-user stage cache, its name + "-farm" (~/.cache/make-your-3d/stages-farm on Linux).
    cache_dir: str | None = None
    # Environment variables every worker process gets (Ray's runtime_env env_vars).
    env_vars: dict[str, str] = field(default_factory=dict)
    # Only for address "auto": the object store's size in bytes (None: Ray's default share of RAM).
    object_store_bytes: int | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "the farm settings") -> "FarmConfig":
        """Checked settings from the `farm` object of `serve --config` (unknown keys refused)."""
        if not isinstance(data, dict):
            raise BadRequest(f"{where} must be a JSON object of farm settings.")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise BadRequest(f"{where} has unknown keys {unknown}; allowed: {', '.join(sorted(names))}.")
        config = cls(**data)
        config.check(where)
        return config

    def check(self, where: str = "the farm settings") -> None:
        if not isinstance(self.address, str) or not self.address:
            raise BadRequest(f"The Ray address in {where} must be text: an address, or auto.")
        if self.workers is not None and (not isinstance(self.workers, int) or isinstance(self.workers, bool) or not 1 <= self.workers <= 4096):
            raise BadRequest(f"'workers' in {where} must be a whole number from 1 to 4096.")
        if not isinstance(self.resource, str) or not self.resource:
            raise BadRequest(f"'resource' in {where} must be a Ray resource name, e.g. GPU.")
        for name, low in (("worker_cpus", 0.0), ("poll_s", 0.01)):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= 600:
                raise BadRequest(f"'{name}' in {where} must be a number from {low} to 600.")
        if not isinstance(self.max_attempts, int) or isinstance(self.max_attempts, bool) or not 1 <= self.max_attempts <= 100:
            raise BadRequest(f"'max_attempts' in {where} must be a whole number from 1 to 100.")
        if not isinstance(self.env_vars, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in self.env_vars.items()):
            raise BadRequest(f"'env_vars' in {where} must map names to text values.")
