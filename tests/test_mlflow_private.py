"""The MLflow UI conventions orchestrator links by, in their one module, checked against MLflow's version.
The links themselves are opened in a real browser in test_mlflow_ui.py."""

from __future__ import annotations

import json
import re

import pytest

from orchestrator.errors import UsageError
from orchestrator.mlflow_private import VIEW_KEY, check_mlflow_version, runs_url, view_tag


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
