"""Every MLflow call of the project: a parent run per sweep, a child run per trial, ensembles.

Calls go through `MlflowClient` with explicit run ids, never the fluent "active run" state, because
the runs are written from different processes (the CLI, Tune trial drivers, rank 0 of each trial).
Every process gets its client from `client()`, which bounds each request (`Bounds`) and turns a server
that cannot be reached or does not answer into `errors.Unavailable`, one line with the masked URI.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import getpass
import hashlib
import json
import logging
import math
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests
import yaml
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, Run, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import (
    MLFLOW_DATASET_CONTEXT,
    MLFLOW_GIT_COMMIT,
    MLFLOW_SOURCE_NAME,
    MLFLOW_SOURCE_TYPE,
    MLFLOW_USER,
)

from orchestrator import logs, mlflow_private
from orchestrator.errors import Unavailable, UsageError, shown
from orchestrator.gpus import price_of
from orchestrator.masking import redact

KIND = "orchestrator.kind"  # sweep | trial | ensemble
SWEEP = "orchestrator.sweep"
TRIAL_KEY = "orchestrator.trial_key"
FAILURE = "orchestrator.failure"  # why a run failed, one line
RESUME_PATH = "orchestrator.tune_path"  # the Tune experiment a sweep run can be resumed from
COMMAND = "orchestrator.command"  # the orchestrator command line that made a run (sweep, ensemble, ...)
DEVICE = "orchestrator.device"  # what a trial trained on, as torch names it ("NVIDIA A10G"), or cpu
PRETRAINED_LEFT_OUT = "orchestrator.pretrained_left_out"  # backbone tensors model.pretrained did not give
PREEMPTION = "orchestrator.preemption"  # what the last preemption notice of a trial led to
OUTCOME = "orchestrator.outcome"  # how a trial ended: one of OUTCOMES
ENDED_EARLY = "orchestrator.ended_early"  # why a diverged or stopped trial ended, and when, one line
OUTCOMES = ("finished", "failed", "diverged", "stopped")
EARLY = ("diverged", "stopped")  # ended by the divergence guard or a scheduler: MLflow status KILLED
PARENT = "mlflow.parentRunId"
NOTE = "mlflow.note.content"  # a run's description in the MLflow UI
# The sweeps an ensemble's, evaluation's, prediction's or calibrated run's sources come from.
SWEEP_RUNS = "orchestrator.sweep_runs"
# Every trial's headline, what the runs table and every printed link lead with: its best epoch's val mIoU
# (the checkpoint it keeps, which ensemble and report use), and that epoch.
HEADLINE, HEADLINE_EPOCH = "best_val_miou", "best_epoch"
MAKE_UI = "http://127.0.0.1:5000"  # where `make ui` serves ./mlflow.db
_ENDED = "\n\nEnded: "  # in a sweep run's description, before how its trials ended
CHECKPOINT_DIR = "checkpoints/best"
CHECKPOINT_FILE = "model.pt"
# The best epoch's validation as a confusion matrix per image [N, C, C] in the split's order: what the
# report's intervals resample.
PER_IMAGE_CONFUSION = "val/per_image_confusion.npy"


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, or a SQLite store in the working directory, made absolute so that Ray
    workers (which run in other directories) write to the same store."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{Path('mlflow.db').resolve()}"


# How long one MLflow call may take before the command fails, in every process that calls MLflow (the
# CLI, trial drivers, rank 0 of each trial). A local Ray's workers inherit the variable; `orchestrator
# submit` puts it in a cluster job's environment, which Ray gives each of the job's workers. MLflow's
# own defaults retry a refused connection for 4 minutes and wait on a silent server for 20 (8 x 120 s).
TIMEOUT_ENV = "ORCHESTRATOR_MLFLOW_TIMEOUT"
DEFAULT_TIMEOUT_S = 30.0
# A dropped connection, a 5xx or a server restarting costs a retry, not the call; `bounds` is written for 2.
RETRIES = 2
TRIES = RETRIES + 1


@dataclass(frozen=True)
class Bounds:
    """MLflow's HTTP settings that keep one call within `seconds`, retries included. MLflow's timeout is
    each try's (to connect, then each read); urllib3 retries at once after the first failure, then sleeps
    backoff_factor * 2**(n-1) s plus up to `jitter` s before try n+1. Each try gets an equal share of the
    bound and the pauses the share left: a refused connection is retried for about a quarter of it (a
    restarting `mlflow server` answers again after about 7 s), a silent server waited on for all of it."""

    seconds: float
    try_s: int  # MLflow takes whole seconds
    backoff_factor: int  # and a whole factor
    jitter: float

    def env(self) -> dict[str, str]:
        return {
            "MLFLOW_HTTP_REQUEST_TIMEOUT": str(self.try_s),
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(RETRIES),
            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": str(self.backoff_factor),
            "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": str(self.jitter),
            # A 429 or 503 with Retry-After would otherwise wait as long as the server asks.
            "MLFLOW_HTTP_RESPECT_RETRY_AFTER_HEADER": "false",
        }


def bounds() -> Bounds:
    """The bounds of ORCHESTRATOR_MLFLOW_TIMEOUT (seconds, at least one per try; default 30)."""
    text = os.environ.get(TIMEOUT_ENV, "")
    try:
        seconds = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds >= TRIES):
        raise UsageError(f"{TIMEOUT_ENV}={shown(text)}: allowed is a number of seconds, {TRIES} or more")
    # The three tries and the one pause that sleeps (before the third: 2 x factor + jitter) share it.
    try_s = max(1, int(seconds // 4))
    left = seconds - TRIES * try_s
    factor = int(left // 2)
    return Bounds(seconds, try_s, factor, min(1.0, left - 2 * factor))


def client(uri: str | None = None) -> MlflowClient:
    """The MLflow client of every call here: each request bounded (`bounds`), a server that cannot be
    reached or does not answer raised as Unavailable."""
    # MLflow reads these at each request; set here, they hold in whichever process makes a client.
    os.environ.update(bounds().env())
    # urllib3 warns at each retry: lines before the one a command fails with (which counts the tries).
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
    return _BoundedClient(uri or tracking_uri())


class _BoundedClient(MlflowClient):
    """MlflowClient whose public methods raise Unavailable for the network failures MLflow wraps."""

    def __init__(self, uri: str) -> None:
        super().__init__(tracking_uri=uri)
        self._orchestrator_uri = uri

    def __getattribute__(self, name: str) -> Any:
        attr = super().__getattribute__(name)
        if name.startswith("_") or not callable(attr):
            return attr
        uri = super().__getattribute__("_orchestrator_uri")

        def bounded(*args: Any, **kwargs: Any) -> Any:
            with _unavailable(uri):
                return attr(*args, **kwargs)

        return bounded


# What requests raises (MLflow wraps it, keeping it as the cause) when the server cannot be reached, drops
# the connection, does not answer in time, or answers 5xx to every try.
_NETWORK = (
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
    requests.exceptions.RetryError,
    requests.exceptions.ChunkedEncodingError,
)


@contextmanager
def _unavailable(uri: str) -> Iterator[None]:
    start = time.monotonic()
    try:
        yield
    except (MlflowException, requests.exceptions.RequestException) as e:
        chain = _chain(e)
        if not any(isinstance(c, _NETWORK) for c in chain):
            raise
        b, took = bounds(), time.monotonic() - start
        raise Unavailable(
            f"MLflow at {redact(uri)} {_failure(chain[-1], b)} ({TRIES} tries, {took:.0f} s): check the "
            f"server and MLFLOW_TRACKING_URI, or allow longer: {TIMEOUT_ENV}=SECONDS (now {b.seconds:g})"
        ) from e


def _chain(e: BaseException) -> list[BaseException]:
    """e and its causes, outermost first."""
    chain: list[BaseException] = []
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    return chain


def _failure(root: BaseException, b: Bounds) -> str:
    """What the innermost error of a failed request says, in words."""
    if isinstance(root, TimeoutError):
        return f"did not answer within {b.try_s} s"
    if isinstance(root, OSError) and root.strerror:  # refused, reset, no route, name not known
        return f"cannot be reached: {root.strerror.lower()}"
    return f"failed: {redact(str(root).splitlines()[0]) if str(root) else type(root).__name__}"


def check_reachable(uri: str | None = None) -> None:
    """Raise Unavailable now, before a command's work, when the tracking server cannot answer: one cheap,
    bounded request (a local store has no server to ask)."""
    uri = uri or tracking_uri()
    if urlsplit(uri).scheme in ("http", "https"):
        client(uri).search_experiments(max_results=1)


def ensure_experiment(name: str, uri: str | None = None) -> str:
    """The experiment's id, created if needed (by the calling process: MLflow resolves a local
    artifact root against its working directory)."""
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    return exp.experiment_id if exp else c.create_experiment(name)


def start_sweep_run(
    experiment_id: str, sweep: str, params: dict[str, Any], uri: str, tune_path: str | None = None
) -> str:
    tags = {KIND: "sweep", SWEEP: sweep, **({RESUME_PATH: tune_path} if tune_path else {})}
    run = _create_run(client(uri), experiment_id, sweep, tags)
    log_params(run.info.run_id, params, uri)
    return run.info.run_id


def describe_sweep_run(run_id: str, description: str, spec: dict[str, Any], uri: str) -> None:
    """The sweep run's description (the UI's) and the spec it runs, as `spec.yaml`."""
    c = client(uri)
    c.set_tag(run_id, NOTE, description)
    c.log_text(run_id, yaml.safe_dump(spec, sort_keys=False), "spec.yaml")


def conclude_sweep_run(run_id: str, metrics: dict[str, float], ended: str, uri: str) -> None:
    """The sweep's summary metrics, and how its trials ended at the end of its description (in place of
    what a run of it before said: a resumed sweep concludes again)."""
    c = client(uri)
    log_metrics(run_id, metrics, step=0, uri=uri)
    described = c.get_run(run_id).data.tags.get(NOTE, "").split(_ENDED)[0]
    c.set_tag(run_id, NOTE, f"{described}{_ENDED}{ended}")


def share_view(experiment_id: str, grid_keys: list[str], uri: str) -> None:
    """Save the experiment's runs view that every printed link opens (runs_link): sorted by the headline,
    it and the swept params shown."""
    columns = [f"metrics.`{HEADLINE}`", f"metrics.`{HEADLINE_EPOCH}`", *(f"params.`{k}`" for k in grid_keys)]
    columns += ["metrics.`val_miou`", "metrics.`train_loss`"]
    client(uri).set_experiment_tag(experiment_id, *mlflow_private.view_tag(columns[0], columns))


def runs_link(experiment: str, uri: str | None = None) -> str:
    """The runs page of the experiment named `experiment`, sorted by the headline metric: on the MLflow
    server at `uri`, else, for a local store, where `make ui` (or `mlflow ui` on that store) serves it."""
    uri = uri or tracking_uri()
    experiment_id = find_experiment_id(experiment, uri)
    parts = urlsplit(uri)
    if parts.scheme in ("http", "https"):  # without any credentials of the URI: a link is shown and shared
        server = f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}{parts.path}"
        return mlflow_private.runs_url(server, experiment_id)
    here = uri in ("sqlite:///mlflow.db", f"sqlite:///{Path('mlflow.db').resolve()}")
    serve = "make ui" if here else f"mlflow ui --backend-store-uri {redact(uri)}"
    return f"{mlflow_private.runs_url(MAKE_UI, experiment_id)} (once `{serve}` serves it)"


def resume_sweep_run(experiment_id: str, tune_path: str, uri: str) -> str | None:
    """The latest sweep run of the Tune experiment at tune_path, marked running again; None if none."""
    c = client(uri)
    runs = c.search_runs(
        [experiment_id],
        filter_string=f"tags.`{KIND}` = 'sweep' and tags.`{RESUME_PATH}` = '{tune_path}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        return None
    c.update_run(runs[0].info.run_id, status=RunStatus.to_string(RunStatus.RUNNING))
    return runs[0].info.run_id


def find_trial_run(experiment_id: str, parent_run_id: str, key: str, uri: str) -> Run | None:
    """The child run of one grid point of a sweep run, if it was started."""
    found = client(uri).search_runs(
        [experiment_id],
        filter_string=f"tags.`{PARENT}` = '{parent_run_id}' and tags.`{TRIAL_KEY}` = '{key}'",
        max_results=1,
    )
    return found[0] if found else None


def start_trial_run(
    experiment_id: str,
    parent_run_id: str,
    key: str,
    params: dict[str, Any],
    uri: str,
    name: str | None = None,
) -> str:
    """The child run of one grid point, named `name` (default: its key); a restarted trial driver finds and
    continues its own run (same parent, same trial key) instead of opening a second one."""
    c = client(uri)
    found = find_trial_run(experiment_id, parent_run_id, key, uri)
    if found:
        run_id = found.info.run_id
        c.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        # A resumed trial starts without the verdict of an attempt before (failed, or ended early by a
        # rank 0 whose driver died before it ended the run).
        for verdict in (FAILURE, OUTCOME, ENDED_EARLY):
            if verdict in found.data.tags:
                c.delete_tag(run_id, verdict)
        return run_id
    run = _create_run(c, experiment_id, name or key, {KIND: "trial", PARENT: parent_run_id, TRIAL_KEY: key})
    log_params(run.info.run_id, params, uri)
    return run.info.run_id


def _create_run(c: MlflowClient, experiment_id: str, name: str, tags: dict[str, str]) -> Run:
    return c.create_run(experiment_id, run_name=name, tags={**_source_tags(), **tags})


@functools.cache
def _source_tags() -> dict[str, str]:
    """MLflow's standard tags of where a run comes from (the UI's Source, Version and User columns), which
    only its fluent API sets: this package, the git commit it runs from where it runs from a checkout, and
    the user. Once per process."""
    tags = {MLFLOW_SOURCE_NAME: "orchestrator", MLFLOW_SOURCE_TYPE: "LOCAL"}
    with contextlib.suppress(KeyError, OSError):  # no name for this uid (a container's)
        tags[MLFLOW_USER] = getpass.getuser()
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):  # no git here
        return tags
    if commit.returncode == 0:
        tags[MLFLOW_GIT_COMMIT] = commit.stdout.strip()
    return tags


def log_params(run_id: str, params: dict[str, Any], uri: str) -> None:
    items = [Param(k, _param_text(v)) for k, v in sorted(params.items())]
    # MLflow takes at most 100 params per batch.
    for i in range(0, len(items), 100):
        client(uri).log_batch(run_id, params=items[i : i + 100])


def log_metrics(
    run_id: str, metrics: dict[str, float], step: int, uri: str, tags: dict[str, Any] | None = None
) -> None:
    """The metrics at `step` and any tags, in one request."""
    now = int(time.time() * 1000)
    client(uri).log_batch(
        run_id,
        metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()],
        tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()],
    )


def set_tags(run_id: str, tags: dict[str, str], uri: str) -> None:
    client(uri).log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def log_checkpoint(run_id: str, path: str | Path, uri: str) -> None:
    """Upload a checkpoint file as the run's best checkpoint (replacing the previous best)."""
    client(uri).log_artifact(run_id, str(path), CHECKPOINT_DIR)


