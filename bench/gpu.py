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
`conv_backward_flops`. MFU = images/s x FLOPs per image / the peak of PEAK_BF16
(an unknown GPU gets none). A batch that runs out of memory is halved until it fits.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import time
from collections.abc import Callable

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from bench import common  # noqa: E402
from orchestrator.models.build import build_model  # noqa: E402
from orchestrator.train.step import accumulate_gradients  # noqa: E402

BENCH = "gpu"

# Peak dense (not 2:4 sparse) bf16 tensor FLOP/s by the words of torch.cuda.get_device_name; first match wins.
PEAK_BF16: tuple[tuple[tuple[str, ...], float], ...] = (
    (("H100", "PCIe"), 756e12),
    (("H100", "NVL"), 835e12),
    (("H100",), 989e12),  # SXM: "NVIDIA H100 80GB HBM3"
    (("H200",), 989e12),
    (("A100",), 312e12),
    (("L4",), 121e12),
)


def peak_flops(device_name: str) -> float | None:
    """The GPU's peak dense bf16 FLOP/s, None when PEAK_BF16 does not know it."""
    words = set(re.split(r"[\s\-_]+", device_name.upper()))
    return next((peak for keys, peak in PEAK_BF16 if {k.upper() for k in keys} <= words), None)


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of the convolutions and matrix products that fn runs (forward and, if it runs one, backward)."""
    with FlopCounterMode(
        display=False, custom_mapping={torch.ops.aten.convolution_backward: conv_backward_flops}
    ) as c:
        fn()
    return c.get_total_flops()


def conv_backward_flops(
    grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed, output_padding, groups,
    output_mask, **kwargs
) -> int:  # fmt: skip
    """A convolution's input gradient and weight gradient each cost its forward's FLOPs.

    torch's own formula (2.13) leaves the groups out of the weight gradient, counting a depthwise convolution
    `groups` times over: DeepLabv3+'s separable ASPP (2048 groups) would dominate the count and the MFU."""
    spatial = (x_shape if transposed else grad_out_shape)[2:]  # where the filter is applied
    forward = 2 * x_shape[0] * math.prod(w_shape) * math.prod(spatial)  # w_shape holds channels / groups
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    crop: tuple[int, int], batch: int, args: argparse.Namespace, device: torch.device
) -> tuple[float, float]:
    """(images/s, FLOPs per image) of training steps at crop (width, height) and batch."""
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

    flops = count_flops(step) / batch  # also the first warm-up step
    for _ in range(args.warmup):
        step()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize(device)
    return batch * args.steps / (time.perf_counter() - started), flops


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
                rate, flops = measure(crop, batch, args, device)
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
    common.emit(
        rows,
        f"GPU throughput and MFU on {name}: {args.steps} steps after {args.warmup} warm-up, norm {args.norm}",
        args.json,
    )


if __name__ == "__main__":
    main()
