"""The walking skeleton end to end, through the real command: synthetic BDD100K -> shards on a real
S3 API server -> a 2-trial Ray Tune sweep of 2 gloo workers each -> SQLite MLflow -> an ensemble."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import broken_shards as broken
import pytest
import s3fs
import yaml
from mlflow.tracking import MlflowClient

from orchestrator.models.catalog import norm_examples

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "orchestrator"]


def run_cli(args: list[str], cwd: Path, env: dict[str, str], timeout: int = 600) -> str:
    proc = subprocess.run(CLI + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"{args} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    )
    return proc.stdout


@pytest.fixture
def workdir(tmp_path, s3_server, s3_bucket, cli_env):
    """A user's working directory: env for S3 + MLflow, synthetic shards in the bucket."""
    env = {**cli_env, **s3_server.env}
    shards = f"s3://{s3_bucket}/bdd100k/shards"
    run_cli(
        ["data", "synth", str(tmp_path / "synth"), "--train", "16", "--val", "4", "--size", "128x72"],
        tmp_path,
        env,
    )
    out = run_cli(["data", "pack", str(tmp_path / "synth"), shards, "--shard-size", "5"], tmp_path, env)
    assert "train: 16 samples in 4 shards" in out
    spec = {
        "name": "e2e",
        "data": {"train": f"{shards}/train", "val": f"{shards}/val", "loader_workers": 0},
        "model": {"backbone": "resnet18"},
        "train": {
            "epochs": 2,
            "steps_per_epoch": 2,
            "checkpoint_every": 1,  # mid-epoch checkpoints go to Ray Train, not to Tune
            "batch_per_gpu": 2,
            "crop": [64, 64],
            "lr": 0.01,
            "diverge_single_class_epochs": 0,  # 2 steps an epoch on 16 scenes: often one class predicted
        },
        "resources": {"workers_per_trial": 2, "cpus_per_worker": 1},
        "storage": f"s3://{s3_bucket}/runs",  # Ray Train checkpoints on the S3 server too
        "grid": {"norm": ["bn", "gn:g8"]},
    }
    (tmp_path / "e2e.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return tmp_path, env


def test_sweep_then_ensemble_through_s3_ray_and_mlflow(workdir, s3_server, s3_bucket):
    cwd, env = workdir
    out = run_cli(["sweep", "e2e.yaml", "-v"], cwd, env)
    assert "norm=bn" in out and "norm=gn:g8" in out and "FINISHED" in out
    assert "Trial status: 2 TERMINATED" in out  # -v: Tune's own status tables
    fs = s3fs.S3FileSystem(**s3_server.storage_options)
    ray_checkpoints = [p for p in fs.find(f"{s3_bucket}/runs") if p.endswith("/model.pt")]
    assert len(ray_checkpoints) == 2 * 2  # 2 trials x num_to_keep=2 epochs

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("e2e")
    runs = client.search_runs([exp.experiment_id])
    sweeps = [r for r in runs if r.data.tags.get("orchestrator.kind") == "sweep"]
    trials = [r for r in runs if r.data.tags.get("orchestrator.kind") == "trial"]
    assert len(sweeps) == 1 and sweeps[0].info.status == "FINISHED"
    assert sorted(r.data.params["norm"] for r in trials) == ["bn", "gn:g8"]
    for trial in trials:
        assert trial.data.tags["mlflow.parentRunId"] == sweeps[0].info.run_id
        assert trial.info.status == "FINISHED"
        assert trial.data.params["model.backbone"] == "resnet18"
        assert trial.data.params["train.batch_per_gpu"] == "2"
        assert trial.data.tags["orchestrator.device"] == "cpu"  # on CUDA torch's name: plan's throughput key
        for metric in (
            "train_loss",
            "val_miou",
            "val_iou_direct",
            "images_per_s",
            "best_val_miou",
            "best_epoch",
        ):
            history = client.get_metric_history(trial.info.run_id, metric)
            assert [m.step for m in history] == [1, 2], metric
        assert 0 <= trial.data.metrics["val_miou"] <= 1
        # The headline: the best epoch's val mIoU and that epoch, as the checkpoint kept.
        history = client.get_metric_history(trial.info.run_id, "val_miou")
        best = max(history, key=lambda m: (m.value, -m.step))
        assert (
            trial.data.metrics["best_val_miou"] == best.value
            and trial.data.metrics["best_epoch"] == best.step
        )
        # Settings are params, not flat per-epoch charts (an unstaged run's batch and crop never change).
        assert not {"epoch", "batch_per_gpu", "crop_width", "crop_height"} & set(trial.data.metrics)
        # A short name of the swept values, the full key a tag; MLflow's standard source tags.
        assert trial.info.run_name == trial.data.params["norm"]
        assert trial.data.tags["orchestrator.trial_key"] == f"norm={trial.data.params['norm']}"
        assert {"mlflow.user", "mlflow.source.name", "mlflow.source.git.commit"} <= set(trial.data.tags)
        assert [f.path for f in client.list_artifacts(trial.info.run_id, "checkpoints/best")] == [
            "checkpoints/best/model.pt"
        ]
        inputs = client.get_run(trial.info.run_id).inputs.dataset_inputs  # the UI's Dataset column
        shards = f"s3://{s3_bucket}/bdd100k/shards"
        assert {i.tags[0].value: json.loads(i.dataset.source) for i in inputs} == {
            "training": {"uri": f"{shards}/train"},
            "validation": {"uri": f"{shards}/val"},
        }

    proc = subprocess.run(CLI + ["ensemble", "--top", "3"], cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 2  # fails clearly, before any download
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: --top 3: experiment 'e2e' has 2 finished trial configuration(s) with metric 'val_miou' and a "
        "checkpoint (runs of the same params count once)"
    )
    env = {**env, "ORCHESTRATOR_CACHE": str(cwd / "cache")}
    out = run_cli(["ensemble", "--top", "2"], cwd, env)  # experiment: the latest sweep's
    assert "ensemble of 2 (mean)" in out
    ensembles = client.search_runs([exp.experiment_id], filter_string="tags.`orchestrator.kind` = 'ensemble'")
    assert len(ensembles) == 1
    members = ensembles[0].data.tags["orchestrator.members"].split(",")
    assert sorted(members) == sorted(r.info.run_id for r in trials)
    assert 0 <= ensembles[0].data.metrics["val_miou"] <= 1
    # Nested under the sweep of its members, the split it scored on as its dataset.
    assert ensembles[0].data.tags["mlflow.parentRunId"] == sweeps[0].info.run_id
    (split,) = client.get_run(ensembles[0].info.run_id).inputs.dataset_inputs
    assert json.loads(split.dataset.source) == {"uri": f"s3://{s3_bucket}/bdd100k/shards/val"}
    # Each member, re-scored from its MLflow checkpoint in one process, scores what its trial reported
    # across 2 ranks at its best epoch: the checkpoint is exactly the model every rank validated.
    best = {
        r.info.run_id: max(m.value for m in client.get_metric_history(r.info.run_id, "val_miou"))
        for r in trials
    }
    for i, run_id in enumerate(members):
        assert ensembles[0].data.metrics[f"member{i}_val_miou"] == pytest.approx(best[run_id], abs=1e-9)
    assert best[members[0]] >= best[members[1]]  # ranked by the best value of the metric
    predictions = {f.path for f in client.list_artifacts(ensembles[0].info.run_id, "predictions")}
    assert {"predictions/per_image.csv", "predictions/per_image_miou.png"} <= predictions
    assert any(p.startswith("predictions/worst-") for p in predictions)
    cached = sorted(p.parent.parent.parent.name for p in (cwd / "cache").rglob("model.pt"))
    assert cached == sorted(members)  # fetched once, kept for the next ensemble

    # One member again, by sliding windows and by a checkpoint file, each logged as an evaluation run.
    out = run_cli(
        ["evaluate", members[0], "--mode", "slide", "--crop", "64x64", "--stride", "48x48"], cwd, env
    )
    (evaluation,) = client.search_runs(
        [exp.experiment_id], filter_string="tags.`orchestrator.kind` = 'evaluation'"
    )
    assert evaluation.data.params["inference.mode"] == "slide"
    assert evaluation.data.params["inference.crop"] == "64x64"
    assert evaluation.data.tags["orchestrator.source_run"] == members[0]
    assert 0 <= evaluation.data.metrics["val_miou_official"] <= 1
    model_file = next((cwd / "cache").rglob("model.pt"))
    out = run_cli(["evaluate", str(model_file), "--flip"], cwd, env)
    assert "official" in out and "experiment 'evaluation'" in out

    out = run_cli(["report", "--out", "study"], cwd, env)
    assert "2 trials (2 finished, 0 failed)" in out and (cwd / "study" / "report.png").stat().st_size > 0
    logged = [f.path for f in client.list_artifacts(sweeps[0].info.run_id, "report")]
    assert logged == ["report/report.md", "report/report.png"]


def test_train_runs_one_trial_without_tune(workdir):
    cwd, env = workdir
    out = run_cli(["train", "e2e.yaml", "--set", "norm=syncbn", "--set", "train.epochs=1"], cwd, env)
    assert "base" in out and "FINISHED" in out
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("e2e")
    (trial,) = client.search_runs([exp.experiment_id], filter_string="tags.`orchestrator.kind` = 'trial'")
    assert trial.data.params["norm"] == "syncbn" and trial.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(trial.info.run_id, "val_miou")] == [1]


