# SPDX-License-Identifier: GPL-3.0-or-later
"""One progress bar per job: the service reports per-stage steps (`stage`, `step`/`total`, the
stage's own ETA); this turns them into one fraction for the whole job, a human stage name and one
ETA for the whole job.

Each stage's share of the job is its expected duration: learned from earlier jobs on this machine
(their job.json stage timings, per preset) or, the first time, an estimate from the preset's step
counts. Standard library only (no bpy), so it is tested on its own.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

# The stage list the backend publishes (GET /v1/schema: names in run order, labels, sub-stages)
# is what the bar uses; these are the fallbacks for a backend too old to publish it.
# tests/test_job_params.py checks them against the backend's declaration.
STAGES: tuple[tuple[str, str], ...] = (
    ("subject", "Cutting out the subject"),
    ("subject_views", "Seeing the subject from all sides"),
    ("identity", "Learning the subject"),
    ("edited_views", "Editing views"),
    ("subject_prior", "Teaching the 3D model the edit"),
    ("front_view", "Painting the edited subject"),
    ("multiview", "Turning it into six views"),
    ("reconstruct", "Building the mesh"),
)
SUBSTAGES: dict[str, str] = {"edited_normals": "edited_views"}  # sub-stage -> the stage it reports inside
SEEDED: frozenset[str] = frozenset({"front_view", "multiview", "reconstruct"})  # the stages each variant runs itself
ORDER = [name for name, _ in STAGES]
PREPARING = "Preparing the image"  # running, before the first stage reports (loading models, masking)
SUBSTAGE_START = 0.8  # a sub-stage fills its parent's share from here on; the parent's own steps fill the part before


@dataclass(frozen=True)
class StagePlan:
    """The stages of a job in run order, what the artist reads for each, and their sub-stages."""

    order: tuple[str, ...]
    labels: dict[str, str]
    parent_of: dict[str, str]  # sub-stage -> its stage
    seeded: frozenset[str] = frozenset()  # stages that read the seed: a set's later variants run only these

    @classmethod
    def from_schema(cls, stages: object) -> "StagePlan | None":
        """The plan from the backend's published list (None when it is not a usable list)."""
        if not isinstance(stages, list) or not stages:
            return None
        try:
            order = tuple(str(s["name"]) for s in stages)
            labels = {str(s["name"]): str(s.get("label") or s["name"]) for s in stages}
            parents = {str(sub): str(s["name"]) for s in stages for sub in (s.get("substages") or ())}
            seeded = frozenset(str(s["name"]) for s in stages if s.get("reads_seed"))
        except (KeyError, TypeError, AttributeError):
            return None
        return cls(order, labels, parents, seeded)


FALLBACK_PLAN = StagePlan(tuple(ORDER), dict(STAGES), dict(SUBSTAGES), SEEDED)
FILL_LIMIT = 0.9  # between two records the bar fills at most this far into the step in flight
# First-time estimates in seconds on a CUDA GPU for the default preset (they only need the right
# proportions: after one job the machine's own timings replace them).
DEFAULT_SECONDS = {"subject": 1.0, "subject_views": 8.0, "identity": 60.0, "edited_views": 45.0, "subject_prior": 60.0,
                   "front_view": 6.0, "multiview": 8.0, "reconstruct": 60.0}
# Per preset, how much longer each stage runs than in "default" (from the presets' step counts).
PRESET_FACTORS = {
    "fast": {"subject_views": 0.75, "identity": 0.4, "edited_views": 0.67, "subject_prior": 0.4, "front_view": 0.67,
             "multiview": 0.75, "reconstruct": 0.6},
    "default": {},
    "quality": {"subject_views": 1.5, "identity": 2.0, "edited_views": 1.33, "subject_prior": 2.0, "front_view": 1.33,
                "multiview": 1.5, "reconstruct": 1.5},
    "lowvram": {name: 1.5 for name in ORDER},
}
UNKNOWN_STAGE_SECONDS = 30.0  # first guess for a stage the backend lists and these tables do not
LEARN_WEIGHT = 0.5  # a new timing moves the learned one halfway (a few jobs settle it)


@dataclass(frozen=True)
class Expectation:
    """What a running job's bar is measured against: each stage's expected seconds, whether they were
    measured on this machine for the job's preset, and the backend's stage list."""

    seconds: dict[str, float]
    measured: bool
    plan: StagePlan = FALLBACK_PLAN


@dataclass(frozen=True)
class JobProgress:
    fraction: float  # 0..1 for the whole job
    label: str  # the current stage, in words
    eta_s: float | None  # seconds left for the whole job (None: unknown)


def estimated_seconds(preset: str) -> dict[str, float]:
    factors = PRESET_FACTORS.get(preset, {})
    return {name: DEFAULT_SECONDS[name] * factors.get(name, 1.0) for name in ORDER}


def _durations(seconds: dict[str, float], plan: StagePlan) -> list[float]:
    return [max(float(seconds.get(name, DEFAULT_SECONDS.get(name, UNKNOWN_STAGE_SECONDS))), 1e-3) for name in plan.order]


