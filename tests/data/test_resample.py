"""train.sample_weights_from: per-image scores of the training split repeat the worst images or drop those
below a score (the BDD100K report, Section X), and the reader still reads every copy exactly once per epoch
with equal batch counts on every rank."""

from __future__ import annotations

import csv
import io
import json
import math
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from orchestrator import checkpoints, tracking
from orchestrator import spec as specs
from orchestrator.checkpoints import model_for
from orchestrator.data.resample import sample_repeats
from orchestrator.data.shards import read_manifest
from orchestrator.data.stream import _read_piece, make_loader
from orchestrator.data.verify import verify
from orchestrator.inference.parts import evaluate_checkpoints
from orchestrator.inference.predict import WHOLE
from orchestrator.storage import join, url_to_fs
from orchestrator.train.loop import Worker

NAN = float("nan")


def test_repeats_and_drops_follow_the_thresholds() -> None:
    scores = {"a": 0.95, "b": 0.5, "c": 0.2, "d": NAN, "e": 0.3, "other-split": 0.1}
    plan = sample_repeats(
        scores, ["a", "b", "c", "d", "e", "f"], repeat_below=0.9, repeat_times=3, drop_below=0.3
    )
    # a: above both; b: repeated; c: dropped; d: no score (NaN), e: exactly at drop_below, f: unscored
    assert plan == {"b": 3, "c": 0, "e": 3}
    assert sample_repeats(scores, ["a", "b", "c"], repeat_below=None, drop_below=0.6) == {"b": 0, "c": 0}


def test_scores_of_another_split_or_a_plan_that_drops_everything_are_refused() -> None:
    with pytest.raises(ValueError, match="none of the 2 scored images.*evaluate"):
        sample_repeats({"v1": 0.5, "v2": 0.1}, ["t1", "t2"], repeat_below=0.9)
    with pytest.raises(ValueError, match="leaves out all 2"):
        sample_repeats({"t1": 0.5, "t2": 0.1}, ["t1", "t2"], repeat_below=None, drop_below=0.6)


RUN = "0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize(
    ("train", "message"),
    [
        ({"repeat_below": 0.9}, "repeat_below needs train.sample_weights_from"),
        ({"drop_below": 0.2}, "drop_below needs train.sample_weights_from"),
        ({"sample_weights_from": RUN}, "needs train.repeat_below, train.drop_below or both"),
        ({"sample_weights_from": RUN, "repeat_below": 0.5, "drop_below": 0.5}, r"drop_below \(0.5\) must be"),
        ({"sample_weights_from": "latest", "repeat_below": 0.5}, "sample_weights_from"),
        ({"sample_weights_from": RUN, "repeat_below": 0.5, "repeat_times": 0}, "repeat_times"),
    ],
)
def test_resampling_keys_are_checked_with_what_to_do(train: dict, message: str) -> None:
    with pytest.raises(specs.SpecError, match=message):
        specs.validate({"name": "r", "data": {"train": "s3://b/t", "val": "s3://b/v"}, "train": train})


def test_resampling_is_a_grid_key() -> None:
    spec = specs.validate(
        {
            "name": "r",
            "data": {"train": "s3://b/t", "val": "s3://b/v"},
            "train": {"sample_weights_from": RUN, "repeat_below": 0.9},
            "grid": {"train.repeat_times": [1, 3]},  # 1: every image once, the baseline
        }
    )
    assert [t.spec.train.repeat_times for t in specs.expand(spec)] == [1, 3]


