"""The spec: validation messages, overrides, grid expansion, flat configs, schema."""

import re
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest
import yaml

from orchestrator import spec as specs
from orchestrator.cli import main
from orchestrator.models.catalog import BACKBONES, backbone_table, norm_grammar, norm_table

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = {"name": "t", "data": {"train": "s3://b/train", "val": "s3://b/val"}}


def write(tmp_path: Path, doc: dict) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def errors_of(tmp_path: Path, doc: dict, overrides=()) -> list[str]:
    with pytest.raises(specs.SpecError) as e:
        specs.load(write(tmp_path, doc), overrides)
    return e.value.lines


def test_shipped_specs_are_valid():
    smoke = specs.load(ROOT / "jobs/smoke.yaml")
    assert [str(t) for t in specs.expand(smoke)] == [
        "norm=bn,train.batch_per_gpu=1",
        "norm=bn,train.batch_per_gpu=2",
        "norm=gn:g8,train.batch_per_gpu=1",
        "norm=gn:g8,train.batch_per_gpu=2",
    ]
    # Their MLflow run names: the swept values, short enough for the runs table to show whole.
    assert [t.name for t in specs.expand(smoke)] == ["bn 1", "bn 2", "gn:g8 1", "gn:g8 2"]
    names = [t.name for t in specs.expand(specs.load(ROOT / "jobs/sweep_norms.yaml"))]
    assert len(set(names)) == len(names) and max(map(len, names)) <= 40, max(names, key=len)
    for name in ("sweep_ibn.yaml", "sweep_ghost.yaml", "enet.yaml", "recipes.yaml", "progressive.yaml"):
        assert specs.expand(specs.load(ROOT / "jobs" / name))


STUDY_NORMS = ["bn", "syncbn", "gn:c16", "gn:c16+ws", "bn+ws", "evalnorm", "evalnorm:rule", "brn", "frn"]
PROXY_NORMS = ["bn", "syncbn", "ghostbn:b2", "evalnorm", "gn:c16", "gn:c16+ws", "frn"]


