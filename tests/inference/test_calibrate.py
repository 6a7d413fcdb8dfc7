"""`orchestrator evalnorm-calibrate RUN_ID` on a BN trial trained here and logged to SQLite MLflow."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from orchestrator import checkpoints, tracking
from orchestrator import spec as specs
from orchestrator.cli import main
from orchestrator.data.shards import pack
from orchestrator.data.stream import dataset_mean_std
from orchestrator.data.synth import synthesize
from orchestrator.models.evalnorm import EvalNorm2d
from orchestrator.train.loop import Position, Worker, make_optimizer, train_epoch


def trained_trial(tmp_path: Path, norm: str) -> str:
    """A finished trial run with a checkpoint, as a sweep leaves it (trained in-process, 1 epoch)."""
    synthesize(str(tmp_path / "synth"), train=8, val=4, size=(96, 64))
    pack(str(tmp_path / "synth"), str(tmp_path / "shards"), shard_size=4)
    spec = specs.validate(
        {
            "name": "cal",
            "data": {
                "train": f"{tmp_path}/shards/train",
                "val": f"{tmp_path}/shards/val",
                "loader_workers": 0,
            },
            "model": {"backbone": "resnet18"},
            "norm": norm,
            "train": {"epochs": 1, "batch_per_gpu": 2, "crop": [64, 64]},
        }
    )
    torch.manual_seed(0)
    model = checkpoints.model_for(spec)
    w = Worker(spec)
    train_epoch(w, model, make_optimizer(spec.train, model), Position())
    config = specs.public_params(specs.flatten(spec))
    uri = tracking.tracking_uri()
    exp = tracking.ensure_experiment("cal", uri)
    parent = tracking.start_sweep_run(exp, "cal", {}, uri)
    run_id = tracking.start_trial_run(exp, parent, f"norm={norm}", config, uri)
    tracking.log_metrics(run_id, {"val_miou": 0.5}, step=1, uri=uri)
    tracking.log_checkpoint(run_id, checkpoints.save(tmp_path / "model.pt", model, config, w.mean_std), uri)
    tracking.end_run(run_id, uri)
    return run_id


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    return MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")


def test_calibration_changes_only_alpha_beta_and_logs_a_run(tmp_path, mlflow_store, capsys, caplog):
    source = trained_trial(tmp_path, "bn")
    caplog.set_level(logging.INFO, logger="orchestrator.inference.calibrate")
    assert main(["evalnorm-calibrate", source, "--steps", "15"]) == 0
    out = capsys.readouterr().out
    assert "BN, running statistics (EMA)" in out and "EvalNorm, calibrated" in out
    progress = [r.getMessage() for r in caplog.records if r.name == "orchestrator.inference.calibrate"]
    assert progress[-3:] == ["calibrate 15/15 steps", "evaluate 2/4 images", "evaluate 4/4 images"]

    exp = mlflow_store.get_experiment_by_name("cal")
    (run,) = mlflow_store.search_runs([exp.experiment_id], "tags.`orchestrator.kind` = 'calibrated'")
    assert run.data.tags["orchestrator.source_run"] == source
    assert run.data.params["norm"] == "evalnorm" and run.data.params["calibration.steps"] == "15"
    assert 0 <= run.data.metrics["val_miou"] <= 1 and 0 <= run.data.metrics["ema_val_miou"] <= 1

    before = checkpoints.load(tracking.download_checkpoint(source))["model"]
    after = checkpoints.load(tracking.download_checkpoint(run.info.run_id))
    for key, value in before.items():  # every trained weight and running statistic, bit for bit
        assert torch.equal(after["model"][key], value), key
    calibrated = checkpoints.load_model(tracking.download_checkpoint(run.info.run_id))
    model = calibrated.model
    assert calibrated.config["norm"] == "evalnorm"
    assert calibrated.mean_std == dataset_mean_std(f"{tmp_path}/shards/train")
    layers = [m for m in model.modules() if isinstance(m, EvalNorm2d)]
    assert len(layers) == sum(key.endswith("running_mean") for key in before)
    table = json.loads(
        Path(mlflow_store.download_artifacts(run.info.run_id, "evalnorm/alpha_beta.json")).read_text()
    )
    assert len(table) == len(layers)
    assert any(alpha > 1e-3 or beta > 1e-3 for alpha, beta in table.values())  # the estimate moved


def test_calibrating_a_gn_run_is_refused_in_one_line(tmp_path, mlflow_store, capsys):
    source = trained_trial(tmp_path, "gn:g8")
    assert main(["evalnorm-calibrate", source, "--steps", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: run {source} uses norm 'gn:g8'; EvalNorm calibrates batch-normalized models: "
        "bn, syncbn, evalnorm (with or without +ws)"
    ]