def log_per_image_confusion(run_id: str, matrices: Any, uri: str) -> None:
    """The best epoch's per-image confusion matrices (a numpy int array [N, C, C]), replacing the last."""
    import numpy as np

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / Path(PER_IMAGE_CONFUSION).name
        np.save(path, matrices.astype(np.int64), allow_pickle=False)
        client(uri).log_artifact(run_id, str(path), str(Path(PER_IMAGE_CONFUSION).parent))


def per_image_confusion(run_id: str, uri: str | None = None) -> Any:
    """A trial's PER_IMAGE_CONFUSION as a numpy int64 array [N, C, C], or None where it logged none (a
    validation that could not read every image, or a trial from before they were logged)."""
    import numpy as np

    with tempfile.TemporaryDirectory() as d:
        try:
            path = client(uri).download_artifacts(run_id, PER_IMAGE_CONFUSION, d)
        except (MlflowException, OSError):
            return None
        return np.load(path, allow_pickle=False)


def log_datasets(run_id: str, splits: dict[str, tuple[str, dict]], uri: str) -> None:
    """Each packed split a run reads, as an MLflow dataset input (the UI's Dataset column):
    {context ("training", "validation"): (URL, its manifest)}. The digest fingerprints the manifest, which
    lists every shard with its size and sha256; the profile counts samples and shards. MLflow keeps one input
    per dataset and run, so a restarted trial adds none."""
    inputs = []
    for context, (url, manifest) in splits.items():
        url = redact(url)  # a password in a URL is never shown
        profile = {"num_samples": manifest["num_samples"], "num_shards": len(manifest["shards"])}
        dataset = Dataset(
            name="/".join(url.rstrip("/").split("/")[-2:]),
            digest=_digest(manifest),
            source_type=urlsplit(url).scheme or "local",
            source=json.dumps({"uri": url}),
            profile=json.dumps(profile),
        )
        inputs.append(DatasetInput(dataset, [InputTag(MLFLOW_DATASET_CONTEXT, context)]))
    client(uri).log_inputs(run_id, datasets=inputs)