def test_study_proxy_holds_the_images_or_the_steps_of_every_batch_equal():
    spec = specs.load(ROOT / "jobs/study_proxy.yaml")
    trials = [t.config for t in specs.expand(spec)]
    assert len(trials) == len(PROXY_NORMS) * 2 * 2 * 3 == 84
    assert sorted(
        {(c["norm"], c["train.batch_per_gpu"], c["train.budget"], c["train.seed"]) for c in trials}
    ) == sorted(
        (n, b, budget, s)
        for n in PROXY_NORMS
        for b in (1, 8)
        for budget in ("epochs", "steps:256")
        for s in (0, 1, 2)
    )
    assert [c["train.seed"] for c in trials[:28]] == [0] * 28  # whole seeds first: a run cut short has them
    assert {(c["resources.workers_per_trial"], c["resources.cpus_per_worker"]) for c in trials} == {(2, 1)}
    # The split's size is the one the spec's comment synthesizes (and `make study` too); an epoch of budget
    # epochs is the whole split cut to a multiple of workers x batch (make_loader).
    text = (ROOT / "jobs/study_proxy.yaml").read_text()
    (synth,) = [line.lstrip("# ").strip() for line in text.splitlines() if "orchestrator data synth" in line]
    assert f"\t$(BIN)/{synth}\n" in (ROOT / "Makefile").read_text()
    samples = int(re.search(r"--train (\d+)", synth).group(1))
    seen, steps = set(), set()
    for t in specs.expand(spec):
        c, train = t.config, t.spec.train
        assert c["train.steps_per_epoch"] is None and c["train.accumulate"] == 1 and not c["train.stages"]
        world, batch = c["resources.workers_per_trial"], c["train.batch_per_gpu"]
        if c["train.budget"] == "epochs":
            seen.add(c["train.epochs"] * world * batch * (samples // world // batch))
        else:
            steps.add(sum(train.budget_steps(world)))
        assert (
            train.warmup_steps < min(train.budget_steps(world) or [samples // world // batch]) * train.epochs
        )
    assert seen == {4 * samples} and steps == {256}


def test_sweep_norms_is_the_full_scale_twin_of_the_proxy():
    full, ghost, proxy = (
        [t.config for t in specs.expand(specs.load(ROOT / "jobs" / n))]
        for n in ("sweep_norms.yaml", "sweep_ghost.yaml", "study_proxy.yaml")
    )
    assert len(full) == 2 * len(STUDY_NORMS) * 4 * 3 * 2 == 432
    assert {c["model.backbone"] for c in full} == {"resnet101", "xception65"}
    assert {tuple(c["train.crop"]) for c in full} == {(513, 513), (720, 720), (1280, 720)}
    assert {c["train.batch_per_gpu"] for c in full} == {1, 2, 4, 8}
    # The proxy runs norms of the full study (Ghost BN's own sweep among them) and its seeds, and more.
    assert {c["norm"] for c in proxy} <= {c["norm"] for c in full + ghost}
    assert {c["train.seed"] for c in full} <= {c["train.seed"] for c in proxy}
    assert {c["train.steps_per_epoch"] for c in full} == {None} and len(
        {c["train.epochs"] for c in full}
    ) == 1


def test_defaults_and_flat_round_trip():
    spec = specs.validate(MINIMAL)
    flat = specs.flatten(spec)
    assert flat["norm"] == "bn" and flat["train.crop"] == [720, 720] and flat["model.output_stride"] is None
    (trial,) = specs.expand(spec)  # the backbone's defaults, filled in per trial
    assert trial.config["model.output_stride"] == 16 and trial.config["model.head"] == "deeplabv3plus"
    assert trial.spec.model.output_stride == 16 and trial.spec == specs.from_flat(trial.config)
    assert trial.key == "base"
    assert spec.experiment == "t"
    assert specs.from_flat(flat) == spec
    assert "grid" not in flat and "data.storage_options" in flat
    assert "data.storage_options" not in specs.public_params(flat)


def test_credentials_written_into_urls_are_masked_in_what_is_logged():
    flat = specs.flatten(
        specs.validate({**MINIMAL, "data": {"train": "s3://AKIA1:s3cr3t@bucket/x", "val": "v"}})
    )
    public = specs.public_params(flat)
    assert public["data.train"] == "s3://***@bucket/x" and "s3cr3t" not in str(public)


def test_a_trial_leaves_its_storage_options_out_of_what_tune_holds_and_takes_them_back():
    options = {"key": "AKIA1", "secret": "s3cr3t", "client_kwargs": {"endpoint_url": "http://s3:9000"}}
    data = {**MINIMAL["data"], "storage_options": options}
    (trial,) = specs.expand(specs.validate({**MINIMAL, "data": data}))
    public = trial.without_secrets()
    assert public.key == trial.key and public.spec.data.storage_options == {}
    assert "s3cr3t" not in str(public.config) + public.spec.model_dump_json()
    back = public.with_storage_options(options)
    assert back.config == trial.config and back.spec == trial.spec


def test_each_problem_is_one_line_naming_field_value_and_allowed(tmp_path):
    doc = {
        **MINIMAL,
        "modle": {},
        "model": {"backbone": "resnet1000"},
        "norm": "gn:x3",
        "train": {"batch_per_gpu": "two", "crop": [16, 16]},
    }
    lines = errors_of(tmp_path, doc)
    assert len(lines) == 5, lines
    text = "\n".join(lines)
    assert "modle: unknown key; allowed: name, data, model, norm, train" in text
    assert (
        f"model.backbone: unknown backbone 'resnet1000'; allowed: {', '.join(BACKBONES)} (got 'resnet1000')"
        in text
    )
    assert f"norm: unknown norm 'gn:x3'; allowed: {norm_grammar()} (got 'gn:x3')" in text
    assert "train.batch_per_gpu:" in text and "(got 'two')" in text
    assert "train.crop: crop [16, 16] is too small" in text


def test_missing_and_nested_unknown_keys(tmp_path):
    lines = errors_of(tmp_path, {"name": "t", "data": {"train": "x", "vall": "y"}})
    assert "data.val: required, missing" in lines
    allowed = "train, val, storage_options, loader_workers, normalize, augment_on"
    assert f"data.vall: unknown key; allowed: {allowed} (got 'y')" in lines


def test_grid_values_are_validated_one_by_one(tmp_path):
    doc = {**MINIMAL, "grid": {"norm": ["bn", "gn:q"], "train.crop": [[64, 64], "big"], "model.depth": [1]}}
    lines = errors_of(tmp_path, doc)
    assert lines[0].startswith("grid.norm[1] -> norm: unknown norm 'gn:q'")
    assert lines[1].startswith("grid.train.crop[1] -> train.crop:")
    assert lines[2].startswith("grid.model.depth: unknown key; allowed: data.train")
    assert len(lines) == 3


@pytest.mark.parametrize("grid", [{}, {"norm": []}])
def test_empty_grid_is_an_error(tmp_path, grid):
    lines = errors_of(tmp_path, {**MINIMAL, "grid": grid})
    assert len(lines) == 1 and lines[0].startswith("grid")


def test_overrides(tmp_path):
    path = write(tmp_path, {**MINIMAL, "grid": {"norm": ["bn", "gn:g8"], "train.batch_per_gpu": [1, 2]}})
    spec = specs.load(path, ["train.epochs=2", "train.crop=[64, 96]", "norm=syncbn"])
    assert spec.train.epochs == 2 and spec.train.crop == (64, 96)
    assert spec.norm == "syncbn" and list(spec.grid) == ["train.batch_per_gpu"]  # the axis is fixed
    assert specs.load(path, ["norm=bn", "train.batch_per_gpu=4"]).grid == {}
    spec = specs.load(path, ["grid.norm=[gn:c16]"])
    assert [t.spec.norm for t in specs.expand(spec)] == ["gn:c16", "gn:c16"]
    assert errors_of(tmp_path, MINIMAL, ["train.epochs"]) == [
        "--set 'train.epochs': expected key=value, e.g. --set train.epochs=2"
    ]
    assert errors_of(tmp_path, MINIMAL, ["train.epochs=0"])[0].startswith(
        "train.epochs: Input should be greater"
    )


def test_json_schema_accepts_the_shipped_specs_and_rejects_bad_ones():
    schema = specs.json_schema()
    for name in (
        "smoke.yaml",
        "sweep_norms.yaml",
        "study_proxy.yaml",
        "sweep_ibn.yaml",
        "sweep_ghost.yaml",
        "enet.yaml",
        "recipes.yaml",
        "progressive.yaml",
    ):
        jsonschema.validate(yaml.safe_load((ROOT / "jobs" / name).read_text()), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**MINIMAL, "grid": {"nrom": ["bn"]}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**MINIMAL, "norm": "gn:g32+ws+ws"}, schema)
    jsonschema.validate({**MINIMAL, "norm": "ign-a:c16+ws"}, schema)
    assert "train.batch_per_gpu" in schema["properties"]["grid"]["propertyNames"]["enum"]


def test_cli_bad_spec_exits_2_before_importing_ray_or_torch(tmp_path):
    path = write(tmp_path, {**MINIMAL, "norm": "batchnorm", "grid": {"train.crop": []}})
    code = (
        "import sys; from orchestrator.cli import main; rc = main(['sweep', sys.argv[1]]);"
        "assert not {'ray', 'torch', 'mlflow'} & set(sys.modules), sorted(sys.modules); sys.exit(rc)"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        f"error: norm: unknown norm 'batchnorm'; allowed: {norm_grammar()} (got 'batchnorm')",
    ]


def test_cli_spec_prints_grid_and_schema(capsys):
    assert main(["spec", str(ROOT / "jobs/smoke.yaml"), "--set", "grid.norm=[syncbn]"]) == 0
    out = capsys.readouterr().out
    assert "smoke: 2 trial(s)" in out and "norm=syncbn,train.batch_per_gpu=2" in out
    assert main(["spec", "--schema"]) == 0
    assert '"propertyNames"' in capsys.readouterr().out


def test_docs_spec_md_is_what_the_schema_writes_and_names_every_field(tmp_path):
    assert main(["spec", "--doc", str(tmp_path / "spec.md")]) == 0
    written = (tmp_path / "spec.md").read_text()
    assert written == (ROOT / "docs/spec.md").read_text(), "stale: run `orchestrator spec --doc docs/spec.md`"
    fields, rest = written.split("\n## Norms\n")
    norms, backbones = rest.split("\n## Backbones\n")
    rows = [line.split(" | ")[0].strip("| `") for line in fields.splitlines() if line.startswith("| `")]
    assert [line for line in norms.splitlines() if line.startswith("| `")] == norm_table()[2:]
    header, _, *records = backbone_table()
    assert [line for line in backbones.splitlines() if line.startswith("| `")] == [header, *records]
    stage_fields = list(specs.StageSpec.model_fields)
    assert sorted(rows) == sorted(["name", "grid", *specs.grid_keys(), *stage_fields])


def test_a_grid_of_backbones_gives_each_its_own_head_and_output_stride():
    spec = specs.validate({**MINIMAL, "grid": {"model.backbone": ["resnet18", "drn_d_22", "enet"]}})
    got = [(t.spec.model.backbone, t.spec.model.head, t.spec.model.output_stride) for t in specs.expand(spec)]
    assert got == [("resnet18", "deeplabv3plus", 16), ("drn_d_22", "deeplabv3plus", 8), ("enet", "enet", 8)]


def test_invalid_combinations_are_named_per_grid_point(tmp_path):
    doc = {**MINIMAL, "model": {"output_stride": 16}, "grid": {"model.backbone": ["resnet18", "drn_d_22"]}}
    assert errors_of(tmp_path, doc) == [
        "grid point model.backbone=drn_d_22: model: unknown output_stride 16 for backbone 'drn_d_22'; "
        "allowed: 8"
    ]
    doc = {
        **MINIMAL,
        "grid": {"model.backbone": ["resnet50", "xception65"], "norm": ["bn", "ibn-a", "ign-a:c16"]},
    }
    lines = errors_of(tmp_path, doc)
    assert [line.split(": model:")[0] for line in lines] == [
        "grid point model.backbone=xception65,norm=ibn-a",
        "grid point model.backbone=xception65,norm=ign-a:c16",
    ]
    assert "backbone 'xception65' has none" in lines[0]
    lines = errors_of(tmp_path, {**MINIMAL, "model": {"backbone": "resnet18", "head": "enet"}})
    assert lines == ["model: head 'enet' belongs to backbone 'enet'; it does not fit backbone 'resnet18'"]


def test_many_invalid_points_are_counted_after_ten_lines(tmp_path):
    lrs = [0.1 * i for i in range(1, 13)]
    doc = {**MINIMAL, "model": {"backbone": "enet"}, "grid": {"norm": ["ibn-a"], "train.lr": lrs}}
    lines = errors_of(tmp_path, doc)
    assert len(lines) == 11 and lines[-1] == "... and 2 more invalid grid points"


def test_pretrained_template_names_each_backbone():
    spec = specs.validate(
        {**MINIMAL, "model": {"backbone": "xception65", "pretrained": "s3://w/{backbone}.pth"}}
    )
    assert spec.model.pretrained_uri == "s3://w/xception65.pth"


def test_multi_grid_reaches_the_model_and_only_on_resnets(tmp_path):
    from orchestrator.checkpoints import model_for

    spec = specs.validate({**MINIMAL, "model": {"backbone": "resnet50", "multi_grid": [1, 2, 4]}})
    model = model_for(spec)
    assert [b.conv2.dilation[0] for b in model.backbone.layer4] == [2, 4, 8]  # OS16: dilation 2 x rates
    lines = errors_of(tmp_path, {**MINIMAL, "model": {"backbone": "xception65", "multi_grid": [1, 2, 4]}})
    assert lines == [
        "model: multi_grid is defined for ResNet backbones (resnet18, resnet50, resnet101, resnet152, "
        "resnet50d, resnet101d), not 'xception65'"
    ]
    lines = errors_of(tmp_path, {**MINIMAL, "model": {"backbone": "resnet18", "multi_grid": [1, 2, 4]}})
    assert lines == [
        "model: multi_grid needs 2 positive unit rates for 'resnet18' (one per block of its last stage), "
        "got [1, 2, 4]"
    ]


def test_trial_keys_of_stages_are_compact_and_quote_free():
    spec = specs.load(ROOT / "jobs/progressive.yaml")
    keys = [t.key for t in specs.expand(spec)]
    assert (
        keys[2]
        == "train.stages=100:384x384:16:0.04|100:512x512:8:0.02|100:768x768:4:0.01,train.mixup_alpha=0.0"
    )
    assert not any("'" in k or " " in k for k in keys)


def test_a_trial_shows_its_key_and_carries_its_validated_spec():
    spec = specs.validate({**MINIMAL, "grid": {"norm": ["bn", "gn:g8"]}})
    trials = specs.expand(spec)
    assert [repr(t) for t in trials] == ["Trial('norm=bn')", "Trial('norm=gn:g8')"]  # what Tune prints
    assert [t.spec.norm for t in trials] == ["bn", "gn:g8"] and trials[1].spec.grid == {}
    assert [t.config["norm"] for t in trials] == ["bn", "gn:g8"]
    assert [t.with_batch(4).name for t in trials] == ["bn", "gn:g8"]  # a chosen batch keeps its name


def _text_fields() -> dict[str, bool]:
    """Each dotted key whose JSON Schema takes only strings (and maybe null) -> whether it takes null."""
    schema = specs.json_schema()
    found = {}

    def walk(properties: dict, prefix: str) -> None:
        for key, prop in properties.items():
            if "$ref" in prop:
                walk(schema["$defs"][prop["$ref"].split("/")[-1]]["properties"], f"{prefix}{key}.")
                continue
            kinds = {member.get("type") for member in prop.get("anyOf", [prop])}
            if kinds - {"null"} == {"string"}:
                found[prefix + key] = "null" in kinds

    walk(schema["properties"], "")
    return found


def test_what_a_user_types_into_a_text_field_arrives_as_that_text(tmp_path):
    """YAML 1.1 read `--set train.amp=off` as False ("got False"); every field of the schema that takes text
    gets the words as typed: the value itself, or an error about that text."""
    fields = _text_fields()
    assert {"name", "train.amp", "model.head", "storage", "data.normalize", "norm"} <= set(fields)
    for key, nullable in fields.items():
        for word in ("off", "on", "no", "yes", "null", "true", "2024"):
            try:
                value = specs.flatten(specs.load(write(tmp_path, MINIMAL), [f"{key}={word}"]))[key]
            except specs.SpecError as e:
                (line,) = [line for line in e.lines if line.startswith(f"{key}:")] or e.lines
                assert f"'{word}'" in line, (key, word, e.lines)
                continue
            if word == "null" and nullable:
                assert value is None, (key, value)
            else:  # a local path is made absolute
                assert value == word or value.endswith(f"/{word}"), (key, word, value)


def test_a_spec_file_reads_yaml_1_2_booleans(tmp_path):
    (tmp_path / "spec.yaml").write_text(
        "name: t\ndata: {train: s3://b/t, val: s3://b/v}\n"
        "train: {amp: off}\nresources: {wait_for_nodes: on}\n"
    )
    spec = specs.load(tmp_path / "spec.yaml", ["storage_shared=true", "grid.train.amp=[off, bf16]"])
    assert spec.train.amp == "off" and spec.resources.wait_for_nodes is True and spec.storage_shared is True
    assert [t.spec.train.amp for t in specs.expand(spec)] == ["off", "bf16"]


@pytest.mark.parametrize("bad", [-1, "half", 1.5, True])
def test_gpus_per_worker_is_a_fraction_up_to_one_whole_gpus_or_auto(tmp_path, bad):
    assert errors_of(tmp_path, {**MINIMAL, "resources": {"gpus_per_worker": bad}}) == [
        "resources.gpus_per_worker: allowed are 0 (the CPU), a fraction of a GPU up to 1, whole GPUs, and "
        f"auto (got {bad!r})"
    ]
    for good in (0, 0.25, 1, 2, "auto"):
        resources = {"gpus_per_worker": good, "workers_per_trial": 1}
        assert (
            specs.load(write(tmp_path, {**MINIMAL, "resources": resources})).resources.gpus_per_worker == good
        )
    # Two ranks of one trial on one GPU is what NCCL refuses: a fraction is for trials of one worker.
    (line,) = errors_of(tmp_path, {**MINIMAL, "resources": {"gpus_per_worker": 0.5, "workers_per_trial": 2}})
    assert line.startswith("resources: resources.gpus_per_worker 0.5 with workers_per_trial 2: Ray may put")
    resources = {"gpus_per_worker": 0.5, "workers_per_trial": 2, "placement": "strict_spread"}
    assert specs.load(write(tmp_path, {**MINIMAL, "resources": resources})).resources.gpus_per_worker == 0.5


@pytest.mark.parametrize("bad", [0, "two", 2.5, True])
def test_a_batch_per_gpu_is_a_whole_number_or_auto(tmp_path, bad):
    assert errors_of(tmp_path, {**MINIMAL, "train": {"batch_per_gpu": bad}}) == [
        f"train.batch_per_gpu: allowed are whole numbers >= 1 and auto (got {bad!r})"
    ]
    assert (
        specs.load(write(tmp_path, {**MINIMAL, "train": {"batch_per_gpu": "auto"}})).train.batch_per_gpu
        == "auto"
    )
    stages = [{"epochs": 1, "crop": [64, 64], "batch_per_gpu": 4, "lr": 0.1}]
    (line,) = errors_of(
        tmp_path, {**MINIMAL, "train": {"batch_per_gpu": "auto", "epochs": 1, "stages": stages}}
    )
    assert line.startswith("train: train.batch_per_gpu: auto does not go with train.stages")
    schema = specs.json_schema()
    jsonschema.validate({**MINIMAL, "train": {"batch_per_gpu": "auto"}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**MINIMAL, "train": {"batch_per_gpu": 0}}, schema)


EMPTY = "empty; give a path or a URL (or null where the field may be unset)"


@pytest.mark.parametrize(
    ("override", "line"),
    [
        ("train.lr=1e309", "train.lr: Input should be a finite number (got inf)"),
        ("train.lr=.nan", "train.lr: Input should be a finite number (got nan)"),
        ("train.scale=[0.5, .inf]", "train.scale.1: Input should be a finite number (got inf)"),
        ("train.epochs=true", "train.epochs: Input should be a valid integer (got True)"),
        ("train.epochs=2.0", "train.epochs: Input should be a valid integer (got 2.0)"),
        ("train.crop=[true, 64]", "train.crop.0: Input should be a valid integer (got True)"),
        ("train.lr=false", "train.lr: Input should be a valid number (got False)"),
        ("resources.gpus_per_worker=true",
         "resources.gpus_per_worker: allowed are 0 (the CPU), a fraction of a GPU up to 1, whole GPUs, and "
         "auto (got True)"),
        ("data.train=''", f"data.train: {EMPTY} (got '')"),
        ("model.pretrained=' '", f"model.pretrained: {EMPTY} (got ' ')"),
        ("data.val=", "--set data.val=: no value; write null to unset a field"),
    ],
)  # fmt: skip
def test_values_that_mean_nothing_are_refused(tmp_path, override, line):
    assert errors_of(tmp_path, MINIMAL, [override]) == [line]


def test_a_warmup_longer_than_the_run_is_refused_where_the_spec_gives_its_steps(tmp_path):
    sets = ["train.epochs=2", "train.steps_per_epoch=3", "train.warmup_steps=6"]
    assert errors_of(tmp_path, MINIMAL, sets) == [
        "train: train.warmup_steps=6 does not fit a run of 2 epochs x 3 steps: lower it below 6"
    ]
    assert specs.load(write(tmp_path, MINIMAL), [*sets[:2], "train.warmup_steps=5"]).train.warmup_steps == 5
    assert specs.load(write(tmp_path, MINIMAL), ["train.warmup_steps=500"]).train.steps_per_epoch is None


def test_numbers_stay_numbers_where_they_are_meant(tmp_path):
    spec = specs.load(write(tmp_path, MINIMAL), ["train.lr=1e-3", "train.blur_sigma=2", "train.seed=017"])
    assert (spec.train.lr, spec.train.blur_sigma, spec.train.seed) == (0.001, 2.0, 17)


def test_a_spec_file_that_gives_a_key_twice_is_refused(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("name: t\ndata: {train: a, val: b}\ntrain:\n  lr: 0.1\n  epochs: 2\n  lr: 0.2\n")
    with pytest.raises(specs.SpecError) as e:
        specs.load(path)
    assert e.value.lines == [
        f"{path}: not valid YAML: line 6, column 3: key 'lr' given twice (first on line 4); YAML would keep "
        "the last silently"
    ]


def test_a_grid_axis_over_credentials_is_refused_without_showing_them(tmp_path):
    grid = {"data.storage_options": [{"key": "AKIA1", "secret": "s3cr3t"}, {}], "norm": ["bn"]}
    lines = errors_of(tmp_path, {**MINIMAL, "grid": grid})
    assert lines == [
        "grid.data.storage_options: credentials are no grid axis (a trial's key shows in run names, the "
        "console and Tune's files); set data.storage_options once, outside the grid"
    ]
    lines = errors_of(tmp_path, MINIMAL, ["grid.data.storage_options.secret=[s3cr3t]"])
    assert len(lines) == 1 and "s3cr3t" not in lines[0]
    lines = errors_of(tmp_path, MINIMAL, ["data.storage_options=s3cr3t"])  # a map expected: not shown
    assert lines == ["data.storage_options: Input should be a valid dictionary (got '***')"]


def test_a_grid_of_passwords_in_urls_keeps_them_out_of_its_keys(tmp_path):
    grid = {"model.pretrained": ["s3://AK:s3cr3t@b/r.pth", "s3://b/r.pth"]}
    keys = [t.key for t in specs.expand(specs.load(write(tmp_path, {**MINIMAL, "grid": grid})))]
    assert keys == ["model.pretrained=s3://***@b/r.pth", "model.pretrained=s3://b/r.pth"]


def test_the_grid_size_is_refused_from_its_axes_before_anything_is_expanded(tmp_path, monkeypatch):
    grid = {"train.seed": list(range(1000)), "train.lr": [0.01 * (i + 1) for i in range(1000)]}
    lines = errors_of(tmp_path, {**MINIMAL, "grid": grid})
    assert lines == [
        "grid: 1,000 train.seed x 1,000 train.lr make 1,000,000 trials, more than 10,000 "
        "(ORCHESTRATOR_MAX_TRIALS raises the limit)"
    ]
    many = {f"train.{k}": [1, 2] for k in ("seed", "epochs", "accumulate", "warmup_steps")}
    many |= {"train.lr": [0.1, 0.2], "train.momentum": [0.5, 0.9]} | {
        "norm": ["bn", "gn:g8"] * 30, "train.crop": [[64, 64]] * 40, "model.backbone": ["resnet18"] * 50
    }  # fmt: skip
    assert errors_of(tmp_path, {**MINIMAL, "grid": many})[0].endswith(
        "make 7,680,000 trials, more than 10,000 (ORCHESTRATOR_MAX_TRIALS raises the limit)"
    )
    start = time.monotonic()  # a long axis is refused before its values are validated (~0.4 ms each)
    with pytest.raises(specs.SpecError, match="^grid: 200,000 train.seed make 200,000 trials"):
        specs.validate({**MINIMAL, "grid": {"train.seed": list(range(200_000))}})
    assert time.monotonic() - start < 1
    monkeypatch.setenv("ORCHESTRATOR_MAX_TRIALS", "4")
    small = {"norm": ["bn", "gn:g8"], "train.seed": [0, 1, 2]}
    assert errors_of(tmp_path, {**MINIMAL, "grid": small})[0].startswith("grid: 2 norm x 3 train.seed make 6")
    monkeypatch.setenv("ORCHESTRATOR_MAX_TRIALS", "6")
    assert len(specs.expand(specs.load(write(tmp_path, {**MINIMAL, "grid": small})))) == 6
    monkeypatch.setenv("ORCHESTRATOR_MAX_TRIALS", "lots")
    assert errors_of(tmp_path, MINIMAL) == ["ORCHESTRATOR_MAX_TRIALS='lots': expected a whole number >= 1"]


def test_a_budget_is_epochs_steps_or_images_and_refuses_what_it_cannot_hold(tmp_path):
    def refused(*sets: str) -> list[str]:
        return errors_of(tmp_path, MINIMAL, ["train.epochs=4", *sets])

    assert refused("train.budget=steps:0") == [
        "train.budget: unknown budget; allowed: epochs, steps:N (optimizer steps) or images:N (training "
        "images seen, over all workers) (got 'steps:0')"
    ]
    assert refused("train.budget=steps:3") == [
        "train: train.budget steps:3 is fewer steps than train.epochs 4 (one per epoch at least): raise it "
        "to 4 or more"
    ]
    # 2 workers x batch 8 = 16 images a step, 100 is no whole number of them; the nearest that is: 96.
    assert refused("train.budget=images:100", "train.batch_per_gpu=8") == [
        "train.budget images:100: a step trains 16 images (train.accumulate 1 x batch_per_gpu 8 x 2 "
        "workers), and the budget must be whole steps, one per epoch at least: e.g. images:96"
    ]
    assert refused("train.budget=images:64", "train.batch_per_gpu=auto")[0].startswith(
        "train.budget images:64 needs a fixed train.batch_per_gpu"
    )
    assert refused("train.budget=steps:8", "train.steps_per_epoch=2")[0].startswith(
        "train: train.steps_per_epoch caps an epoch of budget epochs; train.budget steps:8 sets the steps"
    )
    assert refused("train.budget=steps:8", "train.warmup_steps=8") == [
        "train.warmup_steps=8 does not fit train.budget steps:8 (8 steps): lower it below 8"
    ]
    stages = "train.stages=[{epochs: 4, crop: [64, 64], batch_per_gpu: 2, lr: 0.1}]"
    assert "does not go with train.stages" in refused("train.budget=steps:8", stages)[0]
    # A grid over the batch holds one images budget only where every batch makes whole steps of it.
    grid = ["grid.train.batch_per_gpu=[1, 2, 8]", "train.budget=images:96", "train.epochs=4"]
    assert specs.load(write(tmp_path, MINIMAL), grid).train.budget == "images:96"
    assert refused("grid.train.batch_per_gpu=[1, 3]", "train.budget=images:100")[0].startswith(
        "grid point train.batch_per_gpu=3: train.budget images:100: a step trains 6 images"
    )
