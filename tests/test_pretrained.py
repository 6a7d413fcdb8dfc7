"""Pretrained loading across norms: what carries over, what is dropped, what is said."""

import argparse
import functools
import logging
from pathlib import Path

import pytest
import torch

from orchestrator.models.build import BACKBONE_BUILDERS, build_model
from orchestrator.models.pretrained import load_pretrained
from orchestrator.models.resnet import ResNet


def test_a_bn_file_gives_a_gn_ws_backbone_its_weights_and_drops_the_statistics(tmp_path, caplog):
    bn = ResNet("resnet18", norm="bn")
    for m in bn.modules():  # non-default values, so that "carried over" is visible
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    torch.save(bn.state_dict(), tmp_path / "r18.pth")
    with caplog.at_level(logging.INFO, logger="orchestrator.models.pretrained"):
        model = build_model("resnet18", norm="gn:g32+ws", pretrained=str(tmp_path / "r18.pth"))
    gn = model.backbone
    assert torch.equal(
        gn.conv1.weight, bn.conv1.weight
    )  # WS standardizes at forward, the stored weight is the file's
    assert torch.equal(gn.layer2[0].bn1.weight, bn.layer2[0].bn1.weight)
    assert torch.equal(gn.layer2[0].bn1.bias, bn.layer2[0].bn1.bias)
    statistics = sum(
        k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in bn.state_dict()
    )
    assert f"dropped {statistics} BN statistics" in caplog.text
    assert not [r for r in caplog.records if r.name.endswith("pretrained") and r.levelno >= logging.WARNING]


def test_a_file_lacking_weights_is_a_warning_naming_them(tmp_path, caplog):
    torch.save(ResNet("resnet50").state_dict(), tmp_path / "r50.pth")
    deeper = ResNet("resnet101")
    with caplog.at_level(logging.INFO, logger="orchestrator.models.pretrained"):
        load_pretrained(deeper, str(tmp_path / "r50.pth"))
    (warning,) = [r for r in caplog.records if r.name.endswith("pretrained") and r.levelno == logging.WARNING]
    assert "lacks" in warning.message and "layer3.6.conv1.weight" in warning.message


# --- Files as people have them: safetensors, training checkpoints, prefixed names --------------------------


def _randomized(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state_dict, every float tensor redrawn, so that "loaded" shows tensor by tensor."""
    generator = torch.Generator().manual_seed(0)
    return {
        k: torch.rand(v.shape, generator=generator) if v.is_floating_point() else v.clone()
        for k, v in model.state_dict().items()
    }


def _assert_landed(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    own = model.state_dict()
    assert set(own) == set(state)
    different = [k for k in own if not torch.equal(own[k], state[k])]
    assert different == []


@functools.cache
def _published(name: str) -> dict[str, torch.Tensor]:
    """Weights in a backbone's published layout (torchvision's for ResNets, timm's for Xception-65)."""
    return _randomized(BACKBONE_BUILDERS[name]())


@pytest.mark.parametrize("name", ["resnet18", "xception65"])
def test_safetensors_load_by_content_whatever_the_name(name: str, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    state = _published(name)
    save_file(state, tmp_path / "model.bin")  # the hub's model.safetensors, renamed: the header tells
    model = BACKBONE_BUILDERS[name]()
    load_pretrained(model, str(tmp_path / "model.bin"))
    _assert_landed(model, state)


DDP_CHECKPOINT = (
    lambda s: {"state_dict": {f"module.{k}": v for k, v in s.items()}, "epoch": 90},
    "took the weights out of 'state_dict', stripped the prefix 'module.'",
)


@pytest.mark.parametrize(
    ("name", "wrap", "how"),
    [
        ("resnet18", *DDP_CHECKPOINT),
        ("xception65", *DDP_CHECKPOINT),
        ("resnet18",
         lambda s: {"model": {f"backbone.{k}": v for k, v in s.items()} | {"head.weight": torch.ones(3)},
                    "optimizer": {"state": {}}, "args": argparse.Namespace(lr=0.1, model="deeplab")},
         "took the weights out of 'model', stripped the prefix 'backbone.'"),
        ("resnet18", lambda s: {f"encoder.{k}": v for k, v in s.items()}, "stripped the prefix 'encoder.'"),
        ("resnet18", lambda s: {"model_state_dict": s}, "took the weights out of 'model_state_dict'"),
    ],
)  # fmt: skip
def test_checkpoints_and_prefixes_are_unwrapped_and_said(name, wrap, how, tmp_path: Path, caplog) -> None:
    state = _published(name)
    torch.save(wrap(state), tmp_path / "checkpoint.pth")
    model = BACKBONE_BUILDERS[name]()
    with caplog.at_level(logging.INFO, logger="orchestrator.models.pretrained"):
        load_pretrained(model, str(tmp_path / "checkpoint.pth"))
    _assert_landed(model, state)
    (loaded,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("loaded")]
    assert f"checkpoint.pth ({how}); dropped 0 BN statistics" in loaded


def test_the_unwrapping_that_matches_most_names_wins(tmp_path: Path) -> None:
    """A checkpoint whose top level holds a stray tensor of a model name keeps looking inside."""
    state = _randomized(ResNet("resnet18"))
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "state_dict": state}, tmp_path / "ckpt.pt")
    model = ResNet("resnet18")
    load_pretrained(model, str(tmp_path / "ckpt.pt"))
    _assert_landed(model, state)


def test_unloadable_files_are_refused_with_the_reason(tmp_path: Path) -> None:
    torch.save(
        {"state_dict": ResNet("resnet18").state_dict(), "trainer": Path("x")}, tmp_path / "pickled.pth"
    )
    with pytest.raises(ValueError, match=r"reads safely \(weights_only=True\): .*pathlib.*save the model's"):
        load_pretrained(ResNet("resnet18"), str(tmp_path / "pickled.pth"))
    (tmp_path / "text.pth").write_text("not weights")
    with pytest.raises(ValueError, match="neither a safetensors file nor one torch.load reads safely"):
        load_pretrained(ResNet("resnet18"), str(tmp_path / "text.pth"))
    torch.save({"model": {"decoder.conv.weight": torch.ones(1)}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"no tensor name in .* also inside state_dict/model/"):
        load_pretrained(ResNet("resnet18"), str(tmp_path / "other.pth"))