def test_trial_on_damaged_shards_finishes_and_counts_what_it_skipped(workdir, s3_server, s3_bucket):
    cwd, env = workdir
    fs = s3fs.S3FileSystem(**s3_server.storage_options)
    shards, damaged = f"{s3_bucket}/bdd100k/shards", f"{s3_bucket}/damaged"
    fs.copy(shards, damaged, recursive=True)
    changes = {
        "train/shard-000001.tar": lambda shard: broken.edit(shard, 2, 0, broken.truncate),
        "train/shard-000003.tar": lambda shard: broken.edit(shard, 0, 1, broken.garbage),
        "val/shard-000000.tar": lambda shard: broken.edit(shard, 1, 1, broken.resized_png(64, 72)),
    }
    for name, change in changes.items():
        fs.pipe_file(f"{damaged}/{name}", change(fs.cat_file(f"{damaged}/{name}")))
    # 16 samples = 2 ranks x 4 batches x 2: every training sample is read in each epoch.
    overrides = ["train.epochs=2", "train.steps_per_epoch=null", f"data.train=s3://{damaged}/train",
                 f"data.val=s3://{damaged}/val"]  # fmt: skip
    out = run_cli(["train", "e2e.yaml", *(a for o in overrides for a in ("--set", o))], cwd, env)
    assert "FINISHED" in out
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("e2e")
    (trial,) = client.search_runs([exp.experiment_id], filter_string="tags.`orchestrator.kind` = 'trial'")
    assert trial.info.status == "FINISHED"
    for metric, per_epoch in (("skipped_samples", 2), ("val_skipped_samples", 1)):
        history = client.get_metric_history(trial.info.run_id, metric)
        assert [(m.step, m.value) for m in history] == [(1, per_epoch), (2, per_epoch)], metric


