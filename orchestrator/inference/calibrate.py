"""Offline EvalNorm for a trained BN run (`orchestrator evalnorm-calibrate RUN_ID`).

The run's checkpoint is rebuilt with `evalnorm` layers (a superset of BN's state, so every trained
weight and running statistic carries over), alpha/beta are estimated on training batches of the
trial's own normalization batch size with every other weight frozen, and the EMA model and the
calibrated one are scored side by side. The calibrated model is logged as its own MLflow run.
"""

from __future__ import annotations

import itertools
import json
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from orchestrator import checkpoints, metrics, tracking
from orchestrator.data.stream import evaluation_loader, input_mean_std, spec_loader
from orchestrator.errors import UsageError
from orchestrator.inference.evaluate import evaluate
from orchestrator.logs import Progress
from orchestrator.models.catalog import NORMS, parse_norm
from orchestrator.models.evalnorm import EvalNorm2d, calibrate
from orchestrator.spec import Spec, from_flat, public_params

CALIBRATABLE = tuple(n.name for n in NORMS.values() if n.evalnorm_calibrates)  # bn, syncbn, evalnorm

log = logging.getLogger(__name__)


@dataclass
class CalibrationResult:
    source_run: str
    run_id: str
    ema: dict[str, float]  # the source model, BN with running statistics
    calibrated: dict[str, float]
    alpha_beta: dict[str, tuple[float, float]]


def calibrate_run(
    run_id: str,
    *,
    steps: int = 200,
    lr: float = 0.1,
    batch_size: int | None = None,
    storage_options: dict | None = None,
) -> CalibrationResult:
    source = tracking.download_checkpoint(run_id)
    state = checkpoints.load(source)
    config = state["config"]
    norm = parse_norm(config["norm"])
    if norm.kind not in CALIBRATABLE:
        raise UsageError(
            f"run {run_id} uses norm {config['norm']!r}; EvalNorm calibrates batch-normalized models: "
            f"{', '.join(CALIBRATABLE)} (with or without +ws)"
        )
    calibrated_config = {**config, "norm": "evalnorm+ws" if norm.ws else "evalnorm"}
    spec = from_flat(calibrated_config)
    model = checkpoints.model_for(spec, pretrained=False)
    missing, unexpected = model.load_state_dict(state["model"], strict=False)
    # Only EvalNorm's own additions (alpha/beta and their state) may be missing from a BN checkpoint.
    layers = {name for name, m in model.named_modules() if isinstance(m, EvalNorm2d)}
    bn_keys = set(nn.BatchNorm2d(1).state_dict())
    unexplained = [
        k for k in missing if k.rpartition(".")[0] not in layers or k.rpartition(".")[2] in bn_keys
    ]
    if unexpected or unexplained:
        raise ValueError(f"checkpoint of run {run_id} does not fit its model: {unexpected or unexplained}")
    original = checkpoints.model_from_state(state)

    batch = batch_size or config["train.batch_per_gpu"]
    with Progress(steps, "calibrate", "step", log) as progress:
        images = _counted(_training_images(spec, batch, storage_options), progress)
        values = calibrate(model, images, steps=steps, lr=lr)
    val = evaluation_loader(config["data.val"], batch_size=batch, storage_options=storage_options)
    calibrated_model = checkpoints.Trained(model.eval(), calibrated_config, original.mean_std)
    with Progress(val.dataloader.dataset.num_samples, "evaluate", "image", log) as progress:
        ema_cm, calibrated_cm = evaluate([original, calibrated_model], val, progress=progress).cms
    ema, calibrated = metrics.summarize(ema_cm), metrics.summarize(calibrated_cm)

    experiment, name = tracking.run_names(run_id)
    with tempfile.TemporaryDirectory() as d:
        ckpt = checkpoints.save(
            Path(d) / tracking.CHECKPOINT_FILE, model, calibrated_config, original.mean_std, source_run=run_id
        )
        table = Path(d) / "alpha_beta.json"
        table.write_text(json.dumps(values, indent=1))
        new_run = tracking.log_derived_run(
            experiment,
            kind="calibrated",
            name=f"{name} evalnorm",
            params={
                **public_params(calibrated_config),
                "calibration.steps": steps,
                "calibration.lr": lr,
                "calibration.batch": batch,
                "source_run": run_id,
            },
            metrics={**calibrated, "ema_val_miou": ema["val_miou"]},
            tags={"orchestrator.source_run": run_id},
            files={tracking.CHECKPOINT_DIR: ckpt, "evalnorm": table},
            sources=[run_id],
        )
    return CalibrationResult(run_id, new_run, ema, calibrated, values)


def _counted(batches: Iterator[torch.Tensor], progress: Progress) -> Iterator[torch.Tensor]:
    """The batches, each counted as a step as it is handed out."""
    for batch in batches:
        progress.update(1)
        yield batch


def _training_images(spec: Spec, batch: int, storage_options: dict | None) -> Iterator[torch.Tensor]:
    """Augmented training batches of the trial's crop, epoch after epoch, as long as asked: the
    training loop's own loader, in this process, at the calibration batch size."""
    data = spec.data.model_copy(update={"storage_options": storage_options or {}, "loader_workers": 0})
    recipe = spec.train.model_copy(update={"batch_per_gpu": batch})
    mean_std = input_mean_std(data)
    for epoch in itertools.count():
        for images, _ in spec_loader(data, recipe, train=True, mean_std=mean_std, epoch=epoch):
            yield images
