"""Filesystem access by URL: the same code reads local disk, S3 and any other fsspec backend."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import http.client
import logging
import random
import tarfile

import fsspec

from orchestrator.errors import Unavailable, UsageError

# The extra of this package (pyproject.toml) that installs each scheme's fsspec driver; s3fs is a dependency.
EXTRAS = {"gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure", "abfss": "azure"}

# azure-core logs every HTTP request and response, headers and all, at INFO: some 30 lines per request would
# bury a command's own lines.
logging.getLogger("azure.core.pipeline.policies.http_logging_policy").setLevel(logging.WARNING)


def url_to_fs(url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return (filesystem, path inside it) for an fsspec URL or a plain local path.

    Credentials come from storage_options or the environment only. For s3:// with no endpoint in
    storage_options, botocore (>= 1.31, which every supported s3fs requires) already honours
    AWS_ENDPOINT_URL, so it is not copied here. Raises Unavailable when a scheme's driver is not installed,
    UsageError for a scheme fsspec does not know (see `require_driver`).
    """
    links = url.split("::")  # a chained URL, "simplecache::gs://bucket/key": every link needs its driver
    for i, link in enumerate(links):
        scheme = fsspec.core.split_protocol(link)[0]
        require_driver(scheme or ("file" if i == len(links) - 1 else link), url)
    return fsspec.core.url_to_fs(url, **(storage_options or {}))


