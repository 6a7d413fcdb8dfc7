"""Every use of the MLflow UI's unpublished conventions, in one module, written for the MLflow versions in
SUPPORTED and checked against the installed one on import: an MLflow upgrade fails here, naming the range,
not as links that open the wrong page.

What is taken, and why:
- the runs page of an experiment, `<server>/#/experiments/<id>/runs`: the experiment's own page opens a
  GenAI overview, which says nothing of a sweep;
- a shared view: the JSON a user's "Share" saves as the experiment tag `mlflow.sharedViewState.<key>`,
  opened with `?viewStateShareKey=<key>` (its order and its columns). The sweep saves one that leads with
  the headline metric, so that every printed link opens the runs table sorted by it, with it shown;
- the scoring server's cast of a JSON request to the signature's dtype (`proto_json_utils.convert_data_type`,
  `np.array(data, dtype=...)`): for an integer tensor it truncates, so float pixels in [0, 1] reached the
  model as zeros and were answered 200. The served model makes it refuse what the dtype cannot hold as sent.
"""

from __future__ import annotations

import json
import urllib.parse

import mlflow
import numpy as np
from mlflow.types import TensorSpec
from mlflow.utils import proto_json_utils

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


def refuse_lossy_json_casts() -> None:
    """Makes the scoring server of this process answer 400 to a JSON request whose values an integer tensor
    input would cast (0.5, 255.0, true for uint8), naming the dtype, the shape and a value, instead of
    predicting on what the cast made of them. Integers out of the dtype's range are refused by the cast
    itself. Idempotent: called by the served model as it loads (inference/served.py); the strict cast keeps
    MLflow's own as its attribute `mlflows`."""
    lax = proto_json_utils.convert_data_type
    if hasattr(lax, "mlflows"):
        return

    def strict(data, spec):
        if isinstance(spec, TensorSpec) and spec.type.kind in "iu":
            try:
                given = np.asarray(data)
            except ValueError:  # ragged: the cast refuses it in its words
                return lax(data, spec)
            if given.size and given.dtype.kind not in "iu":
                odd = given[given != np.trunc(given)] if given.dtype.kind == "f" else given
                value = (odd if odd.size else given).flat[0].item()
                low, high = np.iinfo(spec.type).min, np.iinfo(spec.type).max
                raise proto_json_utils.MlflowInvalidInputException(
                    f"the model's input is {spec.type} {list(spec.shape)}, integers {low}-{high}: the "
                    f"request holds {given.dtype} values such as {value!r}"
                )
        return lax(data, spec)

    strict.mlflows = lax
    proto_json_utils.convert_data_type = strict
