"""The optional URL schemes: gs:// (gcsfs, `orchestrator[gcs]`) and az://, abfs:// (adlfs,
`orchestrator[azure]`).

Without its driver a scheme fails in one line naming the extra, wherever a URL is opened (the data commands,
pretrained weights, Ray's storage). With the drivers, the real commands run against local emulators: a GCS
emulator (gcp-storage-emulator, a dev dependency) and Azurite (npm; .ci/run installs it into .venv/node).
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import fsspec
import pytest
import torch
import yaml
from fsspec.registry import _registry, known_implementations

from bench.local_s3 import free_port
from orchestrator.cli import main
from orchestrator.data.shards import pack
from orchestrator.data.stream import evaluation_loader
from orchestrator.data.synth import synthesize
from orchestrator.errors import Unavailable, UsageError
from orchestrator.execution import cluster
from orchestrator.models.pretrained import load_pretrained
from orchestrator.storage import url_to_fs

CLI = [sys.executable, "-m", "orchestrator"]
PACKAGES = {"gcs": "gcsfs", "azure": "adlfs"}  # the extra -> the driver it installs
MISSING = [  # a URL, the extra its driver comes with
    ("gs://bucket/shards", "gcs"),
    ("gcs://bucket/shards", "gcs"),
    ("az://container/shards", "azure"),
    ("abfs://container/shards", "azure"),
    ("abfss://container/shards", "azure"),
]


def _uninstalled(monkeypatch: pytest.MonkeyPatch, package: str) -> None:
    """Make `package` look not installed, as far as fsspec can tell: importing it fails, fsspec forgets the
    classes it already imported from it and the schemes that only the package's entry points declare."""
    monkeypatch.setitem(sys.modules, package, None)
    for scheme, cls in list(_registry.items()):
        if cls.__module__.split(".")[0] == package:
            monkeypatch.delitem(_registry, scheme)
    for entry in importlib.metadata.entry_points(group="fsspec.specs"):
        if entry.value.split(":")[0].split(".")[0] == package:
            monkeypatch.delitem(known_implementations, entry.name, raising=False)


def _opens(how: str, url: str, tmp_path: Path) -> int | None:
    """Open `url` the way `how` does: a data command (its exit code) or a library entry point."""
    if how == "verify":
        return main(["data", "verify", url])
    if how == "pack":
        return main(["data", "pack", str(tmp_path / "raw"), url])
    if how == "synth":
        return main(["data", "synth", url])
    if how == "pretrained":
        load_pretrained(torch.nn.Linear(1, 1), f"{url}/resnet18.pth")
    elif how == "ray storage":
        cluster.ray_storage(f"{url}/runs")
    return None


@pytest.mark.parametrize("how", ["verify", "pack", "synth", "pretrained", "ray storage"])
@pytest.mark.parametrize("url,extra", MISSING)
def test_a_missing_driver_is_one_line_naming_the_extra(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    tmp_path: Path,
    url: str,
    extra: str,
    how: str,
) -> None:
    _uninstalled(monkeypatch, PACKAGES[extra])
    scheme = url.split("://")[0]
    expected = (
        f"the fsspec driver for {scheme}:// is not installed .*: pip install 'orchestrator\\[{extra}\\]'"
    )
    if how in ("verify", "pack", "synth"):
        assert _opens(how, url, tmp_path) == 1
        out, err = capsys.readouterr()
        assert out == "" and len(err.splitlines()) == 1, err
        assert re.search(f"^error: {url}.*: {expected}$", err.strip()), err
    else:
        with pytest.raises(Unavailable, match=expected):
            _opens(how, url, tmp_path)


