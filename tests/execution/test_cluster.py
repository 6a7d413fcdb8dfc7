"""Job submission and the cluster configs of cluster/: the configs parse and hold what docs/cluster.md
promises (Ray's own launcher schema for aws-gpu.yaml), and, with real processes, sweeps submitted to the
head of cluster/local.sh (Ray with token auth, MLflow server, moto S3) as users type them finish with
their runs in MLflow."""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import ray
import yaml
from mlflow.tracking import MlflowClient

from bench import common
from orchestrator import checkpoints, tracking
from orchestrator import spec as specs
from orchestrator.data.transforms import IMAGENET
from orchestrator.errors import UsageError
from orchestrator.submit import FORWARDED_ENV, entrypoint, job_address, job_env

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
TORCH_PIN = re.search(r"torch==[\d.]+", (ROOT / "Makefile").read_text()).group()
RAY_IMAGE = f"rayproject/ray:{ray.__version__}-py{sys.version_info.major}{sys.version_info.minor}-gpu"


@pytest.mark.parametrize("spec", sorted(p.name for p in (ROOT / "jobs").glob("*.yaml")))
def test_job_specs_are_executable_sweeps(spec):
    """`ray job submit -- jobs/X.yaml` runs the file: a shebang (a YAML comment), mode 100755 in git."""
    assert (ROOT / "jobs" / spec).read_text().startswith("#!/usr/bin/env -S orchestrator sweep\n")
    if shutil.which("git") and (ROOT / ".git").exists():
        git = ["git", "ls-files", "-s", f"jobs/{spec}"]
        staged = subprocess.run(git, cwd=ROOT, capture_output=True, text=True).stdout
        assert staged.startswith("100755 "), staged
    assert os.access(ROOT / "jobs" / spec, os.X_OK)


