"""Parameter groups: learning-rate multipliers and where weight decay applies."""

import pytest
import torch

from orchestrator import checkpoints
from orchestrator import spec as specs
from orchestrator.models.evalnorm import evalnorm_parameters
from orchestrator.train.loop import make_optimizer


def optimizer_for(norm: str, **train) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    spec = specs.validate(
        {"name": "t", "data": {"train": "x", "val": "y"}, "model": {"backbone": "resnet18"}, "norm": norm,
         "train": {"weight_decay": 1e-4, "head_lr_mult": 10, **train}}
    )  # fmt: skip
    model = checkpoints.model_for(spec)
    return model, make_optimizer(spec.train, model)


def settings(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, tuple[float, float]]:
    """parameter name -> (lr_mult, weight_decay), failing if a parameter sits in two groups."""
    names = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, tuple[float, float]] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            assert names[id(p)] not in out, names[id(p)]
            out[names[id(p)]] = (group["lr_mult"], group["weight_decay"])
    return out


def test_every_parameter_once_head_at_10x_no_decay_on_norms_and_biases():
    model, optimizer = optimizer_for("bn")
    got = settings(model, optimizer)
    assert set(got) == {n for n, _ in model.named_parameters()}
    assert got["backbone.conv1.weight"] == (1.0, 1e-4)
    assert got["backbone.bn1.weight"] == (1.0, 0.0) and got["backbone.layer1.0.bn2.bias"] == (1.0, 0.0)
    assert got["head.classifier.weight"] == (10.0, 1e-4) and got["head.classifier.bias"] == (10.0, 0.0)


def test_decay_norm_and_bias_opt_in():
    model, optimizer = optimizer_for("gn:g8", decay_norm_and_bias=True)
    got = settings(model, optimizer)
    assert got["backbone.bn1.weight"] == (1.0, 1e-4) and got["head.classifier.bias"] == (10.0, 1e-4)


@pytest.mark.parametrize("decay", [False, True])
def test_evalnorm_estimators_never_decay(decay):
    model, optimizer = optimizer_for("evalnorm", decay_norm_and_bias=decay)
    got = settings(model, optimizer)
    estimators = {id(p) for p in evalnorm_parameters(model)}
    names = [n for n, p in model.named_parameters() if id(p) in estimators]
    assert names and all(got[n] == (1.0, 0.0) for n in names)
