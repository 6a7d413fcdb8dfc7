"""Filesystem access by URL: the same code reads local disk, S3 and any other fsspec backend."""

from __future__ import annotations

import fsspec


def url_to_fs(url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return (filesystem, path inside it) for an fsspec URL or a plain local path.

    Credentials come from storage_options or the environment only. For s3:// with no endpoint in
    storage_options, botocore (>= 1.31, which every supported s3fs requires) already honours
    AWS_ENDPOINT_URL, so it is not copied here.
    """
    return fsspec.core.url_to_fs(url, **(storage_options or {}))


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL with '/', keeping its scheme (os.path.join would mangle 's3://')."""
    pieces = [url.rstrip("/")] + [p.strip("/") for p in parts if p.strip("/")]
    return "/".join(pieces)