def test_a_failing_trial_fails_alone_with_its_reason(workdir):
    cwd, env = workdir
    args = ["sweep", "e2e.yaml", "--set", "norm=bn", "--set", "grid.train.batch_per_gpu=[2, 64]"]
    proc = subprocess.run(CLI + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-4000:]
    table = proc.stdout[proc.stdout.index("trial ") :]
    assert "train.batch_per_gpu=2   FINISHED" in table
    assert "train.batch_per_gpu=64  FAILED" in table
    assert "too few for world_size 2 x batch_size 64" in table  # the reason, in one line
    # The error in full, with its traceback, on the console that otherwise shows progress lines alone.
    assert "Trial task failed" in proc.stderr and "Traceback (most recent call last)" in proc.stderr
    assert "train.batch_per_gpu=64  failed" in proc.stdout

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("e2e")
    runs = client.search_runs([exp.experiment_id])
    status = {
        r.data.tags.get("orchestrator.trial_key", r.data.tags["orchestrator.kind"]): r.info.status
        for r in runs
    }
    assert status == {
        "train.batch_per_gpu=2": "FINISHED",
        "train.batch_per_gpu=64": "FAILED",
        "sweep": "FAILED",
    }


ALL_NORMS = [*norm_examples(), "evalnorm:rule", "gn:g8", "gn:g8+ws", "bn+ws"]  # every row, and variants


def test_every_norm_trains_in_a_2_worker_trial(workdir):
    """Each norm as a grid value, 2 gloo workers (syncbn across them), 2 accumulated micro-batches
    per step and PreciseBN before evaluation."""
    cwd, env = workdir
    sets = [
        f"grid.norm=[{', '.join(ALL_NORMS)}]",
        "train.epochs=1",
        "train.steps_per_epoch=1",
        "train.accumulate=2",
        "train.precise_bn_batches=2",
    ]
    out = run_cli(["sweep", "e2e.yaml", *(a for s in sets for a in ("--set", s))], cwd, env, timeout=1200)
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("e2e")
    trials = client.search_runs([exp.experiment_id], "tags.`orchestrator.kind` = 'trial'")
    assert sorted(r.data.params["norm"] for r in trials) == sorted(ALL_NORMS), out[-3000:]
    for trial in trials:
        assert trial.info.status == "FINISHED", trial.data.params["norm"]
        assert trial.data.params["train.accumulate"] == "2"
        assert 0 <= trial.data.metrics["val_miou"] <= 1
    run_cli(["report", "--experiment", "e2e", "--out", "report"], cwd, env)
    table = (cwd / "report" / "report.md").read_text()
    assert all(f"| {norm} |" in table for norm in ALL_NORMS), table  # each a row, like the others