def _digest(manifest: dict) -> str:
    """8 hex digits of the manifest's sha256 (MLflow's own digests are that long)."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:8]


def log_epoch(
    run_id: str, metrics: dict[str, float], epoch: int, uri: str, tags: dict[str, Any] | None = None
) -> bool:
    """Log one epoch's metrics (with val_miou among them) at step `epoch`, with `tags`, unless the run
    already has that step: a trial restarted from an older checkpoint runs an epoch again that its first
    attempt logged. Returns whether it logged."""
    if any(m.step == epoch for m in client(uri).get_metric_history(run_id, "val_miou")):
        return False
    log_metrics(run_id, metrics, step=epoch, uri=uri, tags=tags)
    return True


# What a trial's attempts cost, its run's running totals (log_attempt), summed on its sweep's run.
COSTS = ("attempts", "restarts", "worker_seconds", "gpu_seconds", "cost_usd")


def log_attempt(
    run_id: str, uri: str, workers: int, gpus_per_worker: float, seconds: float, steps: int | None = None
) -> None:
    """Charge one attempt of a trial (its worker group, from start to shutdown) to its run: the attempt's
    `attempt_seconds` at step n (its number), and the running totals of COSTS at the same step: worker_seconds
    (workers x wall time), gpu_seconds (x GPUs per worker), and cost_usd at the list price of the GPU the
    trial tagged as its device (none on the CPU, or before a first epoch named it). `steps`, where known:
    the trial's optimizer steps done when the attempt ended (`attempt_steps`, from which the next attempt
    counts the steps lost)."""
    run = client(uri).get_run(run_id)
    before = run.data.metrics
    n = int(before.get("attempts", 0)) + 1
    totals = {
        "attempt_seconds": seconds,
        "attempts": n,
        "restarts": n - 1,
        "worker_seconds": before.get("worker_seconds", 0.0) + workers * seconds,
        "gpu_seconds": before.get("gpu_seconds", 0.0) + workers * gpus_per_worker * seconds,
    }
    if steps is not None:
        totals["attempt_steps"] = steps
    price = price_of(run.data.tags.get(DEVICE))
    if price is not None:
        totals["cost_usd"] = totals["gpu_seconds"] / 3600 * price
    log_metrics(run_id, totals, step=n, uri=uri)


def sum_costs(experiment_id: str, parent_run_id: str, uri: str) -> dict[str, float]:
    """The COSTS of a sweep's trials, summed and logged on the sweep's run."""
    runs = trial_runs(experiment_id, parent_run_id, uri)
    totals = {k: sum(r.data.metrics.get(k, 0.0) for r in runs) for k in COSTS}
    log_metrics(parent_run_id, totals, step=0, uri=uri)
    return totals


def trial_costs(sweep_run_id: str, uri: str | None = None) -> dict[str, dict[str, float]]:
    """{trial key: its COSTS so far} of a sweep run's trials; UsageError for an id of no sweep run."""
    run = find_run(sweep_run_id, uri)
    if run is None or run.data.tags.get(KIND) != "sweep":
        raise UsageError(f"{shown(sweep_run_id)} is no sweep run at {redact(uri or tracking_uri())}")
    return {
        r.data.tags[TRIAL_KEY]: {k: r.data.metrics[k] for k in COSTS if k in r.data.metrics}
        for r in trial_runs(run.info.experiment_id, sweep_run_id, uri)
    }