def require_driver(scheme: str, url: str) -> None:
    """Import the fsspec driver of `scheme` (of `url`, named in the errors). Unavailable when its package is
    not installed, naming the extra that installs it; UsageError when fsspec knows no such scheme."""
    try:
        fsspec.get_filesystem_class(scheme)
    except (ImportError, ValueError) as e:
        extra = EXTRAS.get(scheme)
        # fsspec raises ImportError with its own hint ("Install gcsfs to ...") from the failed import; abfss
        # comes from adlfs's entry point only, so without adlfs fsspec does not know it (ValueError).
        if extra:
            why = e.__cause__ or e
            raise Unavailable(
                f"{url}: the fsspec driver for {scheme}:// is not installed ({why}): "
                f"pip install 'orchestrator[{extra}]'"
            ) from e
        if isinstance(e, ImportError):
            raise Unavailable(f"{url}: the fsspec driver for {scheme}:// is not installed: {e}") from e
        raise UsageError(
            f"{url}: fsspec knows no scheme {scheme}://; use a local path, file://, s3://, gs:// or az://"
        ) from e


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL with '/', keeping its scheme (os.path.join would mangle 's3://')."""
    pieces = [url.rstrip("/")] + [p.strip("/") for p in parts if p.strip("/")]
    return "/".join(pieces)


# --- Transient remote errors -----------------------------------------------------------------------------

RETRIES = 5  # default attempts after the first, for a caller's retry loop around a whole object read

# HTTP statuses worth another try: timeout, throttling, server errors and overloaded gateways (not 501).
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
# S3 / botocore error codes for the same (botocore.retries.standard lists them).
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "RequestTimeoutException",
        "PriorRequestNotComplete", "Throttling", "ThrottlingException", "ThrottledException",
        "RequestThrottled", "RequestThrottledException", "TooManyRequestsException", "RequestLimitExceeded",
        "BandwidthLimitExceeded", "ProvisionedThroughputExceededException", "EC2ThrottledException",
    }
)  # fmt: skip
# s3fs turns S3 error responses into OSError with an errno (s3fs.errors.ERROR_CODE_TO_EXCEPTION): EBUSY for
# SlowDown / ServiceUnavailable / 503 / OperationAborted (409), EREMOTEIO for InternalError / 500. The others
# are what sockets say about lost or refused connections.
_TRANSIENT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "EBUSY", "EREMOTEIO", "ECONNRESET", "ECONNABORTED", "ECONNREFUSED", "EPIPE", "ETIMEDOUT", "EAGAIN",
        "ENETDOWN", "ENETUNREACH", "ENETRESET", "EHOSTUNREACH",
    )
    if hasattr(errno, name)
)  # fmt: skip


_Types = tuple[type[BaseException], ...]


@functools.cache
def _error_types() -> tuple[_Types, _Types, _Types]:
    """(permanent, transient, undecided) exception types, from the libraries that are installed.

    Imported here, not at module level, so local-only installs (no s3fs / aiohttp / botocore) work.
    """
    permanent: list[type[BaseException]] = [
        FileNotFoundError, PermissionError, FileExistsError, IsADirectoryError, NotADirectoryError,
        ValueError, TypeError, KeyError, NotImplementedError, tarfile.TarError,
    ]  # fmt: skip
    # socket.timeout is TimeoutError; asyncio.TimeoutError is too from Python 3.11 on, not on 3.10.
    transient: list[type[BaseException]] = [
        ConnectionError, TimeoutError, asyncio.TimeoutError, http.client.IncompleteRead
    ]  # fmt: skip
    undecided: list[type[BaseException]] = []  # wrappers whose chained cause tells
    with contextlib.suppress(ImportError):
        import s3fs.utils

        permanent.append(s3fs.utils.FileExpired)  # EBUSY, but the object changed: rereading mixes versions
    with contextlib.suppress(ImportError):
        import aiohttp

        permanent.append(aiohttp.ClientConnectorCertificateError)
        # ClientConnectionError covers ServerDisconnectedError, ClientOSError and socket/connect timeouts;
        # ClientPayloadError is a body cut short (what s3fs raises after its own retries run out).
        transient += [aiohttp.ClientPayloadError, aiohttp.ClientConnectionError]
    with contextlib.suppress(ImportError):
        import botocore.exceptions as boto
        import botocore.parsers

        undecided.append(boto.SSLError)  # a bad certificate, or a TLS handshake cut short
        transient += [
            boto.HTTPClientError,  # ResponseStreamingError, ReadTimeoutError, ConnectionClosedError
            boto.ConnectionError,  # EndpointConnectionError, ConnectTimeoutError
            boto.IncompleteReadError,
            boto.ChecksumError,  # a body damaged in transit; a bounded retry settles it
            boto.FlexibleChecksumError,
            botocore.parsers.ResponseParserError,  # throttling responses with broken XML (s3fs #484)
        ]
    with contextlib.suppress(ImportError):
        import urllib3.exceptions

        transient += [urllib3.exceptions.ProtocolError, urllib3.exceptions.TimeoutError]
    with contextlib.suppress(ImportError):
        import fsspec.exceptions

        transient.append(fsspec.exceptions.FSTimeoutError)
    return tuple(permanent), tuple(transient), tuple(undecided)


def _verdict(exc: BaseException) -> bool | None:
    """Whether this one exception is transient; None when it cannot tell (a wrapper: look at its cause)."""
    if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit, CancelledError
        return False
    permanent, transient, undecided = _error_types()
    if isinstance(exc, undecided):
        return None
    if isinstance(exc, permanent):  # first: FileNotFoundError and FileExpired are OSErrors too
        return False
    if isinstance(exc, transient):
        return True
    response = getattr(exc, "response", None)  # botocore ClientError
    if isinstance(response, dict) and "Error" in response:
        code = response["Error"].get("Code")
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return code in _TRANSIENT_CODES or status in _TRANSIENT_STATUS
    if isinstance(exc, OSError):  # generic EIO etc.: s3fs chains the ClientError as __cause__
        return True if exc.errno in _TRANSIENT_ERRNOS else None
    # aiohttp.ClientResponseError (.status), gcsfs HttpError (.code), urllib HTTPError, ...
    for name in ("status", "status_code", "code"):
        status = getattr(exc, name, None)
        if isinstance(status, int) and 400 <= status < 600:
            return status in _TRANSIENT_STATUS
    return None


def is_transient(exc: BaseException) -> bool:
    """True when reading the object again may well succeed: lost or reset connections, timeouts, bodies
    cut short, HTTP 5xx (not 501), 408 and 429, S3 throttling (503 SlowDown) - as raised by s3fs, botocore,
    aiohttp, urllib3, fsspec or the standard library. False for missing objects, denied access (403), bad
    requests and data errors (ValueError, tarfile errors) and anything unrecognised.

    The outermost exception that can be classified decides, following __cause__ (else __context__) as
    tracebacks do, so s3fs's OSError(EIO) wrapping a 502 ClientError counts as transient while a
    FileNotFoundError raised while handling a timeout does not.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        verdict = _verdict(current)
        if verdict is not None:
            return verdict
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return False


_JITTER = random.SystemRandom()  # not the seeded `random`: ranks and workers must not sleep in lockstep


def backoff(attempt: int, base: float = 0.5, cap: float = 8.0) -> float:
    """Seconds to sleep before retry `attempt` (1-based): "full jitter" exponential backoff, uniform in
    [0, min(cap, base * 2 ** (attempt - 1))]. The random spread keeps many readers that failed together
    (a throttled bucket) from retrying together; the cap bounds a single wait.
    """
    if attempt < 1:
        raise ValueError(f"attempt is 1-based, got {attempt}")
    return _JITTER.uniform(0.0, min(cap, base * 2.0 ** min(attempt - 1, 64)))
