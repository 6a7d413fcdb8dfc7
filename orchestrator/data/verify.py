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

from orchestrator.data.layout import names
from orchestrator.data.shards import MANIFEST, decode_image, decode_pair, is_labeled, read_manifest
from orchestrator.errors import UsageError
from orchestrator.storage import join, url_to_fs


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
        split_urls = [join(url, s) for s in names(fs, path) if fs.exists(join(path, s, MANIFEST))]
    if not split_urls:
        raise UsageError(
            f"no {MANIFEST} in {url} nor in its folders: "
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
        pairs = _samples(shard, data, is_labeled(manifest), report.problems)
        if len(pairs) != entry["num_samples"]:
            report.problems.append(f"{shard}: {len(pairs)} samples, the manifest says {entry['num_samples']}")
        stems = [stem for stem, _, _ in pairs]
        if "ids" in entry and stems != entry["ids"][: len(stems)]:
            report.problems.append(f"{shard}: its sample ids differ from the manifest's (or their order)")
        for stem, jpg, png in pairs:
            try:
                image = decode_image(jpg) if png is None else decode_pair(jpg, png)[0]
            except ValueError as e:
                report.problems.append(f"{shard}: {stem}: {e}")
                continue
            if [image.shape[1], image.shape[0]] != manifest["image_size"]:
                report.problems.append(
                    f"{shard}: {stem}.jpg is {image.shape[1]}x{image.shape[0]}, "
                    f"the manifest's image_size is {manifest['image_size']}"
                )
        report.samples += len(pairs)


def _samples(
    shard: str, data: bytes, labeled: bool, problems: list[str]
) -> list[tuple[str, bytes, bytes | None]]:
    """(id, jpg, png) of a shard's members, <id>.jpg then <id>.png (only <id>.jpg, png None, in an images-only
    split), up to the first member that breaks that order."""
    extensions = (".jpg", ".png") if labeled else (".jpg",)
    samples, current = [], []  # current: the members read of the sample being read
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                stem, ext = posixpath.splitext(member.name)
                if (
                    not member.isfile()
                    or "/" in member.name
                    or ext != extensions[len(current)]
                    or (current and stem != current[0][0])
                ):
                    order = ", ".join(f"<id>{e}" for e in extensions)
                    problems.append(f"{shard}: member {member.name!r} breaks the {order} order")
                    return samples
                current.append((stem, tar.extractfile(member).read()))
                if len(current) == len(extensions):
                    samples.append((stem, current[0][1], current[1][1] if labeled else None))
                    current = []
    except tarfile.TarError as e:
        problems.append(f"{shard}: not a readable tar ({e})")
        return samples
    if current:
        problems.append(f"{shard}: {current[0][0]}.jpg is the last member, its mask is missing")
    return samples
