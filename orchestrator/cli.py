"""The `orchestrator` command: parse arguments, call one function per subcommand.

Heavy imports (torch, Ray, MLflow) happen inside the subcommands, so `orchestrator spec` and a bad
spec answer in well under a second.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shlex
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from orchestrator import errors
from orchestrator.data.layout import LABEL_FORMATS
from orchestrator.errors import Unavailable, UsageError
from orchestrator.gpus import GPUS
from orchestrator.masking import redact, redact_arg, redact_argv
from orchestrator.spec import SpecError


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; the exit code follows orchestrator/errors.py's contract (0, 1, 2, 70, 130)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    job = []
    if argv[:1] == ["submit"] and "--" in argv:  # `submit [options] -- ensemble ...`: that command as the job
        argv, job = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    try:
        args = _parser().parse_args(argv)
    except BadArguments as e:
        return _refuse(e, [*argv, *job])
    except SystemExit as e:  # --help
        return e.code
    args.job = job
    # Tagged on the runs it makes (a report prints it), credentials in --set masked.
    args.command = shlex.join(["orchestrator", *redact_argv(argv)])
    # Checkpoint downloads take a second; MLflow's bars for them would bury the one-line errors below.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return args.func(args)
    except BadArguments as e:  # submit's check of the command after --
        return _refuse(e, [*argv, *job])
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return errors.EXIT_INTERRUPTED
    except Exception as e:
        code, lines = _explain(e)
        if args.verbose:
            traceback.print_exc()
        for line in lines:
            print(f"error: {_masked(line, [*argv, *job])}", file=sys.stderr)
        return code


MAX_ERROR_LINES = 30
MAX_LINE_CHARS = (
    1000  # values in a line are cut to errors.MAX_VALUE_CHARS where it is made; this bounds the rest
)


def _explain(e: Exception) -> tuple[int, list[str]]:
    """(exit code, lines) of a failure, by orchestrator/errors.py's contract."""
    if isinstance(e, SpecError):
        return errors.EXIT_USAGE, e.lines
    if isinstance(e, (KeyError, IndexError)):  # lookups of ours fail as LookupError; these are bugs
        code = errors.EXIT_INTERNAL
    elif isinstance(e, (UsageError, LookupError)):  # not like this, or nothing to act on
        code = errors.EXIT_USAGE
    elif isinstance(e, (Unavailable, OSError, *_mlflow_errors())):  # the environment: a service, a file
        code = errors.EXIT_UNAVAILABLE
    else:
        code = errors.EXIT_INTERNAL
    ours = isinstance(e, (UsageError, Unavailable, LookupError)) and code != errors.EXIT_INTERNAL
    text = str(e.args[0]) if ours and e.args else f"{type(e).__name__}: {e}"
    if isinstance(e, _mlflow_errors()):  # what the store answered (tracking.py has the network's)
        text = f"MLflow at {redact(os.environ.get('MLFLOW_TRACKING_URI', 'the local store'))}: {e}"
    lines = [errors.cut(redact(line), MAX_LINE_CHARS) for line in text.splitlines() or [text]]
    if not ours:
        lines = lines[:1]
    if code == errors.EXIT_INTERNAL:
        lines[0] = f"internal error, a bug: {lines[0]} (-v prints the traceback)"
    if len(lines) > MAX_ERROR_LINES:
        lines[MAX_ERROR_LINES - 1 :] = [f"... {len(lines) - MAX_ERROR_LINES + 1} more lines"]
    return code, lines


def _mlflow_errors() -> tuple[type[Exception], ...]:
    """MLflow's exception class, where a command loaded MLflow: an answer of the tracking store (a store
    that refuses its URI, a server error) is the environment's."""
    module = sys.modules.get("mlflow.exceptions")
    return (module.MlflowException,) if module else ()


class BadArguments(Exception):
    """What argparse says of arguments it cannot take."""


class _Parser(argparse.ArgumentParser):
    """A parser whose flags are never abbreviated (`--se` is no `--set`, and would dodge its masking) and
    whose complaints main prints (_refuse), instead of a usage text and an exit."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise BadArguments(f"{self.prog}: {message} (-h: usage)")


def _refuse(e: BadArguments, argv: list[str]) -> int:
    """argparse's complaint in one line, exit 2."""
    print(f"error: {errors.cut(_masked(str(e), argv), MAX_LINE_CHARS)}", file=sys.stderr)
    return errors.EXIT_USAGE


