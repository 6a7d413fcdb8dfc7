"""Evaluation images/s: the bare forward pass, the pass in one process, and the pass on 1 and 2 Ray workers.

    .venv/bin/python -m bench.evaluate [--images 24] [--size 640x360] [--batch 2] [--rounds 2]

Synthesizes and packs a validation split and saves an untrained resnet18-deeplabv3plus checkpoint (the
demo's model), then measures in one run, each round timing every setup once, in images/s (best round):
- forward: the model on the split's images already decoded and normalized in memory, at one thread: the
  most a pass can do on one core;
- one process: `orchestrator evaluate`'s pass in this process at one thread (read, decode, forward,
  confusion matrices, predictions to nowhere);
- 1 and 2 Ray workers: the same pass cut over Ray workers of one CPU each (the local Ray started before the
  first round; each pass starts its workers and loads the model in them).
The ratios: one process and 1 worker to the forward pass (what reading, scoring and Ray cost), 2 workers to
1 (how the pass scales with workers on this machine's cores).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from bench import common  # noqa: E402
from orchestrator import checkpoints  # noqa: E402
from orchestrator import spec as specs  # noqa: E402
from orchestrator.data.stream import evaluation_loader  # noqa: E402
from orchestrator.data.transforms import IMAGENET, normalize  # noqa: E402
from orchestrator.execution.cluster import init_ray  # noqa: E402
from orchestrator.execution.inference import on_ray  # noqa: E402
from orchestrator.inference.parts import Pass, run_pass  # noqa: E402

BENCH = "evaluate"


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--images", type=int, default=24)
    p.add_argument("--size", default="640x360", help="WIDTHxHEIGHT of the images")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    torch.set_num_threads(1)

    with common.workspace("bench-evaluate-") as root:
        shards = common.synth_pack(root, train=1, val=args.images, size=size, shard_size=8)
        job = Pass((checkpoint(root, shards),), f"{shards}/val", batch_size=args.batch, device="cpu")
        model = job.load()[0].model
        batches = [normalize(x, IMAGENET) for x, _ in evaluation_loader(job.data, batch_size=args.batch)]
        init_ray()
        setups = {
            "forward": lambda: forward(model, batches),
            "one process": lambda: run_pass(job),
            "1 Ray worker": lambda: run_pass(job, runner=on_ray(1, gpus_per_worker=0)),
            "2 Ray workers": lambda: run_pass(job, runner=on_ray(2, gpus_per_worker=0)),
        }
        best = {name: 0.0 for name in setups}
        for _ in range(args.rounds):
            for name, run in setups.items():
                started = time.perf_counter()
                run()
                best[name] = max(best[name], args.images / (time.perf_counter() - started))

    setup = f"resnet18-deeplabv3plus, {args.images} images {args.size}, batch {args.batch}"
    rows = [
        common.Row(BENCH, f"forward only, 1 thread; {setup}", best["forward"], "img/s"),
        common.Row(BENCH, "pass in one process, 1 thread", best["one process"], "img/s",
                   best["one process"] / best["forward"], "forward"),
        common.Row(BENCH, "pass on 1 Ray worker (1 CPU)", best["1 Ray worker"], "img/s",
                   best["1 Ray worker"] / best["forward"], "forward"),
        common.Row(BENCH, "pass on 2 Ray workers (1 CPU each)", best["2 Ray workers"], "img/s",
                   best["2 Ray workers"] / best["1 Ray worker"], "1 worker"),
    ]  # fmt: skip
    common.emit(rows, f"Evaluation images/s, best of {args.rounds} rounds", args.json)


def checkpoint(root: Path, shards: Path) -> dict:
    spec = specs.validate(common.small_spec("evaluate", shards, steps=1, batch=2, crop=64, epochs=1))
    torch.manual_seed(0)
    config = specs.public_params(specs.flatten(spec))
    path = checkpoints.save(
        root / "model.pt", checkpoints.model_for(spec, pretrained=False), config, IMAGENET
    )
    return checkpoints.load(path)


@torch.no_grad()
def forward(model: torch.nn.Module, batches: list[torch.Tensor]) -> None:
    for x in batches:
        model(x)


if __name__ == "__main__":
    main()
