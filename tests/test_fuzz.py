"""The command's edges under generated input (hypothesis): spec files, `--set` values and the argv of every
subcommand, plain and hostile. Whatever comes in, the command ends with exit code 0, 1 or 2, prints no
traceback, keeps stderr and its time bounded, and the sentinel credential given to it shows in no output,
no log, no file it wrote and no MLflow store.

Each command runs for real, in this process, against a real SQLite MLflow store and a small packed split,
up to where its long work would start (a sweep's or a trial's Ray run, a job's upload, a plan's meta passes,
synthesis, a pack's pool): there a stand-in stops it with exit 1, once what it was handed is checked.
FUZZ_EXAMPLES sets the examples per test (default 20, the quick suite's share; e.g. FUZZ_EXAMPLES=2000 for
a long run). Every input URL is a local path: nothing here may reach a network.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from orchestrator import cli, tracking
from orchestrator import spec as specs
from orchestrator.errors import Unavailable

SENTINEL = "S3NT1NEL7q"  # the credential a user hands over
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "20"))
MAX_SECONDS = 30
MAX_STDERR = 50_000
FUZZ = settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)

# ------------------------------------------------------------------------------------------ the workspace


class WorkStarted(Unavailable):
    """The stand-in's stop: the command got as far as its long work (exit 1)."""


@dataclass
class Workspace:
    root: Path  # the store, the packed split, a file that is no checkpoint: shared by every example
    examples: Path  # a folder per example
    runs: dict[str, str]  # "@trial", "@sweep" -> run ids in the store


def _stand_in(name: str):
    def work(*args, **kwargs):
        # What the work is handed may hold the credential (the workers need it); it must be a typed value.
        spec = next((a for a in args if isinstance(a, specs.Spec)), None)
        assert spec is None or isinstance(spec.train.epochs, int)
        raise WorkStarted(f"fuzz: {name} would start here")

    return work


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workspace]:
    from orchestrator.data.shards import pack
    from orchestrator.data.synth import synthesize

    root = tmp_path_factory.mktemp("fuzz")
    synthesize(str(root / "raw"), train=4, val=2, size=(64, 36))
    pack(str(root / "raw"), str(root / "shards"), shard_size=2, workers=1)
    (root / "not-a-checkpoint.pt").write_text("hello")
    uri = f"sqlite:///{root}/mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # the store's artifacts go to root/mlruns
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("ORCHESTRATOR_MLFLOW_TIMEOUT", "5")
        mp.delenv("RAY_ADDRESS", raising=False)
        mp.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # never a real S3, should one be asked
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        exp = tracking.ensure_experiment("fuzz", uri)
        sweep = tracking.start_sweep_run(exp, "fuzz", {"norm": "bn"}, uri)
        trial = tracking.start_trial_run(exp, sweep, "base", {"norm": "bn", "train.crop": "[64, 64]"}, uri)
        tracking.log_metrics(trial, {"val_miou": 0.5}, step=1, uri=uri)
        tracking.end_run(trial, uri)
        tracking.end_run(sweep, uri)
        import orchestrator.data.shards
        import orchestrator.data.synth
        import orchestrator.execution.sweep
        import orchestrator.plan
        import orchestrator.submit

        for module, name in [
            (orchestrator.execution.sweep, "run_sweep"), (orchestrator.execution.sweep, "run_single"),
            (orchestrator.submit, "submit"), (orchestrator.plan, "plan"),
            (orchestrator.data.synth, "synthesize"), (orchestrator.data.shards, "pack"),
        ]:  # fmt: skip
            mp.setattr(module, name, _stand_in(f"{module.__name__}.{name}"))
        yield Workspace(root, tmp_path_factory.mktemp("examples"), {"@trial": trial, "@sweep": sweep})


@dataclass
class Outcome:
    code: int
    out: str
    err: str
    logs: str
    seconds: float


_LOGGERS = ("", "ray", "mlflow")  # those whose handlers a command changes (orchestrator/logs.py)


