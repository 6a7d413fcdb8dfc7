"""Filter Response Normalization and TLU against the paper's equations (Singh & Krishnan 2020, Eq. 1-3),
written out in float64, and the rule that the norm owns the model's activations."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import nn

from orchestrator.models import catalog, norms
from orchestrator.models.build import build_model
from orchestrator.models.frn import EPS, TLU, FilterResponseNorm2d


def by_definition(
    x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, tau: torch.Tensor
) -> torch.Tensor:
    """z = max(gamma * x / sqrt(nu^2 + eps) + beta, tau), nu^2 the mean of x^2 over each image's channel."""
    x = x.double()
    nu2 = (x * x).sum((2, 3), keepdim=True) / (x.shape[2] * x.shape[3])
    y = gamma.double()[:, None, None] * x / torch.sqrt(nu2 + EPS) + beta.double()[:, None, None]
    return torch.maximum(y, tau.double()[:, None, None])


def layers(channels: int = 4) -> tuple[FilterResponseNorm2d, TLU]:
    frn, tlu = FilterResponseNorm2d(channels), TLU(channels)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        frn.weight.copy_(torch.rand(channels, generator=g) + 0.5)
        frn.bias.copy_(torch.randn(channels, generator=g))
        tlu.tau.copy_(torch.randn(channels, generator=g))
    return frn, tlu


def test_frn_and_tlu_compute_the_papers_equations() -> None:
    frn, tlu = layers()
    x = torch.randn(3, 4, 5, 7, generator=torch.Generator().manual_seed(1)) * 3 + 1  # a mean: none is taken
    out = tlu(frn(x))
    torch.testing.assert_close(
        out.double(), by_definition(x, frn.weight, frn.bias, tlu.tau), rtol=1e-5, atol=1e-6
    )
    assert (out == tlu.tau[None, :, None, None]).any() and (out > tlu.tau[None, :, None, None]).any()


def test_the_gradients_are_those_of_the_equations() -> None:
    """FRN's own backward against autograd through the equations in float64, at a map that is all zero
    too (where nu^2 = 0 and only eps keeps the gradient finite)."""
    frn, _ = layers()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 5, 3, generator=g, dtype=torch.float64)
    x[1, 2] = 0
    upstream = torch.randn(2, 4, 5, 3, generator=g, dtype=torch.float64)
    ours = x.clone().requires_grad_()
    (frn.double()(ours) * upstream).sum().backward()
    reference = x.clone().requires_grad_()
    weight, bias = (p.detach().clone().requires_grad_() for p in (frn.weight, frn.bias))
    no_threshold = torch.full((4,), -torch.inf, dtype=torch.float64)
    (by_definition(reference, weight, bias, no_threshold) * upstream).sum().backward()
    for got, expected in (
        (ours.grad, reference.grad),
        (frn.weight.grad, weight.grad),
        (frn.bias.grad, bias.grad),
    ):
        torch.testing.assert_close(got, expected)
    assert torch.isfinite(ours.grad).all()


def test_tlu_gradients_are_those_of_max() -> None:
    """TLU's own backward against autograd's max(x, tau); where x == tau (a zeroed map at the start) the
    gradient goes to tau, as ReLU gives none to its input at 0."""
    _, tlu = layers()
    tlu.double()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64)
    upstream = torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64)
    ours, reference = x.clone().requires_grad_(), x.clone().requires_grad_()
    tau = tlu.tau.detach().clone().requires_grad_()
    (tlu(ours) * upstream).sum().backward()
    (torch.maximum(reference, tau[None, :, None, None]) * upstream).sum().backward()
    torch.testing.assert_close(ours.grad, reference.grad)
    torch.testing.assert_close(tlu.tau.grad, tau.grad)
    tie = tlu.tau.detach()[None, :, None, None].expand(1, 4, 2, 2).clone().requires_grad_()
    tlu.tau.grad = None
    tlu(tie).sum().backward()
    assert not tie.grad.any() and torch.equal(tlu.tau.grad, torch.full((4,), 4.0, dtype=torch.float64))


