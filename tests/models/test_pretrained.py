"""Pretrained weights: from any fsspec URL, across norms (what carries over, what is dropped, what is said),
files as people have them (safetensors, training checkpoints, prefixes), and the refusals that name why."""

import argparse
import functools
import logging
import re
from pathlib import Path

import fsspec
import pytest
import torch

from orchestrator import checkpoints
from orchestrator import spec as specs
from orchestrator.errors import UsageError
from orchestrator.models.build import backbone_constructor, build_model
from orchestrator.models.pretrained import load_pretrained
from orchestrator.models.resnet import ResNet


def _torchvision_like_file(path: str, norm: str = "bn", **open_kwargs) -> dict[str, torch.Tensor]:
    """A resnet18 state_dict with an fc layer, as torchvision saves it; returns what was saved."""
    torch.manual_seed(1)
    state = ResNet("resnet18", norm=norm).state_dict()
    for value in state.values():
        if value.is_floating_point():
            value.normal_()  # distinct from any fresh init
    state |= {"fc.weight": torch.randn(1000, 512), "fc.bias": torch.randn(1000)}
    with fsspec.open(path, "wb", **open_kwargs) as f:
        torch.save(state, f)
    return state


@pytest.mark.parametrize("scheme", ["path", "file", "memory"])
def test_pretrained_round_trips(tmp_path: Path, scheme: str, caplog: pytest.LogCaptureFixture) -> None:
    url = {
        "path": str(tmp_path / "r18.pth"),
        "file": f"file://{tmp_path}/r18.pth",
        "memory": f"memory://weights-{tmp_path.name}/r18.pth",
    }[scheme]
    saved = _torchvision_like_file(url)
    with caplog.at_level(logging.INFO, logger="orchestrator.models.pretrained"):
        model = build_model("resnet18", pretrained=url, storage_options={})
    loaded = model.backbone.state_dict()
    assert loaded.keys() == saved.keys() - {"fc.weight", "fc.bias"}
    for key, value in loaded.items():
        assert torch.equal(value, saved[key]), key
    assert "loaded 120 of 120 tensors" in caplog.text and "fc.weight" in caplog.text
    assert model.pretrained_left_out == [] and not _warnings(caplog)


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.endswith("pretrained") and r.levelno >= logging.WARNING
    ]


def test_a_bn_file_gives_a_gn_ws_backbone_its_weights_and_drops_the_statistics(tmp_path, caplog):
    saved = _torchvision_like_file(str(tmp_path / "r18.pth"))
    with caplog.at_level(logging.INFO, logger="orchestrator.models.pretrained"):
        model = build_model("resnet18", norm="gn:g32+ws", pretrained=str(tmp_path / "r18.pth"))
    gn = model.backbone
    assert torch.equal(gn.conv1.weight, saved["conv1.weight"])  # WS standardizes at forward: stored as is
    assert torch.equal(gn.layer4[1].conv2.weight, saved["layer4.1.conv2.weight"])
    assert torch.equal(gn.layer2[0].bn1.weight, saved["layer2.0.bn1.weight"])
    assert torch.equal(gn.layer2[0].bn1.bias, saved["layer2.0.bn1.bias"])
    assert "loaded 60 of 60 tensors" in caplog.text  # 20 convs, 20 norms x (weight, bias)
    assert "dropped 60 BN statistics" in caplog.text  # running stats: GN keeps none
    assert not _warnings(caplog)


def test_a_bn_file_gives_an_frn_backbone_its_weights_and_tlus_start_as_its_relus(tmp_path, caplog):
    saved = _torchvision_like_file(str(tmp_path / "r18.pth"))
    with caplog.at_level(logging.INFO, logger="orchestrator.models.pretrained"):
        model = build_model("resnet18", norm="frn", pretrained=str(tmp_path / "r18.pth"))
    frn = model.backbone
    assert torch.equal(frn.layer2[0].bn1.weight, saved["layer2.0.bn1.weight"])
    assert torch.equal(frn.layer2[0].bn1.bias, saved["layer2.0.bn1.bias"])
    assert model.pretrained_left_out == [] and not _warnings(caplog)  # a TLU's threshold is not pretrained
    assert all(not t.abs().sum() for k, t in frn.state_dict().items() if k.endswith(".tau"))  # ReLU: tau 0
    assert "dropped 60 BN statistics" in caplog.text


# --- Strict: a file that would leave part of the backbone as initialized is refused -----------------------


