"""Every use of the MLflow UI's unpublished conventions, in one module, written for the MLflow versions in
SUPPORTED and checked against the installed one on import: an MLflow upgrade fails here, naming the range,
not as links that open the wrong page.

What is taken, and why:
- the runs page of an experiment, `<server>/#/experiments/<id>/runs`: the experiment's own page opens a
  GenAI overview, which says nothing of a sweep;
- a shared view: the JSON a user's "Share" saves as the experiment tag `mlflow.sharedViewState.<key>`,
  opened with `?viewStateShareKey=<key>` (its order and its columns). The sweep saves one that leads with
  the headline metric, so that every printed link opens the runs table sorted by it, with it shown.
"""

from __future__ import annotations

import json
import urllib.parse

import mlflow

from orchestrator.errors import check_version

SUPPORTED = ((3, 17), (3, 18))  # [from, to)
VIEW_KEY = "orchestrator"  # the shared view each sweep saves on its experiment
_VIEW_TAG = "mlflow.sharedViewState."


def check_mlflow_version(version: str = mlflow.__version__) -> None:
    """UsageError unless `version` is in SUPPORTED."""
    check_version(
        "MLflow",
        version,
        SUPPORTED,
        "links into the MLflow UI by its conventions",
        "orchestrator/mlflow_private.py",
    )


check_mlflow_version()


def view_tag(order_by: str, columns: list[str]) -> tuple[str, str]:
    """The experiment tag of a shared view: runs ordered by `order_by` (highest first), `columns` shown, in
    MLflow's column names (`metrics.\\`best_val_miou\\``, `params.\\`norm\\``)."""
    state = {"orderByKey": order_by, "orderByAsc": False, "selectedColumns": columns}
    return _VIEW_TAG + VIEW_KEY, json.dumps(state)


def runs_url(server: str, experiment_id: str, view: bool = True) -> str:
    """The runs page of an experiment on an MLflow server (http...), in the sweep's shared view."""
    query = "?" + urllib.parse.urlencode({"viewStateShareKey": VIEW_KEY}) if view else ""
    return f"{server.rstrip('/')}/#/experiments/{experiment_id}/runs{query}"