def end_early(run_id: str, outcome: str, reason: str, uri: str) -> None:
    """Record that a trial ended before its last epoch (`outcome` one of EARLY), and why; its driver ends
    the run (end_trial_run)."""
    set_tags(run_id, {OUTCOME: outcome, ENDED_EARLY: reason[:5000]}, uri)


def outcome(run: Run) -> str:
    """How a trial run ended (one of OUTCOMES), from its tag, else, for runs from before the tag, its
    status."""
    return run.data.tags.get(OUTCOME) or ("finished" if run.info.status == "FINISHED" else "failed")


def end_trial_run(run_id: str, uri: str, failure: str | None = None) -> tuple[str, str | None]:
    """End a trial run, with `failure` (what its driver saw fail) or by what its rank 0 recorded: failed (a
    failure not worth a retry), ended early (diverged, stopped: status KILLED) or finished. Returns the
    outcome and its reason."""
    tags = client(uri).get_run(run_id).data.tags
    if failure or FAILURE in tags:
        ended, reason, status = "failed", failure or tags[FAILURE], "FAILED"
    elif tags.get(OUTCOME) in EARLY:
        ended, reason, status = tags[OUTCOME], tags.get(ENDED_EARLY), "KILLED"
    else:
        ended, reason, status = "finished", None, "FINISHED"
    set_tags(run_id, {OUTCOME: ended, **({FAILURE: reason[:5000]} if ended == "failed" else {})}, uri)
    client(uri).set_terminated(run_id, status=status)
    return ended, reason