def test_storage_options_reach_the_workers_and_nowhere_else(workdir, s3_server):
    """s3fs credentials in data.storage_options: the only way this sweep's workers reach the data (no AWS_*
    in the environment), and found afterwards in none of Tune's console or state, MLflow, checkpoints or
    Ray's session logs."""
    cwd, env = workdir
    sentinel = "SENTINEL-not-for-anyone"
    env = {k: v for k, v in env.items() if not k.startswith("AWS_") or k == "AWS_EC2_METADATA_DISABLED"}
    spec = yaml.safe_load((cwd / "e2e.yaml").read_text())
    spec["data"]["storage_options"] = {"client_kwargs": {"endpoint_url": s3_server.endpoint}}
    spec["storage"] = str(cwd / "runs")
    del spec["grid"]
    private = cwd.parent / f"{cwd.name}-private.yaml"  # outside the folder searched below
    private.write_text(yaml.safe_dump(spec))
    overrides = ["--set", "data.storage_options.key=test", "--set", f"data.storage_options.secret={sentinel}"]
    args = [*CLI, "sweep", str(private), *overrides, "--set", "train.epochs=1"]
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-8000:]
    assert "FINISHED" in proc.stdout
    assert sentinel not in proc.stdout + proc.stderr

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    (sweep,) = client.search_runs(
        [client.get_experiment_by_name("e2e").experiment_id], "tags.`orchestrator.kind` = 'sweep'"
    )
    assert sweep.data.tags["orchestrator.command"].endswith(
        "--set 'data.storage_options.key=***' --set 'data.storage_options.secret=***' --set train.epochs=1"
    )
    found = []
    for folder in (cwd, Path(env["RAY_TMPDIR"])):
        for path in folder.rglob("*"):
            if path.is_file() and not path.is_symlink() and sentinel.encode() in path.read_bytes():
                found.append(path)
    assert found == []


def test_the_demo_trains_every_norm_it_lists_without_collapse(tmp_path, cli_env):
    """`make demo`'s chain as written (jobs/smoke.yaml on the Makefile's synthetic data): every trial
    finishes well above the score of predicting background everywhere, the collapse plain GN fell into
    at a scaled LR without a warmup."""
    import torch

    from orchestrator import metrics
    from orchestrator.data.stream import evaluation_loader

    root = Path(__file__).resolve().parents[2]
    recipe = (root / "Makefile").read_text().split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    demo = [
        line.split("$(BIN)/orchestrator ", 1)[1].split() for line in recipe.splitlines() if "$(BIN)" in line
    ]
    assert [args[:2] for args in demo[:3]] == [
        ["data", "synth"],
        ["data", "pack"],
        ["sweep", "jobs/smoke.yaml"],
    ]
    for args in demo[:2]:
        run_cli(args, tmp_path, cli_env)
    run_cli(["sweep", str(root / "jobs" / "smoke.yaml")], tmp_path, cli_env, timeout=900)
    background = torch.zeros(3, 3, dtype=torch.int64)
    for _, masks in evaluation_loader(str(tmp_path / "data" / "shards" / "val"), batch_size=8):
        background += metrics.confusion_matrix(torch.full_like(masks, metrics.BACKGROUND), masks)
    collapsed = metrics.summarize(background)["val_miou"]
    client = MlflowClient(cli_env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("smoke")
    trials = client.search_runs([exp.experiment_id], "tags.`orchestrator.kind` = 'trial'")
    grid = yaml.safe_load((root / "jobs" / "smoke.yaml").read_text())["grid"]
    assert len(trials) == len(grid["norm"]) * len(grid["train.batch_per_gpu"])
    for trial in trials:
        assert trial.info.status == "FINISHED", trial.data.params["norm"]
        assert trial.data.metrics["best_val_miou"] > collapsed + 0.1, (trial.info.run_name, collapsed)