@contextlib.contextmanager
def _logging_restored() -> Iterator[io.StringIO]:
    """Every record logged meanwhile, as text; the handlers and their levels as they were, after: `sweep`
    routes logs to a file and quiets console handlers, which a command may do once per process."""
    before = {n: [(h, h.level) for h in logging.getLogger(n).handlers] for n in _LOGGERS}
    text = io.StringIO()
    capture = logging.StreamHandler(text)
    logging.getLogger().addHandler(capture)
    try:
        yield text
    finally:
        for name, handlers in before.items():
            logger = logging.getLogger(name)
            for handler in set(logger.handlers) - {h for h, _ in handlers}:
                logger.removeHandler(handler)
                handler.close()
            for handler, level in handlers:
                handler.setLevel(level)


def run(workspace: Workspace, argv: list[str], spec_text: str | None = None) -> Outcome:
    """`orchestrator ARGV` in a fresh folder with placeholders filled in; its outcome, checked against the
    contract."""
    folder = workspace.examples / f"{time.monotonic_ns()}"
    folder.mkdir()
    try:
        return _run(workspace, folder, argv, spec_text)
    finally:
        shutil.rmtree(folder)


def _run(workspace: Workspace, folder: Path, argv: list[str], spec_text: str | None) -> Outcome:
    inputs = {folder / "spec.yaml"}
    if spec_text is not None:
        (folder / "spec.yaml").write_text(spec_text)
    places = {
        "@spec": str(folder / "spec.yaml"), "@dir": str(folder), "@missing": str(folder / "missing"),
        "@shards": str(workspace.root / "shards"), "@bad": str(workspace.root / "not-a-checkpoint.pt"),
        "@out": str(folder / "out"), **workspace.runs,
    }  # fmt: skip
    argv = [_fill(a, places) for a in argv]
    out, err = io.StringIO(), io.StringIO()
    start = time.monotonic()
    with _logging_restored() as logs, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        cwd = os.getcwd()
        os.chdir(folder)
        try:
            code = cli.main(argv)
        finally:
            os.chdir(cwd)
    outcome = Outcome(code, out.getvalue(), err.getvalue(), logs.getvalue(), time.monotonic() - start)
    shown = f"argv: {argv}\nexit {code}\nstderr: {outcome.err[-3000:]}"
    if currently_in_test_context():  # --hypothesis-show-statistics: how far the examples got
        event(f"{' '.join(argv[:2]) if argv[0] == 'data' else argv[0]}: exit {code}")
    assert code in (0, 1, 2), shown
    if not {"-v", "--verbose"} & set(argv):  # -v asks for the traceback
        assert "Traceback" not in outcome.out + outcome.err, shown
    assert len(outcome.err) < MAX_STDERR and outcome.seconds < MAX_SECONDS, shown
    for where, text in (("stdout", outcome.out), ("stderr", outcome.err), ("logs", outcome.logs)):
        assert SENTINEL not in text, f"{where} holds the credential\n{shown}"
    for path in [*folder.rglob("*"), *workspace.root.rglob("*")]:  # what it wrote, the store, artifacts
        if path.is_file() and path not in inputs:
            assert SENTINEL.encode() not in path.read_bytes(), f"{path} holds the credential\n{shown}"
    return outcome


def _fill(arg: str, places: dict[str, str]) -> str:
    for key in sorted(places, key=len, reverse=True):
        arg = arg.replace(key, places[key])
    return arg


# ------------------------------------------------------------------------------------------- strategies

