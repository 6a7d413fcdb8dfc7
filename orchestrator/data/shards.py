"""Pack the BDD100K layout into tar shards (<id>.jpg, <id>.png adjacent) with one manifest per split.

Shards turn tens of thousands of small objects into a few sequential reads, which is what makes streaming
from object storage fast (ENVIRONMENT.md: 1000-1800 samples/s from tar shards against 50-160 per object).
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import tarfile

import fsspec
import simplejpeg

from orchestrator.data import layout
from orchestrator.data.storage import join, url_to_fs

FORMAT = "orchestrator-shards/1"
MANIFEST = "manifest.json"


def pack(src: str, dst: str, shard_size: int = 64, storage_options: dict | None = None) -> dict[str, dict]:
    """Write {dst}/{split}/shard-NNNNNN.tar and {dst}/{split}/manifest.json for each split under src."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    src_fs, src_root = url_to_fs(src, storage_options)
    dst_fs, dst_root = url_to_fs(dst, storage_options)
    splits = layout.present_splits(src, storage_options)
    if not splits:
        raise FileNotFoundError(f"no BDD100K split under {src} (expected {layout.image_dir(src, 'train')})")
    manifests = {}
    for split in splits:
        ids = layout.list_ids(src, split, storage_options)
        manifests[split] = _pack_split(
            src_fs, src_root, dst_fs, join(dst_root, split), split, ids, shard_size
        )
    return manifests


def _pack_split(
    src_fs: fsspec.AbstractFileSystem,
    src_root: str,
    dst_fs: fsspec.AbstractFileSystem,
    out_dir: str,
    split: str,
    ids: list[str],
    shard_size: int,
) -> dict:
    dst_fs.makedirs(out_dir, exist_ok=True)
    shards, sizes = [], set()
    for start in range(0, len(ids), shard_size):
        chunk = ids[start : start + shard_size]
        paths = [
            p
            for i in chunk
            for p in (layout.image_path(src_root, split, i), layout.mask_path(src_root, split, i))
        ]
        blobs = src_fs.cat(paths)  # one batched read per shard: concurrent requests on object stores
        members = [(posixpath.basename(p), blobs[p]) for p in paths]
        sizes.update(_jpeg_size(data) for name, data in members if name.endswith(".jpg"))
        data = _tar(members)
        name = f"shard-{len(shards):06d}.tar"
        dst_fs.pipe_file(join(out_dir, name), data)
        shards.append(
            {
                "name": name,
                "num_samples": len(chunk),
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        )
    if len(sizes) > 1:
        raise ValueError(f"images of split {split!r} differ in size (width, height): {sorted(sizes)}")
    manifest = {
        "format": FORMAT,
        "split": split,
        "num_samples": len(ids),
        "image_size": list(sizes.pop()) if sizes else None,
        "shards": shards,
    }
    # Last, so a reader that finds a manifest also finds every shard it names.
    dst_fs.pipe_file(join(out_dir, MANIFEST), json.dumps(manifest, indent=1).encode())
    return manifest


def read_manifest(url: str, storage_options: dict | None = None) -> dict:
    """The manifest of a packed split directory, e.g. s3://bucket/shards/train."""
    fs, path = url_to_fs(url, storage_options)
    try:
        manifest = json.loads(fs.cat_file(join(path, MANIFEST)))
    except FileNotFoundError:
        raise FileNotFoundError(f"no {MANIFEST} in {url}: pack the dataset there first") from None
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{join(url, MANIFEST)} has format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def _jpeg_size(data: bytes) -> tuple[int, int]:
    height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    return width, height


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    """An uncompressed tar of (name, data) in order, with fixed metadata so equal input gives equal bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()
