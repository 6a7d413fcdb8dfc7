"""A file that is not a checkpoint of this tool is refused in one line, and nothing in it is ever run."""

from __future__ import annotations

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