_TEXT = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters=":/\\\x00"), max_size=24
)  # no scheme, no path: nothing reaches a network or outside the example's folder
_NUMBERS = st.sampled_from(
    ["0", "-1", "1", "2", "3", "1e309", "nan", "inf", "-inf", "0.5", "1e-3", "99999999999999999999", "0x10",
     "", " ", "two", "1x1", "0x0", "64x36", "-5x5", "1,2", "0.75,1,1.25", "1,,2", "true", "null"]
)  # fmt: skip
_SECRET_SETS = st.sampled_from(
    [f"data.storage_options.key={SENTINEL}", f"data.storage_options={{secret: {SENTINEL}}}",
     f"data={{train: a, val: b, storage_options: {{token: {SENTINEL}}}}}",
     f"data={{train: [a, {{key: {SENTINEL}}}]", f"data.train=s3://AK:{SENTINEL}@b/x",
     f"grid.data.storage_options=[{{key: {SENTINEL}}}, {{}}]", f"model.pretrained=s3://u:{SENTINEL}@h/w.pth",
     f"data.storage_options.client_kwargs.password={SENTINEL}"]
)  # fmt: skip
_KEYS = st.sampled_from(specs.grid_keys() + ["name", "grid", "data", "bogus", "train.bogus", "train"])
_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**20), 10**20), st.floats(), _TEXT,
    st.sampled_from(["off", "bf16", "bn", "gn:g8", "resnet18", "@dir", "", "auto", "x" * 3000]),
)  # fmt: skip
_VALUES = st.recursive(
    _SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_KEYS | _TEXT, inner, max_size=3),
    max_leaves=8,
)  # fmt: skip


def _flow(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 20).strip().removesuffix("...").strip()


_SETS = st.one_of(
    _SECRET_SETS,
    st.builds(lambda k, v: f"{k}={_flow(v)}", _KEYS | st.builds(lambda k: f"grid.{k}", _KEYS), _VALUES),
    st.builds(lambda k, v: f"{k}={v}", _KEYS, _NUMBERS | _TEXT),
    _TEXT,
)

BASE = {
    "name": "fuzz",
    "data": {"train": "@dir/train", "val": "@dir/val", "storage_options": {"key": SENTINEL}},
    "model": {"backbone": "resnet18"},
    "norm": "bn",
    "train": {"epochs": 1, "crop": [64, 64], "batch_per_gpu": 1},
    "resources": {"workers_per_trial": 1},
    "grid": {"norm": ["bn", "gn:g8"]},
}


def _laughs(levels: int) -> str:
    lines = ['l0: &l0 "lol"'] + [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


_HOSTILE = {
    "plain": lambda text: text,
    "twice": lambda text: text + "name: again\n",
    "laughs": lambda text: _laughs(9) + text,
    "deep": lambda text: text + "extra: " + "[" * 400 + "]" * 400 + "\n",
    "broken": lambda text: text.replace(":", "", 1) + "  - : [\n",
    "tabs": lambda text: text.replace("  ", "\t"),
    "huge": lambda text: text + "# " + "x" * (1 << 20) + "\n",
    "list": lambda text: "- " + text.replace("\n", "\n  "),
    "empty": lambda text: "",
}


@st.composite
def spec_texts(draw) -> str:
    doc = yaml.safe_load(yaml.safe_dump(BASE))
    if draw(st.booleans()):
        doc["data"]["train"] = f"s3://AK:{SENTINEL}@bucket/train"
    changes = st.just([]) | st.lists(st.tuples(_KEYS | _TEXT, _VALUES), max_size=3)  # a third: none
    for key, value in draw(changes):
        specs._set_path(doc, key.split(".") if key else ["x"], value)
    text = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)
    return _HOSTILE[draw(st.sampled_from(["plain"] * len(_HOSTILE) + sorted(_HOSTILE)))](text)


def _set_args(values: list[str], inline: list[bool]) -> list[str]:
    return [a for v, i in zip(values, inline, strict=False) for a in ((f"--set={v}",) if i else ("--set", v))]


# -------------------------------------------------------------------------------- argv of every command


def _commands() -> dict[str, object]:
    """{"sweep": its parser, ..., "data pack": ...}: every subcommand, from the parser itself."""
    found = {}

    def walk(parser, prefix: list[str]) -> None:
        subs = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
        if not subs:
            found[" ".join(prefix)] = parser
        for action in subs:
            for name, child in action.choices.items():
                walk(child, [*prefix, name])

    walk(cli._parser(), [])
    return found


COMMANDS = _commands()
_PATHS = st.sampled_from(["@spec", "@dir", "@missing", "@shards", "@shards/val", "@bad", "@out", "@out/x"])
_RUNS = st.sampled_from(["@trial", "@sweep", "0" * 32, "f" * 32, "abc", ""])