def end_run(run_id: str, uri: str, failed: bool = False, reason: str | None = None) -> None:
    if reason:
        set_tags(run_id, {FAILURE: reason[:5000]}, uri)
    client(uri).set_terminated(run_id, status="FAILED" if failed else "FINISHED")


def crop_param(params: dict[str, str]) -> tuple[int, ...]:
    """A trial run's `train.crop` param ("[720, 720]") as numbers; () without one."""
    return tuple(int(v) for v in re.findall(r"\d+", params.get("train.crop", "")))


_FINISHED_TRIALS = f"tags.`{KIND}` = 'trial' and attributes.status = 'FINISHED'"


def finished_trial_runs(experiment: str, uri: str | None = None) -> list[Run]:
    """The finished trial runs of `experiment`: none where the experiment, or the SQLite store, does not
    exist (and none is created)."""
    uri = uri or tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        return []
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return c.search_runs([exp.experiment_id], filter_string=_FINISHED_TRIALS, max_results=10_000)


def ended_early(experiment: str, uri: str | None = None) -> dict[str, int]:
    """How many trial runs of `experiment` ended early, by outcome (EARLY): what no ensemble picks."""
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return {}
    runs = c.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`{KIND}` = 'trial' and attributes.status = 'KILLED'",
        max_results=10_000,
    )
    counts = {o: sum(r.data.tags.get(OUTCOME) == o for r in runs) for o in EARLY}
    return {o: n for o, n in counts.items() if n}