def _masked(line: str, argv: list[str]) -> str:
    """An error line with every argument that holds a credential (masking.redact_arg) masked where the
    line quotes it, as given or as its repr."""
    for arg in argv:
        masked = redact_arg(arg)
        if masked != arg:
            line = line.replace(repr(arg)[1:-1], masked).replace(arg, masked)
    return line


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="orchestrator", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(required=True, metavar="COMMAND")
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="store_true", help="print the traceback of a failure")

    def resume_arg(cmd: argparse.ArgumentParser) -> None:
        cmd.add_argument(
            "--resume",
            action="store_true",
            help="continue the spec's sweep after its driver died: keep finished trials, resume the others "
            "from their last checkpoints, in the same MLflow runs",
        )

    def fit_args(cmd: argparse.ArgumentParser, skip: bool = True) -> None:
        cmd.add_argument(
            "--gpu",
            help=f"the GPUs' kind ({', '.join(GPUS)}): grid points that would not fit its memory are refused "
            "before any starts, batch_per_gpu auto is chosen for it (default: the joined cluster's kind)",
        )
        if skip:
            cmd.add_argument(
                "--skip-unfit",
                action="store_true",
                help="run the grid points that fit the GPUs, list the others",
            )

    def spec_args(cmd: argparse.ArgumentParser, optional: bool = False) -> None:
        if optional:
            cmd.add_argument("spec", nargs="?", help="sweep spec YAML (see jobs/), or -- COMMAND ARGS...")
        else:
            cmd.add_argument("spec", help="sweep spec YAML (see jobs/)")
        cmd.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a spec field by dotted key, value in YAML (repeatable): --set train.epochs=2",
        )

    cmd = sub.add_parser("sweep", help="run the spec's grid as Ray Tune trials of Ray Train workers")
    spec_args(cmd)
    resume_arg(cmd)
    fit_args(cmd)
    cmd.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="print Ray's, Tune's and the workers' logs here, with Tune's status tables (default: to a log "
        "file beside the run, the console showing a row per trial), and the traceback of a failure",
    )
    cmd.set_defaults(func=_sweep)

    cmd = sub.add_parser(
        "train", parents=[verbose], help="run one trial (the spec without its grid), same code path, no Tune"
    )
    spec_args(cmd)
    fit_args(cmd, skip=False)
    cmd.set_defaults(func=_train)

    cmd = sub.add_parser(
        "submit",
        parents=[verbose],
        help="`orchestrator sweep SPEC` (or, after --, an ensemble, evaluate or predict command) as a Ray "
        "job on a cluster: stream its logs, exit as it did",
    )
    spec_args(cmd, optional=True)
    cmd.add_argument(
        "--address", help="Ray job server URL (default: RAY_API_SERVER_ADDRESS, RAY_ADDRESS, the local head)"
    )
    cmd.add_argument("--working-dir", default=".", help="folder uploaded as the job's working directory")
    cmd.add_argument(
        "--env",
        dest="extra_env",
        action="append",
        default=[],
        metavar="NAME",
        help="also forward this environment variable to the job, e.g. a credential (repeatable)",
    )
    resume_arg(cmd)
    fit_args(cmd)
    cmd.set_defaults(func=_submit)

    cmd = sub.add_parser(
        "report",
        parents=[verbose],
        help="the study's figure (mIoU vs batch per GPU, a line per norm, seeds averaged, facets backbone x "
        "crop x protocol) and document (wall time, ensemble gain, commands, tables, which differences are "
        "findings), logged to the sweep's MLflow run",
    )
    cmd.add_argument("--experiment", help="MLflow experiment (default: that of the latest sweep)")
    cmd.add_argument("--sweep-run", help="sweep parent run id (default: the experiment's latest sweep)")
    cmd.add_argument(
        "--baseline",
        action="append",
        metavar="NORM",
        help="compare every norm with this one at each batch per GPU, with an interval (repeatable; "
        "default: bn)",
    )
    where = cmd.add_mutually_exclusive_group()
    where.add_argument("--out", default="report", help="folder for report.png and report.md")
    where.add_argument(
        "--doc", help="write the document to this .md path instead, its figure beside it (same name, .png)"
    )
    cmd.set_defaults(func=_report)

    cmd = sub.add_parser(
        "plan",
        parents=[verbose],
        help="each grid point's GPU memory, FLOPs and GPU-hours, and the grid's cost, before it runs",
    )
    spec_args(cmd)
    cmd.add_argument("--gpu", help=f"the GPUs' kind: {', '.join(GPUS)} (default: the kind of the cluster "
                     "at RAY_ADDRESS)")  # fmt: skip
    cmd.add_argument("--gpus", type=_positive, help="GPUs of the cluster (default: what the spec's "
                     "max_concurrent_trials x workers_per_trial x gpus_per_worker use)")  # fmt: skip
    cmd.add_argument("--price", type=_price, help="USD per GPU-hour (default: the built-in on-demand price)")
    cmd.add_argument("--train-images", type=_positive, help="training images per epoch (default: the "
                     "spec's split's manifest, else BDD100K's 70,000)")  # fmt: skip
    cmd.add_argument("--json", action="store_true", help="print the plan as JSON")
    cmd.add_argument(
        "--actual",
        metavar="SWEEP_RUN_ID",
        help="set each point beside what its trial spent in that sweep run (GPU-hours over all its attempts)",
    )
    cmd.set_defaults(func=_plan)

    cmd = sub.add_parser(
        "spec",
        parents=[verbose],
        help="validate a spec and print its expanded grid, or print the JSON Schema",
    )
    cmd.add_argument("spec", nargs="?", help="sweep spec YAML")
    cmd.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    cmd.add_argument("--schema", action="store_true", help="print the spec's JSON Schema")
    cmd.add_argument("--doc", metavar="PATH", help="write the spec's reference (docs/spec.md) to PATH")
    cmd.set_defaults(func=_spec)

    data = sub.add_parser("data", help="synthetic data, shard packing and checking").add_subparsers(
        required=True
    )
    cmd = data.add_parser(
        "synth",
        parents=[verbose],
        help="write procedural road scenes in the BDD100K layout to any fsspec URL",
    )
    cmd.add_argument("dst")
    cmd.add_argument("--train", type=_count, default=64)
    cmd.add_argument("--val", type=_count, default=16)
    cmd.add_argument("--size", type=_size, default=(1280, 720), help="WIDTHxHEIGHT (default 1280x720)")
    cmd.add_argument("--seed", type=_count, default=0)
    cmd.set_defaults(func=_synth)
    cmd = data.add_parser(
        "pack", parents=[verbose], help="pack a BDD100K layout into tar shards + manifest at any fsspec URL"
    )
    cmd.add_argument("src")
    cmd.add_argument("dst")
    cmd.add_argument("--shard-size", type=_positive, default=64, help="samples per shard")
    cmd.add_argument("--workers", type=_positive, help="processes packing shards (default: one per CPU)")
    cmd.add_argument(
        "--labels",
        choices=LABEL_FORMATS,
        help="the label format to read where a split has several (default: the first of these it has)",
    )
    cmd.add_argument(
        "--splits",
        type=_names,
        help="comma-separated splits to pack (default: train,val); a named split without labels, such as "
        "test, is packed from its images alone, marked unlabeled",
    )
    cmd.add_argument(
        "--skip-bad",
        action="store_true",
        help="pack the good samples and list the others with their reasons in the manifest (default: refuse)",
    )
    cmd.set_defaults(func=_pack)
    cmd = data.add_parser(
        "verify",
        parents=[verbose],
        help="re-read packed shards: checksums, sizes, sample counts, pairs that decode and match",
    )
    cmd.add_argument("url", help="a packed split folder, or the packed root holding one per split")
    cmd.set_defaults(func=_verify)

    def inference_args(cmd: argparse.ArgumentParser, data: str | None = None) -> None:
        if data is None:
            cmd.add_argument(
                "--data", type=_text, help="packed split URL to score (default: the (first) model's data.val)"
            )
        else:
            cmd.add_argument("--data", type=_text, required=True, help=data)
        cmd.add_argument("--mode", choices=("whole", "slide", "multiscale"), default="whole")
        cmd.add_argument(
            "--crop", type=_size, help="sliding window WIDTHxHEIGHT (slide; multiscale by windows)"
        )
        cmd.add_argument("--stride", type=_size, help="step between windows XxY, at most the crop")
        cmd.add_argument(
            "--scales", type=_scales, default=(1.0,), help="multiscale factors, e.g. 0.75,1,1.25"
        )
        cmd.add_argument("--flip", action="store_true", help="also predict the mirrored image and average")
        cmd.add_argument("--batch-size", type=_positive, default=2)
        cmd.add_argument(
            "--amp", choices=("off", "bf16"), default="off", help="bfloat16 autocast (default off)"
        )
        cmd.add_argument(
            "--device", choices=("auto", "cuda", "cpu"), default="auto", help="auto: a GPU where there is one"
        )
        cmd.add_argument(
            "--workers", type=_positive, help="split the images over N Ray workers (default: this process)"
        )
        cmd.add_argument(
            "--gpus-per-worker",
            type=_fraction,
            help="GPUs each Ray worker holds (default: 1 where Ray has GPUs)",
        )
        cmd.add_argument(
            "--skip-bad",
            action="store_true",
            help="leave out the images that cannot be read and list them (default: fail, naming the shards)",
        )

    cmd = sub.add_parser(
        "evaluate",
        parents=[verbose],
        help="score one model (an MLflow run's best checkpoint, or a checkpoint file/URI)",
    )
    cmd.add_argument("model", help="MLflow run id, or a checkpoint path/URI (model.pt)")
    inference_args(cmd)
    cmd.add_argument("--experiment", help="MLflow experiment of the evaluation run for a checkpoint file "
                     "(default: evaluation); a run's evaluation goes to the run's experiment")  # fmt: skip
    cmd.set_defaults(func=_evaluate)

    cmd = sub.add_parser(
        "ensemble", parents=[verbose], help="ensemble the best trials of an experiment and log it to MLflow"
    )
    cmd.add_argument("--top", type=_positive, default=3)
    cmd.add_argument("--experiment", help="MLflow experiment (default: that of the latest sweep)")
    cmd.add_argument("--metric", default="val_miou", help="metric to rank trials by (higher is better)")
    cmd.add_argument(
        "--filter", help="MLflow filter on the trials, e.g. \"params.`model.backbone` = 'resnet101'\""
    )
    cmd.add_argument(
        "--combine",
        choices=("mean", "weighted", "vote"),
        default="mean",
        help="mean softmax, mean weighted by each member's best metric, or per-pixel vote",
    )
    cmd.add_argument(
        "--register", metavar="NAME", help="registered MLflow model of the best trial and the ensemble "
        "(default: the experiment's name)",
    )  # fmt: skip
    inference_args(cmd)
    cmd.set_defaults(func=_ensemble)

    cmd = sub.add_parser(
        "predict",
        parents=[verbose],
        help="write a trial's or an ensemble's predictions of a split as BDD100K masks or RLE JSON",
    )
    cmd.add_argument("run_id", help="MLflow run id of a trial, or of an ensemble (its members)")
    cmd.add_argument(
        "--out", required=True, help="new or empty folder (path or fsspec URL) the predictions are written to"
    )
    cmd.add_argument(
        "--overwrite",
        action="store_true",
        help="write into an --out that holds files (same names replaced, the others kept and not logged)",
    )
    cmd.add_argument(
        "--format",
        choices=("masks", "rle"),
        default="masks",
        help="masks: <id>.png of class ids; rle: one predictions.json of Scalabel RLE frames",
    )
    inference_args(cmd, data="packed split URL to predict, labelled or not (e.g. the test split)")
    cmd.set_defaults(func=_predict)

    cmd = sub.add_parser(
        "evalnorm-calibrate",
        parents=[verbose],
        help="estimate EvalNorm alpha/beta for a trained BN run (other weights frozen); score; log to MLflow",
    )
    cmd.add_argument("run_id", help="MLflow run id of a finished bn/syncbn trial")
    cmd.add_argument("--steps", type=_positive, default=200, help="optimization steps on training batches")
    cmd.add_argument("--lr", type=_rate, default=0.1)
    cmd.add_argument(
        "--batch-size", type=_positive, help="normalization batch (default: the trial's batch_per_gpu)"
    )
    cmd.set_defaults(func=_calibrate)
    return p