def _positional(dest: str) -> st.SearchStrategy[str]:
    if dest == "spec":
        return st.just("@spec") | _PATHS
    if dest in ("model", "run_id"):
        return _RUNS | _PATHS
    return _PATHS | _TEXT


@st.composite
def argvs(draw, command: str) -> list[str]:
    parser = COMMANDS[command]
    argv = command.split()
    for action in parser._actions:
        if not action.option_strings and action.dest != "help":
            argv.append(draw(_positional(action.dest)))
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    for action in draw(st.lists(st.sampled_from(options), max_size=5, unique_by=id)) if options else []:
        flag = draw(st.sampled_from(action.option_strings))
        if action.nargs == 0:
            argv.append(flag)
        elif action.dest == "overrides":
            argv += ["--set", draw(_SETS)]
        elif action.choices:
            argv += [flag, draw(st.sampled_from(list(action.choices)) | _TEXT)]  # valid half the time
        else:
            argv += [flag, draw(_NUMBERS | _TEXT | _PATHS | _RUNS)]  # credentials come by spec and --set
    extra = draw(st.sampled_from(["", "abbreviated", "unknown", "secret"]))
    if extra == "abbreviated" and options:
        argv += [
            draw(st.sampled_from(options)).option_strings[-1][:4],
            f"data.storage_options.key={SENTINEL}",
        ]
    elif extra == "unknown":
        argv += ["--nope", draw(_TEXT)]
    elif extra == "secret":
        argv.append(draw(_SECRET_SETS))
    return argv


# ------------------------------------------------------------------------------------------------ tests


@FUZZ
@given(text=spec_texts(), sets=st.lists(_SETS, max_size=3), inline=st.lists(st.booleans(), max_size=3),
       command=st.sampled_from(["spec", "sweep", "train", "plan", "submit"]))  # fmt: skip
def test_any_spec_and_set_ends_in_the_contract(workspace, text, sets, inline, command):
    argv = [command, "@spec", *_set_args(sets, inline)]
    if command == "plan":
        argv += ["--gpu", "a10g"]
    run(workspace, argv, spec_text=text)


@FUZZ
@given(command=st.sampled_from(sorted(COMMANDS)), data=st.data())
def test_any_argv_of_any_subcommand_ends_in_the_contract(workspace, command, data):
    argv = data.draw(argvs(command))
    if command == "submit" and data.draw(st.booleans()):
        job = data.draw(st.sampled_from(["ensemble", "evaluate", "predict"]))
        argv = ["submit", "--", *data.draw(argvs(job))]
    run(workspace, argv, spec_text=yaml.safe_dump(BASE))


def test_the_harness_sees_a_leak_a_traceback_and_a_bug(workspace, monkeypatch):
    """The checks can fail: a credential printed, a traceback, and exit 70 are each caught."""
    with pytest.raises(AssertionError, match="stdout holds the credential"):
        monkeypatch.setattr(cli, "_spec", lambda args: print(SENTINEL) or 0)
        run(workspace, ["spec", "@spec"], spec_text="")
    with pytest.raises(AssertionError, match="Traceback"):
        monkeypatch.setattr(cli, "_spec", lambda args: print("Traceback (most recent call last):") or 0)
        run(workspace, ["spec", "@spec"], spec_text="")
    with pytest.raises(AssertionError, match="exit 70"):
        monkeypatch.setattr(cli, "_spec", lambda args: {}["bug"])
        run(workspace, ["spec", "@spec"], spec_text="")
    monkeypatch.undo()
    with pytest.raises(AssertionError, match="holds the credential"):
        run(workspace, ["data", "synth", "@out", "--train", "1"], spec_text="")  # the stand-in: exit 1, clean
        (workspace.root / "leak.txt").write_text(SENTINEL)
        run(workspace, ["spec", "@spec"], spec_text=yaml.safe_dump(BASE))
    (workspace.root / "leak.txt").unlink()


def test_every_subcommand_is_fuzzed():
    assert set(COMMANDS) == {
        "sweep", "train", "submit", "report", "plan", "spec", "data synth", "data pack", "data verify",
        "evaluate", "ensemble", "predict", "evalnorm-calibrate",
    }  # fmt: skip
