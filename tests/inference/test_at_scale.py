"""Inference at dataset scale: a pass cut into parts (in this process and on 2 local Ray workers) gives what
one process gives, to the bit; `orchestrator predict` writes BDD100K's masks and RLE JSON for labelled and
unlabelled splits, and the written files re-scored by BDD100K's rule give evaluate's val_miou_official.
Nothing is made up for an unreadable image: a pass fails naming its shard, or (--skip-bad) leaves it out
and lists it; predict writes into a new or empty folder (or --overwrite) and logs only what it wrote."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import broken_shards as broken
import mlflow.pyfunc
import numpy as np
import pytest
import ray
import torch
from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus
from PIL import Image
from pycocotools import mask as coco
from ray.util.state import list_actors

from bench.local_s3 import free_port
from orchestrator import checkpoints, tracking
from orchestrator import spec as specs
from orchestrator.cli import main
from orchestrator.data.shards import pack, read_manifest
from orchestrator.data.synth import synthesize
from orchestrator.data.transforms import IMAGENET
from orchestrator.errors import MAX_VALUE_CHARS, Unavailable, UsageError
from orchestrator.execution.inference import on_ray, run_parts
from orchestrator.inference.evaluate import SKIPPED_FILE
from orchestrator.inference.parts import Output, Pass, evaluate_checkpoints, merge, run_pass, sample_ids
from orchestrator.inference.predict import InferenceSettings
from orchestrator.inference.runs import evaluate_model, predict_run, run_ensemble
from orchestrator.logs import Progress

ROOT = Path(__file__).resolve().parents[2]
IMAGES = 7  # batches of 2: 4 batches, the last one partial


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> Path:
    """7 labelled val images (96x64), the same images packed again as an unlabelled `test` split, and an
    untrained checkpoint (its predictions hold all three classes: test_predict checks)."""
    root = tmp_path_factory.mktemp("scale")
    synthesize(str(root / "raw"), train=1, val=IMAGES, size=(96, 64))
    shutil.copytree(root / "raw/images/100k/val", root / "raw/images/100k/test")
    pack(str(root / "raw"), str(root / "shards"), shard_size=3, workers=1, splits=["val", "test"])
    spec = specs.validate(
        {
            "name": "scale",
            "data": {"train": f"{root}/shards/val", "val": f"{root}/shards/val"},
            "model": {"backbone": "resnet18"},
            "norm": "bn",
        }
    )
    torch.manual_seed(0)
    model = checkpoints.model_for(spec, pretrained=False)
    config = specs.public_params(specs.flatten(spec))
    checkpoints.save(root / "model.pt", model, config, IMAGENET)
    return root


LOST = [1, 3, 4, 5]  # the damaged split's unreadable images: 3 is the first of shard 1


@pytest.fixture(scope="module")
def damaged(split: Path) -> str:
    """The val split as `shards/damaged`, with image 1 (its JPEG truncated) and images 3 to 5 (the second
    shard, cut short in its first JPEG) unreadable."""
    root = split / "shards/damaged"
    shutil.copytree(split / "shards/val", root)
    changes = {
        0: lambda shard: broken.edit(shard, 1, 0, broken.truncate),
        1: lambda shard: broken.cut(shard, 0),
    }
    for shard, change in changes.items():
        path = root / f"shard-{shard:06d}.tar"
        path.write_bytes(change(path.read_bytes()))
    return str(root)


def lost_ids(damaged: str) -> list[str]:
    ids = sample_ids(read_manifest(damaged))
    return [ids[i] for i in LOST]


def job(root: Path, output: Output | None = None, keep: int = 2, data: str = "val") -> Pass:
    state = checkpoints.load(root / "model.pt")
    settings = InferenceSettings("slide", crop=(64, 64), stride=(32, 32))
    return Pass(
        (state, state), f"{root}/shards/{data}", settings, "vote", batch_size=2, keep=keep, device="cpu",
        output=output,
    )  # fmt: skip


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_parts_of_whole_batches_merge_to_what_one_process_computes(split: Path, tmp_path: Path) -> None:
    whole = job(split, Output(str(tmp_path / "one"), "masks"))
    members = whole.load()
    one, _ = merge([whole.run(members)], 2, 2)
    cut = job(split, Output(str(tmp_path / "two"), "masks"))
    parts = [cut.run(members, (i, 2)) for i in range(2)]
    assert [p.images for p in parts] == [4, 3]  # whole batches: images (0, 4), (4, 7), not (0, 3), (3, 7)
    merged, _ = merge(parts, 2, 2)
    assert one.per_image.sum() == 3 * IMAGES * 96 * 64  # every pixel labelled, by 2 members and their vote
    assert torch.equal(merged.per_image, one.per_image)
    assert [s.index for s in merged.best] == [s.index for s in one.best]
    assert [s.index for s in merged.worst] == [s.index for s in one.worst]
    written = files(tmp_path / "one")
    assert len(written) == IMAGES and written == files(tmp_path / "two")

    rle = job(split, Output("unused", "rle"), keep=0)
    _, frames = merge([rle.run(members)], 2, 0)
    _, cut_frames = merge([rle.run(members, (i, 3)) for i in range(3)], 2, 0)
    assert frames == cut_frames and len(frames) == IMAGES


def test_parts_of_a_damaged_split_list_the_unreadable_images_and_score_them_nowhere(
    split: Path, damaged: str
) -> None:
    whole = job(split, data="damaged")
    members = whole.load()
    one, _ = merge([whole.run(members)], 2, 2)
    cut, _ = merge([whole.run(members, (i, 3)) for i in range(3)], 2, 2)  # images (0, 2), (2, 4), (4, 7)
    assert [(u.index, u.id) for u in one.unreadable] == list(zip(LOST, lost_ids(damaged), strict=True))
    assert one.unreadable[1].why.startswith("shard-000001.tar is unreadable from sample 0 on (")
    assert [u[:2] for u in cut.unreadable] == [u[:2] for u in one.unreadable]  # (index, id)
    assert torch.equal(cut.per_image, one.per_image)
    assert not one.per_image[:, LOST].any() and one.per_image.sum() == 3 * (IMAGES - 4) * 96 * 64
    assert one.images()["index"].tolist() == [0, 2, 6]  # per-image rows of the images read alone
    assert one.coverage.scored == IMAGES - 4 and one.coverage.skipped == tuple(lost_ids(damaged))


class KillAWorker(Progress):
    """Progress that kills one Ray worker's process when the first part comes back: a part it holds, or is
    handed next, has to be run again by the worker Ray restarts."""

    def __init__(self) -> None:
        super().__init__(IMAGES, "evaluate", "image", logging.getLogger("test"))
        self.killed: int | None = None

    def update(self, n: int) -> None:
        super().update(n)
        if self.killed is None:
            # This test's Ray by its address: another Ray on the host (a sweep) is no one's to kill.
            here = ray.get_runtime_context().gcs_address
            alive = list_actors(here, filters=[("class_name", "=", "_Worker"), ("state", "=", "ALIVE")])
            self.killed = alive[0].pid
            os.kill(self.killed, signal.SIGKILL)


@pytest.mark.slow
def test_two_ray_workers_give_the_scores_csv_and_files_of_one_process(
    split: Path, damaged: str, tmp_path: Path, cli_env
):
    """One test for the Ray paths: starting the local Ray is most of its time."""
    path, val = split / "model.pt", f"{split}/shards/val"
    settings = InferenceSettings("slide", crop=(64, 64), stride=(32, 32))
    masks = {n: Output(str(tmp_path / f"masks{n}"), "masks") for n in (None, 2)}
    runners = {None: None, 2: on_ray(2)}  # this process, 2 Ray workers
    try:
        reports = [
            evaluate_checkpoints([path, path], val, settings, combine="vote", out_dir=tmp_path / f"eval{n}",
                                 keep=2, device="cpu", runner=runners[n])
            for n in (None, 2)
        ]  # fmt: skip
        predicted = [run_pass(job(split, out, data="test"), runner=runners[n])[0] for n, out in masks.items()]
        killing = KillAWorker()
        survived, _ = merge(run_parts(job(split), 2, 0, killing), 2, 2)
        skipping = [
            run_pass(job(split, data="damaged"), runner=runners[n], skip_bad=True)[0] for n in (None, 2)
        ]
        failures = []
        for n in (None, 2):
            with pytest.raises(Unavailable) as failed:
                run_pass(job(split, data="damaged"), runner=runners[n])
            failures.append(str(failed.value))
    finally:
        ray.shutdown()
    assert [u.index for u in skipping[1].unreadable] == LOST
    assert [u[:2] for u in skipping[1].unreadable] == [u[:2] for u in skipping[0].unreadable]
    assert torch.equal(skipping[1].per_image, skipping[0].per_image)
    assert failures[1] == failures[0] and failures[0].startswith(f"4 of {IMAGES} images of {damaged} are")
    one, two = (r.evaluation for r in reports)
    assert torch.equal(one.per_image, two.per_image) and one.ids == two.ids
    csv = [(tmp_path / f"eval{n}/per_image.csv").read_bytes() for n in (None, 2)]
    assert csv[0] == csv[1] and [p.name for p in reports[0].files] == [p.name for p in reports[1].files]
    assert torch.equal(predicted[0].per_image, predicted[1].per_image)
    written = [files(tmp_path / f"masks{n}") for n in (None, 2)]
    assert written[0] == written[1] and len(written[1]) == IMAGES
    assert killing.killed and torch.equal(survived.per_image, one.per_image)


def official_miou(truths: list[np.ndarray], predictions: list[np.ndarray]) -> float:
    """BDD100K's drivable rule as bdd100k/eval/seg.py computes it, written here from that code: background
    (2) is the `ignored` class, 255 joins it; a histogram over the images; IoU per road class (NaN -> 0);
    the mean over the road classes found in the ground truth."""
    hist, found = np.zeros((3, 3)), set()
    for truth, pred in zip(truths, predictions, strict=True):
        truth = np.where(truth == 255, 2, truth).astype(int)
        found |= set(np.unique(truth).tolist()) - {2}
        counted = truth < 2
        hist += np.bincount(3 * truth[counted] + pred[counted], minlength=9).reshape(3, 3)
    with np.errstate(invalid="ignore", divide="ignore"):
        ious = np.diag(hist) / (hist.sum(1) + hist.sum(0) - np.diag(hist))
    return float(np.mean(np.nan_to_num(ious[:-1])[sorted(found)]))


def trial_run(uri: str, checkpoint: Path, val_miou: float, seed: int = 0) -> str:
    """A finished trial run of experiment "scale" with `checkpoint` as its best and `val_miou` logged."""
    exp = tracking.ensure_experiment("scale", uri)
    parent = tracking.start_sweep_run(exp, "scale", {}, uri)
    config = {**checkpoints.load(checkpoint)["config"], "train.seed": seed}
    trial = tracking.start_trial_run(exp, parent, f"seed={seed}", config, uri)
    tracking.log_metrics(trial, {"val_miou": val_miou}, step=0, uri=uri)
    tracking.log_checkpoint(trial, checkpoint, uri)
    tracking.end_run(trial, uri)
    return trial


def test_predict_writes_masks_and_rle_that_score_as_evaluate_did(
    split: Path, tmp_path: Path, monkeypatch, capsys
):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # MLflow's artifact root: ./mlruns
    trial = trial_run(uri, split / "model.pt", 0.5)
    exp = tracking.ensure_experiment("scale", uri)

    assert main(["evaluate", trial, "--data", f"{split}/shards/val", "--device", "cpu"]) == 0
    c = MlflowClient(uri)
    (evaluation,) = c.search_runs([exp], f"tags.`{tracking.KIND}` = 'evaluation'")
    expected = evaluation.data.metrics["val_miou_official"]

    # The unlabelled split: masks of every image, nothing to score.
    assert main(["predict", trial, "--data", f"{split}/shards/test", "--out", str(tmp_path / "test")]) == 0
    assert f"{IMAGES} predictions (masks) written to {tmp_path / 'test'}" in capsys.readouterr().out
    ids = sorted(p.stem for p in (split / "raw/images/100k/test").iterdir())
    assert sorted(p.stem for p in (tmp_path / "test").iterdir()) == ids
    # The labelled split, as masks and as RLE: both score as evaluate did.
    truths = [np.asarray(Image.open(split / f"raw/labels/drivable/masks/val/{i}.png")) for i in ids]
    assert main(["predict", trial, "--data", f"{split}/shards/val", "--out", str(tmp_path / "val")]) == 0
    masks = [np.asarray(Image.open(tmp_path / "val" / f"{i}.png")) for i in ids]
    assert {m.dtype for m in masks} == {np.dtype(np.uint8)} and set(np.unique(masks)) == {0, 1, 2}
    assert official_miou(truths, masks) == pytest.approx(expected, abs=1e-12)
    unlabelled_masks = [np.asarray(Image.open(tmp_path / "test" / f"{i}.png")) for i in ids]
    assert all(np.array_equal(a, b) for a, b in zip(masks, unlabelled_masks, strict=True))  # the same images

    assert main(["predict", trial, "--data", f"{split}/shards/val", "--out", str(tmp_path / "rle"),
                 "--format", "rle"]) == 0  # fmt: skip
    frames = json.loads((tmp_path / "rle/predictions.json").read_text())["frames"]
    assert [f["name"] for f in frames] == [f"{i}.jpg" for i in ids]
    decoded = []
    for frame in frames:
        mask = np.full((64, 96), 2, np.uint8)  # background where no label covers
        for label in frame["labels"]:
            assert label["category"] == ("direct", "alternative")[int(label["id"])]
            mask[
                coco.decode({"size": label["rle"]["size"], "counts": label["rle"]["counts"].encode()}) == 1
            ] = int(label["id"])
        decoded.append(mask)
    assert all(np.array_equal(a, b) for a, b in zip(decoded, masks, strict=True))

    predictions = c.search_runs([exp], f"tags.`{tracking.KIND}` = 'prediction'", order_by=["start_time"])
    assert len(predictions) == 3
    unlabelled, labelled, rle = predictions
    assert unlabelled.data.metrics == {} and labelled.data.metrics["val_miou_official"] == expected
    assert rle.data.params["format"] == "rle" and rle.data.params["source"] == trial
    assert [a.path for a in c.list_artifacts(rle.info.run_id, "predictions")] == [
        "predictions/predictions.json"
    ]
    assert len(c.list_artifacts(unlabelled.info.run_id, "predictions")) == IMAGES


def test_the_best_trial_and_the_ensemble_are_registered_models_that_predict_as_predict_does(
    split: Path, tmp_path: Path, monkeypatch, capsys
):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # MLflow's artifact root: ./mlruns
    torch.manual_seed(1)
    other = checkpoints.load(split / "model.pt")
    other["model"] = checkpoints.model_for(specs.from_flat(other["config"]), pretrained=False).state_dict()
    (tmp_path / "other").mkdir()
    torch.save(other, tmp_path / "other/model.pt")
    best, second = (
        trial_run(uri, split / "model.pt", 0.6),
        trial_run(uri, tmp_path / "other/model.pt", 0.5, seed=1),
    )
    assert main(["ensemble", "--top", "2", "--experiment", "scale", "--device", "cpu"]) == 0
    assert "registered model 'scale' (best_trial v1, champion v" in capsys.readouterr().out

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("scale").experiment_id
    (ensemble,) = c.search_runs([exp], f"tags.`{tracking.KIND}` = 'ensemble'")
    aliases = {alias: str(v) for alias, v in c.get_registered_model("scale").aliases.items()}
    better = ensemble.data.metrics["val_miou"] > ensemble.data.metrics["member0_val_miou"]
    assert aliases == {"best_trial": "1", "ensemble": "2", "champion": "2" if better else "1"}
    assert [c.get_model_version("scale", v).run_id for v in ("1", "2")] == [best, ensemble.info.run_id]
    (output,) = c.get_run(ensemble.info.run_id).outputs.model_outputs  # the UI's Models column
    logged = c.get_logged_model(output.model_id)
    assert logged.experiment_id == exp and logged.status == LoggedModelStatus.READY
    assert logged.name == "ensemble-of-2-mean"  # what it is, not "model"
    # Each version says what it is, its score, and why it holds its aliases.
    champion, other = ("2", "1") if better else ("1", "2")
    described = {v: c.get_model_version("scale", v).description for v in ("1", "2")}
    assert described["1"].startswith(f"best trial {c.get_run(best).info.run_name}, from experiment 'scale': ")
    assert described["2"].startswith("ensemble of 2 (mean), from experiment 'scale': val_miou ")
    assert "champion: the better of best_trial and ensemble by val_miou" in described[champion]
    assert "champion" not in described[other]
    assert c.get_run(best).outputs.model_outputs  # the best trial's run shows its model too

    ids = sorted(p.stem for p in (split / "raw/images/100k/val").iterdir())
    images = np.stack([np.asarray(Image.open(split / f"raw/images/100k/val/{i}.jpg")) for i in ids])
    for alias, run in (("ensemble", ensemble.info.run_id), ("best_trial", best)):
        model = mlflow.pyfunc.load_model(f"models:/scale@{alias}")
        predicted = np.concatenate([model.predict(images[i : i + 2]) for i in range(0, len(ids), 2)])
        assert predicted.dtype == np.uint8 and predicted.shape == (len(ids), 64, 96)
        out = tmp_path / alias
        assert (
            main(["predict", run, "--data", f"{split}/shards/val", "--out", str(out), "--device", "cpu"]) == 0
        )
        assert np.array_equal(predicted, np.stack([np.asarray(Image.open(out / f"{i}.png")) for i in ids]))
        if alias == ("ensemble" if better else "best_trial"):
            champion_predicted = predicted
    assert second in ensemble.data.params["members"]

    # What inference needs, and no more: the model loads and predicts with Ray, s3fs, pycocotools, simplejpeg
    # and safetensors unimportable, and requires none of them.
    blocked = ["ray", "s3fs", "pycocotools", "simplejpeg", "safetensors"]
    requirements = Path(mlflow.pyfunc.get_model_dependencies("models:/scale@champion")).read_text()
    assert not set(blocked) & set(re.findall(r"^([a-z0-9_-]+)", requirements, re.M)), requirements
    script = (
        f"import sys; sys.modules.update(dict.fromkeys({blocked!r}))\n"
        "import mlflow.pyfunc\n"
        "model = mlflow.pyfunc.load_model('models:/scale@champion')\n"
        "print(model.predict(model.input_example).shape)"
    )
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0 and loaded.stdout.splitlines()[-1] == "(1, 8, 8)", loaded.stderr[-3000:]

    # The documented serve command, from a shell whose PATH lacks the venv (a fresh clone's): over HTTP, the
    # champion answers what predict wrote, and its REST example.
    port = free_port()
    env = {**os.environ, "PATH": "/usr/bin:/bin"}
    server = subprocess.Popen(
        ["make", "-s", "-C", str(ROOT), "serve", "MODEL=scale", f"PORT={port}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        answer = _invoke(f"http://127.0.0.1:{port}", {"inputs": images[:2].tolist()}, server)
        assert np.array_equal(np.asarray(answer["predictions"], dtype=np.uint8), champion_predicted[:2])
        example = json.loads(
            mlflow.models.Model.load("models:/scale@champion").get_serving_input(
                mlflow.artifacts.download_artifacts("models:/scale@champion")
            )
        )
        assert np.asarray(_invoke(f"http://127.0.0.1:{port}", example, server)["predictions"]).shape == (
            1,
            8,
            8,
        )
        # Pixels sent as floats in [0, 1], and an image of one channel: refused, saying why.
        code, message = _refused(f"http://127.0.0.1:{port}", {"inputs": (images[:1] / 255).tolist()})
        assert (
            code == 400
            and "input is uint8 [-1, -1, -1, 3], integers 0-255: the request holds float64" in message
        )
        code, message = _refused(f"http://127.0.0.1:{port}", {"inputs": images[:1, :, :, :1].tolist()})
        assert code == 400 and "does not match expected shape (-1, -1, -1, 3)" in message
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def _invoke(url: str, body: dict, server: subprocess.Popen, timeout: float = 180) -> dict:
    """The served model's JSON answer to `body`, once it answers /ping."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2):
                break
        except OSError:
            assert server.poll() is None, server.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the model server did not answer /ping"
            time.sleep(0.5)
    with urllib.request.urlopen(_request(url, body), timeout=120) as response:
        return json.loads(response.read())


