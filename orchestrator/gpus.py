"""The GPU kinds `orchestrator plan` and `batch_per_gpu: auto` know: memory as the driver reports it, dense
bf16 peak, an approximate dated price, and how torch and Ray name them. No torch, no Ray: the sweep's driver
reads its cluster's kind with it."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Gpu:
    name: str  # as torch.cuda.get_device_name words it
    memory_gib: float  # what the driver reports in all (nvidia-smi's MiB / 1024), not the marketed GB
    peak_bf16: float  # dense (not 2:4 sparse) bf16 tensor FLOP/s
    usd_per_hour: float  # on-demand, one GPU, as of PRICES_AS_OF
    ray_type: str  # the accelerator_type Ray gives its nodes (ray.util.accelerators)


PRICES_AS_OF = "2026-12-03"  # approximate AWS us-east-1 on-demand list prices per GPU; pass --price for yours
GPUS: dict[str, Gpu] = {
    "v100-16gb": Gpu("Tesla V100-SXM2-16GB", 15.8, 125e12, 3.06, "V100"),  # p3.2xlarge; fp16 tensor peak
    "a10g": Gpu("NVIDIA A10G", 22.5, 70e12, 1.01, "A10G"),  # g5.xlarge
    "l4": Gpu("NVIDIA L4", 22.5, 121e12, 0.80, "L4"),  # g6.xlarge
    "v100-32gb": Gpu("Tesla V100-SXM2-32GB", 31.7, 125e12, 3.90, "V100"),  # p3dn.24xlarge / 8
    "a100-40gb": Gpu("NVIDIA A100-SXM4-40GB", 39.4, 312e12, 4.10, "A100"),  # p4d.24xlarge / 8
    "a100-80gb": Gpu("NVIDIA A100-SXM4-80GB", 79.2, 312e12, 5.12, "A100"),  # p4de.24xlarge / 8
    "h100": Gpu("NVIDIA H100 80GB HBM3", 79.6, 989e12, 6.88, "H100"),  # p5.48xlarge / 8
    "h200": Gpu("NVIDIA H200", 140.4, 989e12, 7.91, "H200"),  # p5en.48xlarge / 8
}

# Peak dense bf16 tensor FLOP/s by the words of torch.cuda.get_device_name; first match wins.
PEAK_BF16: tuple[tuple[tuple[str, ...], float], ...] = (
    (("H100", "PCIe"), 756e12),
    (("H100", "NVL"), 835e12),
    (("H100",), 989e12),  # SXM: "NVIDIA H100 80GB HBM3"
    (("H200",), 989e12),
    (("A100",), 312e12),
    (("A10G",), 70e12),
    (("L4",), 121e12),
)


def peak_flops(device_name: str) -> float | None:
    """The GPU's peak dense bf16 FLOP/s, None when PEAK_BF16 does not know it."""
    words = set(re.split(r"[\s\-_]+", device_name.upper()))
    return next((peak for keys, peak in PEAK_BF16 if {k.upper() for k in keys} <= words), None)


def kind_of(accelerator_type: str) -> str | None:
    """The key of GPUS that Ray's accelerator_type names (`A10G`: a10g); where it names several (`A100`: 40
    and 80 GB), the one with the least memory. None for a type GPUS does not know."""
    kinds = [kind for kind, gpu in GPUS.items() if gpu.ray_type == accelerator_type]
    return min(kinds, key=lambda kind: GPUS[kind].memory_gib, default=None)


def price_of(device_name: str | None) -> float | None:
    """The list price per hour of the GPU torch calls `device_name` (a trial's orchestrator.device tag);
    None for the CPU or a GPU that GPUS does not list."""
    return next((gpu.usd_per_hour for gpu in GPUS.values() if gpu.name == device_name), None)
