"""The download transport: which URLs to try, and one transfer with retries, ``Range`` resume, proxies, CA bundles, a
size bound and a minimum rate, into a file and a hash it is handed (a `Sink`). It knows nothing of the cache: it
never chooses file names, checks a hash or writes records.
"""
from __future__ import annotations

import dataclasses
import hashlib
import http.client
import math
import os
import re
import socket
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import BinaryIO, Callable, List, Optional

from tqdm import tqdm

from . import _registry

__all__ = ["RangeNotSatisfiable", "SettingError", "Settings", "Sink", "TransferError", "download_sources", "fetch",
           "make_opener", "offline_variable"]

CHUNK_SIZE = 1 << 20  # 1 MiB per read and hash step: per-call overhead vanishes, memory stays flat
DEFAULT_TIMEOUT = 30.0  # seconds without a byte before a connection counts as stuck rather than slow
MAX_TIMEOUT = 86_400.0  # a day: more is a typo, and sockets reject timeouts past what a C timeval holds
DEFAULT_RETRIES = 5
DEFAULT_BACKOFF = 1.0
MAX_BACKOFF = 30.0  # cap on one wait: with the defaults the five retries wait 31 s in all
# A transfer that averages less than this many bytes a second, once RATE_GRACE seconds have passed, is given up:
# 10 kB/s still brings the largest release (1.35 GB) in under two days, while a server that drips a byte a second
# cannot hold a download (and its lock) for ever; the per-read timeout alone never fires on such a server.
DEFAULT_MIN_RATE = 10_000.0
RATE_GRACE = 60.0  # seconds before the average rate counts: connecting, TLS, slow start and a retry or two
# Seconds a download may add no byte before a process waiting for it fetches the file itself (and, for twice that,
# counts as a dead one's): twice the read timeout, so that a healthy transfer never looks stalled.
DEFAULT_STALL_TIMEOUT = 60.0

RELEASE_CDN = "https://openaipublic.azureedge.net/clip/"
RELEASE_ORIGIN = "https://openaipublic.blob.core.windows.net/clip/"
USER_AGENT = "clip-dropin (python urllib)"

_OFFLINE_VARIABLES = ("CLIP_OFFLINE", "HF_HUB_OFFLINE")
_CA_VARIABLES = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})
_BASE_SCHEMES = ("http", "https", "file")
_RETRY_STATUSES = frozenset({408, 429})  # request timeout, too many requests; every 5xx is retried too
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", re.I)

_sleep = time.sleep  # the one place retries wait; tests replace it to see the backoff without waiting


class SettingError(ValueError):
    """An environment variable holds a value that cannot be used; the message names the variable."""


class TransferError(Exception):
    """This source will not give the file (4xx, retries spent, too slow, too large); another source may."""


class RangeNotSatisfiable(TransferError):
    """HTTP 416: the server has no bytes after the ones the sink already holds."""


class _Retry(Exception):
    """A failure worth another attempt at the same source: connection error, timeout, 5xx, cut-off body."""


def offline_variable() -> Optional[str]:
    """The first of ``CLIP_OFFLINE``, ``HF_HUB_OFFLINE`` set to 1, true, yes or on (any case), else None;
    `SettingError` if one holds something that is neither true nor false (0, false, no, off or empty)."""
    for name in _OFFLINE_VARIABLES:
        value = os.environ.get(name, "").strip().lower()
        if value in _TRUE:
            return name
        if value not in _FALSE:
            raise SettingError(f"{name}={os.environ[name]!r} is neither true (1, true, yes, on) nor false "
                               "(0, false, no, off)")
    return None


@dataclasses.dataclass(frozen=True)
class Settings:
    """How transfers behave, each value read from its environment variable (see the README)."""

    timeout: float
    retries: int
    backoff: float
    min_rate: float
    stall_timeout: float = DEFAULT_STALL_TIMEOUT

    @classmethod
    def from_environment(cls) -> "Settings":
        """Read and check the settings now; raise `SettingError` naming the first variable that is wrong."""
        return cls(timeout=_number("CLIP_DOWNLOAD_TIMEOUT", DEFAULT_TIMEOUT, float, 1e-3, MAX_TIMEOUT),
                   retries=_number("CLIP_DOWNLOAD_RETRIES", DEFAULT_RETRIES, int, 0, 1000),
                   backoff=_number("CLIP_DOWNLOAD_BACKOFF", DEFAULT_BACKOFF, float, 0.0, MAX_BACKOFF),
                   min_rate=_number("CLIP_DOWNLOAD_MIN_RATE", DEFAULT_MIN_RATE, float, 0.0, 1e12),
                   stall_timeout=_number("CLIP_DOWNLOAD_STALL_TIMEOUT", DEFAULT_STALL_TIMEOUT, float, 0.1,
                                         MAX_TIMEOUT))


