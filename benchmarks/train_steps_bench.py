"""How the two optimisations' loss falls with steps, learning rate and schedule (issue 16, item 4).

    python benchmarks/train_steps_bench.py [--stages identity,prior] [--lrs 1e-4,3e-4,1e-3]
        [--steps 25,50,100,200] [--schedules constant,cosine] [--json PATH]

For each stage, learning rate and schedule it trains the real trainer (`IdentityTrainer`,
`SubjectPriorTrainer`) from the same start and records:
- the training loss of every step, and its moving average over `--window` steps (the raw loss
  swings with the random timestep, so only the average means anything);
- a fixed evaluation loss at each step count in `--steps`: the mean loss over `--evals` draws
  (augmented views, noise, timesteps; no condition dropout) fixed before training, the same for
  every run, so runs are compared on identical data.
A constant rate is one run evaluated at every step count; a decaying schedule depends on the run's
length, so it is one run per step count. The reference is the `default` preset's rate, constant, at
its step count (200): for every other run the report gives the first step count whose evaluation
loss is at or below the reference's.

Models: the tiny set (real architectures, random weights) on the CPU. Random weights say little
about real ones: the UNet predicts noise badly whatever the adapter does, so losses move little and
the ranking of settings may not carry over. Use this to check the mechanics and as a first look,
not to pick step counts for real weights.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "backend"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

VIEW_NAMES = ("front", "front_right", "right", "back", "left", "front_left")


def moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def subject_views(size: int) -> list[Image.Image]:
    """Six RGBA views of the example subject (turned and mirrored copies: the tiny multi-view model's
    own views are noise, which would make the identity stage's data meaningless)."""
    subject = Image.open(REPO / "examples" / "toy_bear.png").convert("RGBA").resize((size, size))
    turns = (0, 10, 20, 0, -20, -10)
    return [(subject.transpose(Image.FLIP_LEFT_RIGHT) if name == "back" else subject).rotate(a) for name, a in zip(VIEW_NAMES, turns)]


class IdentityRuns:
    name = "identity"

    def __init__(self, models: Path, preset, evals: int):
        from make_your_3d.models.personalized import ip_adapter_parameters, load_personalized
        from make_your_3d.pipeline.identity import IdentityTrainer

        self.preset = preset
        self.pipe = load_personalized(models, torch.device("cpu"))
        self.views = list(zip(VIEW_NAMES, subject_views(64)))
        self.original = {k: v.detach().clone() for k, v in ip_adapter_parameters(self.pipe.unet).items()}
        fixed = IdentityTrainer(self.pipe, self.views, "a toy bear", preset.sd_size, 0.0, preset.identity_batch, seed=999)
        self.eval_set = []
        for _ in range(evals):
            batch = fixed.make_batch()
            self.eval_set.append((batch, *fixed.noise_for(batch)))
        self._loss = fixed.loss

    def trainer(self, lr: float, schedule: str):
        from make_your_3d.pipeline.identity import IdentityTrainer, load_ip_state

        load_ip_state(self.pipe.unet, self.original)
        return IdentityTrainer(self.pipe, self.views, "a toy bear", self.preset.sd_size, lr, self.preset.identity_batch, seed=0,
                               augment_pool=self.preset.identity_augment_pool, lr_schedule=schedule)

    def params(self, trainer):
        return trainer.params.values()

    @torch.no_grad()
    def evaluate(self) -> float:
        return float(np.mean([float(self._loss(b, n, t)) for b, n, t in self.eval_set]))


class PriorRuns:
    name = "prior"

    def __init__(self, models: Path, preset, evals: int):
        from make_your_3d.models.multiview import load_multiview
        from make_your_3d.models.registry import ROLES

        self.preset = preset
        self.mv = load_multiview(ROLES["multiview"].path(models), torch.device("cpu"), torch.float32)
        views = subject_views(preset.mv_size)
        self.colors = [v.convert("RGB") for v in views]
        self.normals = [Image.new("RGB", (preset.mv_size, preset.mv_size), (128, 128, 255)) for _ in views]
        self.condition = views[0]
        self.evals = evals
        self.eval_set = None

    def trainer(self, lr: float, schedule: str):
        from make_your_3d.pipeline.subject_prior import ADAPTER, SubjectPriorTrainer

        if getattr(self.mv.unet, "peft_config", {}).get(ADAPTER) is not None:
            self.mv.unet.delete_adapters(ADAPTER)  # a fresh LoRA (B zero, A from the seeded RNG below)
        torch.manual_seed(0)
        trainer = SubjectPriorTrainer(self.mv, self.colors, self.normals, self.condition, self.preset.lora_rank, lr, seed=0, lr_schedule=schedule)
        if self.eval_set is None:
            gen = torch.Generator().manual_seed(999)
            n = trainer.latents.shape[0]
            self.eval_set = [(torch.randn(trainer.latents.shape, generator=gen),
                              torch.randint(0, trainer.scheduler.config.num_train_timesteps, (1,), generator=gen).repeat(n)) for _ in range(self.evals)]
        self._trainer = trainer
        return trainer

    def params(self, trainer):
        return trainer.params.values()

    @torch.no_grad()
    def evaluate(self) -> float:
        return float(np.mean([float(self._trainer.loss(n, t)) for n, t in self.eval_set]))


def train_chunks(runs, trainer, steps: list[int]) -> tuple[list[float], dict[int, float]]:
    """Train to each step count in turn (one continuous run: `train` is called per chunk, the
    optimiser state carries over), evaluating at each."""
    losses, evals, done = [], {}, 0
    for target in steps:
        for p in runs.params(trainer):
            p.requires_grad_(True)  # `train` freezes them when it returns
        losses += trainer.train(target - done)
        done = target
        evals[target] = runs.evaluate()
    return losses, evals


def bench(args) -> dict:
    from make_your_3d.models.tiny import write_tiny_set
    from make_your_3d.pipeline.presets import resolve_preset

    models = args.work / "tiny"
    if not models.exists():
        write_tiny_set(models, seed=0)
    default = resolve_preset("default", None)
    preset = resolve_preset("default", models, {"identity_steps": default.identity_steps, "prior_steps": default.prior_steps})
    out = {"preset": {k: getattr(preset, k) for k in ("sd_size", "mv_size", "identity_batch", "identity_augment_pool", "lora_rank",
                                                      "identity_lr", "prior_lr", "identity_steps", "prior_steps")},
           "steps": args.steps, "lrs": args.lrs, "schedules": args.schedules, "window": args.window, "evals": args.evals, "stages": {}}
    for stage in args.stages:
        runs = IdentityRuns(models, preset, args.evals) if stage == "identity" else PriorRuns(models, preset, args.evals)
        default_lr = preset.identity_lr if stage == "identity" else preset.prior_lr
        default_steps = preset.identity_steps if stage == "identity" else preset.prior_steps
        runs.trainer(default_lr, "constant")
        start = runs.evaluate()  # the untrained model (original adapter / a zero LoRA)
        rows = []
        for lr in args.lrs:
            for schedule in args.schedules:
                t0 = time.perf_counter()
                if schedule == "constant":
                    losses, evals = train_chunks(runs, runs.trainer(lr, schedule), sorted(args.steps))
                    row = {"lr": lr, "schedule": schedule, "eval": evals, "losses": losses,
                           "smoothed": moving_average(losses, args.window)}
                else:
                    evals, curves = {}, {}
                    for n in sorted(args.steps):
                        trainer = runs.trainer(lr, schedule)
                        curves[n] = trainer.train(n)
                        evals[n] = runs.evaluate()
                    row = {"lr": lr, "schedule": schedule, "eval": evals, "losses_by_run": curves,
                           "smoothed_end": {n: moving_average(c, args.window)[-1] for n, c in curves.items()}}
                row["seconds"] = round(time.perf_counter() - t0, 1)
                rows.append(row)
                print(f"{stage} lr {lr:g} {schedule}: eval " + ", ".join(f"{n}: {v:.5f}" for n, v in row["eval"].items())
                      + f" ({row['seconds']} s, load {os.getloadavg()[0]:.2f})", flush=True)
        reference = next(r for r in rows if r["lr"] == default_lr and r["schedule"] == "constant")
        ref_steps = default_steps if default_steps in args.steps else max(args.steps)  # the preset's count, if it was run
        target = reference["eval"][ref_steps]
        ref_smooth = reference["smoothed"][ref_steps - 1]
        for r in rows:
            r["reaches_default_at"] = next((n for n in sorted(r["eval"]) if r["eval"][n] <= target), None)
            if "smoothed" in r:
                r["smoothed_reaches_default_at"] = next((i + 1 for i, v in enumerate(r["smoothed"]) if v <= ref_smooth), None)
        out["stages"][stage] = {"default_lr": default_lr, "default_steps": ref_steps, "reference_eval": target,
                                "reference_smoothed": ref_smooth, "untrained_eval": start, "runs": rows}
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=lambda s: s.split(","), default=["identity", "prior"])
    parser.add_argument("--lrs", type=lambda s: [float(x) for x in s.split(",")], default=[1e-4, 3e-4, 1e-3])
    parser.add_argument("--steps", type=lambda s: [int(x) for x in s.split(",")], default=[25, 50, 100, 200])
    parser.add_argument("--schedules", type=lambda s: s.split(","), default=["constant", "cosine"])
    parser.add_argument("--window", type=int, default=20)
    parser.add_argument("--evals", type=int, default=16)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    args.work = args.work or Path(tempfile.mkdtemp(prefix="train_steps_"))
    args.work.mkdir(parents=True, exist_ok=True)
    res = bench(args)
    res["machine"] = {"machine": platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                      "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"), "load_end": os.getloadavg()[0]}
    for stage, data in res["stages"].items():
        print(f"\n{stage}: untrained eval loss {data['untrained_eval']:.5f}; reference (lr {data['default_lr']:g}, constant, "
              f"{data['default_steps']} steps) {data['reference_eval']:.5f}")
        print("| lr | schedule | " + " | ".join(f"eval@{n}" for n in sorted(args.steps)) + " | reaches reference at |")
        print("|---|---|" + "---|" * len(args.steps) + "---|")
        for r in data["runs"]:
            print(f"| {r['lr']:g} | {r['schedule']} | " + " | ".join(f"{r['eval'][n]:.5f}" for n in sorted(args.steps))
                  + f" | {r['reaches_default_at'] or 'not within ' + str(max(args.steps))} |")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