def _fake_split(root: Path, sizes: list[int]) -> tuple[str, list[list[str]]]:
    ids = [[f"s{shard}-{i}" for i in range(n)] for shard, n in enumerate(sizes)]
    shards = [
        {"name": f"shard-{i:06d}.tar", "num_samples": n, "bytes": 0, "sha256": "", "ids": ids[i]}
        for i, n in enumerate(sizes)
    ]
    manifest = {"format": "orchestrator-shards/1", "split": "train", "num_samples": sum(sizes),
                "image_size": [8, 8], "shards": shards}  # fmt: skip
    root.mkdir()
    (root / "manifest.json").write_text(json.dumps(manifest))
    return str(root), ids


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("num_workers", [1, 2])
def test_every_copy_is_planned_once_with_equal_batches_on_every_rank(
    tmp_path: Path, world_size: int, num_workers: int
) -> None:
    sizes, batch = [5, 3, 8, 1, 7], 2
    url, ids = _fake_split(tmp_path / "split", sizes)
    repeats = {"s0-0": 3, "s0-4": 2, "s2-1": 0, "s2-7": 4, "s3-0": 0, "s4-6": 2}
    copies = sum(sizes) + sum(n - 1 for n in repeats.values())  # 24 + 5 = 29
    seen, batches, orders = Counter(), [], {}
    for rank in range(world_size):
        loader = make_loader(url, batch_size=batch, rank=rank, world_size=world_size, train=True, crop=None,
                             epoch=2, seed=3, repeats=repeats)  # fmt: skip
        stream, planned = loader.dataloader.dataset, 0
        for worker in range(num_workers):
            for p in stream.worker_pieces(worker, num_workers):
                assert p.order == tuple(sorted(p.order))  # a repeated sample is read once, yielded again
                orders[p.shard] = p.order
                seen.update((p.shard, position) for position in range(p.start, p.stop))
                planned += p.stop - p.start
        assert planned == len(loader) * batch
        batches.append(len(loader))
    assert batches == [copies // world_size // batch] * world_size
    assert max(seen.values()) == 1  # no copy twice: positions, not samples, are split
    # Every copy read is a copy of the plan; with drop_last, those left over are fewer than one round.
    read = Counter(ids[shard][orders[shard][position]] for shard, position in seen)
    assert all(n <= repeats.get(sample_id, 1) for sample_id, n in read.items())
    assert "s2-1" not in read and "s3-0" not in read
    assert 0 <= copies - sum(read.values()) < world_size * batch


def test_repeated_samples_are_read_from_the_shards_and_augmented_apart(tiny_shards: Path) -> None:
    url = str(tiny_shards / "train")
    ids = [i for shard in read_manifest(url)["shards"] for i in shard["ids"]]
    repeats = {ids[0]: 3, ids[5]: 0, ids[6]: 2}
    loader = make_loader(url, batch_size=1, rank=0, world_size=1, train=True, crop=(32, 32), epoch=0,
                         seed=0, scale=(1.0, 1.0), blur=(0.0, 1.0), repeats=repeats)  # fmt: skip
    stream = loader.dataloader.dataset
    fs, root = url_to_fs(url)
    samples = (s for p in stream.pieces for s in _read_piece(fs, join(root, p.name), p, 2))
    names = [s.name.rsplit(":", 1)[1] for s in samples]
    assert Counter(names) == Counter({i: repeats.get(i, 1) for i in ids if repeats.get(i, 1)})
    crops = [x for x, _ in loader]
    assert len(crops) == 8 + 2 + 1 - 1
    # The three copies of ids[0] have their own draws: no two crops of the epoch are equal.
    assert len({tuple(c.flatten().tolist()) for c in crops}) == len(crops)


def test_a_split_packed_without_ids_cannot_be_resampled(tmp_path: Path) -> None:
    url, _ = _fake_split(tmp_path / "split", [4])
    manifest = json.loads((tmp_path / "split" / "manifest.json").read_text())
    del manifest["shards"][0]["ids"]
    (tmp_path / "split" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="records no sample ids.*pack the split again"):
        make_loader(url, batch_size=1, rank=0, world_size=1, train=True, crop=None, epoch=0, seed=0,
                    repeats={"s0-0": 2})  # fmt: skip
    make_loader(url, batch_size=1, rank=0, world_size=1, train=True, crop=None, epoch=0, seed=0)  # unweighted


def test_pack_records_the_ids_in_member_order_and_verify_checks_them(tiny_shards: Path) -> None:
    url = tiny_shards / "train"
    manifest = read_manifest(str(url))
    for entry in manifest["shards"]:
        with tarfile.open(url / entry["name"]) as tar:
            assert entry["ids"] == [Path(m.name).stem for m in tar.getmembers()[::2]]
    assert not verify(str(url)).problems
    manifest["shards"][0]["ids"] = manifest["shards"][0]["ids"][::-1]
    (url / "manifest.json").write_text(json.dumps(manifest))
    assert any("sample ids differ" in p for p in verify(str(url)).problems)


def test_worker_without_its_plan_is_refused(tiny_shards: Path) -> None:
    data = {"train": f"{tiny_shards}/train", "val": f"{tiny_shards}/val"}
    spec = specs.validate(
        {"name": "r", "data": data, "train": {"sample_weights_from": RUN, "repeat_below": 0.5}}
    )
    with pytest.raises(ValueError, match="repeats"):
        Worker(spec)


def test_per_image_scores_come_back_by_sample_id(tiny_shards: Path, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    data = {"train": f"{tiny_shards}/train", "val": f"{tiny_shards}/val"}
    spec = specs.validate({"name": "r", "data": data, "model": {"backbone": "resnet18"}})
    path = checkpoints.save(
        tmp_path / "model.pt", model_for(spec), specs.flatten(spec), ((0.5,) * 3, (0.25,) * 3)
    )
    out = tmp_path / "predictions"
    report = evaluate_checkpoints([path], f"{tiny_shards}/train", WHOLE, out_dir=out)
    columns = report.evaluation.images()
    ids = [i for shard in read_manifest(f"{tiny_shards}/train")["shards"] for i in shard["ids"]]
    assert columns["id"] == ids
    run = tracking.log_derived_run("e", "evaluation", "eval", {}, {}, files={"predictions": out}, uri=uri)
    scores = tracking.per_image_scores(run, "miou", uri)
    expected = dict(zip(ids, columns["miou"].tolist(), strict=True))
    assert scores.keys() == expected.keys()
    assert all(
        math.isclose(scores[k], v) or (math.isnan(v) and math.isnan(scores[k])) for k, v in expected.items()
    )

    with pytest.raises(LookupError, match="is not in the MLflow store"):
        tracking.per_image_scores("f" * 32, "miou", uri)
    bare = tracking.log_derived_run("e", "evaluation", "bare", {}, {}, uri=uri)
    with pytest.raises(LookupError, match="has no predictions/per_image.csv.*orchestrator evaluate"):
        tracking.per_image_scores(bare, "miou", uri)
    old = tmp_path / "old"
    old.mkdir()
    (old / "per_image.csv").write_text("index,miou\n0,0.5\n")
    before_ids = tracking.log_derived_run(
        "e", "evaluation", "old", {}, {}, files={"predictions": old}, uri=uri
    )
    with pytest.raises(LookupError, match="no sample ids"):
        tracking.per_image_scores(before_ids, "miou", uri)


@pytest.mark.slow
def test_a_trial_trains_on_the_plan_of_an_evaluation_of_the_training_split(
    tiny_shards: Path, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    def orchestrator(*args: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=tmp_path, env=cli_env,
                              capture_output=True, text=True, timeout=600)  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        return proc.stdout

    base = {
        "name": "resample",
        "data": {"train": f"{tiny_shards}/train", "val": f"{tiny_shards}/val", "loader_workers": 0},
        "model": {"backbone": "resnet18"},
        "train": {"epochs": 1, "batch_per_gpu": 1, "crop": [32, 32]},
        "resources": {"workers_per_trial": 1, "cpus_per_worker": 1},
        "storage": str(tmp_path / "runs"),
    }
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    orchestrator("train", "base.yaml")
    client = MlflowClient(cli_env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("resample").experiment_id
    (trial,) = client.search_runs([experiment], "tags.`orchestrator.kind` = 'trial'")
    orchestrator("evaluate", trial.info.run_id, "--data", f"{tiny_shards}/train")
    (evaluation,) = client.search_runs([experiment], "tags.`orchestrator.kind` = 'evaluation'")
    path = client.download_artifacts(evaluation.info.run_id, tracking.PER_IMAGE, str(tmp_path))
    rows = list(csv.DictReader(io.StringIO(Path(path).read_text())))
    scores = sorted(float(r["miou"]) for r in rows)
    threshold = scores[3]  # the 3 worst images are repeated, the rest read once
    resampled = base | {"train": base["train"] | {"sample_weights_from": evaluation.info.run_id,
                                                   "repeat_below": threshold, "repeat_times": 3}}  # fmt: skip
    (tmp_path / "resampled.yaml").write_text(yaml.safe_dump(resampled))
    orchestrator("train", "resampled.yaml")
    runs = client.search_runs(
        [experiment], "tags.`orchestrator.kind` = 'trial'", order_by=["start_time DESC"]
    )
    params = runs[0].data.params
    worst = sum(s < threshold for s in scores)
    assert (params["resample.repeated"], params["resample.dropped"]) == (str(worst), "0")
    assert params["resample.epoch_samples"] == str(8 + 2 * worst)
    # One epoch of batch 1 on one worker: poly LR ends at lr x (1 / steps)^0.9, steps = the plan's copies.
    (lr,) = client.get_metric_history(runs[0].info.run_id, "lr")
    assert runs[0].info.status == "FINISHED"
    assert lr.value == pytest.approx(0.02 * (1 / (8 + 2 * worst)) ** 0.9)
