"""Norm grammar, group counts, GroupNorm vs the paper's definition, SyncBN vs BatchNorm on the whole batch."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import pydantic
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from orchestrator.models import norms
from orchestrator.models.build import build_model
from orchestrator.models.catalog import NORMS, NormSpec, norm_grammar, norm_pattern, parse_norm
from orchestrator.models.evalnorm import EvalNorm2d
from orchestrator.models.norms import (
    IBN,
    BatchNorm2d,
    FrozenBatchNorm2d,
    GroupNorm,
    InstanceNorm,
    LayerNorm,
    SyncBatchNorm,
    convert_norms,
    make_norm,
)

VALID_NORMS = [
    ("bn", NormSpec("bn")),
    ("syncbn", NormSpec("syncbn")),
    ("gn:g32", NormSpec("gn", groups=32)),
    ("gn:g1", NormSpec("gn", groups=1)),
    ("gn:c16", NormSpec("gn", channels_per_group=16)),
    ("in", NormSpec("in")),
    ("ln", NormSpec("ln")),
    ("frozenbn", NormSpec("frozenbn")),
    ("evalnorm", NormSpec("evalnorm")),
    ("evalnorm:rule", NormSpec("evalnorm", rule=True)),
    ("ibn-a", NormSpec("ibn-a")),
    ("ign-a:g32", NormSpec("ign-a", groups=32)),
    ("ign-a:c16", NormSpec("ign-a", channels_per_group=16)),
    ("gn:g32+ws", NormSpec("gn", groups=32, ws=True)),
    ("bn+ws", NormSpec("bn", ws=True)),
    ("ign-a:c16+ws", NormSpec("ign-a", channels_per_group=16, ws=True)),
    ("evalnorm:rule+ws", NormSpec("evalnorm", rule=True, ws=True)),
    ("frozenbn+ws", NormSpec("frozenbn", ws=True)),
]
INVALID_NORMS = [
    *("gn:x3", "gn", "gn:", "gn:g0", "gn:g-2", "gn:g032", "gn:c", "gn:g3.5", "bn:g4", "BN", " bn", ""),
    *("bn+ws+ws", "evalnorm:foo", "ibn-a:c16", "ign-a", "+ws", "in:g2", "ln:c4", "frozenbn:rule"),
    *("bn:rule", "evalnorm:rule:rule", "evalnorm:g2", "ign-a:g0", "gn:g32+WS", "gn:g32ws", "bn+", "bn +ws"),
    *("ws", "ibn-b", "ign-a:c16:rule", "xbn", "bnx", "bn\n", "gn:g4c2"),
]


@pytest.mark.parametrize(("text", "expected"), VALID_NORMS)
def test_parse_norm_accepts_the_grammar(text: str, expected: NormSpec) -> None:
    assert parse_norm(text) == expected
    assert str(parse_norm(text)) == text
    assert parse_norm(expected) is expected  # a parsed spec passes through


@pytest.mark.parametrize("text", INVALID_NORMS)
def test_parse_norm_rejects_with_the_value_and_the_grammar(text: str) -> None:
    with pytest.raises(ValueError, match="unknown norm") as err:
        parse_norm(text)
    assert repr(text) in str(err.value)
    assert "gn:c<N>" in str(err.value) and "ign-a:c<N>" in str(err.value) and "+ws" in str(err.value)


def test_norm_pattern_is_the_grammar_as_a_schema_pattern() -> None:
    # A schema pattern (JSON Schema: ECMA-262; pydantic: Rust's regex) is searched, not fully matched, and
    # knows no `(?P<name>`. Pydantic's engine, as spec.py's fields use it:
    assert "(?P<" not in norm_pattern()
    norm = pydantic.TypeAdapter(Annotated[str, pydantic.Field(pattern=norm_pattern())])
    for text, _ in VALID_NORMS:
        norm.validate_python(text)
    for text in INVALID_NORMS:
        with pytest.raises(pydantic.ValidationError):
            norm.validate_python(text)


def test_the_grammar_lists_every_form_of_every_row_and_each_parses() -> None:
    forms = norm_grammar().split(" (g<N>")[0].split(", ")
    assert {form.split(":")[0] for form in forms} == set(NORMS)
    for form in forms:
        spec = parse_norm(form.replace("<N>", "8"))
        assert spec.kind == form.split(":")[0] and str(spec) == form.replace("<N>", "8")
        assert parse_norm(f"{spec}+ws").ws
    for row in NORMS.values():  # the pattern's alternatives and the schema take the names unescaped
        assert re.fullmatch(r"[a-z][a-z0-9-]*", row.name), row.name
        assert row.about, f"{row.name}: the norms' table says what it is"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kind": "gn"},
        {"kind": "bn", "groups": 4},
        {"kind": "gn", "groups": 4, "channels_per_group": 2},
        {"kind": "gn", "groups": 0},
        {"kind": "bn", "rule": True},
        {"kind": "ibn-a", "channels_per_group": 16},
        {"kind": "batchnorm"},
    ],
)
def test_norm_spec_rejects_what_the_grammar_rejects(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="invalid norm"):
        NormSpec(**kwargs)


def test_catalog_does_not_import_torch() -> None:
    code = "import sys, orchestrator.models.catalog; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


@pytest.mark.parametrize(
    ("spec", "channels", "groups"),
    [
        ("gn:g32", 64, 32),
        ("gn:g32", 48, 16),  # the DeepLabv3+ decoder's 48-channel projection
        ("gn:g32", 728, 8),  # Xception's 728 channels
        ("gn:g8", 3, 1),
        ("gn:c16", 64, 4),
        ("gn:c16", 48, 3),
        ("gn:c16", 728, 91),  # gcd(16, 728) = 8 channels per group
        ("gn:c16", 8, 1),
    ],
)
def test_group_counts(spec: str, channels: int, groups: int) -> None:
    layer = make_norm(spec, channels)
    assert isinstance(layer, nn.GroupNorm)
    assert (layer.num_groups, layer.num_channels) == (groups, channels)


def test_group_fallback_is_logged_once_per_spec_and_channels(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(norms, "_logged_fallbacks", set())
    with caplog.at_level(logging.INFO, logger=norms.__name__):
        for _ in range(3):
            make_norm("gn:g32", 48)
        make_norm("gn:g32", 64)  # divides: nothing to say
        make_norm("gn:c16", 40)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert "gn:g32" in messages[0] and "48" in messages[0] and "16 groups" in messages[0]
    assert "gn:c16" in messages[1] and "5 groups of 8" in messages[1]


def test_make_norm_kinds() -> None:
    assert type(make_norm("bn", 8)) is BatchNorm2d
    assert type(make_norm(NormSpec("syncbn"), 8)) is SyncBatchNorm
    assert type(make_norm("frozenbn", 8)) is FrozenBatchNorm2d
    assert type(make_norm("bn+ws", 8)) is BatchNorm2d  # +ws is the convs' business
    assert [(type(n), n.rule) for n in (make_norm("evalnorm", 8), make_norm("evalnorm:rule", 8))] == [
        (EvalNorm2d, False),
        (EvalNorm2d, True),
    ]
    for spec, kind, groups in [("in", InstanceNorm, 8), ("ln", LayerNorm, 1), ("gn:c2+ws", GroupNorm, 4)]:
        layer = make_norm(spec, 8)
        assert type(layer) is kind and (layer.num_groups, layer.num_channels) == (groups, 8)


@pytest.mark.parametrize(
    ("spec", "instance_half", "expected"),
    [
        ("ibn-a", False, BatchNorm2d),
        ("ign-a:c4", False, GroupNorm),
        ("ibn-a", True, IBN),
        ("ign-a:g2+ws", True, IBN),
        ("bn", True, BatchNorm2d),  # other specs ignore instance_half
        ("gn:g2", True, GroupNorm),
        ("in", True, InstanceNorm),
        ("frozenbn", True, FrozenBatchNorm2d),
    ],
)
def test_instance_half_makes_ibn_layers_only_for_ibn_specs(
    spec: str, instance_half: bool, expected: type
) -> None:
    layer = make_norm(spec, 16, instance_half=instance_half)
    assert type(layer) is expected
    if spec.startswith("ign-a") and not instance_half:
        assert layer.num_groups == 4  # c4 on 16 channels


def _random_affine(layer: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for name in ("weight", "bias"):
            getattr(layer, name).copy_(torch.randn(getattr(layer, name).shape, generator=gen))


def _standardize(x: torch.Tensor, dims: tuple[int, ...], eps: float = 1e-5) -> torch.Tensor:
    """(x - mean) / sqrt(biased var + eps) over `dims`, in float64."""
    x = x.double()
    mean = x.mean(dim=dims, keepdim=True)
    var = x.var(dim=dims, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


def _affine(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return x * weight.double().reshape(1, -1, 1, 1) + bias.double().reshape(1, -1, 1, 1)


@pytest.mark.parametrize(("spec", "dims"), [("in", (2, 3)), ("ln", (1, 2, 3))])
def test_instance_and_layer_norm_match_their_definitions(spec: str, dims: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(0)
    layer = make_norm(spec, 6)
    _random_affine(layer, gen)
    x = torch.randn(3, 6, 5, 7, generator=gen) * torch.arange(1, 7).reshape(1, 6, 1, 1) + 3
    expected = _affine(_standardize(x, dims), layer.weight.detach(), layer.bias.detach())
    for mode in (layer.train(), layer.eval()):  # neither keeps running stats
        torch.testing.assert_close(mode(x).double(), expected, atol=1e-5, rtol=1e-5)
    if spec == "in":  # the same function as torch's InstanceNorm2d with an affine
        instance = nn.InstanceNorm2d(6, affine=True)
        instance.load_state_dict(layer.state_dict())
        torch.testing.assert_close(layer(x), instance(x))


def test_frozen_bn_is_a_fixed_affine_in_train_and_eval() -> None:
    gen = torch.Generator().manual_seed(0)
    layer = make_norm("frozenbn", 4)
    for value in layer.buffers():
        value.copy_(torch.randn(4, generator=gen))
    layer.running_var.abs_().add_(0.1)
    w, b, rm, rv = (
        t.clone().double() for t in (layer.weight, layer.bias, layer.running_mean, layer.running_var)
    )
    scale = w / torch.sqrt(rv + 1e-5)
    x = torch.randn(2, 4, 3, 5, generator=gen) * 3 + 1
    expected = x.double() * scale.reshape(1, 4, 1, 1) + (b - rm * scale).reshape(1, 4, 1, 1)
    assert list(layer.parameters()) == []
    for mode in (layer.train(), layer.eval(), layer.train()):
        torch.testing.assert_close(mode(x).double(), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(layer.running_mean.double(), rm) and torch.equal(layer.running_var.double(), rv)


def test_frozen_bn_loads_a_batch_norm_state_dict() -> None:
    gen = torch.Generator().manual_seed(1)
    bn = nn.BatchNorm2d(4)
    _random_affine(bn, gen)
    for _ in range(3):
        bn(torch.randn(8, 4, 3, 3, generator=gen) * 2 + 1)  # running stats away from 0 / 1
    frozen = make_norm("frozenbn", 4)
    frozen.load_state_dict(bn.state_dict())  # strict: num_batches_tracked is dropped, not an error
    x = torch.randn(2, 4, 3, 3, generator=gen)
    torch.testing.assert_close(frozen(x), bn.eval()(x))


@pytest.mark.parametrize(("spec", "channels"), [("ibn-a", 9), ("ign-a:c2", 12), ("ign-a:g4+ws", 13)])
def test_ibn_layer_is_instance_norm_on_the_first_half_and_the_plain_norm_on_the_rest(
    spec: str, channels: int
) -> None:
    gen = torch.Generator().manual_seed(0)
    layer = make_norm(spec, channels, instance_half=True).train()
    _random_affine(layer.IN, gen)
    _random_affine(layer.BN, gen)
    half = channels // 2  # floor, as IBN-Net
    assert (layer.IN.num_channels, layer.BN.weight.numel()) == (half, channels - half)
    x = torch.randn(3, channels, 4, 5, generator=gen) * 2 + 1
    instance = _affine(_standardize(x[:, :half], (2, 3)), layer.IN.weight.detach(), layer.IN.bias.detach())
    if spec == "ibn-a":  # BN in training: statistics of the batch
        rest = _standardize(x[:, half:], (0, 2, 3))
    else:
        groups = {"ign-a:c2": 3, "ign-a:g4+ws": 1}[spec]  # c2 on 6 channels; g4 on 7: gcd(4, 7) = 1
        assert layer.BN.num_groups == groups
        rest = paper_group_norm(
            x[:, half:], torch.ones(channels - half), torch.zeros(channels - half), groups
        )
    rest = _affine(rest, layer.BN.weight.detach(), layer.BN.bias.detach())
    torch.testing.assert_close(layer(x).double(), torch.cat([instance, rest], dim=1), atol=1e-5, rtol=1e-5)


# --- convert_norms ------------------------------------------------------------------------------------------


def _count(model: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


def _trained_bn_model() -> nn.Module:
    """A small bn model whose BN affines and running stats are no longer their init values."""
    torch.manual_seed(0)
    model = build_model("resnet18", norm="bn")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
        for _ in range(2):
            model(torch.randn(2, 3, 32, 32))
    return model


def test_bn_model_frozen_computes_what_it_computed_in_eval() -> None:
    model = _trained_bn_model().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        bn_count = _count(model, nn.BatchNorm2d)
        frozen = convert_norms(model, "frozenbn")
        assert frozen is model
        assert (_count(model, FrozenBatchNorm2d), _count(model, nn.BatchNorm2d)) == (bn_count, 0)
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(model.train()(x), expected, atol=1e-5, rtol=1e-4)  # frozen in train too
    owners = {type(m) for m in model.modules() if list(m.parameters(recurse=False))}
    assert owners == {nn.Conv2d}  # only the convs train now


def test_bn_to_gn_replaces_every_norm_and_keeps_the_affines() -> None:
    model = _trained_bn_model().train()
    bn_count, weight = _count(model, nn.BatchNorm2d), model.backbone.layer2[0].bn1.weight.detach().clone()
    convert_norms(model, "gn:g8")
    assert (_count(model, nn.GroupNorm), _count(model, nn.BatchNorm2d)) == (bn_count, 0)
    assert torch.equal(model.backbone.layer2[0].bn1.weight, weight)
    model(torch.randn(1, 3, 32, 32)).sum().backward()  # batch 1 trains now


@pytest.mark.parametrize("spec", ["evalnorm", "evalnorm:rule"])
def test_bn_to_evalnorm_keeps_every_batch_norm_tensor(spec: str) -> None:
    model = _trained_bn_model()
    before = model.state_dict()
    convert_norms(model, spec)
    after = model.state_dict()
    assert _count(model, EvalNorm2d) == _count(build_model("resnet18", norm="bn"), nn.BatchNorm2d)
    assert before.keys() <= after.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_conversion_keeps_dtype_and_mode_and_merges_ibn_halves() -> None:
    model = build_model("resnet18", norm="ign-a:c16").double().eval()
    ibn = model.backbone.layer1[0].bn1
    _random_affine(ibn.IN, torch.Generator().manual_seed(0))
    weight = torch.cat([ibn.IN.weight, ibn.BN.weight]).detach()
    convert_norms(model, "bn")
    assert _count(model, IBN) == 0 and type(model.backbone.layer1[0].bn1) is BatchNorm2d
    assert torch.equal(model.backbone.layer1[0].bn1.weight, weight)
    assert all(t.dtype == torch.float64 for t in model.state_dict().values() if t.is_floating_point())
    assert not any(m.training for m in model.modules())


@pytest.mark.parametrize(
    ("spec", "why"), [("ibn-a", "IBN-a"), ("ign-a:c16", "IBN-a"), ("gn:g32+ws", "\\+ws")]
)
def test_conversion_to_what_changes_the_architecture_is_refused(spec: str, why: str) -> None:
    with pytest.raises(ValueError, match=f"cannot convert .*{why}.*build the model with it"):
        convert_norms(build_model("resnet18", norm="bn"), spec)


def paper_group_norm(
    x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, groups: int, eps: float = 1e-5
):
    """Figure 3 of Wu & He, Group Normalization (2018), in float64."""
    n, c, h, w = x.shape
    xg = x.double().reshape(n, groups, c // groups * h * w)
    mean = xg.mean(dim=2, keepdim=True)
    var = xg.var(dim=2, unbiased=False, keepdim=True)
    xg = (xg - mean) / torch.sqrt(var + eps)
    return xg.reshape(n, c, h, w) * gamma.double().reshape(1, c, 1, 1) + beta.double().reshape(1, c, 1, 1)


@pytest.mark.parametrize(
    ("spec", "channels", "groups"), [("gn:g4", 16, 4), ("gn:c2", 16, 8), ("gn:g8", 12, 4)]
)
def test_group_norm_matches_the_paper(spec: str, channels: int, groups: int) -> None:
    gen = torch.Generator().manual_seed(0)
    layer = make_norm(spec, channels)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(channels, generator=gen))
        layer.bias.copy_(torch.randn(channels, generator=gen))
    x = torch.randn(3, channels, 5, 7, generator=gen) * 2 + 3
    expected = paper_group_norm(x, layer.weight.detach(), layer.bias.detach(), groups)
    torch.testing.assert_close(layer(x).double(), expected, atol=1e-5, rtol=1e-5)


# --- SyncBatchNorm ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyncCase:
    sizes: tuple[int, ...]  # rows of the batch on each rank
    momentum: float | None
    steps: int
    seed: int = 0

    def rows(self, rank: int) -> slice:
        start = sum(self.sizes[:rank])
        return slice(start, start + self.sizes[rank])


# Unequal per-rank batches, and momentum None (BatchNorm's cumulative average) over two steps.
SYNC_CASES = [SyncCase((1, 3), 0.1, 1), SyncCase((2, 2), None, 2, seed=1), SyncCase((3, 2), 0.3, 2, seed=2)]


def _train(layer: nn.Module, case: SyncCase, rows: slice) -> list[torch.Tensor]:
    """`case.steps` forward/backward steps of `layer` on `rows` of the case's batch.

    Returns the last y and dx (of those rows), the accumulated weight/bias grads, and the running stats.
    """
    gen = torch.Generator().manual_seed(case.seed)
    shape = (sum(case.sizes), 3, 4, 5)
    x_all = torch.randn(shape, generator=gen) * 3 + 5  # an offset mean: E[x^2] - E[x]^2 must hold up
    dy_all = torch.randn(shape, generator=gen)
    layer.momentum = case.momentum
    with torch.no_grad():
        layer.weight.copy_(torch.randn(3, generator=gen))
        layer.bias.copy_(torch.randn(3, generator=gen))
    for _ in range(case.steps):
        x = x_all[rows].clone().requires_grad_()
        y = layer(x)
        (y * dy_all[rows]).sum().backward()
    return [y.detach(), x.grad, layer.weight.grad, layer.bias.grad, layer.running_mean, layer.running_var]


def _assert_like_batch_norm_on_the_whole_batch(case: SyncCase, per_rank: list[list], tol: float) -> None:
    y, dx, dw, db, mean, var = _train(nn.BatchNorm2d(3), case, slice(None))
    close = {"atol": tol, "rtol": tol}
    torch.testing.assert_close(torch.cat([r[0] for r in per_rank]), y, **close)
    torch.testing.assert_close(torch.cat([r[1] for r in per_rank]), dx, **close)
    # Each rank holds its rows' share of the parameter grads; DDP adds them up (as a mean).
    torch.testing.assert_close(sum(r[2] for r in per_rank), dw, **close)
    torch.testing.assert_close(sum(r[3] for r in per_rank), db, **close)
    for r in per_rank:  # every rank's running stats are those of the whole batch
        torch.testing.assert_close(r[4], mean, **close)
        torch.testing.assert_close(r[5], var, **close)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_sync_bn_without_a_process_group_is_exactly_batch_norm(momentum: float | None) -> None:
    case = SyncCase((4,), momentum, steps=2)
    _assert_like_batch_norm_on_the_whole_batch(case, [_train(make_norm("syncbn", 3), case, slice(None))], 0)


def test_sync_bn_with_one_rank_is_exactly_batch_norm(tmp_path: Path) -> None:
    # torch's own SyncBatchNorm raises on CPU here ("expected input tensor to be on GPU").
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        case = SyncCase((4,), 0.1, 2)
        _assert_like_batch_norm_on_the_whole_batch(
            case, [_train(make_norm("syncbn", 3), case, slice(None))], 0
        )
    finally:
        dist.destroy_process_group()


def test_ddp_accepts_a_cpu_model_with_sync_bn(tmp_path: Path) -> None:
    # DDP refuses any nn.SyncBatchNorm (subclasses too) inside a CPU module; ours must not be one.
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        model = nn.Sequential(nn.Conv2d(3, 4, 1), make_norm("syncbn", 4))
        nn.parallel.DistributedDataParallel(model)(torch.randn(2, 3, 4, 4)).sum().backward()
    finally:
        dist.destroy_process_group()


def test_sync_bn_in_eval_uses_running_stats() -> None:
    layer = make_norm("syncbn", 3).eval()
    mean, var = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([4.0, 0.25, 1.0])
    with torch.no_grad():
        layer.running_mean.copy_(mean)
        layer.running_var.copy_(var)
    x = torch.randn(1, 3, 2, 2)
    expected = (x - mean.reshape(1, 3, 1, 1)) / torch.sqrt(var.reshape(1, 3, 1, 1) + layer.eps)
    torch.testing.assert_close(layer(x), expected)


def _sync_worker(rank: int, world_size: int, store_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size)
    try:
        results = [_train(make_norm("syncbn", 3), case, case.rows(rank)) for case in SYNC_CASES]
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_sync_bn_over_two_gloo_processes_is_batch_norm_on_the_whole_batch(tmp_path: Path) -> None:
    mp.spawn(_sync_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for i, case in enumerate(SYNC_CASES):
        _assert_like_batch_norm_on_the_whole_batch(case, [r[i] for r in results], 1e-5)


def test_group_norms_keep_a_channels_last_input_so_where_torch_loses_it(monkeypatch) -> None:
    """GroupNorm has returned channels-first for a channels_last input on CUDA in some torch versions (every
    conv after it would convert back): GN, IN, LN and the IBN layers give the layout back."""
    x = torch.randn(2, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    plain = nn.GroupNorm.forward
    monkeypatch.setattr(nn.GroupNorm, "forward", lambda self, t: plain(self, t).contiguous())  # as on CUDA
    for spec in ("gn:g2", "in", "ln", "ign-a:c2"):
        layer = make_norm(spec, 8, instance_half=True)
        out = layer(x)
        assert out.is_contiguous(memory_format=torch.channels_last), spec
        if isinstance(layer, nn.GroupNorm):
            torch.testing.assert_close(out, plain(layer, x))  # the same values
    assert not make_norm("gn:g2", 8)(x.contiguous()).is_contiguous(memory_format=torch.channels_last)