@pytest.mark.parametrize("dropped", ["layer2.0.bn1.weight", "layer3.1.bn2.running_var"])
def test_a_file_lacking_a_tensor_is_refused_naming_it_and_the_count(tmp_path: Path, dropped: str) -> None:
    url = str(tmp_path / "r18.pth")
    state = _torchvision_like_file(url)
    del state[dropped]  # a parameter, a buffer: both stay as initialized if nothing says so
    torch.save(state, url)
    with pytest.raises(UsageError) as error:
        build_model("resnet18", pretrained=url)
    assert str(error.value) == (
        f"model.pretrained '{url}' would leave 1 of the backbone's 120 tensors as initialized: "
        f"1 missing from the file ({dropped}); set model.pretrained_strict: false to train with them so"
    )


def test_a_file_lacking_tensors_loads_with_strict_false_and_says_which(tmp_path: Path, caplog) -> None:
    url = str(tmp_path / "r18.pth")
    state = {k: v for k, v in _torchvision_like_file(url).items() if not k.startswith("layer4.")}
    torch.save(state, url)
    # ResNet-18's layer4: 2 blocks x (2 convs + 2 BNs x weight, bias, running mean and var) + the downsample.
    first = "(layer4.0.conv1.weight, layer4.0.bn1.weight, layer4.0.bn1.bias, layer4.0.bn1.running_mean, "
    with pytest.raises(UsageError, match=re.escape(f"25 missing from the file {first}")) as error:
        load_pretrained(ResNet("resnet18"), url)
    assert "would leave 25 of the backbone's 120 tensors" in str(error.value)
    assert "layer4.0.bn1.running_var and 20 more)" in str(error.value)
    model = ResNet("resnet18")
    with caplog.at_level(logging.INFO, logger="orchestrator.models.pretrained"):
        left_out = load_pretrained(model, url, strict=False)
    assert len(left_out) == 25 and {k.split(".")[0] for k in left_out} == {"layer4"}
    assert left_out[:2] == ["layer4.0.conv1.weight", "layer4.0.bn1.weight"]  # the model's order
    (warning,) = _warnings(caplog)
    assert warning.startswith(
        f"model.pretrained {url} leaves 25 of the backbone's 120 tensors as initialized"
    )
    assert first in warning and warning.endswith("(model.pretrained_strict: false)")
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if k in loaded)


def test_wrong_shapes_load_with_strict_false_and_keep_the_models_tensors(tmp_path: Path, caplog) -> None:
    state = _randomized(ResNet("resnet18"))
    state["layer1.0.conv1.weight"] = torch.ones(64, 64, 1, 1)
    torch.save(state, tmp_path / "bad.pth")
    torch.manual_seed(0)
    fresh = build_model("resnet18").backbone.state_dict()
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING, logger="orchestrator.models.pretrained"):
        model = build_model("resnet18", pretrained=str(tmp_path / "bad.pth"), pretrained_strict=False)
    assert model.pretrained_left_out == ["layer1.0.conv1.weight"]
    (warning,) = _warnings(caplog)
    assert (
        "1 of other shapes, another architecture's? (layer1.0.conv1.weight: file (64, 64, 1, 1), model (64"
        in warning
    )
    loaded = model.backbone.state_dict()
    assert torch.equal(loaded["layer1.0.conv1.weight"], fresh["layer1.0.conv1.weight"])
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if k != "layer1.0.conv1.weight")


