"""What checkpointing every N steps costs a training step: written and stored on the step or off it.

    .venv/bin/python -m bench.checkpoint [--every 12] [--steps 24] [--epochs 3] [--batch 2] [--crop 128]

Synthesizes and packs a small dataset in a temporary folder and starts a local S3 API server (moto, on
127.0.0.1) for the trials' storage. Three `orchestrator train` runs of the same trial (resnet18-deeplabv3plus,
1 Ray Train worker, 1 thread; its checkpoint, weights and SGD momentum, is about 2 x the model's size):
- no checkpoint within the epoch (`train.checkpoint_every: 0`): the step's own time;
- a checkpoint every `--every` steps, written and stored on the step (`train.checkpoint_upload: sync`);
- the same in the background (`train.checkpoint_upload: background`, the default): the step copies the
  state, Ray Train's upload thread writes and stores it.
A step's time is an epoch's training time, its interval checkpoints included, divided by its steps: the
images_per_s each trial logs per epoch; each run's figure is its best epoch after the first. On a 2-core
machine the upload thread and the S3 server take CPU from the step; a store across a network waits on the
network instead, and a GPU's step needs little CPU: the background's gain here is the least it gives.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ["OMP_NUM_THREADS"] = "1"  # this process and the Ray workers it starts (1 CPU each)
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import s3fs  # noqa: E402

from bench import common  # noqa: E402
from bench.local_s3 import local_s3  # noqa: E402

BENCH = "checkpoint"
BUCKET = "bench-checkpoints"


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--every", type=int, default=12, help="checkpoint every this many steps")
    p.add_argument("--steps", type=int, default=24, help="training steps per epoch")
    p.add_argument("--epochs", type=int, default=3, help="epochs per run; the first warms up")
    p.add_argument("--batch", type=int, default=2, help="batch per worker")
    p.add_argument("--crop", type=int, default=128)
    args = p.parse_args()

    with common.workspace("bench-checkpoint-") as root, local_s3(root / "moto.log") as s3:
        os.environ.update(s3.env)  # the Ray workers started from here reach the store as this process does
        s3fs.S3FileSystem(**s3.storage_options).mkdir(BUCKET)
        shards = common.synth_pack(root, train=2 * args.batch * args.steps, val=4, size=(256, 144))
        raw = common.small_spec(
            BENCH, shards, steps=args.steps, batch=args.batch, crop=args.crop, epochs=args.epochs,
            storage=f"s3://{BUCKET}/runs",
        )  # fmt: skip
        step = {}
        for setup, every, upload in [("none", 0, "sync"), ("sync", args.every, "sync"),
                                     ("background", args.every, "background")]:  # fmt: skip
            train = {**raw["train"], "checkpoint_every": every, "checkpoint_upload": upload}
            spec = {**raw, "train": train, "tracking": {"experiment": f"{BENCH}-{setup}"}}
            step[setup] = min(common.trained_step_s(spec, f"checkpoint {setup}")[1:])

    none = f"no interval checkpoint ({common.number(step['none'])} s/step)"
    rows = [
        common.Row(BENCH, "no checkpoint within the epoch", step["none"], "s/step"),
        common.Row(BENCH, f"every {args.every} steps, on the step", step["sync"], "s/step",
                   step["sync"] / step["none"], none),
        common.Row(BENCH, f"every {args.every} steps, in the background", step["background"], "s/step",
                   step["background"] / step["none"], none),
        common.Row(BENCH, "checkpointing's cost per step: background / on the step",
                   (step["background"] - step["none"]) / (step["sync"] - step["none"]), "x"),
    ]  # fmt: skip
    common.emit(
        rows,
        f"resnet18-deeplabv3plus, batch {args.batch}, crop {args.crop}, {args.steps} steps/epoch, "
        f"checkpoints to a local S3 server (moto), best of epochs 2-{args.epochs}, 1 worker, 1 thread",
        args.json,
    )


if __name__ == "__main__":
    main()
