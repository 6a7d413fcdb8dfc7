"""PreciseBN: recompute BN population statistics after training, before evaluation.

During training the running statistics are an EMA over batches taken while the weights moved; with
1-8 images per batch that estimate is noisy and stale. Recomputing them with the final weights as the
plain average over K batches (what `momentum=None` does) gives the population estimate that
evaluation assumes. Only batch-statistics layers change; GN, IN, LN and frozen BN have none.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


@torch.no_grad()
def precise_bn(net: nn.Module, images: Iterable[torch.Tensor], num_batches: int) -> int:
    """Reset and re-estimate the running statistics of every BN layer (incl. SyncBN, EvalNorm and the
    BN half of IBN) from `num_batches` batches; returns how many batches were used. The model's mode
    and each layer's momentum are restored."""
    layers = [m for m in net.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not layers or num_batches == 0:
        return 0
    momenta = [m.momentum for m in layers]
    was_training = net.training
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: running = mean over the batches seen
    net.train()
    used = 0
    try:
        for batch in itertools.islice(images, num_batches):
            net(batch)
            used += 1
    finally:
        for m, momentum in zip(layers, momenta, strict=True):
            m.momentum = momentum
        net.train(was_training)
    return used