def _number(variable: str, default: float, kind: Callable, minimum: float, maximum: float):
    """A finite number from ``variable`` within [minimum, maximum], or ``default`` when it is unset or empty."""
    text = os.environ.get(variable, "").strip()
    if not text:
        return default
    try:
        value = kind(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or not minimum <= value <= maximum:
        article = "an integer" if kind is int else "a number"
        raise SettingError(f"{variable}={text!r} is not {article} from {minimum:g} to {maximum:g}; unset it to get "
                           f"the default ({default:g})")
    return value


def download_sources(url: str) -> List[str]:
    """The URLs to try for ``url``, in order: ``$CLIP_DOWNLOAD_BASE/<file name>`` when set, the URL, and the release
    CDN's storage origin for URLs on the CDN. `SettingError` for a base that is not an http(s):// or file:// URL."""
    sources = []
    base = os.environ.get("CLIP_DOWNLOAD_BASE", "").strip()
    if base:
        if urllib.parse.urlsplit(base).scheme.lower() not in _BASE_SCHEMES:
            raise SettingError(f"CLIP_DOWNLOAD_BASE={base!r} is not an https://, http:// or file:// URL of the "
                               "folder that holds the release files")
        sources.append(base.rstrip("/") + "/" + _registry.file_name(url))
    sources.append(url)
    if url.startswith(RELEASE_CDN):
        sources.append(RELEASE_ORIGIN + url[len(RELEASE_CDN):])
    return list(dict.fromkeys(sources))


def make_opener() -> urllib.request.OpenerDirector:
    """An opener that follows redirects, uses the environment's proxies and its CA bundle, if one is named."""
    context = ssl.create_default_context()
    variable = next((name for name in _CA_VARIABLES if os.environ.get(name)), None)
    if variable is not None:
        bundle = os.environ[variable]
        try:
            context = ssl.create_default_context(**{"capath" if os.path.isdir(bundle) else "cafile": bundle})
        except (OSError, ssl.SSLError) as error:
            raise SettingError(f"{variable}={bundle} cannot be used as a CA bundle: {error}") from error
    return urllib.request.build_opener(urllib.request.HTTPSHandler(context=context))


# ----------------------------------------------------------------------------------------------------------------
# Transfers


class Sink:
    """Where a transfer puts a body: a binary file open for writing after the ``size`` bytes it holds (a transfer
    asks the server for the rest), and ``digest``, the running hash of its bytes."""

    def __init__(self, file: BinaryIO, digest, size: int) -> None:
        self.file = file
        self.digest = digest
        self.size = size
        self.spliced = size > 0  # its bytes come from more than one response
        self.resumable = False  # a source has accepted (or offered) Range requests
        self.on_write: Optional[Callable[[], None]] = None  # called before each chunk: a heartbeat, and a check

    def append(self, chunk: bytes) -> None:
        if self.on_write is not None:
            self.on_write()
        self.file.write(chunk)
        self.file.flush()  # in the file at once, so that a killed process leaves every byte received to resume
        self.digest.update(chunk)
        self.size += len(chunk)

    def restart(self) -> None:
        """Drop every byte: the next transfer fetches the whole file."""
        self.file.seek(0)
        self.file.truncate()
        self.digest = hashlib.new(self.digest.name)
        self.size, self.spliced = 0, False


@dataclasses.dataclass
class _Budget:
    """What one `fetch` may still take: bytes (the size bound) and time (the minimum average rate)."""

    limit: Optional[int]
    min_rate: float
    label: str
    started: float = dataclasses.field(default_factory=time.monotonic)
    received: int = 0

    def too_large(self) -> TransferError:
        return TransferError(f"the server sends more than {self.limit} bytes, more than {self.label} can have")

    def check_rate(self) -> None:
        elapsed = time.monotonic() - self.started
        if self.min_rate and elapsed > RATE_GRACE and self.received < self.min_rate * elapsed:
            raise TransferError(
                f"too slow: {self.received} bytes in {elapsed:.0f} s, under the {self.min_rate:g} bytes a second "
                "that CLIP_DOWNLOAD_MIN_RATE asks for (0 turns the check off)")


def fetch(url: str, sink: Sink, settings: Settings, opener: urllib.request.OpenerDirector, *, label: str,
          limit: Optional[int] = None) -> None:
    """Append the rest of ``url``'s body to ``sink``, resuming and retrying with backoff, until the body ends.

    ``label`` names the file in the progress bar and messages; ``limit`` is the most bytes the whole file may have.
    Raises `RangeNotSatisfiable` if the server has no bytes after those ``sink`` holds (HTTP 416), and
    `TransferError` if this source will not give the rest (an HTTP error, retries spent, too slow or too large).
    """
    budget = _Budget(limit, settings.min_rate, label)
    failures = 0
    best = sink.size
    while True:
        try:
            _transfer(url, sink, settings.timeout, opener, budget)
            return
        except _Retry as error:
            if sink.size > best:  # new bytes arrived: a flaky link that keeps delivering is not failing
                best, failures = sink.size, 0
            failures += 1
            if failures > settings.retries:
                raise TransferError(f"{error} (gave up after {failures} failed attempts)") from None
            budget.check_rate()
            _sleep(min(settings.backoff * 2 ** (failures - 1), MAX_BACKOFF))


def _transfer(url: str, sink: Sink, timeout: float, opener: urllib.request.OpenerDirector, budget: _Budget) -> None:
    """One request: resume or restart ``sink`` and append the body; raise _Retry if it ends early."""
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    if sink.size:
        request.add_header("Range", f"bytes={sink.size}-")
    try:
        response = opener.open(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        error.close()
        raise _status_failure(error.code, error.reason) from None
    except (OSError, http.client.HTTPException, ValueError) as error:
        raise _connection_failure(error, timeout) from None
    with response:
        total = _start(response, sink)
        if budget.limit is not None and total is not None and total > budget.limit:
            raise budget.too_large()
        progress = tqdm(total=total, initial=sink.size, unit="B", unit_scale=True, unit_divisor=1024,
                        desc=budget.label, disable=None, leave=False)
        # read1 hands over whatever has arrived (up to a chunk), so the sink keeps every byte received when the
        # connection breaks or the process is killed; read() would wait for a whole chunk first.
        read = getattr(response, "read1", response.read)
        with progress:
            while True:
                try:
                    chunk = read(CHUNK_SIZE)
                except (OSError, http.client.HTTPException) as error:
                    raise _Retry(f"connection broken after {sink.size} bytes: "
                                 f"{_connection_failure(error, timeout)}") from None
                if not chunk:
                    break
                if budget.limit is not None and sink.size + len(chunk) > budget.limit:
                    sink.restart()  # bytes past the bound belong to no release file: nothing worth resuming
                    raise budget.too_large()
                sink.append(chunk)
                budget.received += len(chunk)
                progress.update(len(chunk))
                budget.check_rate()
    if total is not None and sink.size < total:
        raise _Retry(f"connection closed after {sink.size} of {total} bytes")


def _start(response, sink: Sink) -> Optional[int]:
    """Check how the server answered (resumed or whole file) and ready ``sink``; return the total size if known."""
    status = response.status or 200  # file:// answers have no status
    headers = response.headers
    if headers.get("Accept-Ranges", "").strip().lower() == "bytes":
        sink.resumable = True
    if status == 206:
        match = _CONTENT_RANGE.fullmatch(headers.get("Content-Range", "").strip())
        if match is None or int(match[1]) != sink.size:
            sink.restart()  # some other range than asked: splicing it would corrupt the file, so start over
            raise _Retry(f"the server answered the range request with {headers.get('Content-Range')!r}")
        sink.resumable = True
        sink.spliced = sink.spliced or sink.size > 0
        return None if match[3] == "*" else int(match[3])
    if not 200 <= status < 300:
        raise TransferError(f"unexpected HTTP {status} {response.reason}")
    if sink.size:
        sink.restart()  # the server ignored the Range header and sends the whole file: restart cleanly
    length = headers.get("Content-Length", "").strip()
    return int(length) if length.isdigit() else None  # no Content-Length: read to the end (or the size bound)


def _status_failure(code: int, reason: str) -> Exception:
    if code == 416:
        return RangeNotSatisfiable("HTTP 416 Range Not Satisfiable")
    if code >= 500 or code in _RETRY_STATUSES:
        return _Retry(f"HTTP {code} {reason}")
    return TransferError(f"HTTP {code} {reason}")


def _connection_failure(error: BaseException, timeout: float) -> Exception:
    reason = error.reason if isinstance(error, urllib.error.URLError) else error
    if isinstance(reason, ssl.SSLCertVerificationError):
        return TransferError(
            f"TLS certificate not trusted ({reason.verify_message}); behind a proxy or firewall that inspects TLS, "
            "point SSL_CERT_FILE or REQUESTS_CA_BUNDLE at its CA bundle")
    if isinstance(reason, socket.gaierror):
        return TransferError(f"cannot resolve the host name ({reason}): no network here, or it needs a proxy")
    if isinstance(reason, (socket.timeout, TimeoutError)):
        return _Retry(f"no answer within {timeout:g} s (CLIP_DOWNLOAD_TIMEOUT)")
    if (isinstance(error, ValueError) or isinstance(reason, (FileNotFoundError, PermissionError))
            or not isinstance(reason, (OSError, http.client.HTTPException))):
        return TransferError(str(reason))  # a malformed URL, an unknown scheme, a missing file://: retries won't help
    return _Retry(str(reason) or type(reason).__name__)
