"""What the orchestrator costs per training step: a bare PyTorch loop vs the worker loop, in-process and
inside Ray Train (1 worker, 2 DDP workers), the same model, data and batch, measured in one run.

    .venv/bin/python -m bench.step_overhead [--steps 16] [--epochs 3] [--batch 2] [--crop 128] [--size WxH]
                                            [--ddp-norms bn syncbn]

Synthesizes and packs a small dataset in a temporary folder. Every setup trains resnet18-deeplabv3plus
(`checkpoints.model_for`, same seed) on 1 thread per worker (OMP_NUM_THREADS=1 here and in the Ray workers
started from here, which hold 1 CPU each), with the same loader: the orchestrator's, decoding and
augmenting in the training process (`data.loader_workers: 0`), so every setup reads the same batches and
pays the same decoding. The setups:
- bare loop: the model, `torch.optim.SGD` (momentum, weight decay), `F.cross_entropy`, backward, step;
  nothing of the orchestrator's loop;
- worker loop in-process: `train_epoch`, the code every Ray Train worker runs (LR schedule per step,
  parameter groups, the trial's loss, a finiteness check, all-reduced sums), in this process;
- `orchestrator train` (`sweep.run_single`) with 1 Ray Train worker, and with 2 DDP workers (gloo) for
  each norm of `--ddp-norms` (default bn).
A step's time is an epoch's training time (the loader's batches included, the loader's start, validation,
checkpoints and trial start excluded: what `train_epoch` reports as images_per_s, per epoch in MLflow)
divided by its steps; each setup's figure is its best epoch after the first (warm-up) one. Drift on a shared
machine is kept out of the ratios: the in-process worker loop alternates with the bare loop epoch by epoch,
and each Ray Train setup is compared with the bare loop's best of the 2 epochs before and the 2 after it
(the bare loop's own row is its best epoch of the whole run).
Target (issue 9): Ray Train, 1 worker <= 1.03x the bare loop's step time.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterator
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ["OMP_NUM_THREADS"] = "1"  # this process and the Ray workers it starts (1 CPU each)
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench import common  # noqa: E402
from orchestrator import checkpoints  # noqa: E402
from orchestrator import spec as specs  # noqa: E402
from orchestrator.data.layout import IGNORE_INDEX  # noqa: E402
from orchestrator.train.loop import Position, Worker, make_optimizer, train_epoch  # noqa: E402

BENCH = "step_overhead"


def bare_epochs(spec: specs.Spec) -> Iterator[float]:
    """A bare PyTorch loop; yields each epoch's seconds per step."""
    t, w = spec.train, Worker(spec)
    torch.manual_seed(t.seed)
    model = checkpoints.model_for(spec).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    for epoch in itertools.count():  # as many as asked for, between the other setups
        steps = w.epoch_steps[epoch % t.epochs]
        batches = iter(w.loader(train=True, epoch=epoch % t.epochs))
        started = time.perf_counter()  # where train_epoch starts its clock: after the loader's start
        for _ in range(steps):
            images, masks = next(batches)
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(images), masks, ignore_index=IGNORE_INDEX).backward()
            optimizer.step()
        yield (time.perf_counter() - started) / steps


def worker_epochs(spec: specs.Spec) -> Iterator[float]:
    """The orchestrator's worker loop (`train_epoch`) in this process; yields each epoch's s/step."""
    w = Worker(spec)
    torch.manual_seed(spec.train.seed)
    model = checkpoints.model_for(spec)
    optimizer = make_optimizer(spec.train, model)
    for epoch in range(spec.train.epochs):
        yield spec.train.batch_per_gpu / train_epoch(w, model, optimizer, Position(epoch))["images_per_s"]


def ray_train(raw: dict[str, Any], workers: int, norm: str) -> list[float]:
    """`orchestrator train` of the spec `raw` with `workers` DDP ranks; each epoch's seconds per step."""
    experiment = f"{raw['name']}-{workers}-{norm}"
    resources = {**raw["resources"], "workers_per_trial": workers}
    return common.trained_step_s(
        {**raw, "norm": norm, "tracking": {"experiment": experiment}, "resources": resources},
        f"Ray Train, {workers} worker(s), {norm}",
    )


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--steps", type=int, default=16, help="training steps per epoch")
    p.add_argument("--epochs", type=int, default=3, help="epochs per setup; the first warms up")
    p.add_argument("--batch", type=int, default=2, help="batch per worker")
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--size", default="256x144", help="synthetic image WIDTHxHEIGHT")
    p.add_argument("--ddp-norms", nargs="+", default=["bn"], help="norms of the 2-worker runs: bn syncbn ...")
    args = p.parse_args()
    torch.set_num_threads(1)  # as a Ray worker holding 1 CPU

    with common.workspace("bench-step-") as root:
        size = tuple(int(v) for v in args.size.split("x"))
        shards = common.synth_pack(root, train=2 * args.batch * args.steps, val=4, size=size)
        raw = common.small_spec(
            BENCH, shards, steps=args.steps, batch=args.batch, crop=args.crop, epochs=args.epochs
        )
        spec = specs.validate(raw)
        bare, worker = bare_epochs(spec), worker_epochs(spec)
        pairs = [(next(bare), next(worker)) for _ in range(args.epochs)][1:]  # alternating, warm
        step = {"worker": min(w for _, w in pairs)}
        base = {"worker": min(b for b, _ in pairs)}  # each setup's bare loop: measured around it
        before = [b for b, _ in pairs][-2:]
        for workers, norm in [(1, "bn")] + [(2, norm) for norm in args.ddp_norms]:
            name = f"{workers} {norm}"
            step[name] = min(ray_train(raw, workers, norm)[1:])
            after = [next(bare) for _ in range(2)]
            base[name], before = min(before + after), after

    def row(setup: str, name: str, target: str = "") -> common.Row:
        vs = f"bare loop around it ({common.number(base[name])} s/step)"
        return common.Row(BENCH, setup, step[name], "s/step", step[name] / base[name], vs, target)

    best = min(base.values())
    rows = [
        common.Row(BENCH, "bare PyTorch loop, 1 thread (best epoch of the run)", best, "s/step"),
        row("worker loop (train_epoch) in-process, 1 thread", "worker"),
        row("Ray Train, 1 worker, bn", "1 bn", "<= 1.03x"),
    ]
    rows += [row(f"Ray Train, 2 DDP workers (gloo), {norm}", f"2 {norm}") for norm in args.ddp_norms]
    if "bn" in args.ddp_norms:
        rate = 2 * args.batch / step["2 bn"]
        rows.append(
            common.Row(
                BENCH,
                "Ray Train, 2 DDP workers, bn: images/s (ideal 2x)",
                rate,
                "img/s",
                rate * base["2 bn"] / args.batch,
                f"bare loop around it ({common.number(args.batch / base['2 bn'])} img/s)",
            )
        )
    common.emit(
        rows,
        f"resnet18-deeplabv3plus, batch {args.batch}/worker, crop {args.crop}, {args.steps} steps/epoch, "
        f"best of epochs 2-{args.epochs}, same loader (decoding in the training process), 1 thread/worker",
        args.json,
    )


if __name__ == "__main__":
    main()