def top_trial_runs(
    experiment: str, metric: str, k: int, uri: str | None = None, filter_string: str | None = None
) -> list[tuple[Run, float]]:
    """The k finished trial runs with a checkpoint (and matching filter_string, an MLflow filter such as
    "params.`model.backbone` = 'resnet101'"), each with its best value of `metric`, ranked by it (the
    best value, not the last: each run's checkpoint is its best epoch). Runs with the same params (one
    configuration trained again: a sweep run twice) count once, by the best of them (the latest of equals):
    an ensemble of one model's copies is that model."""
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        raise LookupError(f"no MLflow experiment named {experiment!r} at {redact(uri or tracking_uri())}")
    # MLflow's filter grammar has `and` only, no `or` and no parentheses (it rejects a parenthesized
    # clause), so the user's clauses join ours as they are.
    try:
        runs = c.search_runs(
            [exp.experiment_id],
            filter_string=_FINISHED_TRIALS + (f" and {filter_string}" if filter_string else ""),
            max_results=10_000,
        )
    except MlflowException as e:
        if not filter_string or e.error_code != "INVALID_PARAMETER_VALUE":
            raise
        reason = e.message.removeprefix(f"{e.error_code}: ")  # as a server's answer words it
        raise UsageError(
            f"--filter {shown(filter_string)}: {reason.splitlines()[0]}; MLflow filters are clauses "
            "joined by `and` (no `or`, no parentheses), e.g. "
            "\"params.norm = 'bn' and metrics.val_miou > 0.4\""
        ) from None
    scored = [(run, best) for run in runs if (best := best_value(run.info.run_id, metric, uri)) is not None]
    scored.sort(key=lambda pair: (-pair[1], -pair[0].info.start_time))  # ties: the latest run
    ranked, configurations = [], set()
    for run, best in scored:
        configuration = frozenset(run.data.params.items())
        if configuration not in configurations and has_checkpoint(run.info.run_id, uri):
            ranked.append((run, best))
            configurations.add(configuration)
            if len(ranked) == k:
                break
    return ranked


def latest_sweep_experiment(uri: str | None = None) -> str:
    """The experiment of the most recently started sweep."""
    run = latest_sweep_run(uri=uri)
    if run is None:
        raise LookupError(
            f"no sweep runs at {redact(uri or tracking_uri())}; run `orchestrator sweep SPEC` first"
        )
    return client(uri).get_experiment(run.info.experiment_id).name


def is_run(text: str, uri: str | None = None) -> bool:
    """Whether text is the id of a run in the tracking store (not, say, a checkpoint path)."""
    return bool(re.fullmatch(r"[0-9a-f]{32}", text)) and find_run(text, uri) is not None


def run_names(run_id: str, uri: str | None = None) -> tuple[str, str]:
    """(experiment name, run name) of a run."""
    c = client(uri)
    run = c.get_run(run_id)
    return c.get_experiment(run.info.experiment_id).name, run.info.run_name


def has_checkpoint(run_id: str, uri: str | None = None) -> bool:
    return any(f.path.endswith(CHECKPOINT_FILE) for f in client(uri).list_artifacts(run_id, CHECKPOINT_DIR))


def download_checkpoint(run_id: str, dst: str | Path | None = None, uri: str | None = None) -> Path:
    """The run's best checkpoint, downloaded into `dst`; UsageError for a run without one: not a trial (a
    sweep, an ensemble, an evaluation), or a trial that finished no epoch."""
    run = find_run(run_id, uri)
    if run is None:
        raise UsageError(f"{shown(run_id)} is no MLflow run id at {redact(uri or tracking_uri())}")
    if not has_checkpoint(run_id, uri):
        kind = run.data.tags.get(KIND, "other")
        raise UsageError(
            f"run {run_id} ({kind}) holds no checkpoint ({CHECKPOINT_DIR}/{CHECKPOINT_FILE}): give the id of "
            "a trial run that finished an epoch"
        )
    dst = Path(dst or tempfile.mkdtemp(prefix=f"ckpt-{run_id[:8]}-"))
    path = client(uri).download_artifacts(run_id, f"{CHECKPOINT_DIR}/{CHECKPOINT_FILE}", str(dst))
    return Path(path)


def cached_checkpoint(run_id: str, uri: str | None = None) -> Path:
    """The run's best checkpoint, downloaded once into ORCHESTRATOR_CACHE (default ~/.cache/orchestrator):
    a finished run's checkpoint never changes, and ensembles fetch the same members again and again."""
    cache = Path(os.environ.get("ORCHESTRATOR_CACHE", Path.home() / ".cache" / "orchestrator"))
    path = cache / "checkpoints" / run_id / CHECKPOINT_DIR / CHECKPOINT_FILE
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as partial:
            downloaded = download_checkpoint(run_id, partial, uri)
            path.parent.mkdir(parents=True, exist_ok=True)
            downloaded.replace(path)  # atomic: a killed download never leaves a half file in the cache
    return path


