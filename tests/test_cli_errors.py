"""The command's error contract (orchestrator/errors.py): a mistake in the input is one line and exit 2,
what the environment cannot give one line and exit 1, a bug one line and exit 70, Ctrl-C 130; a traceback
only with -v."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator import cli
from orchestrator.errors import Unavailable, UsageError
from orchestrator.spec import SpecError

SMOKE = str(Path(__file__).resolve().parents[1] / "jobs" / "smoke.yaml")


def test_a_bad_argument_is_one_line_and_exit_2(capsys):
    assert cli.main(["predict", "RUN"]) == 2
    assert capsys.readouterr().err == (
        "error: orchestrator predict: the following arguments are required: --out, --data (-h: usage)\n"
    )
    assert cli.main(["data", "synth", "d", "--size", "0x9"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: orchestrator data synth: argument --size: expected WIDTHxHEIGHT such as 1280x720, got '0x9' "
        "(-h: usage)"
    ]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["plan", SMOKE, "--price", "-1"], "US dollars per GPU-hour >= 0 such as 1.01"),
        (["plan", SMOKE, "--price", "nan"], "US dollars per GPU-hour >= 0 such as 1.01"),
        (["evaluate", "R", "--scales", "1,inf"], "factors > 0 such as 0.75,1,1.25"),
        (["evaluate", "R", "--gpus-per-worker", "1e999"], "a number of GPUs >= 0 such as 1 or 0.5"),
        (["evalnorm-calibrate", "R", "--lr", "0"], "a learning rate > 0 such as 0.1"),
        (["evalnorm-calibrate", "R", "--steps", "-3"], "a whole number >= 1"),
        (["data", "synth", "d", "--train", "-1"], "a whole number >= 0"),
    ],
)
def test_numbers_on_the_command_line_are_finite_and_in_range(capsys, argv, expected):
    assert cli.main(argv) == 2
    (err,) = capsys.readouterr().err.splitlines()
    value = argv[-1].split(",")[-1]
    assert f"argument {argv[-2]}: expected {expected}, got '{value}' (-h: usage)" in err


def test_flags_are_never_abbreviated_and_what_they_carry_stays_masked(capsys):
    assert cli.main(["spec", SMOKE, "--se", "data.storage_options.key=S3CR3T"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "error: orchestrator: unrecognized arguments: --se data.storage_options.key=*** (-h: usage)\n"
    )


@pytest.mark.parametrize(
    ("error", "code", "lines"),
    [
        (UsageError("--top 9: the experiment has 3 trials"), 2, ["--top 9: the experiment has 3 trials"]),
        (LookupError("no MLflow experiment named 'x'"), 2, ["no MLflow experiment named 'x'"]),
        (SpecError(["a: bad", "b: worse"]), 2, ["a: bad", "b: worse"]),
        (Unavailable("MLflow at http://u:pw@h:5000 did not answer in 30 s\nhint: is it up?"), 1,
         ["MLflow at http://***@h:5000 did not answer in 30 s", "hint: is it up?"]),
        (FileNotFoundError(2, "No such file or directory", "/x"), 1,
         ["FileNotFoundError: [Errno 2] No such file or directory: '/x'"]),
        (KeyError("k"), 70, ["internal error, a bug: KeyError: 'k' (-v prints the traceback)"]),
        (RuntimeError("boom\nmore"), 70,
         ["internal error, a bug: RuntimeError: boom (-v prints the traceback)"]),
    ],
)  # fmt: skip
def test_each_failure_is_its_lines_and_its_exit_code_without_a_traceback(
    monkeypatch, capsys, error, code, lines
):
    def fail(args):
        raise error

    monkeypatch.setattr(cli, "_spec", fail)
    assert cli.main(["spec", SMOKE]) == code
    assert capsys.readouterr().err.splitlines() == [f"error: {line}" for line in lines]


def test_ctrl_c_is_exit_130_in_one_line(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_spec", interrupted)
    assert cli.main(["spec", SMOKE]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"


def test_minus_v_prints_the_traceback(monkeypatch, capsys):
    def bug(args):
        return {}["missing"]

    monkeypatch.setattr(cli, "_spec", bug)
    assert cli.main(["spec", SMOKE, "-v"]) == 70
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):") and "in bug" in err
    assert (
        err.splitlines()[-1] == "error: internal error, a bug: KeyError: 'missing' (-v prints the traceback)"
    )


def test_long_messages_are_cut_and_many_lines_counted(monkeypatch, capsys):
    def fail(args):
        raise UsageError("\n".join([f"problem {i}: " + "x" * 5000 for i in range(100)]))

    monkeypatch.setattr(cli, "_spec", fail)
    assert cli.main(["spec", SMOKE]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == cli.MAX_ERROR_LINES and lines[-1] == "error: ... 71 more lines"
    assert max(map(len, lines)) < cli.MAX_LINE_CHARS + 10 and lines[0].endswith("... (5,011 characters)")


def test_a_submitted_command_is_checked_here_in_one_line(capsys):
    assert cli.main(["submit", "--", "evaluate"]) == 2
    assert capsys.readouterr().err == (
        "error: orchestrator evaluate: the following arguments are required: model (-h: usage)\n"
    )


def test_a_credential_is_never_put_on_a_jobs_command_line(capsys):
    for form in (
        "data.storage_options.key=S3CR3T",
        "data={train: a, val: b, storage_options: {key: S3CR3T}}",
    ):
        assert cli.main(["submit", SMOKE, "--set", form]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: submit --set data") and "stored with the job" in err
        assert "S3CR3T" not in err


@pytest.mark.parametrize("command", [["evaluate", "R"], ["ensemble"], ["predict", "R", "--out", "o"]])
def test_a_data_split_that_is_not_there_is_the_inputs_mistake(tmp_path, capsys, command):
    (tmp_path / "file").write_text("x")
    for data, says in (
        ("", "error: orchestrator {}: argument --data: expected a path or URL, got '' (-h: usage)"),
        (str(tmp_path / "missing"), "error: --data '{}': no packed split there (no manifest.json); give a "),
        (str(tmp_path / "file"), "error: --data '{}': no packed split there (no manifest.json); give a "),
    ):
        assert cli.main([*command, "--data", data]) == 2
        assert capsys.readouterr().err.startswith(says.format(data or command[0]))


def test_a_manifest_that_pack_did_not_write_is_refused(tmp_path):
    from orchestrator.data.shards import read_manifest

    for text, says in (("{", "is not one `orchestrator data pack` wrote"), ("[]", "has format 'list'"),
                       ('{"format": "x"}', "has format 'x', expected 'orchestrator-shards/1'")):  # fmt: skip
        (tmp_path / "manifest.json").write_text(text)
        with pytest.raises(UsageError, match=says):
            read_manifest(str(tmp_path))


def test_an_answer_of_the_tracking_store_is_the_environments(monkeypatch, capsys):
    from mlflow.exceptions import MlflowException

    def refused(args):
        raise MlflowException("The filesystem tracking backend is in maintenance mode")

    monkeypatch.setattr(cli, "_spec", refused)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://u:pw@h:5000")
    assert cli.main(["spec", SMOKE]) == 1
    assert capsys.readouterr().err == (
        "error: MLflow at http://***@h:5000: The filesystem tracking backend is in maintenance mode\n"
    )
