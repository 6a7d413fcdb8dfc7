"""The MLflow UI conventions orchestrator links by, in their one module, checked against MLflow's version.
The links themselves are opened in a real browser in test_mlflow_ui.py."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from mlflow.types import Schema, TensorSpec
from mlflow.utils import proto_json_utils

from orchestrator.errors import UsageError
from orchestrator.mlflow_private import (
    VIEW_KEY,
    check_mlflow_version,
    refuse_lossy_json_casts,
    runs_url,
    view_tag,
)


@pytest.mark.parametrize("version", ["3.17.0", "3.17.2"])
def test_the_supported_mlflows_pass(version: str) -> None:
    check_mlflow_version(version)


@pytest.mark.parametrize("version", ["3.16.1", "3.18.0", "4.0.0"])
def test_another_mlflow_is_refused_naming_the_range(version: str) -> None:
    with pytest.raises(
        UsageError, match=rf"as of mlflow>=3\.17,<3\.18 .* this is MLflow {re.escape(version)}"
    ):
        check_mlflow_version(version)


def test_a_shared_view_is_the_tag_the_uis_share_writes_and_its_link_opens() -> None:
    tag, value = view_tag("metrics.`best_val_miou`", ["metrics.`best_val_miou`", "params.`norm`"])
    assert tag == f"mlflow.sharedViewState.{VIEW_KEY}"
    assert json.loads(value) == {
        "orderByKey": "metrics.`best_val_miou`",
        "orderByAsc": False,
        "selectedColumns": ["metrics.`best_val_miou`", "params.`norm`"],
    }
    assert (
        runs_url("http://h:5000/", "7") == f"http://h:5000/#/experiments/7/runs?viewStateShareKey={VIEW_KEY}"
    )


IMAGES = Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))])  # the served model's input


def mlflows_cast(monkeypatch) -> None:
    """MLflow's own cast for this test, whatever an earlier test's served model installed in this process."""
    cast = proto_json_utils.convert_data_type
    monkeypatch.setattr(proto_json_utils, "convert_data_type", getattr(cast, "mlflows", cast))


@pytest.mark.parametrize(
    ("pixels", "value"),
    [([0.0, 0.5, 1.0], "0.5"), ([0.0, 255.0, 1.0], "0.0"), ([True, False, True], "True")],
)
def test_the_scoring_servers_cast_refuses_what_uint8_cannot_hold_as_sent(monkeypatch, pixels, value) -> None:
    mlflows_cast(monkeypatch)
    request = {"inputs": [[pixels, pixels]]}  # one 1x2 image
    # MLflow's own cast: what the model would be given.
    assert proto_json_utils.parse_tf_serving_input(request, IMAGES).dtype == np.uint8
    refuse_lossy_json_casts()
    refuse_lossy_json_casts()  # once is enough: a second call wraps nothing more
    with pytest.raises(proto_json_utils.MlflowInvalidInputException) as refused:
        proto_json_utils.parse_tf_serving_input(request, IMAGES)
    assert refused.value.get_http_status_code() == 400
    kind = "bool" if value == "True" else "float64"
    assert refused.value.message == (
        "Invalid input. the model's input is uint8 [-1, -1, -1, 3], integers 0-255: the request holds "
        f"{kind} values such as {value}"
    )


def test_the_strict_cast_keeps_what_the_dtype_holds_and_mlflows_own_refusals(monkeypatch) -> None:
    mlflows_cast(monkeypatch)
    refuse_lossy_json_casts()
    pixels = [[[[0, 128, 255], [1, 2, 3]]]]
    parsed = proto_json_utils.parse_tf_serving_input({"inputs": pixels}, IMAGES)
    assert parsed.dtype == np.uint8 and parsed.tolist() == pixels
    with pytest.raises(proto_json_utils.MlflowInvalidInputException, match="300 out of bounds for uint8"):
        proto_json_utils.parse_tf_serving_input({"inputs": [[[[0, 300, 1]]]]}, IMAGES)
    # Other types are not the strict cast's: a float column stays MLflow's.
    floats = Schema([TensorSpec(np.dtype(np.float32), (-1,))])
    assert proto_json_utils.parse_tf_serving_input({"inputs": [0.5]}, floats).tolist() == [0.5]