def _refused(url: str, body: dict) -> tuple[int, str]:
    """The HTTP status and message with which the served model refuses `body`."""
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(_request(url, body), timeout=120)
    return refused.value.code, json.loads(refused.value.read())["message"]


def _request(url: str, body: dict) -> urllib.request.Request:
    return urllib.request.Request(
        f"{url}/invocations", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )


def test_unreadable_images_fail_each_command_naming_their_shards_and_nothing_is_made_up(
    split: Path, damaged: str, tmp_path: Path, monkeypatch
):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # MLflow's artifact root: ./mlruns
    trial = trial_run(uri, split / "model.pt", 0.5)
    masks, rle = tmp_path / "masks", tmp_path / "rle"
    with pytest.raises(Unavailable) as failed:
        predict_run(trial, damaged, str(masks))
    message = str(failed.value)
    lines = message.splitlines()  # the console shows each line, cut to MAX_VALUE_CHARS
    assert lines[0] == f"4 of {IMAGES} images of {damaged} are unreadable:"
    assert lines[1].startswith("  shard-000000.tar (1: ")
    assert lines[2].startswith("  shard-000001.tar (3: shard-000001.tar is unreadable from sample 0 on (")
    assert "--skip-bad" in lines[3] and lines[4].startswith(f"the other images' masks are in {masks}: ")
    assert max(map(len, lines)) <= MAX_VALUE_CHARS
    lost = lost_ids(damaged)
    readable = [f"{i}.png" for i in sample_ids(read_manifest(damaged)) if i not in lost]
    assert sorted(p.name for p in masks.iterdir()) == sorted(readable)  # no placeholder's mask
    with pytest.raises(Unavailable, match=r"^4 of 7 images .* are unreadable:\n  shard-000000.tar \(1: "):
        predict_run(trial, damaged, str(rle), format="rle")
    assert not rle.exists()
    commands = [lambda: evaluate_model(trial, data=damaged), lambda: run_ensemble("scale", 1, data=damaged)]
    for command in commands:
        with pytest.raises(Unavailable, match=r"^4 of 7 images .* are unreadable:\n  shard-000000.tar \(1: "):
            command()
    runs = MlflowClient(uri).search_runs([tracking.ensure_experiment("scale", uri)])
    assert {r.data.tags[tracking.KIND] for r in runs} == {"sweep", "trial"}  # nothing logged


