"""What a sweep costs beyond its trials: `orchestrator sweep` of a 4-trial grid on a local Ray, from the
command to the first training step, and the grid's wall time against the ideal packing of its trials.

    .venv/bin/python -m bench.sweep [--steps 8] [--epochs 2] [--crop 128] [--size 256x144]

Synthesizes and packs a small dataset in a temporary folder and writes a spec of 4 trials (norm bn, gn:g8 x
batch per worker 1, 2; resnet18-deeplabv3plus, 1 worker of 1 CPU per trial, `max_concurrent_trials` = the
trials that fit in this machine's CPUs), then runs `orchestrator sweep` as a subprocess with a private
RAY_TMPDIR and a SQLite MLflow store in the temporary folder. The figures come from what the sweep logged
to MLflow (wall-clock milliseconds):
- a trial's first training step starts at t1 - train1 - (t2 - t1 - train2): t_e is the timestamp of epoch
  e's metrics, train_e its training time (steps x batch / images_per_s); t2 - t1 - train2 is what an epoch
  spends besides training (loader start, validation, checkpoint, report, MLflow), taken from epoch 2 and
  subtracted from epoch 1 as well. The MLflow trial run opens before Ray Train starts its workers;
- command to first step: from the moment the command is started to the earliest trial's first step
  (Python and Ray start, Tune, the trial driver, the worker group, model and loader). Target <= 20 s;
- grid wall: the first trial run's start to the last one's end; ideal: the sum of the trial runs' durations
  over the concurrent slots (perfect packing, no gaps between trials). Target: wall <= 1.1x ideal.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import yaml  # noqa: E402
from mlflow.entities import Run  # noqa: E402

from bench import common  # noqa: E402
from orchestrator import tracking  # noqa: E402

BENCH = "sweep"
GRID = {"norm": ["bn", "gn:g8"], "train.batch_per_gpu": [1, 2]}
CPUS_PER_TRIAL = 1  # 1 worker of 1 CPU (common.small_spec)


def first_step(run: Run, steps: int) -> float:
    """When the trial's first training step started, in seconds since the epoch (see the docstring)."""
    c = tracking.client()
    rates = {m.step: m for m in c.get_metric_history(run.info.run_id, "images_per_s")}
    batches = {m.step: m.value for m in c.get_metric_history(run.info.run_id, "batch_per_gpu")}
    if not {1, 2} <= set(rates):
        raise SystemExit(f"trial {run.info.run_name} logged epochs {sorted(rates)}: the bench needs 1 and 2")
    t1, t2 = rates[1].timestamp / 1000, rates[2].timestamp / 1000
    train1, train2 = (steps * batches[e] / rates[e].value for e in (1, 2))
    return t1 - train1 - max(0.0, t2 - t1 - train2)


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--steps", type=int, default=8, help="training steps per epoch")
    p.add_argument("--epochs", type=int, default=2, help="epochs per trial (at least 2)")
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--size", default="256x144", help="synthetic image WIDTHxHEIGHT")
    args = p.parse_args()
    if args.epochs < 2:
        p.error("--epochs: the first step's time is derived from epochs 1 and 2")
    slots = max(1, (os.cpu_count() or 1) // CPUS_PER_TRIAL)

    with common.workspace("bench-sweep-") as root:
        size = tuple(int(v) for v in args.size.split("x"))
        batch = max(GRID["train.batch_per_gpu"])
        shards = common.synth_pack(root, train=batch * args.steps, val=4, size=size)
        raw = common.small_spec(
            BENCH, shards, steps=args.steps, batch=1, crop=args.crop, epochs=args.epochs, grid=GRID
        )
        raw["resources"]["max_concurrent_trials"] = slots
        spec_path = root / "spec.yaml"
        spec_path.write_text(yaml.safe_dump(raw))
        log_path = root / "sweep.log"
        started = time.time()
        with open(log_path, "w") as log:
            cmd = [sys.executable, "-m", "orchestrator", "sweep", str(spec_path)]
            done = subprocess.run(
                cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
            )
        ended = time.time()
        if done.returncode:
            sys.stderr.write(Path(log_path).read_text()[-5000:])
            raise SystemExit(f"orchestrator sweep exited {done.returncode}")
        c = tracking.client()
        exp = c.get_experiment_by_name(BENCH)
        parent = tracking.latest_sweep_run([exp.experiment_id])
        ray_up = parent.info.start_time / 1000  # the sweep run opens once Ray is up, before Tune starts
        runs = tracking.trial_runs(exp.experiment_id, parent.info.run_id)
        starts = [r.info.start_time / 1000 for r in runs]
        ends = [r.info.end_time / 1000 for r in runs]
        firsts = [first_step(r, args.steps) for r in runs]

    wall = max(ends) - min(starts)
    ideal = sum(e - s for s, e in zip(starts, ends, strict=True)) / slots
    rows = [
        common.Row(
            BENCH, "command start -> first training step", min(firsts) - started, "s", target="<= 20 s"
        ),
        common.Row(BENCH, "  of which: command start -> Ray up (sweep run opened)", ray_up - started, "s"),
        common.Row(BENCH, "  of which: Ray up -> first trial run opened (Tune)", min(starts) - ray_up, "s"),
        common.Row(
            BENCH,
            f"  trial run opened -> its first step (Ray Train workers, model, loader; mean of {len(runs)})",
            statistics.mean(f - s for f, s in zip(firsts, starts, strict=True)),
            "s",
        ),
        common.Row(BENCH, f"ideal: sum of {len(runs)} trial times / {slots} slots", ideal, "s"),
        common.Row(
            BENCH,
            "grid wall (first trial start -> last trial end)",
            wall,
            "s",
            wall / ideal,
            "ideal",
            "<= 1.1x",
        ),
        common.Row(
            BENCH,
            "whole command (Ray start and stop included)",
            ended - started,
            "s",
            (ended - started) / ideal,
            "ideal",
        ),
    ]
    common.emit(
        rows,
        f"{len(runs)} trials ({' x '.join(GRID)}), resnet18-deeplabv3plus, crop {args.crop}, "
        f"{args.epochs} epochs of {args.steps} steps, 1 worker x 1 CPU per trial, {slots} concurrent",
        args.json,
    )


if __name__ == "__main__":
    main()
