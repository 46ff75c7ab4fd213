"""The add-on's whole-job progress (blender_addon/progress.py: standard library only, so it runs
without bpy): one fraction over every stage, human names, one ETA, timings learned per machine."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("addon_progress", REPO / "blender_addon" / "progress.py")
progress = importlib.util.module_from_spec(_spec)
sys.modules["addon_progress"] = progress  # dataclasses look their module up while the class is built
_spec.loader.exec_module(progress)


def records() -> list[tuple[str, int, int, float | None]]:
    """What the service reports for one job: each stage from 0/1 'starting' to its last step."""
    seq: list[tuple[str, int, int, float | None]] = []
    for stage, total in (("subject", 1), ("subject_views", 2), ("identity", 5), ("edited_views", 3), ("edited_normals", 2),
                         ("subject_prior", 5), ("front_view", 2), ("multiview", 2), ("reconstruct", 13)):
        if stage != "edited_normals":
            seq.append((stage, 0, 1, None))
        seq += [(stage, s, total, None) for s in range(total + 1)]
    return seq


def test_whole_job_fraction_is_monotonic_across_stages():
    seconds = progress.estimated_seconds("default")
    out = [progress.job_progress(st, s, t, eta, seconds) for st, s, t, eta in records()]
    fractions = [p.fraction for p in out]
    assert all(b >= a - 1e-12 for a, b in zip(fractions, fractions[1:])), fractions
    assert fractions[0] == 0.0 and abs(fractions[-1] - 1.0) < 1e-9
    labels = [p.label for p in out]
    assert labels[0] == "Cutting out the subject" and labels[-1] == "Building the mesh"
    assert {"Learning the subject", "Editing views"} <= set(labels) and not any("_" in x for x in labels)
    etas = [p.eta_s for p in out]
    assert etas[0] > etas[len(etas) // 2] > etas[-1] == 0.0


def test_wrong_variant_per_stage_bars_go_backwards():
    """The per-stage step/total the panel used to show drops to 0 at every stage: the check above
    must catch that kind of bar."""
    per_stage = [s / t for _, s, t, _ in records()]
    assert any(b < a for a, b in zip(per_stage, per_stage[1:]))


def test_shares_follow_the_stage_times():
    """A stage that took most of the time on this machine gets most of the bar."""
    seconds = {name: 1.0 for name in progress.ORDER}
    seconds["identity"] = 100.0
    after_identity = progress.job_progress("edited_views", 0, 1, None, seconds).fraction
    assert after_identity > 0.9
    assert progress.job_progress("identity", 1, 2, None, seconds).fraction > 0.45
    # the stage's own measured ETA replaces its estimate
    assert progress.job_progress("identity", 1, 2, 7.0, seconds).eta_s == 7.0 + sum(
        v for k, v in seconds.items() if progress.ORDER.index(k) > progress.ORDER.index("identity"))


def test_stage_times_learned_from_job_json(tmp_path: Path):
    path = tmp_path / "stage_times.json"
    times = progress.StageTimes(path)
    assert times.seconds("fast") == progress.estimated_seconds("fast")
    job = {"stages": [{"name": "identity", "cached": False, "seconds": 12.0},
                      {"name": "subject_views", "cached": True, "seconds": 0.01},
                      {"name": "reconstruct", "cached": False, "seconds": 30.0}]}
    assert times.learn("fast", job)
    assert times.seconds("fast")["identity"] == 12.0 and times.seconds("fast")["reconstruct"] == 30.0
    assert times.seconds("fast")["subject_views"] == progress.estimated_seconds("fast")["subject_views"]  # cached: not a timing
    times.learn("fast", {"stages": [{"name": "identity", "cached": False, "seconds": 20.0}]})
    again = progress.StageTimes(path)  # persisted
    assert again.seconds("fast")["identity"] == 16.0 and again.learned("default") == {}
    path.write_text("not json")
    assert progress.StageTimes(path).seconds("default") == progress.estimated_seconds("default")


def test_time_left_is_estimating_until_this_machine_has_measured_the_preset():
    """Issue 27: the first job in a fresh user folder said "about 4:07 left" for a 40 s job, from
    invented GPU figures. Without measured timings the bar still moves, the time left is None."""
    seconds = progress.estimated_seconds("default")
    guessed = progress.job_progress("identity", 2, 5, None, seconds, measured=False)
    measured = progress.job_progress("identity", 2, 5, None, seconds, measured=True)
    assert guessed.eta_s is None and measured.eta_s is not None and guessed.fraction == measured.fraction
    times = progress.StageTimes(Path("/nonexistent/stage_times.json"))
    assert times.expectation("default").measured is False


def test_the_bar_and_time_left_move_between_records_but_never_past_the_next_step():
    seconds = {name: 10.0 for name in progress.ORDER}
    at = [progress.job_progress("multiview", 1, 4, None, seconds, since_s=t) for t in (0.0, 1.0, 2.0, 60.0)]
    nxt = progress.job_progress("multiview", 2, 4, None, seconds)
    fractions = [p.fraction for p in at]
    assert fractions[0] < fractions[1] < fractions[2] < fractions[3] < nxt.fraction, (fractions, nxt.fraction)
    assert at[0].eta_s > at[1].eta_s > at[2].eta_s >= 0.0
    # the stage's own estimate from the backend counts down with the clock as well
    assert progress.job_progress("multiview", 1, 4, 6.0, seconds, since_s=2.0).eta_s == 4.0 + 10.0
    # wrong variant: without the fill the bar stands still for the whole step
    assert progress.job_progress("multiview", 1, 4, None, seconds).fraction == progress.job_progress("multiview", 1, 4, None, seconds, since_s=0.0).fraction


def test_a_set_of_variants_has_a_total():
    seconds = {name: 10.0 for name in progress.ORDER}
    expect = progress.Expectation(seconds, True)
    # one running with 30 s left, two queued: each runs the three seeded stages only (the rest are cached)
    assert progress.set_seconds_left([("running", 30.0), ("queued", None), ("queued", None)], expect) == 30.0 + 2 * 30.0
    # nothing started yet: the first runs every stage
    assert progress.set_seconds_left([("queued", None), ("queued", None)], expect) == 80.0 + 30.0
    assert progress.set_seconds_left([("running", None), ("queued", None)], expect) is None
    assert progress.set_seconds_left([("running", 5.0)], progress.Expectation(seconds, False)) is None