def test_launcher_config_passes_rays_schema_and_sets_up_the_project():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(raw)))  # what `ray up` checks, with its defaults filled in
    assert raw["provider"]["type"] == "aws"
    assert raw["docker"]["image"] == RAY_IMAGE  # the project's Ray and Python, pinned
    types = raw["available_node_types"]
    head = types[raw["head_node_type"]]
    assert head["resources"] == {}  # trial drivers need no custom resource
    (worker,) = (t for name, t in types.items() if name != raw["head_node_type"])
    assert re.match(r"(g|p)\d", worker["node_config"]["InstanceType"])  # a GPU instance family
    assert worker["max_workers"] >= 1
    assert raw["file_mounts"]["~/orchestrator"] == "."
    assert raw["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert ".gitignore" in raw["rsync_filter"]  # .venv, data, runs stay home
    setup = raw["setup_commands"]
    torch_at = next(i for i, c in enumerate(setup) if TORCH_PIN in c)
    assert torch_at < next(i for i, c in enumerate(setup) if "~/orchestrator" in c)
    for cmd in (*raw["head_start_ray_commands"], *raw["worker_start_ray_commands"]):
        assert "ray stop" in cmd or "RAY_AUTH_MODE=token" in cmd
    assert "--dashboard-host=127.0.0.1" in raw["head_start_ray_commands"][-1]


def test_kuberay_manifest_has_token_auth_gpu_workers_and_credentials_from_a_secret():
    docs = {d["kind"]: d for d in yaml.safe_load_all((CLUSTER / "kuberay.yaml").read_text())}
    config, cluster = docs["ConfigMap"], docs["RayCluster"]
    assert cluster["apiVersion"] == "ray.io/v1"
    spec = cluster["spec"]
    assert spec["rayVersion"] == ray.__version__
    assert spec["authOptions"] == {"mode": "token"}
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    assert "resources" not in head["rayStartParams"]  # trial drivers need no custom resource
    (group,) = spec["workerGroupSpecs"]
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    containers = [head["template"]["spec"]["containers"][0], group["template"]["spec"]["containers"][0]]
    assert int(containers[1]["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    images = {c["image"] for c in containers}
    assert len(images) == 1 and re.fullmatch(r"[\w./-]+:\d[\w.-]*", images.pop())  # one pinned tag
    for c in containers:
        assert "env" not in c  # nothing inline: the ConfigMap and the Secret only
        assert {"configMapRef": {"name": config["metadata"]["name"]}} in c["envFrom"]
        assert {"secretRef": {"name": "orchestrator-s3", "optional": True}} in c["envFrom"]
    assert config["data"]["MLFLOW_TRACKING_URI"].startswith("http")
    assert not {k for k in config["data"] if "SECRET" in k or "KEY_ID" in k or "TOKEN" in k}


KUBERAY = "1.5.1"  # the operator version cluster/kuberay.yaml and docs/cluster.md name


def _strict(schema: dict) -> dict:
    """The schema as `kubectl apply --validate=strict` holds a manifest to it: an object with declared
    properties takes no others (the API server would prune them silently), unless the schema keeps them."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        keeps = schema.get("x-kubernetes-preserve-unknown-fields") or "additionalProperties" in schema
        if "properties" in schema and not keeps:
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [_strict(v) for v in schema]
    return schema


def test_kuberay_manifest_is_a_valid_raycluster_of_the_operator_version_it_names():
    import gzip
    import json

    import jsonschema

    fixture = ROOT / "tests" / "fixtures" / "kuberay" / f"rayclusters.v{KUBERAY}.schema.json.gz"
    text = (CLUSTER / "kuberay.yaml").read_text()
    assert f"KubeRay operator >= {KUBERAY}" in text
    assert f"(operator >= {KUBERAY})" in (ROOT / "docs" / "cluster.md").read_text()
    validator = jsonschema.Draft7Validator(_strict(json.loads(gzip.decompress(fixture.read_bytes()))))
    (cluster,) = [d for d in yaml.safe_load_all(text) if d["kind"] == "RayCluster"]
    assert list(validator.iter_errors(cluster)) == []
    broken = copy.deepcopy(cluster)  # what the schema refuses: a misspelled key, a type, a missing field
    broken["spec"]["workerGroupSpecs"][0]["replica"] = 2
    broken["spec"]["headGroupSpec"]["rayStartParams"]["num-gpus"] = 0
    del broken["spec"]["workerGroupSpecs"][0]["groupName"]
    found = sorted(e.message for e in validator.iter_errors(broken))
    assert found == [
        "'groupName' is a required property",
        "0 is not of type 'string'",
        "Additional properties are not allowed ('replica' was unexpected)",
    ]


@pytest.mark.slow
def test_the_images_python_requirements_resolve(tmp_path):
    """What cluster/Dockerfile's last `pip install` asks for, resolved by pip (--dry-run) beside the pinned
    torch, in an environment like the image's (Python 3.11, Ray 2.60: this project's)."""
    import json

    runs = [line for line in (CLUSTER / "Dockerfile").read_text().splitlines() if "RUN pip install" in line]
    last = runs[-1]
    assert last.split()[-1] == "/home/ray/orchestrator"  # the checkout, copied there
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(report), TORCH_PIN,
         str(ROOT)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    installs = {i["metadata"]["name"] for i in json.loads(report.read_text())["install"]}
    assert "orchestrator" in installs and "torch" not in installs  # the pin holds: no other torch resolved


def test_dockerfile_builds_on_the_pinned_ray_image_and_installs_torch_first():
    lines = (CLUSTER / "Dockerfile").read_text().splitlines()
    assert f"FROM {RAY_IMAGE}" in lines
    runs = [line for line in lines if line.startswith("RUN ")]
    assert TORCH_PIN in runs[0] and "/home/ray/orchestrator" in runs[-1]


# An AWS access key id, or a credential-like key assigned (KEY=VALUE, KEY: VALUE) a value that is not a
# reference ($VAR, $(cat FILE), a file path, a placeholder "...").
CREDENTIAL = re.compile(
    r"AKIA[0-9A-Z]{16}|(SECRET_ACCESS_KEY|ACCESS_KEY_ID|AUTH_TOKEN|PASSWORD)['\"]?(=|:\s)\s*['\"]?(?![$.~/'\"\\]|$)",
    re.IGNORECASE,
)


@pytest.mark.parametrize("name", sorted(p.name for p in CLUSTER.iterdir()))
def test_no_credentials_in_cluster_files(name):
    """Values of credential-like keys are references ($VAR, $(cat FILE), ...), never literals."""
    hits = [line for line in (CLUSTER / name).read_text().splitlines() if CREDENTIAL.search(line)]
    assert not hits


def test_local_script_is_clean_bash():
    script = CLUSTER / "local.sh"
    assert os.access(script, os.X_OK)
    assert "set -euo pipefail" in script.read_text()
    subprocess.run(["bash", "-n", str(script)], check=True)
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed")
    lint = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout


def test_local_script_refuses_unknown_commands_and_options(tmp_path):
    env = {**os.environ, "STATE_DIR": str(tmp_path)}
    for args in ([], ["restart"], ["start", "--gpu"]):
        proc = subprocess.run([CLUSTER / "local.sh", *args], env=env, capture_output=True, text=True)
        assert proc.returncode == 1 and "usage" in proc.stderr, args
    assert not list(tmp_path.iterdir())  # nothing started, nothing written


def test_the_cluster_manual_names_every_cluster_file_and_submission_form():
    readme = (ROOT / "README.md").read_text()
    assert "[docs/cluster.md](docs/cluster.md)" in readme[readme.index("## Run on a cluster") :]
    section = (ROOT / "docs/cluster.md").read_text()
    for path in sorted(CLUSTER.iterdir()):
        assert f"cluster/{path.name}" in section, path.name
    for form in (
        "ray job submit --working-dir . -- jobs/sweep_norms.yaml",
        "-- orchestrator sweep jobs/sweep_norms.yaml",
        "orchestrator submit jobs/sweep_norms.yaml",
        "ray up cluster/aws-gpu.yaml",
        "kubectl apply -f cluster/kuberay.yaml",
    ):
        assert form in section, form


def test_entrypoint_is_the_sweep_command_with_the_spec_relative_to_the_working_dir(tmp_path, monkeypatch):
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "a b.yaml").write_text("")
    monkeypatch.chdir(tmp_path)
    command = entrypoint(str(tmp_path / "jobs" / "a b.yaml"), ["grid.norm=[bn, gn:g8]"], ".")
    assert command == "orchestrator sweep 'jobs/a b.yaml' --set 'grid.norm=[bn, gn:g8]'"
    assert entrypoint("jobs/a b.yaml", [], ".", resume=True) == "orchestrator sweep 'jobs/a b.yaml' --resume"
    fitted = entrypoint("jobs/a b.yaml", [], ".", gpu="a10g", skip_unfit=True)
    assert fitted == "orchestrator sweep 'jobs/a b.yaml' --gpu a10g --skip-unfit"
    with pytest.raises(UsageError, match="outside the working directory"):
        entrypoint(str(ROOT / "jobs/smoke.yaml"), [], ".")


def test_job_env_forwards_only_what_is_set_and_named(monkeypatch):
    for name in FORWARDED_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    monkeypatch.setenv(tracking.TIMEOUT_ENV, "45")  # the job's MLflow calls get the bound set here
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    forwarded = {"MLFLOW_TRACKING_URI": "http://mlflow:5000", tracking.TIMEOUT_ENV: "45"}
    assert job_env() == forwarded  # credentials only when named
    assert job_env(["AWS_SECRET_ACCESS_KEY", "UNSET_VARIABLE"]) == {**forwarded, "AWS_SECRET_ACCESS_KEY": "s"}


def test_job_address_prefers_the_flag_then_rays_variables(monkeypatch):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert job_address(None) == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "http://b:8265")
    assert job_address(None) == "http://b:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://a:8265")
    assert job_address(None) == "http://a:8265"
    assert job_address("http://c:8265") == "http://c:8265"


# --- real processes: cluster/local.sh, `ray job submit`, `orchestrator submit` ---------------------------

TINY = [  # one trial, one step: the point is the path through the cluster, not the training
    "train.epochs=1",
    "train.steps_per_epoch=1",
    "train.warmup_steps=0",
    "grid.norm=[bn]",
    "grid.train.batch_per_gpu=[2]",
    "data.train=s3://orchestrator/shards/train",
    "data.val=s3://orchestrator/shards/val",
    "storage=s3://orchestrator/runs",
]


def sets(*overrides: str) -> list[str]:
    return [a for o in (*TINY, *overrides) for a in ("--set", o)]


def run(cmd: list, env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@dataclass
class LocalCluster:
    env: dict[str, str]  # a user's shell after `source $STATE_DIR/env`
    secrets: list[str]  # the Ray token and the S3 secret: never in any output


@pytest.fixture(scope="module")
def local_cluster() -> Iterator[LocalCluster]:
    """cluster/local.sh with --s3 (moto) on free ports, with a private state dir and token, and a small
    dataset packed into its bucket (bench.common.local_cluster: stopped by PID, leftovers an error)."""
    state = Path(tempfile.mkdtemp(prefix="oc-", dir="/tmp"))  # short: Ray's socket paths
    try:
        # A plain head as Ray's docs start one: 2 CPUs, no custom resources (trial drivers need none).
        with common.local_cluster(state, s3=True, ray_args=("--num-cpus", "2")) as env:
            data = run([sys.executable, "-m", "orchestrator", "data", "synth", str(state / "synth"),
                        "--train", "8", "--val", "4", "--size", "128x72"], env)  # fmt: skip
            assert data.returncode == 0, data.stderr
            data = run([sys.executable, "-m", "orchestrator", "data", "pack", str(state / "synth"),
                        "s3://orchestrator/shards", "--shard-size", "4", "--workers", "1"], env)  # fmt: skip
            assert data.returncode == 0, data.stderr
            yield LocalCluster(env, [(state / "token").read_text(), env["AWS_SECRET_ACCESS_KEY"]])
    finally:
        shutil.rmtree(state, ignore_errors=True)


def assert_no_secrets(cluster: LocalCluster, *outputs: str) -> None:
    assert not [s for s in cluster.secrets for out in outputs if s in out]


def trials(uri: str, experiment: str) -> list:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], "tags.`orchestrator.kind` = 'trial'")


@pytest.mark.slow
def test_ray_job_submit_runs_the_executable_spec_and_logs_to_the_clusters_mlflow(local_cluster):
    """As users type it: the spec file is the entrypoint; MLflow and S3 come from the head's environment."""
    env = local_cluster.env
    ray_cli = Path(sys.executable).with_name("ray")
    cmd = [ray_cli, "job", "submit", "--working-dir", ".", "--", "jobs/smoke.yaml",
           *sets("tracking.experiment=cluster-ray-job")]  # fmt: skip
    proc = run(cmd, env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "succeeded" in proc.stdout + proc.stderr
    (trial,) = trials(env["MLFLOW_TRACKING_URI"], "cluster-ray-job")
    assert trial.info.status == "FINISHED" and trial.data.params["norm"] == "bn"
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])  # the checkpoint went through the server to S3
    assert [f.path for f in client.list_artifacts(trial.info.run_id, "checkpoints/best")] == [
        "checkpoints/best/model.pt"
    ]
    assert_no_secrets(local_cluster, proc.stdout, proc.stderr)


@pytest.mark.slow
def test_an_ensemble_submitted_runs_on_the_clusters_ray_workers(local_cluster, tmp_path, monkeypatch):
    """`orchestrator submit -- ensemble ... --workers 2`: the job's ensemble scores on 2 Ray workers of the
    cluster, reading the bucket's split and the member's checkpoint from the head's MLflow (and S3)."""
    env = local_cluster.env
    for name in ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, env[name])
    uri = env["MLFLOW_TRACKING_URI"]
    spec = specs.validate({"name": "member", "model": {"backbone": "resnet18"}, "data": {
        "train": "s3://orchestrator/shards/train", "val": "s3://orchestrator/shards/val"}})  # fmt: skip
    config = specs.public_params(specs.flatten(spec))
    exp = tracking.ensure_experiment("cluster-ensemble", uri)
    trial = tracking.start_trial_run(
        exp, tracking.start_sweep_run(exp, "member", {}, uri), "member", config, uri
    )
    tracking.log_metrics(trial, {"val_miou": 0.5}, step=0, uri=uri)
    model = checkpoints.model_for(spec, pretrained=False)
    tracking.log_checkpoint(trial, checkpoints.save(tmp_path / "model.pt", model, config, IMAGENET), uri)
    tracking.end_run(trial, uri)

    cli = [sys.executable, "-m", "orchestrator", "submit", "--", "ensemble", "--top", "1",
           "--experiment", "cluster-ensemble", "--workers", "2"]  # fmt: skip
    proc = run(cli, env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "orchestrator ensemble --top 1 --experiment cluster-ensemble --workers 2" in proc.stderr
    assert "4 images on 2 Ray worker(s) of 0 GPU(s)" in proc.stdout and "SUCCEEDED" in proc.stderr
    assert "Connecting to existing Ray cluster" not in proc.stdout  # Ray's console lines: quieted
    (ensemble,) = MlflowClient(uri).search_runs([exp], "tags.`orchestrator.kind` = 'ensemble'")
    assert ensemble.data.params["members"] == trial and "val_miou_official" in ensemble.data.metrics
    assert_no_secrets(local_cluster, proc.stdout, proc.stderr)


@pytest.mark.slow
def test_orchestrator_submit_forwards_mlflow_and_exits_with_the_job_status(local_cluster, tmp_path):
    """`orchestrator submit` runs `orchestrator sweep SPEC` as a job; the MLflow store named here (not the
    head's) receives the runs; a job that fails makes it exit 1."""
    env = {**local_cluster.env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    cli = [sys.executable, "-m", "orchestrator", "submit", "jobs/smoke.yaml"]
    proc = run([*cli, *sets("tracking.experiment=cluster-submit")], env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "orchestrator sweep jobs/smoke.yaml --set" in proc.stderr
    assert "forwarded: AWS_DEFAULT_REGION, AWS_ENDPOINT_URL, MLFLOW_TRACKING_URI" in proc.stderr
    assert "SUCCEEDED" in proc.stderr and "FINISHED" in proc.stdout  # the job's own trial table, streamed
    (trial,) = trials(env["MLFLOW_TRACKING_URI"], "cluster-submit")
    assert trial.info.status == "FINISHED"
    assert_no_secrets(local_cluster, proc.stdout, proc.stderr)

    # The job cannot open this store (MLflow refuses file stores): its sweep exits 1 before Ray starts.
    failing = {**env, "MLFLOW_TRACKING_URI": f"file://{tmp_path}/store"}
    proc = run([*cli, *sets()], failing)
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "FAILED (Job entrypoint command failed with exit code 1)" in proc.stderr
