"""The honest price of screening: the proxy study's grid (a smaller twin of jobs/study_proxy.yaml) run in full
and with ASHA, side by side on the same data, and what ASHA saved and lost.

    .venv/bin/python -m bench.screening [--train 128] [--epochs 4] [--batches 2 8] [--norms bn gn:c16 ...]

The twin: the proxy study's seven norms x batch per GPU {2, 8}, one seed, 2 gloo workers of 1 CPU per trial,
one trial at a time, ResNet-18 DeepLabv3+ on synthetic 128x72 scenes (--train of them, a quarter of the
proxy's), 4 epochs, the LR scaled as the proxy's (lr_reference_batch 4). Both sweeps keep the divergence guard
at its defaults. ASHA: grace 1 epoch, reduction factor 2, on val_miou (rungs at epochs 1 and 2).

Figures, from MLflow:
- compute: the sum of the trials' worker-seconds (the ledger of each attempt: workers x its seconds; on GPUs,
  GPU-seconds), and the sweep's wall time;
- the top 3 configurations by best val mIoU among the finished trials of each sweep, and how many of the full
  grid's top 3 ASHA's top 3 holds; ASHA's winner scored in the full grid against the full grid's winner.
Takes about 20 min on 2 idle cores: not one of `make bench`'s quick figures.
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from bench import common  # noqa: E402

BENCH = "screening"
NORMS = ["bn", "syncbn", "gn:c16", "gn:c16+ws", "bn+ws", "evalnorm", "evalnorm:rule"]  # the proxy study's


def sweep(raw: dict, setup: str) -> dict[str, tuple[str, float | None, float]]:
    """Run the spec `raw` as a sweep; {trial key: (outcome, best val mIoU, worker-seconds)} and its wall."""
    from orchestrator import spec as specs
    from orchestrator import tracking
    from orchestrator.execution.sweep import run_sweep

    spec = specs.validate(raw)
    run_sweep(spec, quiet=True)
    c = tracking.client()
    exp = c.get_experiment_by_name(spec.experiment)
    runs = c.search_runs([exp.experiment_id], f"tags.`{tracking.KIND}` = 'trial'", max_results=1000)
    if len(runs) != len(specs.expand(spec)):
        raise SystemExit(f"{setup}: {len(runs)} trial runs for {len(specs.expand(spec))} grid points")
    return {
        r.data.tags[tracking.TRIAL_KEY]: (
            tracking.outcome(r),
            tracking.best_value(r.info.run_id, "val_miou"),
            r.data.metrics.get("worker_seconds", 0.0),
        )
        for r in runs
    }


def top(trials: dict[str, tuple[str, float | None, float]], k: int = 3) -> list[str]:
    """The k best finished trials by best val mIoU."""
    finished = [(best, key) for key, (outcome, best, _) in trials.items() if outcome == "finished" and best]
    return [key for _, key in sorted(finished, reverse=True)[:k]]


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--train", type=int, default=128, help="synthetic training scenes (the proxy: 512)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batches", type=int, nargs="+", default=[2, 8], help="batch per GPU, the grid's axis")
    p.add_argument("--norms", nargs="+", default=NORMS)
    args = p.parse_args()

    with common.workspace("bench-screening-") as root:
        shards = common.synth_pack(root, train=args.train, val=32, size=(128, 72))
        raw = common.small_spec(
            BENCH, shards, steps=1, batch=2, crop=128, epochs=args.epochs,
            train={"steps_per_epoch": None, "crop": [128, 72], "lr": 0.005, "lr_reference_batch": 4,
                   "diverge_single_class_epochs": 2},  # the product's default, which small_spec turns off
            resources={"workers_per_trial": 2, "max_concurrent_trials": 1},
            grid={"norm": args.norms, "train.batch_per_gpu": args.batches},
        )  # fmt: skip
        started = time.perf_counter()
        full = sweep({**raw, "name": f"{BENCH}-full"}, "full grid")
        search = {"scheduler": "asha", "grace_epochs": 1, "reduction_factor": 2}
        halfway = time.perf_counter()
        asha = sweep({**raw, "name": f"{BENCH}-asha", "search": search}, "asha")
        wall = {"full": halfway - started, "asha": time.perf_counter() - halfway}

    spent = {name: sum(s for _, _, s in trials.values()) for name, trials in (("full", full), ("asha", asha))}
    ended = {
        name: {o: sum(t[0] == o for t in trials.values()) for o in ("finished", "diverged", "stopped")}
        for name, trials in (("full", full), ("asha", asha))
    }
    top_full, top_asha = top(full), top(asha)
    held = len(set(top_full) & set(top_asha))
    full_best = {key: best for key, (_, best, _) in full.items()}
    trail = full_best[top_full[0]] - (full_best[top_asha[0]] or 0.0) if top_asha and top_full else None
    counts = {n: ", ".join(f"{v} {o}" for o, v in e.items() if v) for n, e in ended.items()}
    rows = [
        common.Row(BENCH, f"full grid: {len(full)} trials ({counts['full']}), wall {wall['full']:.0f} s",
                   spent["full"], "worker-s"),
        common.Row(BENCH, f"asha: the same grid ({counts['asha']}), wall {wall['asha']:.0f} s",
                   spent["asha"], "worker-s", spent["asha"] / spent["full"], "the full grid's"),
        common.Row(BENCH, f"top 3 kept: full {', '.join(top_full)}; asha {', '.join(top_asha)}", held,
                   "of 3"),
        common.Row(BENCH, "asha's winner in the full grid, below the full grid's winner", trail,
                   "val mIoU", note="no finished trial"),
    ]  # fmt: skip
    common.emit(
        rows,
        f"{len(args.norms)} norms x batch per GPU {args.batches}, resnet18-deeplabv3plus, {args.train} "
        f"synthetic 128x72 scenes, {args.epochs} epochs, 2 workers of 1 CPU per trial, one trial at a time; "
        "asha: grace 1 epoch, reduction factor 2, on val_miou",
        args.json,
    )


if __name__ == "__main__":
    main()
