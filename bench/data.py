"""Is the training loader decode-bound? Raw decode+augment vs the loader, from local disk and from S3.

    .venv/bin/python bench/data.py [--samples 384] [--size 1280x720] [--crop 720x720] [--batch 4]

Synthesizes and packs one dataset in a temporary folder, copies its shards to a local S3 API server
(moto on 127.0.0.1), then measures in one run, on the same shards, samples/s of:
- raw: decode (simplejpeg + PNG) and augment (scale, crop, flip, blur p=0.5, normalize) in a loop on one
  core, the bytes already in memory: the most one core can do;
- the training loader with one worker process (one decoding core) over local shards and over S3 shards,
  with augmentation in the worker, and with augmentation on the device (here the consuming process: the
  worker only decodes).
Each loader rate is the best of `--epochs` epochs (a fresh loader per epoch, its worker start included).
Targets (issue 5): S3 loader >= 0.9x the local one; loader >= 0.8x raw decode+augment.
"""

from __future__ import annotations

import argparse
import os
import tarfile
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import s3fs  # noqa: E402
import torch  # noqa: E402

from orchestrator.data.local_s3 import local_s3  # noqa: E402
from orchestrator.data.shards import decode_pair, pack  # noqa: E402
from orchestrator.data.stream import make_loader  # noqa: E402
from orchestrator.data.synth import synthesize  # noqa: E402
from orchestrator.data.transforms import train_transform  # noqa: E402


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
            train_transform(image, mask, crop, np.random.default_rng(i))
    return len(pairs) / (time.perf_counter() - started)


def loader_rate(url: str, args: argparse.Namespace, on_device: bool, storage_options: dict | None) -> float:
    best = 0.0
    for epoch in range(args.epochs):
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
        best = max(best, samples / (time.perf_counter() - started))
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=384)
    p.add_argument("--size", default="1280x720", help="synthetic image WIDTHxHEIGHT")
    p.add_argument("--crop", default="720x720", help="training crop WIDTHxHEIGHT")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--shard-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=2)
    args = p.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    args.crop = tuple(int(v) for v in args.crop.split("x"))
    torch.set_num_threads(1)  # one core each: this process, and the loader's worker

    root = Path(tempfile.mkdtemp(prefix="bench-data-"))
    synthesize(str(root / "synth"), train=args.samples, val=0, size=size)
    pack(str(root / "synth"), str(root / "shards"), shard_size=args.shard_size)
    split = root / "shards" / "train"
    with local_s3(root / "moto.log") as s3:
        fs = s3fs.S3FileSystem(**s3.storage_options)
        fs.mkdir("bench")
        fs.put(str(split), "bench/train", recursive=True)
        raw = raw_rate(split, args.crop)
        rows = [
            ("raw decode only, 1 core", raw_rate(split, args.crop, decode_only=True)),
            ("raw decode + augment, 1 core", raw),
        ]
        for on_device in (False, True):
            where = "device (main process)" if on_device else "worker"
            local = loader_rate(str(split), args, on_device, None)
            remote = loader_rate("s3://bench/train", args, on_device, s3.storage_options)
            rows += [(f"loader, local shards, augment in {where}", local)]
            rows += [(f"loader, S3 shards, augment in {where}", remote)]
            if not on_device:
                ratios = (remote / local, local / raw)

    shard_mb = np.mean([f.stat().st_size for f in split.glob("*.tar")]) / 2**20
    print(
        f"\n{args.samples} samples {args.size}, crop {args.crop[0]}x{args.crop[1]}, batch {args.batch}, "
        f"shards of {args.shard_size} ({shard_mb:.0f} MB), {os.cpu_count()} cores, torch {torch.__version__}"
    )
    print(f"{'':<56} {'samples/s':>10} {'x raw':>7}")
    for name, rate in rows:
        print(f"{name:<56} {rate:10.1f} {rate / raw:7.2f}")
    print(f"\nS3 loader / local loader: {ratios[0]:.2f} (target >= 0.9)")
    print(f"local loader / raw decode+augment: {ratios[1]:.2f} (target >= 0.8)")


if __name__ == "__main__":
    main()
