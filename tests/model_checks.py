"""The check every model test makes: logits at input size, finite, and a backward pass whose gradients
reach backbone and head (EvalNorm's estimators learn from its auxiliary loss alone, so it is added)."""

import torch
from torch import nn

from orchestrator.models.evalnorm import evalnorm_aux_loss


def check_trains(model: nn.Module, x: torch.Tensor, num_classes: int = 3) -> None:
    logits = model(x)
    assert logits.shape == (x.shape[0], num_classes, *x.shape[-2:])
    assert torch.isfinite(logits).all()
    loss = logits.square().mean()
    aux = evalnorm_aux_loss(model)
    (loss if aux is None else loss + aux).backward()
    for part in (model.backbone, model.head):
        grads = [p.grad for p in part.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)
