"""A file that is not a checkpoint of this tool is refused in one line, and nothing in it is ever run; the
copy a background checkpoint is written from holds still while training goes on."""

from __future__ import annotations

import copy
import os
import pickle

import pytest
import torch

from orchestrator import checkpoints
from orchestrator.errors import UsageError


class _Payload:
    def __reduce__(self):
        return os.system, ("touch ran",)


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"", "(EOFError: )"),
        (b"hello", "(KeyError: "),  # no zip: a legacy pickle, whose magic number this is not
        (pickle.dumps(_Payload()), "(UnpicklingError: Weights only load failed."),
    ],
)
def test_a_file_that_torch_cannot_read_as_weights_is_refused(tmp_path, monkeypatch, content, says):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.pt").write_bytes(content)
    with pytest.raises(UsageError) as e:
        checkpoints.load(tmp_path / "x.pt")
    assert str(e.value).startswith(f"{tmp_path / 'x.pt'}: not a checkpoint of this tool {says}")
    assert len(str(e.value)) < 260 and not (tmp_path / "ran").exists()


def test_weights_alone_are_refused_naming_what_the_file_holds(tmp_path):
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "w.pt")
    torch.save([1, 2], tmp_path / "l.pt")
    with pytest.raises(UsageError, match=r"it holds \['conv1.weight'\], not the model and the trial config"):
        checkpoints.load(tmp_path / "w.pt")
    with pytest.raises(UsageError, match="it holds list, not the model"):
        checkpoints.load(tmp_path / "l.pt")
    with pytest.raises(FileNotFoundError):  # the environment's, not the input's: exit 1
        checkpoints.load(tmp_path / "missing.pt")


def test_a_host_copy_keeps_the_state_as_it_was_while_training_changes_it() -> None:
    """A background checkpoint is written from a host copy while the next steps update weights and momentum
    in place: the copy holds the values of the step it was made at, in the same structure."""
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "position": {"step": 3}}
    copied = checkpoints.host_copy(state)
    expected = copy.deepcopy(state)
    optimizer.step()  # in place: weights and momentum move on
    assert not torch.equal(model.weight, expected["model"]["weight"])
    assert copied["position"] == {"step": 3}
    assert copied["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    for k, v in expected["model"].items():
        assert torch.equal(copied["model"][k], v)
    for i, s in expected["optimizer"]["state"].items():
        assert torch.equal(copied["optimizer"]["state"][i]["momentum_buffer"], s["momentum_buffer"])