def log_derived_run(
    experiment: str,
    kind: str,
    name: str,
    params: dict[str, Any],
    metrics: dict[str, float],
    tags: dict[str, str] | None = None,
    files: dict[str, str | Path] | None = None,
    uri: str | None = None,
    sources: list[str] = (),
    data: dict[str, tuple[str, dict]] | None = None,
) -> str:
    """A finished run made from other runs (an ensemble, a calibrated model, an evaluation): params,
    metrics, tags naming its sources, and files as artifacts ({artifact folder: local file or folder}).
    sources: the runs it is made from; it is tagged with their sweeps (SWEEP_RUNS), and nested under the
    sweep where they come from one. data: the splits it read, as dataset inputs (log_datasets)."""
    uri = uri or tracking_uri()
    c = client(uri)
    sweeps = sorted({sweep for source in sources for sweep in _sweeps_of(c.get_run(source))})
    tags = {KIND: kind, **(tags or {}), **({SWEEP_RUNS: ",".join(sweeps)} if sweeps else {})}
    run = _create_run(
        c, ensure_experiment(experiment, uri), name, tags | ({PARENT: sweeps[0]} if len(sweeps) == 1 else {})
    )
    run_id = run.info.run_id
    if data:
        log_datasets(run_id, data, uri)
    log_params(run_id, params, uri)
    log_metrics(run_id, metrics, step=0, uri=uri)
    for folder, path in (files or {}).items():
        if Path(path).is_dir():
            c.log_artifacts(run_id, str(path), folder)
        else:
            c.log_artifact(run_id, str(path), folder)
    end_run(run_id, uri)
    return run_id


def _sweeps_of(run: Run) -> list[str]:
    """The sweep runs a run comes from: a trial's parent, a derived run's sweeps."""
    tags = run.data.tags
    if tags.get(KIND) == "trial":
        return [tags[PARENT]]
    return [s for s in tags.get(SWEEP_RUNS, "").split(",") if s]


