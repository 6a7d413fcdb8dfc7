"""Transient-error classification and backoff (orchestrator.storage), and what s3fs does with real
faults from the flaky_s3 proxy: which faults it retries by itself and which exception reaches the caller."""

from __future__ import annotations

import asyncio
import errno
import http.client
import io
import os
import socket
import ssl
import statistics
import tarfile
import urllib.parse

import aiohttp
import botocore.exceptions as boto
import pytest
import s3fs
import urllib3.exceptions
from botocore.parsers import ResponseParserError
from fsspec.exceptions import FSTimeoutError
from s3fs.errors import translate_boto_error
from s3fs.utils import FileExpired

from orchestrator.storage import RETRIES, backoff, is_transient

BLOCK = 1 << 20  # readahead block: a 6 MiB object takes several range GETs


def _client_error(status: int, code: str, message: str = "m") -> boto.ClientError:
    response = {"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": status}}
    return boto.ClientError(response, "GetObject")


def _s3fs_error(status: int, code: str, message: str = "m") -> BaseException:
    """The exception s3fs raises for this error response (its translate_boto_error, __cause__ set)."""
    return translate_boto_error(_client_error(status, code, message))


def _raised(outer: BaseException, inner: BaseException, explicit: bool = True) -> BaseException:
    """outer raised `from inner` (explicit) or while handling inner (implicit __context__)."""
    try:
        try:
            raise inner
        except BaseException:
            if explicit:
                raise outer from inner
            raise outer  # noqa: B904 - the implicit chain (__context__) is the point
    except BaseException as e:
        return e


def _response_error(status: int) -> aiohttp.ClientResponseError:
    return aiohttp.ClientResponseError(None, (), status=status)  # type: ignore[arg-type]


TRANSIENT = {
    "ConnectionResetError": ConnectionResetError(errno.ECONNRESET, "reset"),
    "ConnectionAbortedError": ConnectionAbortedError(),
    "BrokenPipeError": BrokenPipeError(),
    "ConnectionRefusedError": ConnectionRefusedError(),
    "TimeoutError": TimeoutError(),
    "asyncio.TimeoutError": asyncio.TimeoutError(),
    "FSTimeoutError": FSTimeoutError(),
    "http.IncompleteRead": http.client.IncompleteRead(b"x", 10),
    "http.RemoteDisconnected": http.client.RemoteDisconnected(),
    "OSError-ECONNRESET": OSError(errno.ECONNRESET, "reset"),
    "OSError-ETIMEDOUT": OSError(errno.ETIMEDOUT, "timed out"),
    "aiohttp.ClientPayloadError": aiohttp.ClientPayloadError("Response payload is not completed"),
    "aiohttp.ServerDisconnectedError": aiohttp.ServerDisconnectedError(),
    "aiohttp.ClientOSError": aiohttp.ClientOSError(errno.ECONNRESET, "reset"),
    "aiohttp.ServerTimeoutError": aiohttp.ServerTimeoutError(),
    "aiohttp.503": _response_error(503),
    "aiohttp.429": _response_error(429),
    "boto.ResponseStreamingError": boto.ResponseStreamingError(error="x"),
    "boto.IncompleteReadError": boto.IncompleteReadError(actual_bytes=1, expected_bytes=2),
    "boto.ReadTimeoutError": boto.ReadTimeoutError(endpoint_url="u"),
    "boto.ConnectTimeoutError": boto.ConnectTimeoutError(endpoint_url="u"),
    "boto.EndpointConnectionError": boto.EndpointConnectionError(endpoint_url="u"),
    "boto.ConnectionClosedError": boto.ConnectionClosedError(endpoint_url="u"),
    "boto.ResponseParserError": ResponseParserError("bad xml"),
    "urllib3.ProtocolError": urllib3.exceptions.ProtocolError("Connection aborted"),
    "urllib3.ReadTimeoutError": urllib3.exceptions.ReadTimeoutError(None, "u", "read timed out"),
    "ClientError-503-SlowDown": _client_error(503, "SlowDown"),
    "ClientError-500": _client_error(500, "InternalError"),
    "ClientError-502": _client_error(502, "502"),
    "ClientError-504": _client_error(504, "GatewayTimeout"),
    "ClientError-400-Throttling": _client_error(400, "ThrottlingException"),
    # What s3fs raises: OSError with an errno, the ClientError as __cause__.
    "s3fs-503-SlowDown": _s3fs_error(503, "SlowDown"),  # OSError(EBUSY)
    "s3fs-503-bare": _s3fs_error(503, "503"),  # HEAD responses have no body: the code is the status
    "s3fs-500": _s3fs_error(500, "InternalError"),  # OSError(EREMOTEIO)
    "s3fs-502": _s3fs_error(502, "BadGateway"),  # OSError(EIO): the cause decides
    "s3fs-504": _s3fs_error(504, "504"),
    "s3fs-RequestTimeout": _s3fs_error(400, "RequestTimeout"),  # TimeoutError
    "chained-cause": _raised(RuntimeError("reading shard"), ConnectionResetError()),
    "chained-context": _raised(RuntimeError("reading shard"), aiohttp.ClientPayloadError("cut"), False),
    "chained-twice": _raised(RuntimeError("outer"), _raised(OSError(errno.EIO, "io"), TimeoutError())),
    "boto.SSLError-handshake": _raised(
        boto.SSLError(endpoint_url="u", error="e"), aiohttp.ServerDisconnectedError(), False
    ),
}

