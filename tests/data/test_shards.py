"""Packing the layout into tar shards: manifest counts and checksums, pair adjacency, failure modes."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from orchestrator.cli import main
from orchestrator.data import shards
from orchestrator.data.shards import MANIFEST, SIDECARS, pack, read_manifest
from orchestrator.data.synth import synthesize
from orchestrator.data.verify import verify
from orchestrator.errors import UsageError


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    synthesize(str(tmp_path / "raw"), train=5, val=3, size=(64, 36), seed=2)
    return tmp_path / "raw"


def test_pack_writes_shards_and_manifests(raw: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    manifests = pack(str(raw), f"file://{out}", shard_size=2)
    assert sorted(manifests) == ["train", "val"]
    for split, expected_sizes in (("train", [2, 2, 1]), ("val", [2, 1])):
        manifest = manifests[split]
        assert json.loads((out / split / "manifest.json").read_text()) == manifest
        assert read_manifest(str(out / split)) == manifest
        assert manifest["format"] == "orchestrator-shards/1" and manifest["split"] == split
        assert manifest["image_size"] == [64, 36]
        assert manifest["labels"] == {"format": "masks", "source": f"labels/drivable/masks/{split}"}
        assert manifest["skipped"] == []
        assert [s["num_samples"] for s in manifest["shards"]] == expected_sizes
        assert manifest["num_samples"] == sum(expected_sizes)
        assert [s["name"] for s in manifest["shards"]] == [
            f"shard-{i:06d}.tar" for i in range(len(expected_sizes))
        ]
        assert sorted(p.name for p in (out / split).iterdir()) == sorted(
            ["manifest.json"] + [s["name"] for s in manifest["shards"]]
        )

        ids = sorted(p.stem for p in (raw / "images/100k" / split).iterdir())
        members = []
        for entry in manifest["shards"]:
            data = (out / split / entry["name"]).read_bytes()
            assert entry["bytes"] == len(data)
            assert entry["sha256"] == hashlib.sha256(data).hexdigest()
            with tarfile.open(out / split / entry["name"]) as tar:
                for member in tar.getmembers():
                    members.append((member.name, tar.extractfile(member).read()))
        # Sorted ids, each image immediately followed by its mask, bytes unchanged.
        assert [name for name, _ in members] == [f"{i}{ext}" for i in ids for ext in (".jpg", ".png")]
        for name, data in members:
            folder = "images/100k" if name.endswith(".jpg") else "labels/drivable/masks"
            assert data == (raw / folder / split / name).read_bytes()


def test_pack_is_byte_reproducible(raw: Path, tmp_path: Path) -> None:
    first = pack(str(raw), str(tmp_path / "a"), shard_size=4)
    second = pack(str(raw), str(tmp_path / "b"), shard_size=4)
    assert first == second


@pytest.mark.parametrize("missing", ["mask", "image"])
def test_pack_refuses_unpaired_samples(raw: Path, tmp_path: Path, missing: str) -> None:
    victim = sorted(p.stem for p in (raw / "images/100k/val").iterdir())[1]
    if missing == "mask":
        (raw / "labels/drivable/masks/val" / f"{victim}.png").unlink()
    else:
        (raw / "images/100k/val" / f"{victim}.jpg").unlink()
    with pytest.raises(ValueError, match=victim):
        pack(str(raw), str(tmp_path / "shards"))


def test_manifest_is_written_after_the_shards(
    raw: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real_tar = shards._tar

    def failing_tar(members: list[tuple[str, bytes]]) -> bytes:
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_tar(members)

    monkeypatch.setattr(shards, "_tar", failing_tar)
    with pytest.raises(OSError, match="disk full"):
        pack(str(raw), str(tmp_path / "shards"), shard_size=2, workers=1)  # in-process: the patch applies
    assert (tmp_path / "shards/train/shard-000000.tar").exists()
    assert not (tmp_path / "shards/train/manifest.json").exists()


def test_read_manifest_errors_clearly(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="pack"):
        read_manifest(str(tmp_path / "nowhere" / "train"))
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other/9"}))
    with pytest.raises(ValueError, match="other/9"):
        read_manifest(str(tmp_path))


def test_pack_without_any_split_fails(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="images/100k"):
        pack(str(tmp_path), str(tmp_path / "out"))


def _decoded(raw: Path, split: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    ids = sorted(p.stem for p in (raw / "images/100k" / split).iterdir())
    images = [np.asarray(Image.open(raw / f"images/100k/{split}/{i}.jpg")) for i in ids]
    masks = [np.asarray(Image.open(raw / f"labels/drivable/masks/{split}/{i}.png")) for i in ids]
    return images, masks


def test_manifest_records_class_pixels_and_rgb_statistics(raw: Path, tmp_path: Path) -> None:
    # One ignore region, so the 255 count is checked as well.
    val_mask = sorted((raw / "labels/drivable/masks/val").iterdir())[0]
    mask = np.array(Image.open(val_mask))
    mask[:5, :7] = 255
    Image.fromarray(mask).save(val_mask)

    manifests = pack(str(raw), str(tmp_path / "shards"), shard_size=2)
    for split in ("train", "val"):
        images, masks = _decoded(raw, split)
        labels = np.concatenate([m.ravel() for m in masks])
        pixels = np.concatenate([i.reshape(-1, 3) for i in images]).astype(np.float64) / 255
        manifest = manifests[split]
        assert manifest["class_pixels"] == {str(c): int((labels == c).sum()) for c in (0, 1, 2, 255)}
        assert np.allclose(manifest["rgb_mean"], pixels.mean(0), rtol=1e-12, atol=0)
        assert np.allclose(manifest["rgb_std"], pixels.std(0), rtol=1e-12, atol=0)
    assert manifests["val"]["class_pixels"]["255"] == 35
    assert sum(manifests["train"]["class_pixels"].values()) == 5 * 64 * 36


def test_pack_lists_every_bad_sample_and_writes_no_manifest(raw: Path, tmp_path: Path) -> None:
    train = sorted(p.stem for p in (raw / "images/100k/train").iterdir())
    val = sorted(p.stem for p in (raw / "images/100k/val").iterdir())
    Image.new("L", (32, 18)).save(raw / f"labels/drivable/masks/train/{train[1]}.png")
    for sample_id, value in ((train[3], 7), (val[0], 3)):
        path = raw / f"labels/drivable/masks/{sample_id.split('-')[1]}/{sample_id}.png"
        mask = np.array(Image.open(path))
        mask[0, 0] = value
        Image.fromarray(mask).save(path)

    with pytest.raises(ValueError) as error:
        pack(str(raw), str(tmp_path / "shards"), shard_size=2)
    lines = str(error.value).splitlines()
    assert lines[0].endswith(": 3 problem(s)")
    assert lines[1:] == [
        f"labels/drivable/masks/train/{train[1]}.png: mask shape (18, 32) does not match image shape "
        "(36, 64, 3): want the image's height and width",
        f"labels/drivable/masks/train/{train[3]}.png: mask has label values [7], allowed are [0, 1, 2, 255]",
        f"labels/drivable/masks/val/{val[0]}.png: mask has label values [3], allowed are [0, 1, 2, 255]",
    ]
    assert not list((tmp_path / "shards").rglob("manifest.json"))


def test_problem_report_lists_at_most_twenty(tmp_path: Path) -> None:
    problems = [f"p{i}" for i in range(23)]
    assert shards.problem_report("title", problems).splitlines() == [
        "title: 23 problem(s)",
        *problems[:20],
        "... and 3 more",
    ]
    assert shards.problem_report("title", ["only"]) == "title: 1 problem(s)\nonly"


@pytest.fixture
def packed(raw: Path, tmp_path: Path) -> Path:
    pack(str(raw), str(tmp_path / "shards"), shard_size=2)  # train 2+2+1, val 2+1
    return tmp_path / "shards"


def test_verify_passes_clean_shards(packed: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["data", "verify", str(packed)]) == 0
    assert capsys.readouterr().out == f"{packed}: 8 samples in 5 shards, 0 problem(s)\n"
    assert main(["data", "verify", str(packed / "val")]) == 0
    assert capsys.readouterr().out == f"{packed / 'val'}: 3 samples in 2 shards, 0 problem(s)\n"


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_verify_names_a_damaged_shard(packed: Path, capsys: pytest.CaptureFixture, damage: str) -> None:
    shard = packed / "train/shard-000001.tar"
    data = bytearray(shard.read_bytes())
    if damage == "flip":
        data[len(data) // 3] ^= 0xFF
    else:
        del data[len(data) // 2 :]
    shard.write_bytes(bytes(data))

    assert main(["data", "verify", str(packed)]) == 1
    out, err = capsys.readouterr()
    problems = out.splitlines()
    assert problems and all(line.startswith(f"{shard}: ") for line in problems)
    digest = hashlib.sha256(data).hexdigest()
    assert f"{shard}: sha256 {digest}, the manifest says " in out
    if damage == "truncate":
        assert f"{shard}: {len(data)} bytes, the manifest says " in out
        assert re.search(rf"{re.escape(str(shard))}: [01] samples, the manifest says 2", out)
    assert re.fullmatch(
        rf"error: {re.escape(str(packed))}: [678] samples in 5 shards, {len(problems)} problem\(s\)\n", err
    )


def test_verify_reports_a_missing_shard_and_a_bad_pair(packed: Path, raw: Path) -> None:
    (packed / "val/shard-000001.tar").unlink()
    jpg = next((raw / "images/100k/val").iterdir()).read_bytes()
    png = io.BytesIO()
    Image.new("L", (8, 8)).save(png, format="PNG")
    (packed / "train/shard-000000.tar").write_bytes(shards._tar([("a.jpg", jpg), ("a.png", png.getvalue())]))

    report = verify(str(packed))
    assert f"{packed}/val/shard-000001.tar: missing, the manifest lists it" in report.problems
    assert any(
        p.startswith(f"{packed}/train/shard-000000.tar: a: mask shape (8, 8)") for p in report.problems
    )
    assert f"{packed}/train/shard-000000.tar: 1 samples, the manifest says 2" in report.problems


def test_verify_without_a_manifest_says_to_pack(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no manifest.json in .* `orchestrator data pack` wrote"):
        verify(str(tmp_path))


@pytest.mark.slow
def test_verify_reads_shards_on_s3(raw: Path, s3_server, s3_bucket: str) -> None:
    import s3fs

    options = s3_server.storage_options
    url = f"s3://{s3_bucket}/shards"
    pack(str(raw), url, shard_size=2, storage_options=options)
    report = verify(url, options)
    assert (report.samples, report.shards, report.problems) == (8, 5, [])

    fs = s3fs.S3FileSystem(**options)
    key = f"{s3_bucket}/shards/val/shard-000000.tar"
    data = bytearray(fs.cat_file(key))
    data[len(data) // 3] ^= 0xFF
    fs.pipe_file(key, bytes(data))
    report = verify(f"{url}/val", options)
    assert report.problems and all(p.startswith(f"{url}/val/shard-000000.tar: ") for p in report.problems)


def test_pack_logs_one_line_per_shard(raw: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="orchestrator.data.shards"):
        pack(str(raw), str(tmp_path / "shards"), shard_size=2)
    assert [r.getMessage() for r in caplog.records if r.name == "orchestrator.data.shards"] == [
        "train shard 1/3 (2 samples)",
        "train shard 2/3 (2 samples)",
        "train shard 3/3 (1 samples)",
        "val shard 1/2 (2 samples)",
        "val shard 2/2 (1 samples)",
    ]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _written(manifests: dict[str, dict]) -> list[str]:
    """The files a complete pack leaves: per split, its manifest and shards."""
    return sorted(
        f"{split}/{n}"
        for split, m in manifests.items()
        for n in [MANIFEST, *(s["name"] for s in m["shards"])]
    )


def _count_decodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that grows by one per decoded pair (workers=1 only: a pool's processes are not patched)."""
    calls, real = [], shards._decode_sample
    monkeypatch.setattr(shards, "_decode_sample", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_pack_output_is_the_same_for_any_number_of_workers(raw: Path, tmp_path: Path) -> None:
    one = pack(str(raw), str(tmp_path / "one"), shard_size=2, workers=1)
    two = pack(str(raw), str(tmp_path / "two"), shard_size=2, workers=2)
    assert one == two
    assert _files(tmp_path / "one") == _files(tmp_path / "two")
    assert sorted(_files(tmp_path / "two")) == _written(two)  # the sidecars go once the manifests are written


def test_pack_resumes_an_interrupted_run(
    raw: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    pack(str(raw), str(tmp_path / "whole"), shard_size=2, workers=1)
    out = tmp_path / "shards"
    calls, real_tar = [], shards._tar

    def interrupted_tar(members: list[tuple[str, bytes]]) -> bytes:
        calls.append(1)
        if len(calls) == 5:  # Ctrl-C while packing val's second shard
            raise KeyboardInterrupt
        return real_tar(members)

    with monkeypatch.context() as patch:
        patch.setattr(shards, "_tar", interrupted_tar)
        with pytest.raises(KeyboardInterrupt):
            pack(str(raw), str(out), shard_size=2, workers=1)
    assert not list(out.rglob(MANIFEST))
    (out / "train/shard-000001.tar").unlink()
    damaged = bytearray((out / "val/shard-000000.tar").read_bytes())
    damaged[100] ^= 0xFF  # same size, other bytes: only the checksum tells
    (out / "val/shard-000000.tar").write_bytes(bytes(damaged))

    decodes = _count_decodes(monkeypatch)
    with caplog.at_level(logging.INFO, logger="orchestrator.data.shards"):
        pack(str(raw), str(out), shard_size=2, workers=1)
    assert len(decodes) == 2 + 2 + 1  # train shard 1, val shards 0 and 1; train shards 0 and 2 reused
    assert [r.getMessage() for r in caplog.records if r.name == "orchestrator.data.shards"] == [
        "train shard 2/3 (2 samples)",
        "train: reused 2 of 3 shards packed by an earlier run",
        "val shard 1/2 (2 samples)",
        "val shard 2/2 (1 samples)",
    ]
    assert _files(out) == _files(tmp_path / "whole")


def test_pack_redoes_shards_with_changed_or_bad_samples(
    raw: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "shards"
    val_mask = sorted((raw / "labels/drivable/masks/val").iterdir())[0]
    good = val_mask.read_bytes()
    mask = np.array(Image.open(val_mask))
    mask[0, 0] = 7
    Image.fromarray(mask).save(val_mask)
    with pytest.raises(ValueError, match="label values"):
        pack(str(raw), str(out), shard_size=2, workers=1)  # leaves the sidecars of the good shards

    val_mask.write_bytes(good)
    image = sorted((raw / "images/100k/train").iterdir())[2]  # train shard 1
    size = image.stat().st_size
    Image.open(image).save(image, quality=50)
    assert image.stat().st_size != size
    sidecar = out / "train/.pack/shard-000000.json"
    sidecar.write_bytes(sidecar.read_bytes()[:-10])  # a write cut short

    decodes = _count_decodes(monkeypatch)
    assert pack(str(raw), str(out), shard_size=2, workers=1) == pack(str(raw), str(tmp_path / "fresh"), 2)
    # Train shards 0 and 1, val shard 0; train shard 2 and val shard 1 reused.
    assert len(decodes) == 2 + 2 + 2
    assert _files(out) == _files(tmp_path / "fresh")


def test_pack_shows_a_progress_bar_on_a_terminal_and_logs_shards_elsewhere(
    raw: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    stderr_terminal: Callable[[], io.StringIO],
) -> None:  # fmt: skip
    caplog.set_level(logging.INFO, logger="orchestrator.data.shards")
    terminal = stderr_terminal()
    pack(str(raw), str(tmp_path / "shards"), shard_size=2, workers=1, progress=True)
    err = terminal.getvalue()
    assert re.search(r"train: 100%.* 5/5 ", err) and re.search(r"val: 100%.* 3/3 ", err)
    assert "shard 1/" not in caplog.text  # the bar says it

    monkeypatch.setattr("sys.stderr", io.StringIO())  # a file, a CI log: no bar, a line per shard
    pack(str(raw), str(tmp_path / "logged"), shard_size=2, workers=1, progress=True)
    assert "100%" not in sys.stderr.getvalue()
    assert "train shard 3/3 (1 samples)" in caplog.text and "val shard 2/2 (1 samples)" in caplog.text

    terminal = stderr_terminal()
    pack(str(raw), str(tmp_path / "quiet"), shard_size=2, workers=1)
    assert terminal.getvalue() == ""


def test_pack_command_takes_workers_and_refuses_bad_numbers(
    raw: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "shards"
    assert main(["data", "pack", str(raw), str(out), "--shard-size", "2", "--workers", "2"]) == 0
    assert (
        capsys.readouterr().out
        == f"train: 5 samples in 3 shards -> {out}/train (masks labels from labels/drivable/masks/train)\n"
        f"val: 3 samples in 2 shards -> {out}/val (masks labels from labels/drivable/masks/val)\n"
    )
    for option, value in (("--workers", "0"), ("--shard-size", "-2"), ("--workers", "two")):
        assert main(["data", "pack", str(raw), str(out), option, value]) == 2
        assert capsys.readouterr().err == (
            f"error: orchestrator data pack: argument {option}: expected a whole number >= 1, got '{value}' "
            "(-h: usage)\n"
        )
    with pytest.raises(ValueError, match="workers must be >= 1, got 0"):
        pack(str(raw), str(out), workers=0)
    with pytest.raises(ValueError, match="shard_size must be >= 1, got 0"):
        pack(str(raw), str(out), shard_size=0)


@pytest.mark.slow
def test_pack_from_and_to_s3_with_a_pool_resumes(
    raw: Path, tmp_path: Path, s3_server, s3_bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    import s3fs

    options = s3_server.storage_options  # reaches the pool's processes with the pickled filesystems
    src, dst = f"s3://{s3_bucket}/raw", f"s3://{s3_bucket}/shards"
    synthesize(src, train=5, val=3, size=(64, 36), seed=2, storage_options=options)  # as the raw fixture
    fs = s3fs.S3FileSystem(**options)
    val_mask = sorted(fs.ls(f"{s3_bucket}/raw/labels/drivable/masks/val"))[2]  # val shard 1
    good = fs.cat_file(val_mask)
    fs.pipe_file(val_mask, b"not a png")
    with pytest.raises(ValueError, match=r"masks/val/synth-val-0000002.png: does not decode as PNG \(not an"):
        pack(src, dst, shard_size=2, storage_options=options, workers=2)

    fs.pipe_file(val_mask, good)
    with caplog.at_level(logging.INFO, logger="orchestrator.data.shards"):
        manifests = pack(src, dst, shard_size=2, storage_options=options, workers=2)
    messages = [r.getMessage() for r in caplog.records if r.name == "orchestrator.data.shards"]
    assert messages == [
        "train: reused 3 of 3 shards packed by an earlier run",
        "val shard 2/2 (1 samples)",
        "val: reused 1 of 2 shards packed by an earlier run",
    ]
    assert manifests == pack(str(raw), str(tmp_path / "local"), shard_size=2, workers=1)
    fs.invalidate_cache()
    assert [p.removeprefix(f"{s3_bucket}/shards/") for p in fs.find(f"{s3_bucket}/shards")] == _written(
        manifests
    )
    assert verify(dst, options).problems == []


def _children(pid: int) -> dict[int, tuple[str, str]]:
    """{pid: (start time, command line)} of a process's children, from a scan of /proc."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # the fields after (comm)
            if int(fields[1]) == pid:
                found[int(stat.parent.name)] = (fields[19], (stat.parent / "cmdline").read_text())
        except (FileNotFoundError, ProcessLookupError):  # it ended meanwhile
            continue
    return found


def _running(pid: int, started: str) -> bool:
    """Whether the process that started at `started` still runs (a zombie has ended; a pid may be reused)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return fields[19] == started and fields[0] != "Z"


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux's")
def test_pack_workers_end_with_a_killed_command_and_packing_again_resumes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    raw, out = tmp_path / "raw", tmp_path / "shards"
    synthesize(str(raw), train=8, val=0, size=(1280, 720), seed=3)
    for path in [*(raw / "images/100k/train").iterdir(), *(raw / "labels/drivable/masks/train").iterdir()]:
        for copy in range(1, 8):  # 64 samples in 32 shards: about a second of decoding for 2 workers
            os.link(path, path.with_stem(f"{path.stem}-{copy}"))
    args = ["data", "pack", str(raw), str(out), "--shard-size", "2", "--workers", "2"]
    with (tmp_path / "pack.log").open("w") as log:
        command = subprocess.Popen([sys.executable, "-m", "orchestrator", *args], stdout=log, stderr=log)
    children: dict[int, tuple[str, str]] = {}
    try:
        deadline = time.monotonic() + 60
        while not list((out / "train" / SIDECARS).glob("*.json")):  # a shard done: the pool is at work
            assert command.poll() is None, (tmp_path / "pack.log").read_text()
            assert time.monotonic() < deadline
            time.sleep(0.01)
        children = _children(command.pid)
        command.kill()  # SIGKILL: no handler, no atexit, no pool shutdown
        command.wait()
        assert sum("spawn_main" in cmdline for _, cmdline in children.values()) == 2, children
        deadline = time.monotonic() + 5
        while (left := [pid for pid, (start, _) in children.items() if _running(pid, start)]) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.05)
        assert left == [], [children[pid][1] for pid in left]
    finally:
        command.kill()
        for pid, (start, _) in children.items():
            if _running(pid, start):
                os.kill(pid, signal.SIGKILL)
    assert not list(out.rglob(MANIFEST))  # killed mid-pack

    with caplog.at_level(logging.INFO, logger="orchestrator.data.shards"):
        resumed = pack(str(raw), str(out), shard_size=2, workers=1)
    assert re.search(r"train: reused [1-9]\d* of 32 shards", caplog.text)
    assert resumed == pack(str(raw), str(tmp_path / "whole"), shard_size=2, workers=1)
    assert _files(out) == _files(tmp_path / "whole")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_worker_whose_parent_died_before_it_asked_ends_at_once() -> None:
    # A parent dead before the prctl has already reparented the worker: the signal will never come.
    code = "import os, orchestrator.data.shards as s; s._end_with_parent(os.getppid() + 1); print(1)"
    worker = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (worker.returncode, worker.stdout) == (-signal.SIGKILL, ""), worker.stderr
