"""Is the training loader decode-bound? Raw decode+augment vs the loader, from local disk and from S3.

    .venv/bin/python -m bench.data [--samples 256] [--size 1280x720] [--crop 720x720] [--batch 4] [--epochs 2]

Synthesizes and packs one dataset in a temporary folder, copies its shards to a local S3 API server
(moto on 127.0.0.1), then measures in one run, on the same shards, samples/s of:
- raw: decode (simplejpeg + PNG), augment (scale, crop, flip, blur p=0.5) and normalize (float32 image,
  int64 mask: what the loader yields) in a loop on one core, the bytes already in memory: the most one core
  can do;
- the training loader with one worker process (one decoding core) over local shards and over S3 shards,
  with augmentation in the worker, and with augmentation on the device (here the consuming process: the
  worker only decodes).
Each rate is the best of `--epochs` rounds, each round measuring every setup once (a fresh loader per
epoch, its worker start included).
Targets (issue 5): S3 loader >= 0.9x the local one; loader >= 0.8x raw decode+augment.
"""

from __future__ import annotations

import argparse
import os
import tarfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import s3fs  # noqa: E402
import torch  # noqa: E402

from bench import common  # noqa: E402
from bench.local_s3 import local_s3  # noqa: E402
from orchestrator.data.shards import decode_pair  # noqa: E402
from orchestrator.data.stream import make_loader  # noqa: E402
from orchestrator.data.transforms import normalize, train_transform  # noqa: E402

BENCH = "data"


def raw_rate(split: Path, crop: tuple[int, int], decode_only: bool = False) -> float:
    """Samples/s of decode (+ augment) on one thread, the shards' bytes already in memory."""
    pairs = []
    for shard in sorted(split.glob("*.tar")):
        with tarfile.open(shard) as tar:
            data = [tar.extractfile(m).read() for m in tar]
        pairs += list(zip(data[0::2], data[1::2], strict=True))
    started = time.perf_counter()
    for i, (jpg, png) in enumerate(pairs):
        image, mask = decode_pair(jpg, png, check_labels=False)
        if not decode_only:
            x, y = train_transform(image, mask, crop, np.random.default_rng(i))
            normalize(x), y.long()
    return len(pairs) / (time.perf_counter() - started)


def loader_rate(
    url: str, args: argparse.Namespace, epoch: int, on_device: bool, storage_options: dict | None
) -> float:
    """Samples/s of one epoch of a fresh training loader with one worker process, its start included."""
    started = time.perf_counter()
    loader = make_loader(
        url,
        batch_size=args.batch,
        rank=0,
        world_size=1,
        train=True,
        crop=args.crop,
        epoch=epoch,
        seed=0,
        num_workers=1,
        augment_on_device=on_device,
        storage_options=storage_options,
    )
    samples = sum(len(images) for images, _ in loader)
    return samples / (time.perf_counter() - started)


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--size", default="1280x720", help="synthetic image WIDTHxHEIGHT")
    p.add_argument("--crop", default="720x720", help="training crop WIDTHxHEIGHT")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--shard-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=2)
    args = p.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    args.crop = tuple(int(v) for v in args.crop.split("x"))
    torch.set_num_threads(1)  # one core each: this process, and the loader's worker

    with common.workspace("bench-data-") as root:
        split = (
            common.synth_pack(root, train=args.samples, val=0, size=size, shard_size=args.shard_size)
            / "train"
        )
        shard_mb = np.mean([f.stat().st_size for f in split.glob("*.tar")]) / 2**20
        with local_s3(root / "moto.log") as s3:
            fs = s3fs.S3FileSystem(**s3.storage_options)
            fs.mkdir("bench")
            fs.put(str(split), "bench/train", recursive=True)
            rates: dict[tuple[str, bool], float] = {}
            for epoch in range(args.epochs):  # every setup once per round: drift hits them alike
                measured = {
                    ("decode", False): raw_rate(split, args.crop, decode_only=True),
                    ("raw", False): raw_rate(split, args.crop),
                }
                for on_device in (False, True):
                    measured["local", on_device] = loader_rate(str(split), args, epoch, on_device, None)
                    measured["s3", on_device] = loader_rate(
                        "s3://bench/train", args, epoch, on_device, s3.storage_options
                    )
                rates = {k: max(v, rates.get(k, 0.0)) for k, v in measured.items()}
    decode, raw = rates["decode", False], rates["raw", False]

    def row(setup: str, rate: float, vs: float, vs_name: str, target: str = "") -> common.Row:
        return common.Row(BENCH, setup, rate, "samples/s", rate / vs, vs_name, target)

    raw_name = "raw decode+augment"
    rows = [
        row("raw decode only, 1 core", decode, raw, raw_name),
        row("raw decode + augment + normalize, 1 core", raw, raw, raw_name),
    ]
    for on_device, where in ((False, "in the worker"), (True, "on the device (here: the main process)")):
        local, remote = rates["local", on_device], rates["s3", on_device]
        rows.append(
            row(
                f"loader, local shards, augment {where}",
                local,
                raw,
                raw_name,
                "" if on_device else ">= 0.8x",
            )
        )
        rows.append(
            row(
                f"loader, S3 shards, augment {where}",
                remote,
                local,
                "local loader",
                "" if on_device else ">= 0.9x",
            )
        )
    common.emit(
        rows,
        f"{args.samples} samples {args.size}, crop {args.crop[0]}x{args.crop[1]}, batch {args.batch}, "
        f"shards of {args.shard_size} ({shard_mb:.0f} MB), 1 loader worker, best of {args.epochs} epochs",
        args.json,
    )


if __name__ == "__main__":
    main()
