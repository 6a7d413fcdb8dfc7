"""Training throughput per GPU and model FLOPs utilization (MFU) of DeepLabv3+ ResNet-101 at the report's
crops, bf16 autocast and channels_last, against the GPU's peak dense bf16 FLOP/s.

    .venv/bin/python -m bench.gpu [--crops 513x513 720x720 1280x720] [--batch 8] [--steps 10] [--warmup 3]

Without CUDA it prints one row, "skipped: no CUDA" (`--device cpu` runs the same code on the CPU, to check
the script, with no MFU). Per crop: resnet101-deeplabv3plus (`--norm`, default bn) in channels_last, SGD;
a step is the training loop's own `accumulate_gradients` (bf16 autocast forward, fp32 loss, backward) and
the optimizer's step, on a fixed random batch already on the GPU (the model's throughput; data loading is
bench/data.py's). images/s = batch x `--steps` / their time after `--warmup` steps, synchronized.
FLOPs per image: torch.utils.flop_counter.FlopCounterMode over one step (forward + backward), divided by the
batch; it counts convolutions and matrix products at 2 FLOPs per multiply-add (norms, activations and
interpolation are not counted, as usual for MFU), with a convolution's backward counted by
`orchestrator.compute.conv_backward_flops`. MFU = images/s x FLOPs per image / the peak of
`orchestrator.gpus.PEAK_BF16` (an unknown GPU gets none). A batch that runs out of memory is halved
until it fits. On a GPU, a row per crop sets `orchestrator plan`'s estimate of the tensors' bytes beside
torch.cuda.max_memory_allocated of the same steps (target: within 15%).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from bench import common  # noqa: E402
from orchestrator.compute import CUDA_AUTOCAST, GIB, count_flops, step_cost, tensor_bytes  # noqa: E402
from orchestrator.gpus import peak_flops  # noqa: E402
from orchestrator.models.build import build_model  # noqa: E402
from orchestrator.train.step import accumulate_gradients  # noqa: E402

BENCH = "gpu"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    crop: tuple[int, int], batch: int, args: argparse.Namespace, device: torch.device
) -> tuple[float, float, int]:
    """(images/s, FLOPs per image, the most bytes allocated on a GPU: 0 on the CPU) of training steps at
    crop (width, height) and batch."""
    torch.manual_seed(0)
    model = build_model("resnet101", "deeplabv3plus", norm=args.norm)
    model = model.to(device, memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    width, height = crop
    images = torch.randn(batch, 3, height, width, device=device).contiguous(memory_format=torch.channels_last)
    masks = torch.randint(0, 3, (batch, height, width), device=device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        accumulate_gradients(model, [(images, masks)], device, "bf16")
        optimizer.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    flops = count_flops(step) / batch  # also the first warm-up step
    for _ in range(args.warmup):
        step()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return batch * args.steps / (time.perf_counter() - started), flops, peak


def estimate(crop: tuple[int, int], batch: int, norm: str) -> float:
    """What `orchestrator plan` counts for the same step: the tensors' bytes (compute.tensor_bytes), from the
    model's forward on the meta device under CUDA autocast's casts to bfloat16."""
    with torch.device("meta"):
        model = build_model("resnet101", "deeplabv3plus", norm=norm).train()
    width, height = crop
    one, two = (
        step_cost(
            model,
            torch.empty(b, 3, height, width, device="meta"),
            torch.empty(b, height, width, device="meta", dtype=torch.long),
            flops=False,
            autocast=CUDA_AUTOCAST,
        )
        for b in (1, 2)
    )
    return tensor_bytes(one, two, batch, optimizer_states=1)


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--crops", nargs="+", default=["513x513", "720x720", "1280x720"], help="WIDTHxHEIGHT")
    p.add_argument("--batch", type=int, default=8, help="batch per GPU (halved while it does not fit)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per crop")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (cuDNN autotuning)")
    p.add_argument("--norm", default="bn")
    p.add_argument("--device", default="cuda", help="cuda, or cpu to check the script")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        rows = [
            common.Row(BENCH, "resnet101-deeplabv3plus, bf16, channels_last", None, note="skipped: no CUDA")
        ]
        common.emit(rows, "GPU throughput and MFU", args.json)
        return
    torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak = peak_flops(name) if device.type == "cuda" else None
    rows = []
    for text in args.crops:
        crop = tuple(int(v) for v in text.split("x"))
        batch, rate = args.batch, None
        while batch and rate is None:
            try:
                rate, flops, allocated = measure(crop, batch, args, device)
            except torch.OutOfMemoryError:
                batch //= 2
            if device.type == "cuda":  # after the handler: its traceback held the failed step's tensors
                torch.cuda.empty_cache()
        setup = f"resnet101-deeplabv3plus {text}, batch {batch}/GPU, bf16, channels_last"
        if not batch:
            rows.append(common.Row(BENCH, setup, None, note="out of memory at batch 1"))
            continue
        setup += f", {flops / 1e9:.1f} GFLOP/img" + ("" if peak else f" (no peak known for {name}: no MFU)")
        mfu = rate * flops / peak if peak else None
        rows.append(common.Row(BENCH, setup, rate, "img/s/GPU", mfu, "peak bf16 (MFU)" if peak else ""))
        if allocated:  # target: within 15% either way
            estimated = estimate(crop, batch, args.norm) / GIB
            what = f"{text}, batch {batch}: `plan`'s tensor estimate"
            ratio = estimated * GIB / allocated
            rows.append(common.Row(BENCH, what, estimated, "GiB", ratio, "max allocated"))
    common.emit(
        rows,
        f"GPU throughput and MFU on {name}: {args.steps} steps after {args.warmup} warm-up, norm {args.norm}",
        args.json,
    )


if __name__ == "__main__":
    main()
