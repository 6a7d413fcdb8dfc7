"""Training-step time of the full model for each norm, as a ratio to `bn`, measured side by side.

    .venv/bin/python -m bench.norms [--backbone resnet50] [--crop 256] [--batch 2] [--rounds 4] [--threads 2]

One process builds a model per norm, then times forward + backward + SGD step (the training loop's own
`accumulate_gradients`) round-robin over the norms for several rounds, so that drift on a shared machine
hits every norm alike; it prints the median step time per norm and its ratio to bn.
"""

from __future__ import annotations

import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from bench import common  # noqa: E402
from orchestrator.models.build import build_model  # noqa: E402
from orchestrator.models.catalog import norm_examples  # noqa: E402
from orchestrator.train.step import accumulate_gradients  # noqa: E402

BENCH = "norms"
NORMS = (*norm_examples(), "evalnorm:rule", "gn:g32", "gn:g32+ws", "bn+ws")  # every row, and variants


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--crop", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rounds", type=int, default=4, help="timed steps per norm (after one warm-up step)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--norms", nargs="+", default=list(NORMS))
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    shape = (args.batch, args.crop, args.crop)
    batch = [(torch.randn(args.batch, 3, *shape[1:]), torch.randint(0, 3, shape))]
    models = {norm: build_model(args.backbone, norm=norm).train() for norm in args.norms}
    optimizers = {norm: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for norm, m in models.items()}
    times: dict[str, list[float]] = {norm: [] for norm in args.norms}
    for round_ in range(args.rounds + 1):
        for norm, model in models.items():
            started = time.perf_counter()
            optimizers[norm].zero_grad(set_to_none=True)
            accumulate_gradients(model, batch, torch.device("cpu"), "off")
            optimizers[norm].step()
            if round_:  # the first round warms up allocators and kernels
                times[norm].append(time.perf_counter() - started)

    steps = {norm: statistics.median(ts) for norm, ts in times.items()}
    vs = "bn" if "bn" in steps else args.norms[0]
    rows = [common.Row(BENCH, norm, step, "s/step", step / steps[vs], vs) for norm, step in steps.items()]
    common.emit(
        rows,
        f"{args.backbone}-deeplabv3plus, batch {args.batch}, crop {args.crop}, {args.threads} threads, "
        f"median of {args.rounds} training steps per norm, norms round-robin in one process",
        args.json,
    )


if __name__ == "__main__":
    main()