def test_skip_bad_leaves_the_unreadable_images_out_and_lists_them(
    split: Path, damaged: str, tmp_path: Path, monkeypatch, capsys
):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # MLflow's artifact root: ./mlruns
    trial = trial_run(uri, split / "model.pt", 0.5)
    c, exp = MlflowClient(uri), tracking.ensure_experiment("scale", uri)
    lost = lost_ids(damaged)
    readable = [i for i in sample_ids(read_manifest(damaged)) if i not in lost]
    listed = f"left out 4 unreadable image(s) (--skip-bad): {', '.join(lost)}"

    def logged(kind: str) -> tuple[str, dict[str, float], list[str]]:
        """The latest run of `kind`: its id, metrics and files, having checked the counts it logged."""
        run = c.search_runs([exp], f"tags.`{tracking.KIND}` = '{kind}'", order_by=["start_time DESC"])[0]
        files = [a.path for a in c.list_artifacts(run.info.run_id, "predictions")]
        counts = {k: run.data.params[k] for k in ("images_scored", "images_total")}
        assert counts == {"images_scored": "3", "images_total": "7"}, kind
        return run.info.run_id, run.data.metrics, sorted(f.removeprefix("predictions/") for f in files)

    out = tmp_path / "masks"
    assert main(["predict", trial, "--data", damaged, "--out", str(out), "--skip-bad"]) == 0
    printed = capsys.readouterr().out
    assert f"3 predictions (masks) written to {out}" in printed and listed in printed
    assert "\nover 3 of 7 images  " in printed  # the scores' header
    written = sorted([*(f"{i}.png" for i in readable), SKIPPED_FILE])
    assert sorted(p.name for p in out.iterdir()) == written
    skipped = [line.split("\t") for line in (out / SKIPPED_FILE).read_text().splitlines()]
    assert [i for i, _ in skipped] == lost and "is unreadable from sample 0 on" in skipped[3][1]
    truths = [np.asarray(Image.open(split / f"raw/labels/drivable/masks/val/{i}.png")) for i in readable]
    predicted = [np.asarray(Image.open(out / f"{i}.png")) for i in readable]
    _, scores, files = logged("prediction")
    assert scores["val_miou_official"] == pytest.approx(official_miou(truths, predicted), abs=1e-12)
    assert files == written

    out = tmp_path / "rle"
    assert main(["predict", trial, "--data", damaged, "--out", str(out), "--skip-bad", "--format=rle"]) == 0
    assert listed in capsys.readouterr().out
    frames = json.loads((out / "predictions.json").read_text())["frames"]
    assert [f["name"] for f in frames] == [f"{i}.jpg" for i in readable]
    assert (out / SKIPPED_FILE).read_text() == (tmp_path / "masks" / SKIPPED_FILE).read_text()
    assert logged("prediction")[2] == ["predictions.json", SKIPPED_FILE]

    assert main(["evaluate", trial, "--data", damaged, "--skip-bad"]) == 0
    printed = capsys.readouterr().out
    assert "\nover 3 of 7 images  " in printed and listed in printed
    run_id, metrics, files = logged("evaluation")
    assert metrics["val_miou_official"] == scores["val_miou_official"] and SKIPPED_FILE in files
    rows = (Path(c.download_artifacts(run_id, "predictions/per_image.csv", str(tmp_path)))).read_text()
    assert [line.split(",")[1] for line in rows.splitlines()[1:]] == readable

    assert main(["ensemble", "--top", "1", "--experiment", "scale", "--data", damaged, "--skip-bad"]) == 0
    printed = capsys.readouterr().out
    assert "\nover 3 of 7 images  " in printed and listed in printed
    assert SKIPPED_FILE in logged("ensemble")[2]


def test_predict_writes_into_a_new_or_empty_folder_and_logs_only_what_it_wrote(
    split: Path, tmp_path: Path, monkeypatch
):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # MLflow's artifact root: ./mlruns
    trial = trial_run(uri, split / "model.pt", 0.5)
    val = f"{split}/shards/val"
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(UsageError, match=rf"^--out '{tmp_path}/file' is a file: want a folder"):
        predict_run(trial, val, str(tmp_path / "file"))
    out = tmp_path / "out"
    out.mkdir()
    predict_run(trial, val, str(out))  # an empty folder will do
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match=rf"^--out '{out}' holds 8 entries: want a new or empty folder, or "):
        predict_run(trial, val, str(out))
    result = predict_run(trial, val, str(out), overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and len(list(out.iterdir())) == IMAGES + 1
    logged = [a.path for a in MlflowClient(uri).list_artifacts(result.run_id, "predictions")]
    assert sorted(logged) == [f"predictions/{p.name}" for p in sorted(out.glob("*.png"))]
