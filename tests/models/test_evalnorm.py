"""EvalNorm2d against BatchNorm2d and against the paper's eqs. 5-9 written out independently here."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from orchestrator.models.evalnorm import EvalNorm2d, calibrate, evalnorm_aux_loss, evalnorm_parameters

EPS = 1e-5
NEW_KEYS = {"raw_alpha", "raw_beta", "train_batch_size"}


def _images(g: torch.Generator, batch: int) -> Tensor:
    """Images whose per-sample channel means differ (a shift per sample), so mu_i matters."""
    return torch.randn(batch, 3, 1, 1, generator=g) + 0.5 * torch.randn(batch, 3, 8, 8, generator=g)


def _net(norm: type[nn.Module]) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        norm(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        norm(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 1),
    )


def _task_loss(out: Tensor, x: Tensor) -> Tensor:
    return nn.functional.mse_loss(out, x.mean((1, 2, 3))[:, None])


def _trained_bn(channels: int = 4) -> nn.BatchNorm2d:
    """A BatchNorm2d with non-trivial affine and running statistics."""
    g = torch.Generator().manual_seed(0)
    bn = nn.BatchNorm2d(channels, momentum=0.3)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(channels, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(channels, generator=g))
        for _ in range(5):
            bn(2 + 3 * torch.randn(2, channels, 6, 5, generator=g))
    return bn


def _eqs_5_6(x: np.ndarray, mu_e, var_e, alpha, beta, weight, bias) -> np.ndarray:
    """Eval normalization, one sample and channel at a time (float64)."""
    y = np.empty_like(x)
    for n in range(x.shape[0]):
        for c in range(x.shape[1]):
            mu_i, var_i = x[n, c].mean(), x[n, c].var()
            mu = alpha * mu_i + (1 - alpha) * mu_e[c]
            var = beta * var_i + (1 - beta) * var_e[c] + beta * (1 - beta) * (mu_i - mu_e[c]) ** 2
            y[n, c] = (x[n, c] - mu) / np.sqrt(var + EPS) * weight[c] + bias[c]
    return y


def test_training_forward_and_gradients_are_batchnorms_with_the_aux_loss_added():
    torch.manual_seed(0)
    bn_net = _net(nn.BatchNorm2d)
    for m in bn_net:
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.normal_(m.bias)
    en_net = _net(EvalNorm2d)
    en_net.load_state_dict(bn_net.state_dict(), strict=False)
    opts = [torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9) for net in (bn_net, en_net)]
    g = torch.Generator().manual_seed(1)
    for _ in range(3):  # later steps also see moved weights and running stats
        x = _images(g, 2)
        xs = [x.clone().requires_grad_() for _ in range(2)]
        outs = [net(xi) for net, xi in zip((bn_net, en_net), xs, strict=True)]
        aux = evalnorm_aux_loss(en_net)
        assert aux is not None and aux > 0
        for opt, loss in zip(opts, (_task_loss(outs[0], x), _task_loss(outs[1], x) + aux), strict=True):
            opt.zero_grad()
            loss.backward()
        assert torch.equal(outs[0], outs[1])
        assert torch.equal(xs[0].grad, xs[1].grad)
        en_params = dict(en_net.named_parameters())
        for name, p in bn_net.named_parameters():
            assert torch.equal(p.grad, en_params[name].grad), name
        assert all(p.grad.abs() > 0 for p in evalnorm_parameters(en_net))
        for opt in opts:
            opt.step()
        en_state = en_net.state_dict()
        for name, v in bn_net.state_dict().items():
            assert torch.equal(v, en_state[name]), name
    en_net.eval()(x)
    assert evalnorm_aux_loss(en_net) is None  # none computed in eval: no stale loss to backpropagate twice


def test_bn_state_dict_loads_and_only_the_new_keys_are_missing():
    for rule, new in ((False, NEW_KEYS), (True, {"train_batch_size"})):
        result = EvalNorm2d(4, rule=rule).load_state_dict(_trained_bn().state_dict(), strict=False)
        assert set(result.missing_keys) == new and result.unexpected_keys == []


def test_eval_with_alpha_beta_zero_is_batchnorm_eval():
    bn = _trained_bn().eval()
    en = EvalNorm2d(4, momentum=0.3)
    en.load_state_dict(bn.state_dict(), strict=False)
    en.eval()
    assert en.alpha == 0 and en.beta == 0  # as built / converted
    x = 1 + 4 * torch.randn(3, 4, 6, 5)
    torch.testing.assert_close(en(x), bn(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("affine", [True, False])
def test_eval_forward_is_eqs_5_and_6(affine: bool):
    bn = _trained_bn()
    en = EvalNorm2d(4, affine=affine).double()
    en.load_state_dict(bn.state_dict(), strict=False)
    with torch.no_grad():
        en.raw_alpha.fill_(0.3)
        en.raw_beta.fill_(0.6)
    x = 1 + 4 * torch.randn(3, 4, 6, 5, dtype=torch.float64)
    weight, bias = (
        (bn.weight.detach().numpy(), bn.bias.detach().numpy()) if affine else (np.ones(4), np.zeros(4))
    )
    mu_e, var_e = bn.running_mean.double().numpy(), bn.running_var.double().numpy()
    expected = _eqs_5_6(x.numpy(), mu_e, var_e, 0.3, 0.6, weight, bias)
    np.testing.assert_allclose(en.eval()(x).detach().numpy(), expected, rtol=1e-6, atol=1e-10)


def test_aux_loss_and_its_gradient_are_eqs_7_to_9():
    torch.manual_seed(0)
    bn = _trained_bn()
    en = EvalNorm2d(4).double()
    en.load_state_dict(bn.state_dict(), strict=False)
    with torch.no_grad():
        en.raw_alpha.fill_(0.2)
        en.raw_beta.fill_(0.4)
    x = (1 + 4 * torch.randn(2, 4, 6, 5, dtype=torch.float64)).requires_grad_()
    mu_e, var_e = en.running_mean.clone(), en.running_var.clone()
    en(x)

    # Eq. 9 on plain autograd: everything but alpha, beta is a constant.
    alpha, beta = (torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (0.2, 0.4))
    xd = x.detach()
    mu_i, var_i = xd.mean((2, 3), keepdim=True), xd.var((2, 3), unbiased=False, keepdim=True)
    mu_b, var_b = xd.mean((0, 2, 3), keepdim=True), xd.var((0, 2, 3), unbiased=False, keepdim=True)
    mu_e, var_e = mu_e[:, None, None], var_e[:, None, None]
    mu_hat = alpha * mu_i + (1 - alpha) * mu_e
    var_hat = beta * var_i + (1 - beta) * var_e + beta * (1 - beta) * (mu_i - mu_e) ** 2
    expected = ((xd - mu_b) / (var_b + EPS).sqrt() - (xd - mu_hat) / (var_hat + EPS).sqrt()).abs().mean()

    torch.testing.assert_close(en.aux_loss, expected)
    torch.testing.assert_close(
        torch.autograd.grad(en.aux_loss, [en.raw_alpha, en.raw_beta]),
        torch.autograd.grad(expected, [alpha, beta]),
    )


def test_alpha_beta_stay_in_0_1_and_come_back_when_pushed_out():
    en = EvalNorm2d(2)
    for raw, value, grad_up, grad_down in (
        (-0.5, 0.0, -1.0, 0.0),
        (0.5, 0.5, -1.0, 1.0),
        (1.5, 1.0, 0.0, 1.0),
    ):
        with torch.no_grad():
            en.raw_alpha.fill_(raw)
        assert en.alpha == value
        # Loss -alpha asks for a larger alpha, loss +alpha for a smaller one.
        assert torch.autograd.grad(-en.alpha, en.raw_alpha)[0] == grad_up
        assert torch.autograd.grad(en.alpha, en.raw_alpha)[0] == grad_down


def test_rule_is_one_over_batch_size_squared_and_survives_a_checkpoint():
    en = EvalNorm2d(4, rule=True)
    assert evalnorm_parameters(en) == [] and {n for n, _ in en.named_parameters()} == {"weight", "bias"}
    with pytest.raises(RuntimeError, match="train_batch_size"):
        en.eval()(torch.randn(1, 4, 3, 3))
    en.train()
    for _ in range(2):
        en(torch.randn(4, 4, 3, 3))
        assert en.aux_loss is None and evalnorm_aux_loss(en) is None
    with torch.no_grad():  # a PreciseBN-style pass is not training
        en(torch.randn(8, 4, 3, 3))
    assert en.alpha.item() == en.beta.item() == 1 / 16

    fresh = EvalNorm2d(4, rule=True)
    fresh.load_state_dict(en.state_dict())
    assert fresh.alpha.item() == fresh.beta.item() == 1 / 16
    x = torch.randn(2, 4, 3, 3)
    assert torch.equal(fresh.eval()(x), en.eval()(x))


def _online(batch: int, en_lr: float, steps: int = 100) -> tuple[list[float], list[EvalNorm2d]]:
    """Train the net with the aux loss added; returns the aux loss per step and the EvalNorm layers."""
    torch.manual_seed(0)
    net = _net(EvalNorm2d)
    en_params = evalnorm_parameters(net)
    others = [p for p in net.parameters() if all(p is not q for q in en_params)]
    opts = [torch.optim.SGD(others, lr=0.05, momentum=0.9), torch.optim.Adam(en_params, lr=en_lr)]
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x = _images(g, batch)
        loss = _task_loss(net(x), x)
        aux = evalnorm_aux_loss(net)
        losses.append(aux.item())
        for opt in opts:
            opt.zero_grad()
        (loss + aux).backward()
        for opt in opts:
            opt.step()
    return losses, [m for m in net if isinstance(m, EvalNorm2d)]


def test_online_estimation_lowers_the_aux_loss_and_grows_alpha_beta_for_small_batches():
    learned, small = _online(batch=2, en_lr=0.03)
    frozen, _ = _online(batch=2, en_lr=0.0)  # same training, alpha = beta = 0 throughout
    last = np.mean(learned[-10:])
    assert last < 0.7 * np.mean(learned[:10])
    assert last < 0.7 * np.mean(frozen[-10:])
    _, large = _online(batch=8, en_lr=0.03)
    for s, big in zip(small, large, strict=True):  # the paper's fig. 3: larger for smaller batches
        assert s.alpha > max(0.1, 2 * big.alpha) and s.beta > max(0.1, 2 * big.beta)


def _mean_aux(net: nn.Module, batches: list[Tensor]) -> float:
    net = copy.deepcopy(net).train()  # train-mode forwards move the running stats: use a copy
    saved = copy.deepcopy(net.state_dict())
    total = 0.0
    for x in batches:
        net.load_state_dict(saved)
        net(x)
        total += evalnorm_aux_loss(net).item()
    return total / len(batches)


def test_calibrate_fits_alpha_beta_and_changes_nothing_else():
    torch.manual_seed(0)
    bn_net = _net(nn.BatchNorm2d)
    opt = torch.optim.SGD(bn_net.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    for _ in range(40):
        x = _images(g, 2)
        opt.zero_grad()
        _task_loss(bn_net(x), x).backward()
        opt.step()
    net = _net(EvalNorm2d)
    net.load_state_dict(bn_net.state_dict(), strict=False)
    net.eval()[0].train()  # mixed modes must come back as they were
    batches = [_images(g, 2) for _ in range(6)]
    before = copy.deepcopy(net.state_dict())
    aux_before = _mean_aux(net, batches)

    estimates = calibrate(net, batches, steps=60)

    layers = {name: m for name, m in net.named_modules() if isinstance(m, EvalNorm2d)}
    assert estimates.keys() == layers.keys() == {"1", "4"}
    for name, (alpha, beta) in estimates.items():
        assert (alpha, beta) == (layers[name].alpha.item(), layers[name].beta.item())
        assert 0.05 < alpha < 1 and 0.05 < beta < 1
    assert _mean_aux(net, batches) < 0.8 * aux_before
    after = net.state_dict()
    for key, value in before.items():
        if key.rsplit(".", 1)[1] not in NEW_KEYS - {"train_batch_size"}:
            assert torch.equal(after[key], value), key
    assert [m.training for m in net] == [True] + [False] * (len(net) - 1)
    assert all(p.requires_grad and p.grad is None for p in net.parameters())


def test_calibrate_refuses_an_iterator_that_runs_out():
    net = _net(EvalNorm2d)
    with pytest.raises(ValueError, match="ran out after 2 of 5"):
        calibrate(net, iter([torch.randn(2, 3, 8, 8)] * 2), steps=5)
