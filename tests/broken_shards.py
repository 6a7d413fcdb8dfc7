"""Ways to break a packed shard (bytes in, bytes out), shared by the reader's tests and the e2e trial."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable

import numpy as np
from PIL import Image

Member = tuple[str, bytes]


def members(shard: bytes) -> list[Member]:
    with tarfile.open(fileobj=io.BytesIO(shard)) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar]


def tar(items: list[Member]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as out:
        for name, data in items:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def edit(shard: bytes, sample: int, member: int, change: Callable[[str, bytes], Member]) -> bytes:
    """The shard with member 0 (the JPEG) or 1 (the PNG) of its sample-th sample changed."""
    items = members(shard)
    items[2 * sample + member] = change(*items[2 * sample + member])
    return tar(items)


def truncate(name: str, data: bytes) -> Member:
    return name, data[: len(data) // 2]


def garbage(name: str, data: bytes) -> Member:
    return name, b"\x89PNG\r\n\x1a\n garbage"


def traverse(name: str, data: bytes) -> Member:
    return "../" + name, data


def resized_png(width: int, height: int) -> Callable[[str, bytes], Member]:
    def change(name: str, data: bytes) -> Member:
        buf = io.BytesIO()
        Image.fromarray(np.zeros((height, width), np.uint8)).save(buf, format="PNG")
        return name, buf.getvalue()

    return change


def _start(shard: bytes, sample: int) -> int:
    """The byte offset of the sample-th sample's first tar header (each member: a 512-byte header, then its
    data padded to 512)."""
    return sum(512 + -(-len(d) // 512) * 512 for _, d in members(shard)[: 2 * sample])


def break_header(shard: bytes, sample: int) -> bytes:
    """Overwrite the tar header of the sample-th sample's JPEG: that sample and every later one of the
    shard become unreadable."""
    offset = _start(shard, sample)
    raw = bytearray(shard)
    raw[offset : offset + 512] = bytes(range(256)) * 2
    return bytes(raw)


def cut(shard: bytes, sample: int) -> bytes:
    """The shard ending in the middle of the sample-th sample's JPEG, as an interrupted upload leaves it:
    that sample and every later one are lost."""
    return shard[: _start(shard, sample) + 700]