def kept_bytes(layers: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the maps autograd keeps for the backward of `layers` on `x` (the parameters left out)."""
    kept: dict[int, int] = {}
    own = {p.untyped_storage().data_ptr() for p in layers.parameters()}

    def keep(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in own:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        layers(x)
    return sum(n for n in kept.values() if n >= x.nbytes // 2)


def test_it_keeps_for_the_backward_what_bn_and_relu_keep() -> None:
    """conv -> FRN -> TLU -> conv on bfloat16 maps keeps what conv -> BN -> in-place ReLU -> conv keeps: no
    float32 copy of the input, no normalized map, no map of the activation's own."""
    frn, tlu = layers(8)
    x = torch.randn(2, 8, 32, 32).bfloat16().requires_grad_()
    ours = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), frn, tlu, nn.Conv2d(8, 8, 1)).bfloat16()
    bn = nn.Sequential(
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.Conv2d(8, 8, 1)
    )
    assert kept_bytes(ours, x) == kept_bytes(bn.bfloat16(), x) == 3 * x.nbytes  # the input, conv's and BN's


def test_each_image_is_its_own_batch_in_training_and_evaluation() -> None:
    frn, tlu = layers()
    x = torch.randn(4, 4, 6, 6)
    together = tlu(frn.train()(x))
    alone = torch.cat([tlu(frn(x[i : i + 1])) for i in range(4)])
    torch.testing.assert_close(together, alone)
    torch.testing.assert_close(tlu(frn.eval()(x)), together)


def test_half_precision_responses_do_not_overflow_the_mean_square() -> None:
    """A float16 response of 300 squares to 90000, past float16's 65504: nu^2 is taken in float32."""
    frn, _ = layers()
    x = torch.full((1, 4, 3, 3), 300.0)
    out = frn.half()(x.half())
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), frn.float()(x), rtol=1e-3, atol=1e-3)


def activation_calls(model: nn.Module, kinds: tuple[type[nn.Module], ...]) -> Counter[int]:
    """How many times each activation module of `kinds` runs in one forward (on the meta device)."""
    calls: Counter[int] = Counter()
    for m in model.modules():
        if isinstance(m, kinds):
            m.register_forward_hook(lambda module, args, out: calls.update([id(module)]))
    with torch.device("meta"):
        model(torch.empty(1, 3, 64, 64))
    return calls


@pytest.mark.parametrize("backbone", catalog.BACKBONES)
def test_the_norm_owns_every_activation_of_the_model(backbone: str) -> None:
    """Under frn each activation the model runs (after a norm, after a residual sum, before a
    pre-activated conv) is a TLU of its own, one for one with the activations of the model under bn."""
    torch_activations = (nn.ReLU, nn.LeakyReLU, nn.PReLU)
    with torch.device("meta"):
        bn, frn = build_model(backbone, norm="bn"), build_model(backbone, norm="frn")
    placed = activation_calls(bn, torch_activations)
    assert placed and not any(isinstance(m, TLU) for m in bn.modules())
    assert not any(isinstance(m, torch_activations) for m in frn.modules())
    tlus = activation_calls(frn, (TLU,))
    assert sum(tlus.values()) == sum(placed.values()) and set(tlus.values()) == {1}  # none runs twice
    norms_ = [m for m in frn.modules() if isinstance(m, FilterResponseNorm2d)]
    assert len(norms_) == sum(isinstance(m, norms.norm_layers()) for m in bn.modules())


def test_a_norm_that_owns_the_activations_is_not_converted_to_or_from() -> None:
    with pytest.raises(ValueError, match="cannot convert a model's norms to 'frn' \\(it owns the model's"):
        norms.convert_norms(build_model("resnet18", "fcn", norm="bn"), "frn")
    with pytest.raises(ValueError, match="to 'bn' \\(the model's norm owns its activations\\)"):
        norms.convert_norms(build_model("resnet18", "fcn", norm="frn"), "bn")
