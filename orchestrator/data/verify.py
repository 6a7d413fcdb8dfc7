"""Re-read packed shards and check them against their manifests: what `orchestrator data verify` runs.

Every shard is read whole and every pair decoded, so a clean report means training will not trip over the
data: checksums and sizes catch a damaged upload, member order and counts a foreign or truncated tar.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
import tarfile
from dataclasses import dataclass, field

from orchestrator.data.layout import SPLITS
from orchestrator.data.shards import MANIFEST, decode_pair, read_manifest
from orchestrator.data.storage import join, url_to_fs
from orchestrator.errors import UsageError


@dataclass
class Report:
    shards: int = 0
    samples: int = 0
    problems: list[str] = field(default_factory=list)  # one line each, naming the file


def verify(url: str, storage_options: dict | None = None) -> Report:
    """Check a packed split folder, or a packed root with one folder per split."""
    fs, path = url_to_fs(url, storage_options)
    if fs.exists(join(path, MANIFEST)):
        split_urls = [url]
    else:
        split_urls = [join(url, s) for s in SPLITS if fs.exists(join(path, s, MANIFEST))]
    if not split_urls:
        raise UsageError(
            f"no {MANIFEST} in {url} nor in its {', '.join(SPLITS)} folders: "
            "give a packed split folder or the root that `orchestrator data pack` wrote"
        )
    report = Report()
    for split_url in split_urls:
        _verify_split(split_url, storage_options, report)
    return report


def _verify_split(url: str, storage_options: dict | None, report: Report) -> None:
    try:
        manifest = read_manifest(url, storage_options)
    except ValueError as e:
        report.problems.append(str(e))
        return
    fs, root = url_to_fs(url, storage_options)
    held = sum(s["num_samples"] for s in manifest["shards"])
    if held != manifest["num_samples"]:
        report.problems.append(
            f"{join(url, MANIFEST)}: num_samples is {manifest['num_samples']}, its shards list {held}"
        )
    for entry in manifest["shards"]:
        shard = join(url, entry["name"])
        report.shards += 1
        try:
            data = fs.cat_file(join(root, entry["name"]))
        except FileNotFoundError:
            report.problems.append(f"{shard}: missing, the manifest lists it")
            continue
        if len(data) != entry["bytes"]:
            report.problems.append(f"{shard}: {len(data)} bytes, the manifest says {entry['bytes']}")
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry["sha256"]:
            report.problems.append(f"{shard}: sha256 {digest}, the manifest says {entry['sha256']}")
        pairs = _pairs(shard, data, report.problems)
        if len(pairs) != entry["num_samples"]:
            report.problems.append(f"{shard}: {len(pairs)} samples, the manifest says {entry['num_samples']}")
        stems = [stem for stem, _, _ in pairs]
        if "ids" in entry and stems != entry["ids"][: len(stems)]:
            report.problems.append(f"{shard}: its sample ids differ from the manifest's (or their order)")
        for stem, jpg, png in pairs:
            try:
                image, _ = decode_pair(jpg, png)
            except ValueError as e:
                report.problems.append(f"{shard}: {stem}: {e}")
                continue
            if [image.shape[1], image.shape[0]] != manifest["image_size"]:
                report.problems.append(
                    f"{shard}: {stem}.jpg is {image.shape[1]}x{image.shape[0]}, "
                    f"the manifest's image_size is {manifest['image_size']}"
                )
        report.samples += len(pairs)


def _pairs(shard: str, data: bytes, problems: list[str]) -> list[tuple[str, bytes, bytes]]:
    """(id, jpg, png) of a shard's members, up to the first that breaks the <id>.jpg, <id>.png order."""
    pairs, image = [], None
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                stem, ext = posixpath.splitext(member.name)
                content = (
                    tar.extractfile(member).read() if member.isfile() and "/" not in member.name else None
                )
                if content is not None and ext == ".jpg" and image is None:
                    image = (stem, content)
                elif content is not None and ext == ".png" and image is not None and image[0] == stem:
                    pairs.append((stem, image[1], content))
                    image = None
                else:
                    problems.append(f"{shard}: member {member.name!r} breaks the <id>.jpg, <id>.png order")
                    return pairs
    except tarfile.TarError as e:
        problems.append(f"{shard}: not a readable tar ({e})")
        return pairs
    if image is not None:
        problems.append(f"{shard}: {image[0]}.jpg is the last member, its mask is missing")
    return pairs
