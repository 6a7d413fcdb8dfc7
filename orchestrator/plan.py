"""`orchestrator plan`: what a spec's grid will cost before any of it runs, with torch on the meta device.

Per grid point (trial): the peak GPU memory of a worker, whether it fits the GPU kind, the training FLOPs
per image and the trial's GPU-hours; in total the GPU-hours, the wall-clock hours on the cluster's GPUs and
dollars. How each figure is made:
- memory = parameters + gradients + optimizer state (SGD momentum: one copy; AdamW: two) + the
  activations autograd keeps for the backward x FRAGMENTATION + CONTEXT_GIB per GPU (CUDA context,
  cuDNN/cuBLAS workspaces): compute.worker_memory. The backward's temporaries are left to the allowance,
  which no GPU has checked yet (bench/gpu.py prints the estimate beside torch.cuda.max_memory_allocated).
  The activations are counted (compute.step_cost) by running the real model's forward on meta tensors at
  batch 1 and 2 (they are affine in the batch: per-image tensors plus per-channel statistics); under AMP
  with CUDA autocast's casts (compute.Autocast: meta tensors have no autocast of their own), its bf16 weight
  copies and the float32 of GN, LN, upsampling and the loss among them.
- FLOPs per image: convolutions and matrix products of a forward and backward (compute.count_flops).
- GPU-hours: the images the trial trains on (epochs x the train split's samples, or steps_per_epoch x batch x
  workers, or train.budget's steps x the images of a step) / the images per second of one GPU: measured,
  where the spec's MLflow experiment holds finished trials of the point's backbone, norm and crop on this
  GPU kind (measured_throughput: from what they spent, validation, checkpoints and restarts included),
  else the GPU kind's bf16 peak x MFU / FLOPs per image (training alone).
The sweep plans first too (fit_trials): `batch_per_gpu: auto` is chosen, points that cannot fit refused.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import asdict, dataclass, replace

import torch

from orchestrator import compute
from orchestrator.checkpoints import model_for
from orchestrator.compute import GIB
from orchestrator.gpus import GPUS, Gpu
from orchestrator.spec import Spec, SpecError, TrainSpec, Trial, expand
from orchestrator.torch_private import MetaShapes

MFU = 0.35  # model FLOPs utilization assumed when nothing was measured
# Of a GPU's (or a node's) memory, what workers sharing it leave free: the caching allocators of several
# processes each hold blocks the others cannot use (an allowance no GPU has checked yet).
PACK_MARGIN = 0.10
MAX_PER_GPU = 8  # workers `gpus_per_worker: auto` puts on one GPU at most: processes time-slice its cores
SHARE_STEP = 1e-4  # Ray's resolution for fractional resources: shares are rounded down to it
BDD100K_TRAIN = 70_000  # images of BDD100K's training split, when the spec's split cannot be read


@dataclass(frozen=True)
class Spent:
    """What a grid point's trial spent, its run's attempt totals (tracking.log_attempt): device-hours (GPU-
    hours where it ran on GPUs, worker-hours on the CPU), its attempts, dollars where its GPU has a price."""

    hours: float
    on_gpu: bool
    attempts: int
    cost_usd: float | None

    @classmethod
    def of(cls, costs: dict[str, float]) -> Spent:
        gpu_seconds = costs.get("gpu_seconds", 0.0)
        seconds = gpu_seconds or costs.get("worker_seconds", 0.0)
        return cls(seconds / 3600, gpu_seconds > 0, int(costs.get("attempts", 0)), costs.get("cost_usd"))


@dataclass(frozen=True)
class Point:
    key: str
    memory_gib: float  # a worker's peak
    fits: bool  # within its share of a GPU (budget_gib)
    batch_per_gpu: int
    gpus_per_worker: float  # the share of a GPU each worker holds (`auto` chosen)
    gflops_per_image: float
    images_per_s_per_gpu: float  # training throughput of one GPU
    measured: bool  # throughput from finished trials in MLflow, not the assumed MFU
    images: int  # trained on, all epochs
    gpu_hours: float
    spent: Spent | None = None  # with plan(actual=...): what its trial spent, if it ran


@dataclass(frozen=True)
class Plan:
    gpu: str
    memory_gib: float
    gpus: int  # in the cluster: trials run max_concurrent_trials at a time, each on workers x GPUs
    usd_per_hour: float
    points: list[Point]
    notes: list[str]

    @property
    def total(self) -> dict[str, float]:
        gpu_hours = sum(p.gpu_hours for p in self.points)
        total = {
            "gpu_hours": gpu_hours,
            "wall_hours": gpu_hours / self.gpus,
            "cost_usd": gpu_hours * self.usd_per_hour,
        }
        ran = [p for p in self.points if p.spent]
        if ran:  # the plan of the points that ran, beside what they spent
            planned = sum(p.gpu_hours for p in ran)
            total |= {"spent_hours": sum(p.spent.hours for p in ran), "planned_hours_of_those": planned}
            total["spent_vs_plan"] = total["spent_hours"] / planned if planned else math.nan
        return total

    def as_json(self) -> dict:
        return {"gpu": self.gpu, "points": [asdict(p) for p in self.points], "total": self.total}


def plan(
    spec: Spec,
    gpu: str,
    *,
    gpus: int | None = None,
    price: float | None = None,
    train_images: int | None = None,
    actual: str | None = None,
) -> Plan:
    """The plan of every grid point of `spec` on GPUs of kind `gpu` (a key of gpus.GPUS); with `actual` (a
    sweep run id), each point beside what its trial spent."""
    kind: Gpu = GPUS[gpu]
    trials = expand(spec)
    spent = {}
    if actual is not None:
        from orchestrator import tracking

        spent = {key: Spent.of(costs) for key, costs in tracking.trial_costs(actual).items()}
    measured, source = measured_throughput(spec.experiment, kind)
    images, where = _train_images(spec, train_images)
    costs = StepCosts()
    points = [replace(_point(t, kind, images, costs, measured), spent=spent.get(t.key)) for t in trials]
    assumed = f"an assumed MFU of {MFU:.0%} of the {kind.name}'s bf16 peak"
    if any(p.measured for p in points):
        count = sum(p.measured for p in points)
        notes = [
            f"throughput (*): measured for {count} of {len(points)} points, {source}; the others {assumed}"
        ]
    else:
        notes = [f"throughput: {assumed} (none measured: {source})"]
    notes.append(f"training images per epoch: {where}")
    r, share = spec.resources, max(p.gpus_per_worker for p in points)
    slots = gpus or max(1, math.ceil(r.max_concurrent_trials * r.workers_per_trial * share))
    return Plan(gpu, kind.memory_gib, slots, kind.usd_per_hour if price is None else price, points, notes)


def fit_trials(
    trials: list[Trial], gpu: str | None, nodes: list[dict[str, float]], skip_unfit: bool = False
) -> tuple[list[Trial], list[str]]:
    """The trials to run, `auto` batches and GPU shares chosen, and a line for each grid point left out. By
    `orchestrator plan`'s estimate, a worker must fit what it holds: on GPUs of kind `gpu` (a key of
    gpus.GPUS), its share of one (budget_gib); on the CPU, its CPUs' share of the memory of a node of
    `nodes` (Ray's resources of each; the one with the least per CPU that can hold the worker). Trials on
    GPUs of no known kind (`gpu` None) are not checked. Points that do not fit refuse the lot (SpecError, a
    line each with its estimate and its share), or, with `skip_unfit`, are left out (unless none fits)."""
    costs = StepCosts()
    fitted, unfit = [], []
    for trial in trials:
        r = trial.spec.resources
        if r.gpus_per_worker and gpu is None:
            fitted.append(trial)
            continue
        if r.gpus_per_worker:
            trial, memory, budget = _on_gpu(trial, GPUS[gpu], costs)
            share = trial.spec.resources.gpus_per_worker
            room = f"{_share(share)} GPU of {GPUS[gpu].memory_gib:g} GiB holds {budget:.1f} GiB"
            room += f" (its share less {PACK_MARGIN:.0%}, kept free)" if share < 1 else ""
        else:
            memory = _peak_memory(trial, costs, cuda=False) / GIB
            budget, room = _on_cpu(r.cpus_per_worker, nodes)
        if memory <= budget:
            fitted.append(trial)
        else:
            batch = trial.spec.train.batch_per_gpu
            unfit.append(f"  {trial.key}: {memory:.1f} GiB per worker at batch {batch}; {room}")
    if unfit and not (skip_unfit and fitted):
        others = " or run the others with --skip-unfit" if fitted else " (none does)"
        raise SpecError([
            f"{len(unfit)} of {len(trials)} grid points do not fit the memory their workers hold by "
            "`orchestrator plan`'s estimate: lower their batch or crop, give each worker a larger share "
            f"(resources.gpus_per_worker, cpus_per_worker) or a larger GPU (--gpu),{others}",
            *unfit,
        ])  # fmt: skip
    return fitted, unfit


def budget_gib(memory_gib: float, share: float) -> float:
    """What a worker holding `share` of a device of `memory_gib` may use: all of it alone on it (share >= 1),
    else its share less PACK_MARGIN. The shares of the workers on one device sum to 1 at most, so their
    estimates sum to its memory less the margin at most, however Ray packs them."""
    return memory_gib if share >= 1 else share * memory_gib * (1 - PACK_MARGIN)


def auto_share(memory_gib: float, gpu_gib: float) -> float:
    """The smallest share of a GPU of `gpu_gib`, 1/n rounded down to Ray's resolution (n <= MAX_PER_GPU),
    whose budget holds a worker's `memory_gib`; 1 where none less than the whole GPU does."""
    for n in range(MAX_PER_GPU, 1, -1):
        share = math.floor(1 / n / SHARE_STEP) * SHARE_STEP
        if memory_gib <= budget_gib(gpu_gib, share):
            return share
    return 1.0


def _on_gpu(trial: Trial, gpu: Gpu, costs: StepCosts) -> tuple[Trial, float, float]:
    """`trial` with its `auto` batch and share chosen for `gpu`, a worker's peak memory in GiB there, and the
    budget of its share (a spec for the CPU, planned for GPUs: a whole one each). A trial of several
    workers takes whole GPUs unless they are spread one per node (spec.ResourcesSpec)."""
    trial = _with_auto_batch(trial, gpu, costs)
    memory = _peak_memory(trial, costs, cuda=True) / GIB
    r = trial.spec.resources
    if r.gpus_per_worker == "auto":
        alone = r.workers_per_trial > 1 and r.placement != "strict_spread"
        trial = trial.with_gpus_per_worker(1.0 if alone else auto_share(memory, gpu.memory_gib))
    return trial, memory, budget_gib(gpu.memory_gib, trial.spec.resources.gpus_per_worker or 1.0)


def _on_cpu(cpus: float, nodes: list[dict[str, float]]) -> tuple[float, str]:
    """The memory budget in GiB of a worker of `cpus` CPUs on the node of `nodes` (Ray's resources: CPU,
    memory in bytes) that can hold it and has the least memory per CPU, and in words; no limit where Ray
    gives none."""
    holding = [n for n in nodes if n.get("CPU", 0) >= cpus and n.get("memory")]
    if not holding:
        return math.inf, ""
    node = min(holding, key=lambda n: n["memory"] / n["CPU"])
    share, memory = cpus / node["CPU"], node["memory"] / GIB
    budget = budget_gib(memory, share)
    words = f"{cpus:g} of the {node['CPU']:g} CPUs of a node of {memory:.1f} GiB hold {budget:.1f} GiB"
    return budget, words + (f" (less {PACK_MARGIN:.0%}, kept free)" if share < 1 else "")


def _share(share: float) -> str:
    return "a whole" if share == 1 else f"{share:g} of a" if share < 1 else f"{share:g} x a"


def _with_auto_batch(trial: Trial, gpu: Gpu, costs: StepCosts) -> Trial:
    """`trial` at the largest batch per GPU that fits `gpu` where its batch is `auto` (1 when none does)."""
    t = trial.spec.train
    if t.batch_per_gpu != "auto":
        return trial
    one, two = costs(trial.spec, tuple(t.crop))
    batch = compute.largest_batch(one, two, gpu.memory_gib * GIB, _optimizer_states(t))
    return trial.with_batch(max(batch, 1))


def _optimizer_states(t: TrainSpec) -> int:
    return 2 if t.optimizer == "adamw" else 1


def _peak_memory(trial: Trial, costs: StepCosts, cuda: bool) -> float:
    """A worker's peak memory in bytes over the trial's stages (compute.worker_memory)."""
    s, t = trial.spec, trial.spec.train
    peaks = []
    for crop, batch in {(tuple(t.stage(e).crop), t.stage(e).batch_per_gpu) for e in range(t.epochs)}:
        one, two = costs(s, crop)
        peaks.append(compute.worker_memory(one, two, batch, _optimizer_states(t), cuda=cuda))
    return max(peaks)


def _point(trial: Trial, gpu: Gpu, images: int, costs: StepCosts, measured: Measured) -> Point:
    trial, gib, budget = _on_gpu(trial, gpu, costs)
    s, t = trial.spec, trial.spec.train
    workers = s.resources.workers_per_trial
    seconds, trained, all_measured = 0.0, 0, True
    fixed = t.budget_steps(workers)
    for epoch in range(t.epochs):
        stage = t.stage(epoch)
        batch, crop = stage.batch_per_gpu, tuple(stage.crop)
        one, _ = costs(s, crop)
        if fixed is not None:
            per_epoch = fixed[epoch] * t.images_per_step(workers)
        else:
            per_epoch = images if t.steps_per_epoch is None else t.steps_per_epoch * batch * workers
        rate = measured.get((s.model.backbone, s.norm, crop))
        all_measured &= rate is not None
        rate = rate or gpu.peak_bf16 * MFU / one.flops
        trained += per_epoch
        seconds += per_epoch / rate
    return Point(
        key=trial.key,
        memory_gib=gib,
        fits=gib <= budget,
        batch_per_gpu=t.batch_per_gpu,
        gpus_per_worker=s.resources.gpus_per_worker or 1.0,
        gflops_per_image=one.flops / 1e9,
        images_per_s_per_gpu=rate,
        measured=all_measured,
        images=trained,
        gpu_hours=seconds / 3600,
    )


Measured = dict[tuple[str, str, tuple[int, int]], float]  # (backbone, norm, crop) -> images/s per GPU


def measured_throughput(experiment: str, gpu: Gpu) -> tuple[Measured, str]:
    """Images/s per GPU of the experiment's finished trials on GPUs of this kind (tagged with its name as
    torch gives it), by backbone, norm and crop, over runs the mean of each run's: what it spent where it
    logged that (`images_trained` / `gpu_seconds`: validation, checkpoints, starts and restarts paid for),
    else its last training `images_per_s` over its GPUs. And where they come from, in words."""
    from orchestrator import tracking
    from orchestrator.errors import Unavailable

    try:
        runs = tracking.finished_trial_runs(experiment)
    except Unavailable as e:  # an MLflow that cannot answer is no reason to refuse a plan
        return {}, str(e)
    rates: dict[tuple, list[float]] = defaultdict(list)
    spent = 0  # runs whose rate is what they spent
    for run in runs:
        params, metrics = run.data.params, run.data.metrics
        gpus = float(params.get("resources.workers_per_trial", 0)) * float(
            params.get("resources.gpus_per_worker", 0)
        )
        if run.data.tags.get(tracking.DEVICE) != gpu.name:
            continue
        if metrics.get("gpu_seconds") and metrics.get("images_trained"):
            rate, spent = metrics["images_trained"] / metrics["gpu_seconds"], spent + 1
        elif "images_per_s" in metrics and gpus:
            rate = metrics["images_per_s"] / gpus
        else:
            continue
        key = (params.get("model.backbone"), params.get("norm"), tracking.crop_param(params))
        rates[key].append(rate)
    trials = sum(len(r) for r in rates.values())
    return {k: sum(r) / len(r) for k, r in rates.items()}, (
        f"{trials} finished trials on {gpu.name} in MLflow experiment {experiment!r} ({spent} of them from "
        "what they spent, the others from their training images/s)"
    )


class StepCosts:
    """Step costs on the meta device, counted once per model and crop (width, height): at batch 1 and 2 (the
    activations are affine in the batch), FLOPs once per architecture and crop (norms and AMP add no
    convolutions or matrix products). Each model is built once for all its crops; ops of the same shapes run
    their meta kernels once (torch_private.MetaShapes)."""

    def __init__(self) -> None:
        self._models: dict[tuple, torch.nn.Module] = {}
        self._costs: dict[tuple, tuple[compute.StepCost, compute.StepCost]] = {}
        self._flops: dict[tuple, int] = {}
        self._shapes = MetaShapes()

    def __call__(self, spec: Spec, crop: tuple[int, int]) -> tuple[compute.StepCost, compute.StepCost]:
        m, amp = spec.model, spec.train.amp != "off"
        architecture = (m.backbone, m.head, m.output_stride, m.multi_grid)
        model_key = (*architecture, spec.norm)
        if model_key not in self._models:
            with torch.device("meta"):
                self._models[model_key] = model_for(spec, pretrained=False).train()
        key = (model_key, amp, crop)
        if key not in self._costs:
            width, height = crop
            count_flops = (architecture, crop) not in self._flops
            with self._shapes:
                one, two = (
                    compute.step_cost(
                        self._models[model_key],
                        torch.empty(batch, 3, height, width, device="meta"),
                        torch.empty(batch, height, width, device="meta", dtype=torch.long),
                        flops=batch == 1 and count_flops,
                        autocast=compute.CUDA_AUTOCAST if amp else None,
                    )
                    for batch in (1, 2)
                )
            if count_flops:
                self._flops[architecture, crop] = one.flops
            self._costs[key] = replace(one, flops=self._flops[architecture, crop]), two
        return self._costs[key]


def _train_images(spec: Spec, given: int | None) -> tuple[int, str]:
    if given is not None:
        return given, f"{given} (--train-images)"
    from orchestrator.data.shards import read_manifest

    try:
        count = read_manifest(spec.data.train, spec.data.storage_options)["num_samples"]
    except Exception as e:  # an unreachable bucket is not a reason to refuse a plan
        return (
            BDD100K_TRAIN,
            f"{BDD100K_TRAIN} (BDD100K's; {spec.data.train} unreadable here: {type(e).__name__})",
        )
    return count, f"{count} ({spec.data.train})"


def fmt_hours(hours: float) -> str:
    if hours < 0.01:  # a test's trial: two digits that say something
        return f"{hours:.2g}"
    return f"{hours:,.0f}" if hours >= 100 else f"{hours:.1f}" if hours >= 1 else f"{hours:.2f}"