def _param_text(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."


# The command line behind a run, so that a report can print how to make it again.


def command_tag(command: str | None) -> dict[str, str]:
    """{COMMAND: command}, or {} when the caller does not know its command line (a library call)."""
    return {COMMAND: command} if command else {}


def tag_command(run_id: str, command: str | None, uri: str) -> None:
    if command:
        set_tags(run_id, command_tag(command), uri)


# Queries of `orchestrator report`: None or [] where nothing matches; the report words the errors.


def find_experiment_id(name: str, uri: str | None = None) -> str | None:
    exp = client(uri).get_experiment_by_name(name)
    return exp.experiment_id if exp else None


def latest_sweep_run(experiment_ids: list[str] | None = None, uri: str | None = None) -> Run | None:
    """The most recently started sweep run in these experiments (None: in any)."""
    c = client(uri)
    ids = [e.experiment_id for e in c.search_experiments()] if experiment_ids is None else experiment_ids
    runs = c.search_runs(
        ids, f"tags.`{KIND}` = 'sweep'", order_by=["attributes.start_time DESC"], max_results=1
    )
    return runs[0] if runs else None


def find_run(run_id: str, uri: str | None = None) -> Run | None:
    """The run, or None where there is none of that id (or the text cannot be a run id)."""
    try:
        return client(uri).get_run(run_id)
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def trial_runs(experiment_id: str, parent_run_id: str, uri: str | None = None) -> list[Run]:
    """Every trial run of a sweep run, whatever its status."""
    return client(uri).search_runs(
        [experiment_id],
        filter_string=f"tags.`{KIND}` = 'trial' and tags.`{PARENT}` = '{parent_run_id}'",
        max_results=10_000,
    )


def latest_ensemble_run(experiment_id: str, uri: str | None = None) -> Run | None:
    """The most recently started finished `ensemble` run of an experiment."""
    runs = client(uri).search_runs(
        [experiment_id],
        f"tags.`{KIND}` = 'ensemble' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def best_value(run_id: str, key: str, uri: str | None = None) -> float | None:
    """The highest finite value the run logged for a metric over all steps; None if it logged none."""
    return metric_history(run_id, key, uri).best


@dataclass(frozen=True)
class MetricHistory:
    """What a run's history of one per-epoch metric says: its best, its last step, and whether it was still
    rising at the end. (A diverged epoch logs NaN, and max() over a NaN depends on its position: only
    finite values count.)"""

    best: float | None  # the highest finite value over all steps
    last_step: int | None  # for a per-epoch metric, the last epoch logged
    last_gain: float | None  # the last finite value less the one before; None with fewer than two


def metric_history(run_id: str, key: str, uri: str | None = None) -> MetricHistory:
    history = sorted(client(uri).get_metric_history(run_id, key), key=lambda m: m.step)
    values = [m.value for m in history if math.isfinite(m.value)]
    return MetricHistory(
        max(values, default=None),
        max((m.step for m in history), default=None),
        values[-1] - values[-2] if len(values) > 1 else None,
    )


def log_files(run_id: str, paths: list[Path], folder: str, uri: str | None = None) -> None:
    for path in paths:
        client(uri).log_artifact(run_id, str(path), folder)


PER_IMAGE = "predictions/per_image.csv"  # where evaluation and ensemble runs keep their per-image scores


def per_image_scores(run_id: str, column: str = "miou", uri: str | None = None) -> dict[str, float]:
    """{sample id: score} from a run's per-image CSV (train.sample_weights_from). LookupError in one line
    when the run, its CSV or the CSV's sample ids are missing."""
    c = client(uri)
    where = f"train.sample_weights_from: run {run_id}"
    if find_run(run_id, uri) is None:
        raise LookupError(f"{where} is not in the MLflow store {redact(uri or tracking_uri())}")
    with tempfile.TemporaryDirectory() as d:
        try:
            path = c.download_artifacts(run_id, PER_IMAGE, d)
        except (MlflowException, OSError):
            raise LookupError(
                f"{where} has no {PER_IMAGE}: score the training split with "
                "`orchestrator evaluate TRIAL_RUN_ID --data TRAIN_URL` and name that evaluation run"
            ) from None
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    if rows and "id" not in rows[0]:
        raise LookupError(
            f"{where}: its per-image scores have no sample ids (the split was packed before they were "
            "recorded): pack it again and evaluate again"
        )
    return {row["id"]: float(row[column]) for row in rows}


def log_model(
    run_id: str,
    python_model: str,
    artifacts: dict[str, str],
    registered_name: str,
    model_name: str,
    requirements: list[str],
    input_example: Any,
    uri: str | None = None,
) -> str:
    """Log a pyfunc model from code (`python_model`: the file that calls mlflow.models.set_model; images
    uint8 [B, H, W, 3] in, class ids uint8 [B, H, W] out) as an output of `run_id`, named `model_name`, the
    orchestrator package inside it, and register it as a new version of `registered_name`; returns the
    version. `requirements`: its pip requirements, given, not inferred (inference would import the model in
    a subprocess, seconds per model); `input_example`: what a request holds, kept with the model in its
    Python and REST forms (MLflow loads the model once to check that it serves it)."""
    import mlflow.pyfunc
    import numpy as np
    from mlflow.models import Model, ModelSignature
    from mlflow.types import Schema, TensorSpec

    import orchestrator

    uri = uri or tracking_uri()
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1))]),
    )
    # Made here, in the run's experiment: Model.log would make it in the fluent API's current experiment.
    experiment_id = client(uri).get_run(run_id).info.experiment_id
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", model_name).strip("-")  # what MLflow takes in a model's name
    model = client(uri).create_logged_model(experiment_id, name, source_run_id=run_id)
    mlflow.set_tracking_uri(uri)  # Model.log and registration resolve the store through it
    mlflow.set_registry_uri(uri)
    # Model.log goes through MLflow's fluent API, not `client()`: bounded by the settings client() set
    # just above, its network failures translated here.
    # MLflow's INFO lines (validating the input example, registering each version) say on the console what
    # the command prints once, in its own words.
    logs.quiet_console("mlflow")
    with _unavailable(uri):
        info = Model.log(
            artifact_path=None,
            flavor=mlflow.pyfunc,
            name=name,
            run_id=run_id,
            model_id=model.model_id,
            registered_model_name=registered_name,
            await_registration_for=0,
            python_model=python_model,
            artifacts=artifacts,
            signature=signature,
            input_example=input_example,
            code_paths=[str(Path(orchestrator.__file__).parent)],
            pip_requirements=requirements,
        )
    return str(info.registered_model_version)


def describe_model_version(name: str, version: str, description: str, uri: str | None = None) -> None:
    client(uri).update_model_version(name, version, description=description)


def set_model_aliases(name: str, aliases: dict[str, str], uri: str | None = None) -> None:
    """Point each alias of registered model `name` at a version ({alias: version})."""
    c = client(uri)
    for alias, version in aliases.items():
        c.set_registered_model_alias(name, alias, version)


def model_aliases(name: str, uri: str | None = None) -> dict[str, str]:
    """{alias: version} of registered model `name`."""
    return {alias: str(v) for alias, v in client(uri).get_registered_model(name).aliases.items()}