def job_progress(stage: str, step: int, total: int, stage_eta_s: float | None, seconds: dict[str, float],
                 plan: StagePlan = FALLBACK_PLAN, *, measured: bool = True, since_s: float = 0.0) -> JobProgress:
    """Whole-job progress from one service record of a running job. `seconds`: expected duration of
    each stage (StageTimes.seconds); `plan`: the backend's stage list; `measured`: whether `seconds`
    were measured on this machine for this preset (if not, the time left is None, "estimating",
    rather than an invented number); `since_s`: seconds since the record arrived, over which the
    bar keeps filling at the expected pace toward the next step (never past FILL_LIMIT of it) and
    the time left keeps falling. Later stages never count as done, earlier ones always do."""
    sub = stage in plan.parent_of
    parent = plan.parent_of.get(stage, stage)
    if parent not in plan.labels:
        return JobProgress(0.0, PREPARING if not stage else stage.replace("_", " ").capitalize(), None)
    durations = _durations(seconds, plan)
    i = plan.order.index(parent)
    # this (sub-)stage's share of its stage: a sub-stage fills the last part, its parent the part before
    share = (1.0 - SUBSTAGE_START) if sub else (SUBSTAGE_START if parent in plan.parent_of.values() else 1.0)
    steps = min(max(float(step), 0.0), float(total)) if total > 0 else 0.0
    if total > 0 and step < total and since_s > 0:
        step_s = durations[i] * share / total  # the expected time of one step of it
        steps = min(steps + since_s / step_s, step + FILL_LIMIT)
    inner = steps / total if total > 0 else 0.0
    inner = SUBSTAGE_START + share * inner if sub else share * inner
    done = sum(durations[:i]) + durations[i] * inner
    if not measured:
        return JobProgress(min(done / sum(durations), 1.0), plan.labels[parent], None)
    later = sum(durations[i + 1:])
    if stage_eta_s is not None and stage_eta_s >= 0:  # the stage's own linear estimate, measured on this run
        current_left = max(float(stage_eta_s) - since_s, 0.0) + (durations[i] * (1.0 - SUBSTAGE_START) if not sub and share < 1.0 else 0.0)
    else:
        current_left = durations[i] * (1.0 - inner)
    return JobProgress(min(done / sum(durations), 1.0), plan.labels[parent], current_left + later)


def set_seconds_left(jobs: list[tuple[str, float | None]], expect: Expectation) -> float | None:
    """Time left for a set of variants, from each job's (status, time left) in run order: a running
    job's own estimate, then per queued job the stages it will run (a set's first job all of them,
    later ones only the stages that read the seed: the rest come from the cache). None when any part
    is unknown (timings not measured on this machine yet, a running job still estimating)."""
    if not expect.measured:
        return None
    durations = dict(zip(expect.plan.order, _durations(expect.seconds, expect.plan)))
    variant = sum(d for name, d in durations.items() if name in expect.plan.seeded)
    started = any(status in ("running", "done") for status, _ in jobs)
    total = 0.0
    for status, left in jobs:
        if status == "running":
            if left is None:
                return None
            total += left
        elif status == "queued":
            total += variant if started else sum(durations.values())
            started = True
    return total


class StageTimes:
    """Per preset, how long each stage took on this machine (a JSON file in the add-on's user folder)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._data: dict[str, dict[str, float]] = {}
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
            if isinstance(raw, dict):
                self._data = {str(p): {str(k): float(v) for k, v in d.items()} for p, d in raw.items() if isinstance(d, dict)}
        except (OSError, ValueError, TypeError, AttributeError):
            self._data = {}

    def seconds(self, preset: str) -> dict[str, float]:
        """Learned timings where there are some, estimates for the rest."""
        return {**estimated_seconds(preset), **self._data.get(preset, {})}

    def learned(self, preset: str) -> dict[str, float]:
        return dict(self._data.get(preset, {}))

    def expectation(self, preset: str, plan: StagePlan = FALLBACK_PLAN) -> Expectation:
        return Expectation(self.seconds(preset), bool(self._data.get(preset)), plan)

    def learn(self, preset: str, job_record: dict) -> bool:
        """Take the computed (not cached) stages' seconds from a finished job's job.json."""
        stages = job_record.get("stages") if isinstance(job_record, dict) else None
        if not isinstance(stages, list):
            return False
        mine = self._data.setdefault(preset, {})
        changed = False
        for rec in stages:
            if not isinstance(rec, dict) or rec.get("cached") or not isinstance(rec.get("name"), str):
                continue
            try:
                secs = float(rec["seconds"])
            except (KeyError, TypeError, ValueError):
                continue
            old = mine.get(rec["name"])
            mine[rec["name"]] = secs if old is None else old + LEARN_WEIGHT * (secs - old)
            changed = True
        if changed:
            self._save()
        return changed

    def _save(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self._data, indent=1), encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError:
            pass  # timings are a nicety; never fail a job over them
