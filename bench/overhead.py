"""What orchestration costs: the same `train_epoch` code in-process vs inside Ray Train workers.

    .venv/bin/python bench/overhead.py [--steps 16] [--size 256x144] [--crop 128]

Synthesizes and packs a small dataset in a temporary folder, then measures, in one run:
training images/s of a warm epoch in-process on one thread (the baseline), through `orchestrator
train` with 1 Ray Train worker, and with 2 DDP workers (gloo) for bn and syncbn; and the wall time
of each whole trial (Ray Train start, 2 epochs, checkpoints, MLflow). Ratios are to the baseline.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import torch  # noqa: E402

from orchestrator import spec as specs  # noqa: E402
from orchestrator.data.shards import pack  # noqa: E402
from orchestrator.data.synth import synthesize  # noqa: E402
from orchestrator.sweep import run_single  # noqa: E402
from orchestrator.train import checkpoint  # noqa: E402
from orchestrator.train.loop import Position, Worker, make_optimizer, train_epoch  # noqa: E402


def in_process(spec: specs.Spec) -> float:
    """Images/s of the second (warm) epoch, one process, one thread, like a 1-CPU Ray worker."""
    torch.set_num_threads(1)
    w = Worker(spec)
    torch.manual_seed(spec.train.seed)
    model = checkpoint.model_for(spec)
    optimizer = make_optimizer(spec, model)
    train_epoch(w, model, optimizer, Position(0))
    return train_epoch(w, model, optimizer, Position(1))["images_per_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=16, help="training steps per epoch")
    p.add_argument("--size", default="256x144", help="synthetic image WIDTHxHEIGHT")
    p.add_argument("--crop", type=int, default=128)
    args = p.parse_args()
    width, height = (int(v) for v in args.size.split("x"))

    root = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root}/mlflow.db"
    os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    batch = 2
    synthesize(str(root / "synth"), train=2 * batch * args.steps, val=4, size=(width, height))
    pack(str(root / "synth"), str(root / "shards"), shard_size=32)
    spec = specs.validate(
        {
            "name": "bench-overhead",
            "data": {"train": f"{root}/shards/train", "val": f"{root}/shards/val", "loader_workers": 0},
            "model": {"backbone": "resnet18"},
            "train": {
                "epochs": 2,
                "steps_per_epoch": args.steps,
                "batch_per_gpu": batch,
                "crop": [args.crop] * 2,
            },
            "resources": {"workers_per_trial": 1, "cpus_per_worker": 1},
            "storage": str(root / "runs"),
        }
    )

    baseline = in_process(spec)
    rows = [("in-process, 1 thread", baseline, float("nan"))]
    for workers, norm in ((1, "bn"), (2, "bn"), (2, "syncbn")):
        trial = spec.model_copy(
            update={
                "norm": norm,
                "resources": spec.resources.model_copy(update={"workers_per_trial": workers}),
            }
        )
        started = time.perf_counter()
        outcome = run_single(trial)
        wall = time.perf_counter() - started
        if outcome.status != "FINISHED":
            raise SystemExit(f"{workers} x {norm} failed: {outcome.error}")
        rows.append((f"Ray Train, {workers} worker(s), {norm}", outcome.metrics["images_per_s"], wall))

    print(
        f"\nresnet18-deeplabv3plus, batch {batch}/worker, crop {args.crop}, {args.steps} steps/epoch, "
        f"{os.cpu_count()} cores, torch {torch.__version__}"
    )
    print(f"{'setup':<32} {'img/s':>7} {'x in-process':>13} {'trial wall s':>13}")
    for name, rate, wall in rows:
        print(f"{name:<32} {rate:7.2f} {rate / baseline:13.2f} {wall:13.1f}")


if __name__ == "__main__":
    main()