PERMANENT = {
    "FileNotFoundError": FileNotFoundError("missing"),
    "PermissionError": PermissionError("denied"),
    "ValueError": ValueError("bad"),
    "KeyError": KeyError("k"),
    "tarfile.ReadError": tarfile.ReadError("unexpected end of data"),
    "RuntimeError": RuntimeError("no cause"),
    "OSError-EIO": OSError(errno.EIO, "no cause"),
    "OSError-EINVAL": OSError(errno.EINVAL, "invalid"),
    "KeyboardInterrupt": KeyboardInterrupt(),
    "CancelledError": asyncio.CancelledError(),
    "ssl.SSLCertVerificationError": ssl.SSLCertVerificationError("bad certificate"),
    "FileExpired": FileExpired("b/k", '"etag"'),  # EBUSY, but the object changed under the reader
    "aiohttp.404": _response_error(404),
    "aiohttp.403": _response_error(403),
    "ClientError-404": _client_error(404, "NoSuchKey"),
    "ClientError-403": _client_error(403, "AccessDenied"),
    "ClientError-501": _client_error(501, "NotImplemented"),
    "s3fs-404": _s3fs_error(404, "NoSuchKey"),  # FileNotFoundError
    "s3fs-403": _s3fs_error(403, "AccessDenied"),  # PermissionError
    "s3fs-400": _s3fs_error(400, "InvalidArgument"),  # OSError(EINVAL)
    "s3fs-416": _s3fs_error(416, "InvalidRange"),
    "boto.NoCredentialsError": boto.NoCredentialsError(),
    "boto.SSLError-certificate": _raised(
        boto.SSLError(endpoint_url="u", error="e"),
        aiohttp.ClientConnectorCertificateError(None, ssl.SSLCertVerificationError("bad")),  # type: ignore
        False,
    ),
    # The outermost classifiable exception decides: a missing object found while handling a timeout.
    "missing-after-timeout": _raised(FileNotFoundError("missing"), TimeoutError(), False),
    "ValueError-from-reset": _raised(ValueError("bad member"), ConnectionResetError()),
}


@pytest.mark.parametrize("exc", TRANSIENT.values(), ids=TRANSIENT.keys())
def test_is_transient_true(exc: BaseException) -> None:
    assert is_transient(exc)


@pytest.mark.parametrize("exc", PERMANENT.values(), ids=PERMANENT.keys())
def test_is_transient_false(exc: BaseException) -> None:
    assert not is_transient(exc)


def test_s3fs_errnos_are_what_is_transient_expects() -> None:
    """Pins the s3fs mapping is_transient relies on (s3fs.errors.ERROR_CODE_TO_EXCEPTION)."""
    slow_down = TRANSIENT["s3fs-503-SlowDown"]
    assert type(slow_down) is OSError and slow_down.errno == errno.EBUSY
    assert TRANSIENT["s3fs-500"].errno == errno.EREMOTEIO
    assert TRANSIENT["s3fs-502"].errno == errno.EIO
    assert isinstance(TRANSIENT["s3fs-502"].__cause__, boto.ClientError)
    assert type(TRANSIENT["s3fs-RequestTimeout"]) is TimeoutError
    assert type(PERMANENT["s3fs-404"]) is FileNotFoundError and type(PERMANENT["s3fs-403"]) is PermissionError


def test_is_transient_survives_a_cycle_in_the_chain() -> None:
    a, b = RuntimeError("a"), RuntimeError("b")
    a.__context__, b.__context__ = b, a
    assert not is_transient(a)


