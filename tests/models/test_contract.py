"""The contract every model keeps, read from the catalog's records: one parametrized test over every pair of
backbone, head and norm (forward, backward, a gradient for every parameter, feature channels and strides),
each backbone's size against its published parameter count, and the records against the code they name."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch import nn

from orchestrator.models import catalog, deeplab, drn, enet, layers, norms, resnet, wider_resnet, xception
from orchestrator.models.build import HEAD_BUILDERS, backbone_constructor, build_model
from orchestrator.models.evalnorm import evalnorm_aux_loss


def norm_families() -> list[str]:
    """Every norm of the catalog (a spec of each row), and Weight Standardization on one."""
    return [*catalog.norm_examples(), "gn:g32+ws"]


MODEL_MODULES = (
    deeplab,
    drn,
    enet,
    layers,
    resnet,
    wider_resnet,
    xception,
)  # every module that builds layers
QUICK_BACKBONE = "resnet18"  # every head x norm on it runs in the quick suite; the rest of the grid is slow


def combinations() -> list:
    """Every pair of backbone, head and norm, each in one case at least: every head x norm on the quick
    backbone, every other backbone with every norm on its default head and with every head on bn. A fault
    of one backbone's with one head and one norm alone is what it leaves out."""
    cases = []
    for backbone in catalog.BACKBONES.values():
        for head in catalog.HEADS:
            try:
                catalog.check_pairing(backbone.name, head)
            except ValueError:
                continue
            for norm in norm_families():
                if catalog.NORMS[catalog.parse_norm(norm).kind].mixes_instance and not backbone.ibn:
                    continue
                pairs = backbone.name == QUICK_BACKBONE or head == catalog.default_head(backbone.name)
                if not (pairs or norm == "bn"):
                    continue
                quick = backbone.name == QUICK_BACKBONE or (backbone.own_head and norm == "bn")
                marks = () if quick else pytest.mark.slow
                cases.append(
                    pytest.param(backbone.name, head, norm, marks=marks, id=f"{backbone.name}-{head}-{norm}")
                )
    return cases