@pytest.mark.parametrize("norm", ["frozenbn", "evalnorm", "evalnorm:rule", "bn+ws"])
def test_a_bn_file_is_whole_for_the_bn_family(tmp_path: Path, norm: str, caplog) -> None:
    """EvalNorm's alpha, beta and batch size start afresh by design; a file from before torch 0.4.1 has no
    num_batches_tracked, and torch keeps the layer's own."""
    state = _torchvision_like_file(str(tmp_path / "r18.pth"))
    torch.save(
        {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, tmp_path / "old.pth"
    )
    with caplog.at_level(logging.WARNING, logger="orchestrator.models.pretrained"):
        model = build_model("resnet18", norm=norm, pretrained=str(tmp_path / "old.pth"))
    assert model.pretrained_left_out == [] and not _warnings(caplog)
    assert torch.equal(model.backbone.layer3[1].bn2.running_var, state["layer3.1.bn2.running_var"])


def test_an_ibn_backbone_from_a_bn_file_is_refused(tmp_path: Path) -> None:
    # IBN-a's halves are named as IBN-Net's own files name them (bn1.IN, bn1.BN): a BN file has none. Six
    # IBN layers (the first norm of each block in layer1-3) x IN weight, bias and BN weight, bias, statistics.
    _torchvision_like_file(str(tmp_path / "r18.pth"))
    with pytest.raises(
        UsageError, match=r"leave 36 of .*\(layer1\.0\.bn1\.IN\.weight, layer1\.0\.bn1\.IN\.b"
    ):
        build_model("resnet18", norm="ibn-a", pretrained=str(tmp_path / "r18.pth"))


def test_the_spec_decides(tmp_path: Path) -> None:
    url = str(tmp_path / "r18.pth")
    state = _torchvision_like_file(url)
    del state["layer4.1.bn2.running_mean"]
    torch.save(state, url)
    raw = {
        "name": "t",
        "data": {"train": "x", "val": "y"},
        "model": {"backbone": "resnet18", "pretrained": url},
    }
    with pytest.raises(UsageError, match="layer4.1.bn2.running_mean"):
        checkpoints.model_for(specs.validate(raw))
    raw["model"]["pretrained_strict"] = False
    assert checkpoints.model_for(specs.validate(raw)).pretrained_left_out == ["layer4.1.bn2.running_mean"]


@pytest.mark.slow
def test_the_trials_run_names_what_was_left_out(tmp_path: Path) -> None:
    from orchestrator import tracking  # MLflow's and Ray's imports: this test's alone
    from orchestrator.train import loop

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = tracking.client(uri).create_run(tracking.ensure_experiment("e", uri)).info.run_id
    names = [f"layer3.{block}.bn1.weight" for block in range(6, 13)]
    loop._tag_pretrained_left_out({"mlflow_run_id": run_id, "tracking_uri": uri}, names)
    assert tracking.client(uri).get_run(run_id).data.tags["orchestrator.pretrained_left_out"] == (
        "7: layer3.6.bn1.weight, layer3.7.bn1.weight, layer3.8.bn1.weight, layer3.9.bn1.weight, "
        "layer3.10.bn1.weight and 2 more"
    )


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
    return _randomized(backbone_constructor(name)())


@pytest.mark.parametrize("name", ["resnet18", "xception65"])
def test_safetensors_load_by_content_whatever_the_name(name: str, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    state = _published(name)
    save_file(state, tmp_path / "model.bin")  # the hub's model.safetensors, renamed: the header tells
    model = backbone_constructor(name)()
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
    model = backbone_constructor(name)()
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
    with pytest.raises(
        UsageError, match=r"^model.pretrained '.*other.pth': no tensor name .* inside state_dict/"
    ):
        load_pretrained(ResNet("resnet18"), str(tmp_path / "other.pth"))


def _torchvision_resnet101_file(path: Path) -> ResNet:
    """Save a ResNet-101 state_dict as torchvision lays it out (with its fc); returns a model holding it."""
    torch.manual_seed(2)
    source = ResNet("resnet101").eval()
    with torch.no_grad():
        for name, value in source.state_dict().items():
            if name.endswith("running_var"):
                value.uniform_(0.5, 2.0)
            elif value.is_floating_point():
                value.add_(torch.randn_like(value) * 0.02)  # distinct from any fresh init
    state = source.state_dict() | {"fc.weight": torch.randn(1000, 2048), "fc.bias": torch.randn(1000)}
    torch.save(state, path)
    return source


def test_torchvision_resnet101_checkpoint_reproduces_the_backbone(tmp_path: Path) -> None:
    source = _torchvision_resnet101_file(tmp_path / "r101.pth")
    model = build_model("resnet101", "deeplabv3plus", pretrained=str(tmp_path / "r101.pth")).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected, got = source(x), model.backbone(x)
    assert torch.isfinite(expected["out"]).all() and expected["out"].abs().max() > 0
    for key in ("low", "out"):
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)


def test_checkpoint_of_another_depth_names_the_first_wrong_shape(tmp_path: Path) -> None:
    # ResNet-101 weights into ResNet-18: in the model's order, the first misfit is layer1.0.conv1 (1x1, 3x3).
    torch.save(ResNet("resnet101").state_dict(), tmp_path / "r101.pth")
    with pytest.raises(UsageError) as error:
        build_model("resnet18", pretrained=str(tmp_path / "r101.pth"))
    message = str(error.value)
    assert message.startswith(f"model.pretrained '{tmp_path / 'r101.pth'}' would leave ")
    assert "of other shapes, another architecture's?" in message and "pretrained_strict: false" in message
    misfits = re.findall(r"([\w.]+): file (\([\d, ]*\)), model (\([\d, ]*\))", message)
    assert misfits[0] == ("layer1.0.conv1.weight", "(64, 64, 1, 1)", "(64, 64, 3, 3)")


def test_wrong_shapes_are_listed_in_the_models_order(tmp_path: Path) -> None:
    state = ResNet("resnet101").state_dict()
    for key in ("layer3.2.conv2.weight", "layer3.10.conv2.weight"):
        state[key] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError) as error:
        build_model("resnet101", pretrained=str(tmp_path / "bad.pth"))
    message = str(error.value)
    assert message.index("layer3.2.conv2.weight") < message.index("layer3.10.conv2.weight")