def test_backoff_bounds() -> None:
    assert RETRIES == 5
    for attempt in range(1, 15):
        bound = min(8.0, 0.5 * 2 ** (attempt - 1))
        waits = [backoff(attempt) for _ in range(300)]
        assert all(0.0 <= w <= bound for w in waits), attempt
        assert max(waits) > 0.8 * bound  # full jitter spans the whole range
    assert all(0.0 <= backoff(a, base=0.1, cap=1.0) <= min(1.0, 0.1 * 2 ** (a - 1)) for a in range(1, 10))
    assert backoff(100_000) <= 8.0  # no float overflow
    with pytest.raises(ValueError):
        backoff(0)


def test_backoff_grows_in_expectation() -> None:
    means = [statistics.fmean(backoff(a) for _ in range(4000)) for a in range(1, 9)]
    for attempt, mean in enumerate(means, 1):  # uniform on [0, bound]: the mean is half the bound
        assert mean == pytest.approx(min(8.0, 0.5 * 2 ** (attempt - 1)) / 2, rel=0.1)
    assert means[0] < means[1] < means[2] < means[3] < means[4]  # 0.25, 0.5, 1, 2, 4; then capped at 4


def test_unreachable_endpoint_is_transient() -> None:
    """What reopening a shard raises while the endpoint is down (botocore retries it first)."""
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fs = s3fs.S3FileSystem(
        key="k", secret="s", skip_instance_cache=True, config_kwargs={"retries": {"total_max_attempts": 1}},
        client_kwargs={"endpoint_url": f"http://127.0.0.1:{port}"},
    )  # fmt: skip
    with pytest.raises(boto.EndpointConnectionError) as caught:
        fs.open("bucket/key", "rb")
    assert is_transient(caught.value)


# --- Real faults through the flaky_s3 proxy -----------------------------------------------------------------


def _fs(flaky_s3, attempts: int | None = None) -> s3fs.S3FileSystem:
    """s3fs through the proxy; attempts: botocore's total attempts and s3fs's retries (None: defaults)."""
    config = {} if attempts is None else {"retries": {"total_max_attempts": attempts}}
    fs = s3fs.S3FileSystem(skip_instance_cache=True, config_kwargs=config, **flaky_s3.storage_options)
    if attempts is not None:
        fs.retries = attempts  # s3fs's own loops (_error_wrapper) make this many attempts
    return fs


def _read_with_fault(fs: s3fs.S3FileSystem, flaky_s3, path: str, mode: str, times: int | None) -> bytes:
    """Read like tarfile does (small reads through a readahead file), faulting GETs from the 2nd block on."""
    with fs.open(path, "rb", block_size=BLOCK, cache_type="readahead") as f:
        out = [f.read(10240)]
        flaky_s3.inject(f"*/{path.rsplit('/', 1)[1]}", mode, times)
        while chunk := f.read(10240):
            out.append(chunk)
    return b"".join(out)


@pytest.fixture
def big_object(flaky_s3, s3_bucket: str) -> tuple[str, bytes]:
    data = os.urandom(6 << 20)
    path = f"{s3_bucket}/shard.bin"
    _fs(flaky_s3).pipe(path, data)  # through the proxy: PUT forwarding works too
    return path, data