@pytest.mark.parametrize(("backbone", "head", "norm"), combinations())
def test_model_contract(backbone: str, head: str, norm: str) -> None:
    torch.manual_seed(0)
    record = catalog.BACKBONES[backbone]
    model = build_model(backbone, head, norm=norm).train()
    x = torch.randn(2, 3, 48, 64)  # not square: a swapped height and width shows
    # The features a head is built on: the record's channels, at stride 4 and at the output stride.
    if record.channels:
        features = model.backbone(x)
        stride = record.output_strides[0]
        assert features["low"].shape == (2, record.channels[0], 12, 16)
        assert features["out"].shape == (2, record.channels[1], 48 // stride, 64 // stride)
    logits = model(x)
    assert logits.shape == (2, 3, 48, 64) and torch.isfinite(logits).all()
    loss = logits.square().mean()
    aux = evalnorm_aux_loss(model)  # EvalNorm's alpha/beta learn from its auxiliary loss alone
    (loss if aux is None else loss + aux).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for part in (model.backbone, model.head):  # zero-init residual gammas hold some gradients at 0, not all
        assert any(p.grad.abs().sum() > 0 for p in part.parameters())
    first = next(m for m in model.backbone.modules() if isinstance(m, nn.Conv2d))
    assert first.weight.grad.abs().sum() > 0  # the gradient reaches the stem


@pytest.mark.parametrize(
    ("backbone", "output_stride"),
    [(b.name, s) for b in catalog.BACKBONES.values() if b.channels for s in b.output_strides],
)
def test_features_at_every_output_stride_the_record_names(backbone: str, output_stride: int) -> None:
    low, out = catalog.BACKBONES[backbone].channels
    with torch.device("meta"):  # shapes only
        features = build_model(backbone, norm="bn", output_stride=output_stride).backbone(
            torch.empty(1, 3, 64, 96)
        )
    assert features["low"].shape == (1, low, 16, 24)
    assert features["out"].shape == (1, out, 64 // output_stride, 96 // output_stride)
    with pytest.raises(ValueError, match=f"unknown output_stride 32 for backbone '{backbone}'"):
        build_model(backbone, output_stride=32)


def test_every_norm_comes_from_make_norm(monkeypatch: pytest.MonkeyPatch) -> None:
    """No model builds a norm of its own: each is the factory's, so a spec's norm reaches every layer."""
    made: list[nn.Module] = []
    make_norm = norms.make_norm

    def recording(*args, **kwargs) -> nn.Module:
        made.append(make_norm(*args, **kwargs))
        return made[-1]

    for module in (norms, *MODEL_MODULES):  # norms.norm_act's too
        if hasattr(module, "make_norm"):
            monkeypatch.setattr(module, "make_norm", recording)
    for record in catalog.BACKBONES.values():
        made.clear()
        with torch.device("meta"):
            model = build_model(record.name, norm="bn")
        found = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d | nn.GroupNorm | nn.LayerNorm)]
        assert found and {id(m) for m in found} == {id(m) for m in made}, record.name


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"backbone": "resnet34"}, "unknown backbone 'resnet34'; allowed: resnet18, resnet50, resnet101, "),
        (
            {"backbone": "resnet18", "head": "pspnet"},
            "unknown head 'pspnet'; allowed: deeplabv3plus, deeplabv3, fcn",
        ),
        ({"backbone": "resnet18", "norm": "gn:x3"}, "unknown norm 'gn:x3'; allowed: bn, syncbn"),
        ({"backbone": "xception65", "norm": "ibn-a"}, "'ibn-a' places instance norm in ResNet-style blocks"),
        (
            {"backbone": "enet", "head": "fcn"},
            "backbone 'enet' takes only its own head 'enet', not head 'fcn'",
        ),
        ({"backbone": "resnet18", "head": "enet"}, "head 'enet' belongs to backbone 'enet'"),
    ],
)
def test_build_model_refuses_what_the_catalog_does_not_allow(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_model(**kwargs)


@pytest.mark.parametrize("backbone", catalog.BACKBONES)
def test_parameter_count_matches_the_published_one(backbone: str) -> None:
    record = catalog.BACKBONES[backbone]
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = build_model(backbone, norm="bn")
    part = model if record.own_head else model.backbone
    count = sum(p.numel() for p in part.parameters())
    assert abs(count - record.parameters) <= record.tolerance * record.parameters, (
        f"{count:,} ({record.source})"
    )


def test_records_name_the_code_that_builds_them() -> None:
    for record in catalog.BACKBONES.values():
        build = backbone_constructor(record.name)
        assert callable(build) and build.__module__ == f"orchestrator.models.{record.module}"
        assert record.output_strides and set(record.output_strides) <= set(catalog.OUTPUT_STRIDES)
        assert (record.channels is None) == bool(record.own_head)
        assert record.about, f"{record.name}: the backbones' table says what it is"
    assert set(HEAD_BUILDERS) | set(catalog.OWN_HEADS) == set(catalog.HEADS)
    assert not set(HEAD_BUILDERS) & set(catalog.OWN_HEADS)


def test_a_new_backbone_is_one_module_and_one_record(monkeypatch: pytest.MonkeyPatch) -> None:
    """What docs/models.md's "Adding a backbone" promises: a module with a function named like the backbone
    and a catalog record, and the spec, docs/spec.md's table, build_model and the contract take it."""
    from orchestrator import spec as specs
    from orchestrator import spec_doc

    module = types.ModuleType("orchestrator.models.tinynet")

    def tinynet(*, norm, output_stride: int) -> nn.Module:
        class TinyNet(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.stem = nn.Sequential(layers.conv(3, 8, 3, stride=4, norm=norm), norms.make_norm(norm, 8))
                self.out = nn.Sequential(
                    layers.conv(8, 16, 3, stride=output_stride // 4, norm=norm), norms.make_norm(norm, 16)
                )

            def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
                low = self.stem(x)
                return {"low": low, "out": self.out(low)}

        return TinyNet()

    module.tinynet = tinynet
    monkeypatch.setitem(sys.modules, "orchestrator.models.tinynet", module)
    record = catalog.Backbone(
        "tinynet",
        module="tinynet",
        channels=(8, 16),
        parameters=3 * 8 * 9 + 2 * 8 + 8 * 16 * 9 + 2 * 16,
        source="counted",
        about="a toy",
    )
    monkeypatch.setitem(catalog.BACKBONES, "tinynet", record)
    assert "| `tinynet` | 0.00M | 16 | a toy |" in spec_doc.render().splitlines()  # docs/spec.md's table

    spec = specs.validate({"name": "t", "data": {"train": "x", "val": "x"}, "model": {"backbone": "tinynet"}})
    (trial,) = specs.expand(spec)
    assert trial.config["model.output_stride"] == 16 and trial.config["model.head"] == "deeplabv3plus"
    test_model_contract("tinynet", "fcn", "gn:c4+ws")
    test_features_at_every_output_stride_the_record_names("tinynet", 8)
    test_parameter_count_matches_the_published_one("tinynet")


class ToyNorm(nn.Module):
    """A norm new to the house: per sample over every channel, with a per-channel affine."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    @classmethod
    def from_spec(cls, spec: catalog.NormSpec, num_channels: int) -> nn.Module:
        return cls(num_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.layer_norm(x, x.shape[1:])
        return y * self.weight[:, None, None] + self.bias[:, None, None]


def test_a_new_norm_is_one_class_and_one_row(monkeypatch: pytest.MonkeyPatch) -> None:
    """What CONTRIBUTING.md's "A norm" promises: a class and a row, and the grammar, the spec, make_norm,
    the conversion and the contract's grid take it."""
    from orchestrator import spec as specs
    from orchestrator import spec_doc

    monkeypatch.setitem(catalog.NORMS, "toy", catalog.Norm("toy", f"{__name__}.ToyNorm", about="a toy"))
    assert "| `toy` | a toy |" in spec_doc.render().splitlines()  # docs/spec.md's table
    assert "toy+ws" not in catalog.norm_grammar() and ", toy (g<N>" in catalog.norm_grammar()
    spec = specs.validate(
        {"name": "t", "data": {"train": "x", "val": "x"}, "grid": {"norm": ["toy", "toy+ws"]}}
    )
    assert [t.config["norm"] for t in specs.expand(spec)] == ["toy", "toy+ws"]
    grid = [case.values for case in combinations() if case.values[2] == "toy"]
    assert {backbone for backbone, _, _ in grid} == set(catalog.BACKBONES)  # every backbone and head runs it
    test_model_contract(QUICK_BACKBONE, "deeplabv3plus", "toy")
    model = build_model(QUICK_BACKBONE, "fcn", norm="bn")
    bns = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert sum(type(m) is ToyNorm for m in norms.convert_norms(model, "toy").modules()) == bns
    assert sum(type(m) is norms.BatchNorm2d for m in norms.convert_norms(model, "bn").modules()) == bns
