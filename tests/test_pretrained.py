"""Pretrained loading across norms: what carries over, what is dropped, what is said."""

import logging

import torch

from orchestrator.models.build import build_model
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