def test_a_sweep_whose_storage_lacks_its_driver_stops_before_ray_starts(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    _uninstalled(monkeypatch, "adlfs")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    init_ray = []
    monkeypatch.setattr(cluster, "init_ray", lambda **kw: init_ray.append(kw))
    spec = {"name": "s", "data": {"train": str(tmp_path / "t"), "val": str(tmp_path / "v")}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    for command in (["sweep", "-v"], ["train"]):  # -v: the sweep's logs stay out of a file and this process
        assert main([*command, "s.yaml", "--set", "storage=az://container/runs"]) == 1
        last = capsys.readouterr().err.splitlines()[-1]
        assert last.startswith("error: az://container/runs") and "pip install 'orchestrator[azure]'" in last
    assert init_ray == []


def test_every_link_of_a_chained_url_needs_its_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    _uninstalled(monkeypatch, "gcsfs")
    with pytest.raises(Unavailable, match=r"^simplecache::gs://b/k: the fsspec driver for gs:// .*\[gcs\]'$"):
        url_to_fs("simplecache::gs://b/k")


def test_a_scheme_fsspec_does_not_know_is_a_usage_error(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(UsageError, match="fsspec knows no scheme nosuch://"):
        url_to_fs("nosuch://bucket/shards")
    assert main(["data", "verify", "nosuch://bucket/shards"]) == 2
    assert capsys.readouterr().err.startswith("error: nosuch://bucket/shards: fsspec knows no scheme")


def test_file_urls_pack_verify_and_stream_as_local_paths(tmp_path: Path) -> None:
    synthesize(str(tmp_path / "raw"), train=2, val=3, size=(64, 36))
    pack(f"file://{tmp_path}/raw", f"file://{tmp_path}/shards", shard_size=2, workers=1)
    assert main(["data", "verify", f"file://{tmp_path}/shards"]) == 0
    by_url = list(evaluation_loader(f"file://{tmp_path}/shards/val", batch_size=2))
    by_path = list(evaluation_loader(str(tmp_path / "shards/val"), batch_size=2))
    assert len(by_url) == 2
    for (image, mask), (path_image, path_mask) in zip(by_url, by_path, strict=True):
        assert torch.equal(image, path_image) and torch.equal(mask, path_mask)


def test_ray_keeps_local_and_s3_storage_and_takes_other_schemes_through_fsspec() -> None:
    assert cluster.ray_storage("/abs/runs") == (None, "/abs/runs")
    assert cluster.ray_storage("s3://bucket/runs") == (None, "s3://bucket/runs")
    fs, path = cluster.ray_storage("memory://ray-storage/runs")
    with fs.open_output_stream(f"{path}/state.json") as f:  # as Ray writes through a pyarrow filesystem
        f.write(b"{}")
    memory = fsspec.filesystem("memory")
    assert memory.cat("/ray-storage/runs/state.json") == b"{}"  # what fsspec's filesystem holds
    memory.rm("/ray-storage", recursive=True)


# --- Real round trips against local emulators ------------------------------------------------------------


@dataclass
class Store:
    """A running emulator: the root URL of its bucket, the environment an `orchestrator` command needs to
    reach it, and the same as fsspec storage options."""

    root: str
    env: dict[str, str]
    storage_options: dict


def _serve(cmd: list[str], ready: str, log: Path) -> subprocess.Popen:
    """Start an emulator; waits until `ready` (a URL of it) answers."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(ready, timeout=1)
            return proc
        except urllib.error.HTTPError:  # it answers, if only to say no
            return proc
        except OSError as e:
            if proc.poll() is not None or time.monotonic() > deadline:
                _stop(proc)
                raise RuntimeError(f"{cmd[0]} did not start: {log.read_text()}") from e
            time.sleep(0.2)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def gcs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    """gcp-storage-emulator on loopback, in memory, with a bucket; gcsfs reaches it anonymously."""
    pytest.importorskip("gcsfs", reason="gs:// needs gcsfs: pip install -e '.[gcs]' (or '.[dev]')")
    emulator = Path(sys.executable).with_name("gcp-storage-emulator")
    if not emulator.exists():
        pytest.skip(f"{emulator} not found: pip install -e '.[dev]' brings the GCS emulator")
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    cmd = [str(emulator), "start", "-H", "127.0.0.1", "--port", str(port), "--in-memory", "-q"]
    log = tmp_path_factory.mktemp("gcs") / "emulator.log"
    proc = _serve([*cmd, "--default-bucket", "orchestrator"], f"{endpoint}/storage/v1/b", log)
    # fsspec takes FSSPEC_GS_<ARG> as gcsfs's constructor argument: no credentials are looked up.
    env = {"STORAGE_EMULATOR_HOST": endpoint, "FSSPEC_GS_TOKEN": "anon"}
    try:
        yield Store("gs://orchestrator", env, {"token": "anon", "endpoint_url": endpoint})
    finally:
        _stop(proc)


# Azurite's well-known development account (its documentation publishes the key).
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


@pytest.fixture(scope="module")
def azure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    """Azurite's blob service on loopback, in memory, telemetry off, with a container; adlfs reaches it by
    a connection string."""
    pytest.importorskip("adlfs", reason="az:// needs adlfs: pip install -e '.[azure]' (or '.[dev]')")
    azurite = Path(sys.executable).parents[1] / "node/node_modules/.bin/azurite-blob"
    if not azurite.exists():
        pytest.skip(f"{azurite} not found: npm install --prefix .venv/node azurite (as .ci/run does)")
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}/devstoreaccount1"
    cmd = [str(azurite), "--blobHost", "127.0.0.1", "--blobPort", str(port), "--inMemoryPersistence"]
    # azure-storage-blob asks for a newer API version than this Azurite knows; adlfs's calls are older ones.
    cmd += ["--extentMemoryLimit", "256", "--disableTelemetry", "--silent", "--skipApiVersionCheck"]
    proc = _serve(cmd, endpoint, tmp_path_factory.mktemp("azurite") / "azurite.log")
    connection = (
        f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={AZURITE_KEY};"
        f"BlobEndpoint={endpoint};"
    )
    options = {"connection_string": connection}
    try:
        fsspec.filesystem("az", **options).mkdir("orchestrator")
        yield Store("az://orchestrator", {"AZURE_STORAGE_CONNECTION_STRING": connection}, options)
    finally:
        _stop(proc)


@pytest.fixture(params=["gcs", "azure"])
def store(request: pytest.FixtureRequest) -> Store:
    return request.getfixturevalue(request.param)


def run_cli(args: list[str], env: dict[str, str], cwd: Path, timeout: int = 600) -> str:
    proc = subprocess.run(CLI + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"{args} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    )
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_pack_verify_and_stream_through_an_emulator(store: Store, tmp_path: Path) -> None:
    """`data pack` writes to the emulator and `data verify` reads it back (whole shards); the stream loader
    (ranged reads) yields what it yields from the same split packed on local disk."""
    synthesize(str(tmp_path / "raw"), train=4, val=3, size=(64, 36))
    pack(str(tmp_path / "raw"), str(tmp_path / "local"), shard_size=2, workers=1)
    url = f"{store.root}/{tmp_path.name}/shards"
    env = {**os.environ, **store.env}
    out = run_cli(
        ["data", "pack", str(tmp_path / "raw"), url, "--shard-size", "2", "--workers", "1"], env, tmp_path
    )
    assert f"val: 3 samples in 2 shards -> {url}/val" in out
    assert "Request URL" not in out  # azure-core's per-request INFO lines stay out of the command's output
    out = run_cli(["data", "verify", url], env, tmp_path)
    assert out == f"{url}: 7 samples in 4 shards, 0 problem(s)\n"

    remote = evaluation_loader(f"{url}/val", batch_size=2, storage_options=store.storage_options)
    local = evaluation_loader(str(tmp_path / "local/val"), batch_size=2)
    pairs = list(zip(remote, local, strict=True))
    assert len(pairs) == 2
    for (image, mask), (local_image, local_mask) in pairs:
        assert torch.equal(image, local_image) and torch.equal(mask, local_mask)


@pytest.mark.slow
@pytest.mark.parametrize("store", ["azure"], indirect=True)  # gs:// takes the same path (ray_storage)
def test_a_sweep_streams_and_checkpoints_through_an_emulator(store: Store, tmp_path: Path, cli_env) -> None:
    """A one-trial sweep reads its data from the emulator and keeps Tune's state and Ray Train's checkpoints
    there: Ray gets the storage as url_to_fs's filesystem (pyarrow has no az://)."""
    root = f"{store.root}/{tmp_path.name}"
    synthesize(str(tmp_path / "raw"), train=4, val=2, size=(64, 36))
    pack(
        str(tmp_path / "raw"),
        f"{root}/shards",
        shard_size=2,
        workers=1,
        storage_options=store.storage_options,
    )
    spec = {
        "name": "schemes",
        "data": {"train": f"{root}/shards/train", "val": f"{root}/shards/val", "loader_workers": 0},
        "model": {"backbone": "resnet18"},
        "train": {
            "epochs": 1,
            "steps_per_epoch": 2,
            "checkpoint_every": 1,
            "batch_per_gpu": 2,
            "crop": [32, 32],
        },
        "resources": {"workers_per_trial": 1, "cpus_per_worker": 1},
        "storage": f"{root}/runs",
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    out = run_cli(["sweep", "spec.yaml"], {**cli_env, **store.env}, tmp_path)
    assert "FINISHED" in out

    fs, runs = url_to_fs(f"{root}/runs", store.storage_options)
    kept = [p.removeprefix(f"{runs}/") for p in fs.find(runs)]
    assert any(p.startswith("schemes/experiment_state-") for p in kept), kept  # Tune's
    assert sum(p.startswith("train-") and p.endswith("/model.pt") for p in kept) == 2, kept  # Ray Train's
