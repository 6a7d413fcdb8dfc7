"""PyTorch's private API is used in one module, which refuses a torch it was not written for; its MetaShapes
replays meta kernels' output shapes without changing what `orchestrator plan` counts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from orchestrator.compute import step_cost
from orchestrator.errors import UsageError
from orchestrator.models.build import build_model
from orchestrator.torch_private import MetaShapes, _pure, _replayable, check_torch_version, storage_id

PACKAGE = Path(__file__).resolve().parents[1] / "orchestrator"
# A private module or attribute of torch: `torch.x._y`, `from torch._x`, `._cdata`, `._schema`.
PRIVATE = re.compile(r"\btorch(\.\w+)*\._\w+|\._cdata\b|\._schema\b")


def test_torchs_private_api_is_used_in_one_module_alone() -> None:
    users = sorted(
        str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if PRIVATE.search(p.read_text())
    )
    assert users == ["torch_private.py"]


@pytest.mark.parametrize("version", ["2.11.0", "2.13.0+cpu", "2.14.1+cu130"])
def test_the_supported_torches_pass(version: str) -> None:
    check_torch_version(version)


@pytest.mark.parametrize("version", ["2.10.1", "2.15.0", "3.0.0"])
def test_another_torch_is_refused_naming_the_range(version: str) -> None:
    with pytest.raises(UsageError, match=rf"as of torch>=2\.11,<2\.15 .* this is torch {re.escape(version)}"):
        check_torch_version(version)


def test_views_share_a_storage_id_on_the_meta_device() -> None:
    x = torch.empty(4, 5, device="meta")
    assert storage_id(x[1:]) == storage_id(x.view(20)) == storage_id(x) != storage_id(torch.empty_like(x))


def test_replaying_shapes_counts_what_running_the_meta_kernels_counts() -> None:
    """One MetaShapes across norms, dtypes, crops and batches, as `orchestrator plan` shares it: a replay
    keyed on too little (no dtype, say) would hand one call's outputs to another."""
    shapes, cases = MetaShapes(), []
    for norm in ("bn", "gn:g8+ws", "evalnorm"):
        for dtype in (torch.float32, torch.bfloat16):
            with torch.device("meta"):
                model = build_model("resnet18", "deeplabv3plus", norm=norm).to(dtype).train()
            for batch, (height, width) in ((1, (48, 64)), (2, (48, 64)), (1, (40, 56))):
                images = torch.empty(batch, 3, height, width, device="meta", dtype=dtype)
                masks = torch.empty(batch, height, width, device="meta", dtype=torch.long)
                cases.append((model, images, masks))
    with shapes:
        replayed = [step_cost(*case, flops=False) for case in cases]
    assert [step_cost(*case, flops=False) for case in cases] == replayed
    assert len(set(replayed)) == len(cases)  # each case counts differently: the comparison can tell
    assert shapes.replayed > 10 * shapes.ran  # and most ops were replayed, not run


def test_outputs_a_replay_could_not_reproduce_are_not_remembered() -> None:
    x, y = torch.empty(4, 5, device="meta"), torch.empty(4, 5, device="meta")
    assert _replayable((x, torch.empty(3, device="meta")), {storage_id(y)}) is not None
    assert _replayable(x[1:], set()) is None  # an offset into a storage
    assert _replayable(x[:, :2], set()) is None  # a storage larger than the shape needs
    assert _replayable((x, x.view(20)), set()) is None  # two outputs, one storage
    view = torch.ops.aten._unsafe_view(y, [20])  # a view, undeclared in its schema
    assert not _pure(torch.ops.aten.view.default) and _pure(torch.ops.aten._unsafe_view.default)
    assert _replayable(view, {storage_id(y)}) is None


def test_every_backbone_and_head_counts_the_same_with_replayed_shapes() -> None:
    """Each model the plan can meet, at a small crop, batch 2, through one MetaShapes and without."""
    from orchestrator.models.catalog import BACKBONES

    shapes, models = MetaShapes(), [(name, None) for name in BACKBONES]
    models += [("resnet18", "deeplabv3"), ("resnet18", "fcn")]
    for backbone, head in models:
        with torch.device("meta"):
            model = build_model(backbone, head, norm="gn:g8+ws").train()
        case = (model, torch.empty(2, 3, 64, 96, device="meta"), torch.empty(2, 64, 96, device="meta").long())
        with shapes:
            step_cost(*case, flops=False)
            replayed = step_cost(*case, flops=False)  # every op met before
        assert replayed == step_cost(*case, flops=False), (backbone, head)