MODES = ["503", "500", "502", "504", "reset", "truncate", "drop"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_single_fault_is_retried_inside_s3fs(flaky_s3, big_object: tuple[str, bytes], mode: str) -> None:
    """Default settings: one fault never reaches the caller; the same range is simply fetched again."""
    path, data = big_object
    assert _read_with_fault(_fs(flaky_s3), flaky_s3, path, mode, times=1) == data
    assert flaky_s3.injected == {mode: 1}
    gets = [(key, range_, fault) for method, key, range_, fault in flaky_s3.log if method == "GET"]
    i = next(i for i, g in enumerate(gets) if g[2])
    assert gets[i + 1] == (gets[i][0], gets[i][1], None)  # the faulted range, asked again


# For each fault that never stops, with botocore and s3fs both set to 2 attempts: the exception that reaches
# the caller, its errno, and how many GETs were faulted (which shows which layer retried).
EXHAUSTED = {
    # botocore retries 5xx (2), then s3fs's _call_s3 retries ClientErrors whose text has "SlowDown" (x2).
    "503": (OSError, errno.EBUSY, 4),
    "500": (OSError, errno.EREMOTEIO, 2),  # botocore only
    "502": (OSError, errno.EIO, 2),
    "504": (OSError, errno.EIO, 2),
    # Mid-body: botocore has returned already; s3fs's _inner_fetch retries the range GET (2).
    "reset": (aiohttp.ClientPayloadError, None, 2),
    "truncate": (aiohttp.ClientPayloadError, None, 2),
}


@pytest.mark.slow
@pytest.mark.parametrize("mode", [*EXHAUSTED, "drop"])
def test_endless_fault_raises(flaky_s3, big_object: tuple, mode: str) -> None:
    path, _ = big_object
    with pytest.raises(Exception) as caught:
        _read_with_fault(_fs(flaky_s3, attempts=2), flaky_s3, path, mode, times=None)
    exc = caught.value
    assert is_transient(exc), repr(exc)
    if mode == "drop":  # no response: botocore retries (2); aiohttp retries once more on a pooled connection
        assert isinstance(exc, (boto.EndpointConnectionError, boto.ConnectionClosedError)), repr(exc)
        assert 2 <= flaky_s3.injected[mode] <= 4
        return
    kind, code, faults = EXHAUSTED[mode]
    assert type(exc) is kind, repr(exc)
    if code is not None:
        assert exc.errno == code
        assert isinstance(exc.__cause__, boto.ClientError)
        assert exc.__cause__.response["ResponseMetadata"]["HTTPStatusCode"] == int(mode)
    assert flaky_s3.injected == {mode: faults}


def _tar(members: int, size: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(members):
            info = tarfile.TarInfo(f"{i:04d}.bin")
            info.size = size
            tar.addfile(info, io.BytesIO(os.urandom(size)))
    return buf.getvalue()


@pytest.mark.slow
def test_fault_passes_through_tarfile_stream_unchanged(flaky_s3, s3_bucket: str) -> None:
    """In _read_piece's setup (tarfile "r|" over a readahead file) the transport's exception reaches the
    loop as it is, not as a tarfile.ReadError; with default retries a single fault is invisible."""
    path = f"{s3_bucket}/shard.tar"
    payload = _tar(members=12, size=400_000)
    fs = _fs(flaky_s3, attempts=1)
    fs.pipe(path, payload)
    with (
        fs.open(path, "rb", block_size=BLOCK, cache_type="readahead") as f,
        tarfile.open(fileobj=f, mode="r|") as tar,
    ):
        members = iter(tar)
        tar.extractfile(next(members)).read()
        flaky_s3.inject("*/shard.tar", "reset", times=None)
        with pytest.raises(aiohttp.ClientPayloadError) as caught:
            for member in members:
                tar.extractfile(member).read()
    assert is_transient(caught.value)

    flaky_s3.clear()
    before = flaky_s3.injected["reset"]
    with (
        _fs(flaky_s3).open(path, "rb", block_size=BLOCK, cache_type="readahead") as f,
        tarfile.open(fileobj=f, mode="r|") as tar,
    ):
        members = iter(tar)
        sizes = [len(tar.extractfile(next(members)).read())]
        flaky_s3.inject("*/shard.tar", "reset", times=1)
        sizes += [len(tar.extractfile(m).read()) for m in members]
    assert sizes == [400_000] * 12 and flaky_s3.injected["reset"] == before + 1


@pytest.mark.slow
def test_proxy_forwards_faithfully(flaky_s3, s3_server, big_object: tuple[str, bytes]) -> None:
    """Without faults the proxy is invisible: same metadata (ETag), ranges, listings; other keys unharmed."""
    path, data = big_object
    fs, direct = _fs(flaky_s3), s3fs.S3FileSystem(skip_instance_cache=True, **s3_server.storage_options)
    assert fs.info(path)["ETag"] == direct.info(path)["ETag"] and fs.info(path)["size"] == len(data)
    assert fs.ls(path.split("/")[0]) == direct.ls(path.split("/")[0])
    flaky_s3.inject("*/other-*", "503", times=None)
    assert fs.cat_file(path, start=12345, end=3_000_000) == data[12345:3_000_000]
    url = urllib.parse.urlsplit(fs.url(path))  # presigned for the proxy's host
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    conn.request("GET", f"{url.path}?{url.query}", headers={"Range": "bytes=100-199"})
    resp = conn.getresponse()
    assert resp.status == 206 and resp.read() == data[100:200]
    assert resp.getheader("Content-Range") == f"bytes 100-199/{len(data)}" and resp.getheader("ETag")
    conn.request("GET", "/nobucket/other-1")
    resp = conn.getresponse()
    assert resp.status == 503 and b"<Code>SlowDown</Code>" in resp.read()
    conn.close()
    assert flaky_s3.injected == {"503": 1}