def _size(text: str) -> tuple[int, int]:
    w, _, h = text.lower().partition("x")
    if not (w.isdecimal() and h.isdecimal() and int(w) >= 1 and int(h) >= 1):
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 1280x720, got {errors.shown(text)}")
    return int(w), int(h)


def _real(text: str, expected: str, ok: Callable[[float], bool]) -> float:
    """A finite number that `ok` accepts, else argparse's one-line error saying what was `expected`."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and ok(value)):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {errors.shown(text)}")
    return value


def _scales(text: str) -> tuple[float, ...]:
    return tuple(_real(v, "factors > 0 such as 0.75,1,1.25", lambda f: f > 0) for v in text.split(","))


def _fraction(text: str) -> float:
    return _real(text, "a number of GPUs >= 0 such as 1 or 0.5", lambda v: v >= 0)


def _price(text: str) -> float:
    return _real(text, "US dollars per GPU-hour >= 0 such as 1.01", lambda v: v >= 0)


def _rate(text: str) -> float:
    return _real(text, "a learning rate > 0 such as 0.1", lambda v: v > 0)


def _settings(args: argparse.Namespace):
    """The inference settings of evaluate, ensemble and predict, checked with their --data before any
    download: a --data that holds no packed split is the input's mistake (exit 2), not the store's."""
    from orchestrator.data.shards import read_manifest
    from orchestrator.inference.predict import InferenceSettings

    settings = InferenceSettings(args.mode, args.crop, args.stride, args.scales, args.flip, args.amp)
    if args.data is not None:
        try:
            read_manifest(args.data)
        except FileNotFoundError:
            raise UsageError(
                f"--data {errors.shown(args.data)}: no packed split there (no manifest.json); give a folder "
                "that `orchestrator data pack` wrote, such as data/shards/val"
            ) from None
    return settings


def _where(args: argparse.Namespace):
    from orchestrator.inference.runs import Where

    if args.workers is None:
        return Where(None, args.device)
    from orchestrator.execution.inference import on_ray

    return Where(on_ray(args.workers, args.gpus_per_worker), args.device)


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated names such as train,val,test, got {text!r}"
        )
    return names


def _text(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError(f"expected a path or URL, got {errors.shown(text)}")
    return text


def _positive(text: str) -> int:
    if not text.isdecimal() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {errors.shown(text)}")
    return int(text)


def _count(text: str) -> int:
    if not text.isdecimal():
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {errors.shown(text)}")
    return int(text)


def _sweep(args: argparse.Namespace) -> int:
    from orchestrator import spec as specs

    spec = specs.load(args.spec, args.overrides)  # before importing Ray: a bad spec fails fast
    from orchestrator.execution.sweep import run_sweep

    if not args.verbose:
        from orchestrator import logs

        log_file = _log_file(spec)
        logs.to_file(log_file)  # after importing Ray and MLflow, whose console handlers it quiets
        print(f"{spec.name}: {len(specs.expand(spec))} trials; logs in {log_file} (-v: here)", flush=True)
    outcomes = run_sweep(
        spec,
        resume=args.resume,
        command=args.command,
        quiet=not args.verbose,
        gpu=_gpu_arg(args.gpu),
        skip_unfit=args.skip_unfit,
    )
    _print_outcomes(spec.experiment, outcomes)
    return 1 if any(o.status == "FAILED" for o in outcomes) else 0


def _log_file(spec) -> Path:
    """<storage>/<name>/logs/sweep-<time>.log, beside Tune's experiment folder, where storage is a local
    folder (default ./runs); else under ./runs."""
    root = Path(spec.storage) if spec.storage and "://" not in spec.storage else Path("runs")
    return root / spec.name / "logs" / f"sweep-{time.strftime('%Y%m%d-%H%M%S')}.log"


def _train(args: argparse.Namespace) -> int:
    from orchestrator import spec as specs

    spec = specs.load(args.spec, args.overrides)  # before importing Ray: a bad spec fails fast
    from orchestrator.execution.sweep import run_single

    outcome = run_single(spec, command=args.command, gpu=_gpu_arg(args.gpu))
    _print_outcomes(spec.experiment, [outcome])
    return 1 if outcome.status == "FAILED" else 0


SUBMITTABLE = ("ensemble", "evaluate", "predict")  # besides the sweep: the commands that run on Ray


def _submit(args: argparse.Namespace) -> int:
    from orchestrator.submit import entrypoint, submit

    if args.job:
        if (
            args.spec
            or args.overrides
            or args.resume
            or args.gpu
            or args.skip_unfit
            or args.job[0] not in SUBMITTABLE
        ):
            raise UsageError(
                f"submit -- {shlex.join(args.job)}: after -- comes one of {', '.join(SUBMITTABLE)} with its "
                "arguments, and no spec, --set, --resume, --gpu or --skip-unfit before it"
            )
        _parser().parse_args(args.job)  # a bad command fails here (exit 2), before anything is uploaded
        command = shlex.join(["orchestrator", *args.job])
    elif args.spec is None:
        raise UsageError("submit: name a sweep spec, or give a command after --: submit -- ensemble --top 3")
    else:
        from orchestrator import spec as specs

        secret = [redact_arg(o) for o in args.overrides if redact_arg(o) != o]
        if secret:
            raise UsageError(
                f"submit --set {secret[0]}: a credential on the job's command line is stored with the job "
                "and shown by `ray job list` and the dashboard; give it in the spec file (uploaded with the "
                "working directory) or the cluster's environment (--env NAME)"
            )
        specs.load(args.spec, args.overrides)  # a bad spec fails here, before anything is uploaded
        command = entrypoint(
            args.spec, args.overrides, args.working_dir, args.resume, _gpu_arg(args.gpu), args.skip_unfit
        )
    return submit(command, args.address, args.working_dir, args.extra_env)


def _report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from orchestrator.report import BASELINE, build_report, how_ended

    doc = Path(args.doc) if args.doc else None
    r = build_report(
        args.experiment,
        Path(args.out),
        sweep_run_id=args.sweep_run,
        doc=doc,
        command=args.command,
        baselines=args.baseline or [BASELINE],
    )
    print(
        f"{len(r.rows)} trials ({how_ended(r.rows, every=True)}) in {len(r.configurations)} configurations "
        f"of sweep run {r.sweep_run_id} in experiment {r.experiment!r}"
    )
    e = r.ensemble
    if e and e.gain is not None:
        print(f"ensemble run {e.run_id}: val mIoU {e.miou:.4f}, {e.gain:+.4f} over its best member")
    print(f"wrote {r.figure} and {r.table}; logged both to MLflow run {r.sweep_run_id} under report/")
    from orchestrator import tracking

    print(f"  its runs by {tracking.HEADLINE}: {tracking.runs_link(r.experiment)}")
    return 0


def _print_outcomes(experiment: str, outcomes: list) -> None:
    from orchestrator import tracking

    width = max(len(o.key) for o in outcomes)
    print(f"\n{'trial':<{width}}  {'status':<8}  {'val_miou':>8}  {'best':>8}  {'loss':>7}  {'img/s':>7}")
    for o in sorted(outcomes, key=lambda o: -o.metrics.get("best_val_miou", -1)):
        m = o.metrics
        print(
            f"{o.key:<{width}}  {o.status:<8}  {m.get('val_miou', float('nan')):8.4f}  "
            f"{m.get('best_val_miou', float('nan')):8.4f}  {m.get('train_loss', float('nan')):7.4f}  "
            f"{m.get('images_per_s', float('nan')):7.2f}"
        )
        if o.error:
            print(f"  {'error' if o.status == 'FAILED' else o.status.lower()}: {o.error}")
    print(f"\nMLflow: experiment {experiment!r} at {redact(tracking.tracking_uri())}")
    print(f"  its runs by {tracking.HEADLINE}: {tracking.runs_link(experiment)}")


def _spec(args: argparse.Namespace) -> int:
    from orchestrator import spec as specs

    if args.schema:
        print(json.dumps(specs.json_schema(), indent=2))
        return 0
    if args.doc:
        from orchestrator import spec_doc

        Path(args.doc).write_text(spec_doc.render())
        print(f"wrote {args.doc}")
        return 0
    if not args.spec:
        raise SpecError(["spec: give a spec file, or --schema, or --doc PATH"])
    print(specs.describe_grid(specs.load(args.spec, args.overrides)))
    return 0


def _gpu_arg(gpu: str | None) -> str | None:
    if gpu is not None and gpu not in GPUS:
        raise UsageError(f"--gpu {gpu!r}: allowed are {', '.join(GPUS)}")
    return gpu


def _cluster_gpu() -> str:
    """The GPU kind of the cluster at RAY_ADDRESS, for a plan without --gpu."""
    if not os.environ.get("RAY_ADDRESS"):
        raise UsageError(
            f"--gpu: name the GPUs' kind ({', '.join(GPUS)}), or set RAY_ADDRESS to read it from a cluster"
        )
    from orchestrator import logs
    from orchestrator.execution import cluster

    logs.quiet_console("ray")
    cluster.init_ray()
    kind = cluster.gpu_kind(cluster.alive_nodes())
    if kind is None:
        raise UsageError(
            f"--gpu: the cluster at {os.environ['RAY_ADDRESS']} has no GPU of a known kind (yet): name one"
        )
    return kind


def _plan(args: argparse.Namespace) -> int:
    from orchestrator import spec as specs

    spec = specs.load(args.spec, args.overrides)  # before importing torch: a bad spec fails fast
    gpu = _gpu_arg(args.gpu) or _cluster_gpu()
    from orchestrator.plan import fmt_hours, plan

    result = plan(
        spec, gpu, gpus=args.gpus, price=args.price, train_images=args.train_images, actual=args.actual
    )
    if args.json:
        print(json.dumps(result.as_json(), indent=1))
        return 0
    width = max(len(p.key) for p in result.points)
    head = f"{'batch':>5}  {'GiB/wkr':>7}  {'GPU/wkr':>7}  {'fits':>4}  "
    head += f"{'GFLOP/img':>9}  {'img/s/GPU':>10}  {'GPU-h':>7}"
    spent_head = f"  {'spent h':>8}  {'x plan':>6}  {'tries':>5}" if args.actual else ""
    print(f"{'grid point':<{width}}  {head}{spent_head}")
    for p in result.points:
        fits, hours, gflops = "yes" if p.fits else "NO", fmt_hours(p.gpu_hours), p.gflops_per_image
        rate = f"{p.images_per_s_per_gpu:.1f}{'*' if p.measured else ' '}"
        batch, gib, share = p.batch_per_gpu, p.memory_gib, f"{p.gpus_per_worker:g}"
        row = f"{p.key:<{width}}  {batch:5}  {gib:7.1f}  {share:>7}  {fits:>4}  "
        row += f"{gflops:9.0f}  {rate:>10}  {hours:>7}"
        if args.actual:
            row += _spent(p)
        print(row)
    total, unfit = result.total, sum(not p.fits for p in result.points)
    gpu_hours, wall = fmt_hours(total["gpu_hours"]), fmt_hours(total["wall_hours"])
    print(
        f"\n{len(result.points)} trials on {gpu} ({result.memory_gib:g} GiB): {unfit} do not fit; "
        f"{gpu_hours} GPU-hours, {wall} h on {result.gpus} GPUs, "
        f"${total['cost_usd']:,.0f} at ${result.usd_per_hour:.2f}/GPU-h"
    )
    if "spent_hours" in total:
        ran = [p for p in result.points if p.spent]
        on = "GPU-hours" if all(p.spent.on_gpu for p in ran) else "device-hours (worker-hours on the CPU)"
        spent, planned = fmt_hours(total["spent_hours"]), fmt_hours(total["planned_hours_of_those"])
        print(
            f"{len(ran)} of them ran in sweep run {args.actual}: {spent} {on} spent, "
            f"{total['spent_vs_plan']:.2f} x the {planned} planned for them"
        )
    for note in result.notes:
        print(f"  {note}")
    return 0


def _spent(p) -> str:
    """A plan row's spent columns: device-hours over all attempts (`c`: worker-hours on the CPU), the
    ratio to the plan, attempts."""
    from orchestrator.plan import fmt_hours

    if p.spent is None:
        return f"  {'-':>8}  {'-':>6}  {'-':>5}"
    hours = fmt_hours(p.spent.hours) + ("" if p.spent.on_gpu else "c")
    ratio = p.spent.hours / p.gpu_hours if p.gpu_hours else float("nan")
    return f"  {hours:>8}  {ratio:6.2f}  {p.spent.attempts:5d}"


def _synth(args: argparse.Namespace) -> int:
    from orchestrator.data.synth import synthesize

    synthesize(args.dst, train=args.train, val=args.val, size=args.size, seed=args.seed)
    w, h = args.size
    print(f"wrote {args.train} train + {args.val} val synthetic scenes ({w}x{h}) to {args.dst}")
    return 0


def _pack(args: argparse.Namespace) -> int:
    from orchestrator.data.shards import pack, problem_report

    manifests = pack(
        args.src, args.dst, shard_size=args.shard_size, workers=args.workers, progress=True,
        labels_format=args.labels, splits=args.splits, skip_bad=args.skip_bad,
    )  # fmt: skip
    for split, m in manifests.items():
        labels = m["labels"]
        source = f"{labels['format']} labels from {labels['source']}" if labels else "unlabeled"
        shards = f"{m['num_samples']} samples in {len(m['shards'])} shards"
        print(f"{split}: {shards} -> {args.dst}/{split} ({source})")
        if m["skipped"]:
            lines = [f"{r['file']}: {r['reason']}" for r in m["skipped"]]
            print(problem_report(f"{split}: left out (listed in its manifest's 'skipped')", lines))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from orchestrator.data.verify import verify

    report = verify(args.url)
    for problem in report.problems:
        print(problem)
    summary = (
        f"{args.url}: {report.samples} samples in {report.shards} shards, {len(report.problems)} problem(s)"
    )
    if report.problems:
        raise Unavailable(summary)
    print(summary)
    return 0


def _ensemble(args: argparse.Namespace) -> int:
    from orchestrator import tracking
    from orchestrator.inference.runs import ended_early_text, run_ensemble

    settings = _settings(args)  # a bad combination fails before any download
    experiment = args.experiment or tracking.latest_sweep_experiment()
    result = run_ensemble(
        experiment, args.top, args.metric, data=args.data, batch_size=args.batch_size,
        filter_string=args.filter, settings=settings, combine=args.combine, where=_where(args),
        register=args.register, command=args.command, skip_bad=args.skip_bad,
    )  # fmt: skip
    rows = [(f"{name} ({run_id[:8]})", m) for run_id, name, m in result.members]
    ensemble = (f"ensemble of {len(result.members)} ({args.combine})", result.metrics)
    _print_scores([*rows, ensemble], result.coverage)
    _print_skipped(result.coverage)
    if result.left_out:
        print(ended_early_text(result.left_out))
    print(f"\nMLflow: ensemble run {result.run_id} in experiment {experiment!r}")
    print(f"  its runs by {tracking.HEADLINE}: {tracking.runs_link(experiment)}")
    aliases = ", ".join(f"{alias} v{version}" for alias, version in sorted(result.versions.items()))
    print(f"MLflow: registered model {result.model!r} ({aliases}): models:/{result.model}@champion")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from orchestrator.inference.runs import evaluate_model

    settings = _settings(args)
    result = evaluate_model(
        args.model, settings, data=args.data, batch_size=args.batch_size, experiment=args.experiment,
        where=_where(args), command=args.command, skip_bad=args.skip_bad,
    )  # fmt: skip
    _print_scores([(result.name, result.metrics)], result.coverage)
    _print_skipped(result.coverage)
    print(f"\nMLflow: evaluation run {result.run_id} in experiment {result.experiment!r}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from orchestrator.inference.runs import predict_run

    result = predict_run(
        args.run_id, args.data, args.out, format=args.format, settings=_settings(args),
        batch_size=args.batch_size, where=_where(args), command=args.command, skip_bad=args.skip_bad,
        overwrite=args.overwrite,
    )  # fmt: skip
    print(f"{result.coverage.scored} predictions ({args.format}) written to {result.written}")
    if result.metrics:
        _print_scores([(f"scored ({args.data})", result.metrics)], result.coverage)
    _print_skipped(result.coverage)
    print(f"\nMLflow: prediction run {result.run_id} in experiment {result.experiment!r}")
    return 0


def _print_scores(rows: list[tuple[str, dict[str, float]]], coverage) -> None:
    """The scores, under a header that says how many of the split's images they are over."""
    over = str(coverage)
    width = max(len(over), *(len(name) for name, _ in rows))
    print(f"\n{over:<{width}}  {'mIoU':>7}  {'official':>8}  {'direct':>7}  {'altern.':>7}  {'pix acc':>7}")
    keys = ("val_miou", "val_miou_official", "val_iou_direct", "val_iou_alternative", "val_pixel_acc")
    for name, m in rows:
        print(
            f"{name:<{width}}  "
            + "  ".join(f"{m[k]:{w}.4f}" for k, w in zip(keys, (7, 8, 7, 7, 7), strict=True))
        )


def _print_skipped(coverage) -> None:
    if coverage.skipped:
        ids = ", ".join(coverage.skipped)
        print(f"left out {len(coverage.skipped)} unreadable image(s) (--skip-bad): {ids}")


def _calibrate(args: argparse.Namespace) -> int:
    from orchestrator.inference.calibrate import calibrate_run

    result = calibrate_run(args.run_id, steps=args.steps, lr=args.lr, batch_size=args.batch_size)
    print(f"\n{'model':<32}  {'val_miou':>8}")
    print(f"{'BN, running statistics (EMA)':<32}  {result.ema['val_miou']:8.4f}")
    print(f"{'EvalNorm, calibrated':<32}  {result.calibrated['val_miou']:8.4f}")
    print(f"\nMLflow: calibrated run {result.run_id} (from {result.source_run})")
    return 0
