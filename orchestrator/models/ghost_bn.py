"""Ghost BatchNorm (Hoffer, Hubara & Soudry, "Train longer, generalize better", NeurIPS 2017): in training,
a worker's batch is normalized in virtual batches of N images, each with its own statistics, as BatchNorm
would normalize N images on a GPU of their own. The knob between the per-GPU batch and smaller
normalization batches at the same gradient batch: `ghostbn:b2` at 8 images per GPU normalizes as per-GPU BN
does at 2, while each step still averages the gradient of 8.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from orchestrator.models.catalog import NormSpec
from orchestrator.models.norms import keep_layout


class GhostBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training forward normalizes each run of `virtual_batch` images of the batch (the
    last may hold fewer) by its own mean and biased variance, and updates the running statistics once per
    virtual batch, in order, as BN would over those batches one after the other. Forwards without grad
    (PreciseBN's statistics pass) and eval are BatchNorm2d's: a BN state_dict loads as it is."""

    def __init__(self, num_features: int, virtual_batch: int, **bn_kwargs) -> None:
        super().__init__(num_features, **bn_kwargs)
        if virtual_batch < 1:
            raise ValueError(f"virtual_batch must be at least 1, got {virtual_batch}")
        self.virtual_batch = virtual_batch

    @classmethod
    def from_spec(cls, spec: NormSpec, num_channels: int) -> GhostBatchNorm2d:
        return cls(num_channels, spec.virtual_batch)

    def forward(self, x: Tensor) -> Tensor:
        batch_norm = super().forward  # BatchNorm2d's step: statistics, running update, batch count
        if not (self.training and torch.is_grad_enabled()) or x.shape[0] <= self.virtual_batch:
            return batch_norm(x)
        return keep_layout(x, torch.cat([batch_norm(part) for part in x.split(self.virtual_batch)]))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch={self.virtual_batch}"
