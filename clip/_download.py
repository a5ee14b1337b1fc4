"""Download release files into the cache: atomic, resumable, verified once, safe across processes.

How a file gets into the cache
------------------------------
``download(url)`` returns ``<cache folder>/<last URL segment>`` once that file's SHA-256 matches the expected one
(by default the URL's second-to-last path segment, as in every CLIP release URL). The bytes are streamed into
``<file>.partial`` in the same folder and hashed as they are written; only a verified file is moved into place with
``os.replace``, so the final path never holds a partial or unverified file, whatever interrupts the transfer
(an exception, Ctrl-C, ``kill -9``). A lock file per target (``<file>.lock``) makes processes that ask for the same
file at once download it once: the others wait, then find it verified. A broken transfer is resumed with an HTTP
``Range`` request where the server allows it and restarted where it does not; a partial file left by a killed
process is resumed the same way (the final hash check guards against a prefix that does not belong: on a
mismatch the file is fetched whole once more). A download that fails for good keeps its partial file only when the
server takes ``Range`` requests, so that the next call resumes it; otherwise it is deleted.

Verified once
-------------
After a file is verified (downloaded, or first found in the cache), ``<file>.sha256.json`` beside it records
``{"file": name, "sha256": hex, "size": bytes, "mtime_ns": int}``. Later calls trust the file while its size and
modification time match the record, so loading a cached model hashes nothing; a file that changed is hashed again
(streaming) and, if it no longer matches, downloaded afresh with a warning. A read-only cache (a cluster's shared
file system) holding verified files and their records is used without taking a lock or writing anything.
``verify_cache()`` re-hashes every recorded file, for changes that kept the size and modification time.

Sources, in this order
----------------------
1. ``$CLIP_DOWNLOAD_BASE/<file name>`` when that variable is set: a mirror for air-gapped machines, one flat folder
   holding the files under their release names (``https://``, ``http://`` or ``file://``). It comes first because a
   machine that needs it usually cannot reach the release host at all.
2. The URL itself.
3. For URLs on the release CDN (``https://openaipublic.azureedge.net/clip/...``), the same path on its storage origin
   (``https://openaipublic.blob.core.windows.net/clip/...``), which serves the same bytes.
4. The caller's ``mirrors``.

Every source is checked against the same SHA-256, so no source can change the weights.

Environment variables (all read at call time)
---------------------------------------------
``CLIP_CACHE_DIR``, ``XDG_CACHE_HOME``
    The cache folder, when no ``download_root`` is given (see `cache_dir`).
``CLIP_OFFLINE``, ``HF_HUB_OFFLINE``
    ``1``, ``true``, ``yes`` or ``on``: never touch the network; a missing file is an error that says where to put it.
``CLIP_DOWNLOAD_BASE``
    A mirror's base URL, tried first (see above).
``CLIP_DOWNLOAD_TIMEOUT``
    Seconds to wait for a connection and for each read (default 30).
``CLIP_DOWNLOAD_RETRIES``
    Retries per source after a connection error, a timeout or an HTTP 5xx, 408 or 429 (default 5). An attempt that
    brings new bytes resets the count, so a slow, flaky link still finishes.
``CLIP_DOWNLOAD_BACKOFF``
    Seconds to wait before the first retry, doubled for each next one (default 1, each wait at most 30).
``HTTPS_PROXY``, ``HTTP_PROXY``, ``NO_PROXY`` (and their lower-case forms)
    Proxies, as ``urllib`` reads them.
``SSL_CERT_FILE``, ``REQUESTS_CA_BUNDLE``, ``CURL_CA_BUNDLE``
    The first one set names a CA bundle (a file or a folder) to trust instead of the system's, e.g. for a proxy
    that inspects TLS.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.client
import json
import os
import posixpath
import re
import socket
import ssl
import stat
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import warnings
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import filelock
from tqdm import tqdm

__all__ = [
    "CacheCheck",
    "DownloadError",
    "cache_dir",
    "cached_path",
    "download",
    "download_sources",
    "is_offline",
    "sha256_from_url",
    "verify_cache",
]

PathLike = Union[str, "os.PathLike[str]"]

CHUNK_SIZE = 1 << 20  # 1 MiB per read and hash step: per-call overhead vanishes, memory stays flat
DEFAULT_TIMEOUT = 30.0  # seconds without a byte before a connection counts as stuck rather than slow
DEFAULT_RETRIES = 5
DEFAULT_BACKOFF = 1.0
MAX_BACKOFF = 30.0  # cap on one wait: with the defaults the five retries wait 31 s in all
LOCK_TIMEOUT = 6 * 3600.0  # another process may be fetching 1.35 GB over a slow link; past this, something is stuck

RECORD_SUFFIX = ".sha256.json"
PARTIAL_SUFFIX = ".partial"
LOCK_SUFFIX = ".lock"

RELEASE_CDN = "https://openaipublic.azureedge.net/clip/"
RELEASE_ORIGIN = "https://openaipublic.blob.core.windows.net/clip/"
USER_AGENT = "clip-dropin (python urllib)"

_OFFLINE_VARIABLES = ("CLIP_OFFLINE", "HF_HUB_OFFLINE")
_CA_VARIABLES = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")
_TRUTHY = frozenset({"1", "true", "yes", "on"})
_RETRY_STATUSES = frozenset({408, 429})  # request timeout, too many requests; every 5xx is retried too
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", re.I)

_sleep = time.sleep  # the one place retries wait; tests replace it to see the backoff without waiting


class DownloadError(RuntimeError):
    """A file could not be downloaded or verified; the message says what was tried and what to do."""


@dataclasses.dataclass(frozen=True)
class CacheCheck:
    """The result of re-hashing one recorded file of the cache (see `verify_cache`)."""

    path: str
    sha256: str  # the expected SHA-256, from the file's record
    ok: bool
    message: str


# ----------------------------------------------------------------------------------------------------------------
# Public functions


def is_offline() -> bool:
    """Whether ``CLIP_OFFLINE`` or ``HF_HUB_OFFLINE`` is set to 1, true, yes or on (any case)."""
    return _offline_variable() is not None


def cache_dir(root: Optional[PathLike] = None) -> str:
    """Return the cache folder, resolved now.

    Parameters
    ----------
    root : str or os.PathLike, optional
        The ``download_root`` a caller gave; used when set (an empty string counts as unset, as in the original).

    Returns
    -------
    str
        The absolute folder: ``root``, else ``$CLIP_CACHE_DIR``, else ``$XDG_CACHE_HOME/clip``, else
        ``~/.cache/clip``, with ``~`` expanded. The folder is not created.
    """
    if root is not None and os.fspath(root):
        folder = os.fspath(root)
    elif os.environ.get("CLIP_CACHE_DIR"):
        folder = os.environ["CLIP_CACHE_DIR"]
    elif os.environ.get("XDG_CACHE_HOME"):
        folder = os.path.join(os.environ["XDG_CACHE_HOME"], "clip")
    else:
        folder = os.path.join("~", ".cache", "clip")
    return os.path.abspath(os.path.expanduser(folder))


def sha256_from_url(url: str) -> str:
    """Return the SHA-256 a release URL carries as its second-to-last path segment, in lower case.

    Raises
    ------
    DownloadError
        If that segment is not 64 hexadecimal digits.
    """
    segments = urllib.parse.urlsplit(url).path.split("/")
    candidate = segments[-2].lower() if len(segments) >= 2 else ""
    if not _SHA256_HEX.fullmatch(candidate):
        raise DownloadError(
            f"cannot tell the expected SHA-256 of {url}: release URLs end in /<64 hex digits>/<file name>; "
            "pass sha256= to give it"
        )
    return candidate


def download_sources(url: str, mirrors: Sequence[str] = ()) -> List[str]:
    """Return the URLs `download` tries for ``url``, in order, without repeats (see the module docstring)."""
    name = _file_name(url)
    if isinstance(mirrors, str):  # one URL passed bare would otherwise be read as a list of characters
        mirrors = [mirrors]
    sources = []
    base = os.environ.get("CLIP_DOWNLOAD_BASE", "").strip()
    if base:
        sources.append(base.rstrip("/") + "/" + name)
    sources.append(url)
    if url.startswith(RELEASE_CDN):
        sources.append(RELEASE_ORIGIN + url[len(RELEASE_CDN):])
    sources.extend(mirrors)
    return list(dict.fromkeys(sources))


def cached_path(url: str, root: Optional[PathLike] = None, *, sha256: Optional[str] = None) -> Optional[str]:
    """Return the path of ``url``'s file if the cache holds it verified by its record, else None.

    Only the file's size and modification time are compared with the record: nothing is hashed, nothing is written
    and the network is never used. A file without a record counts as not verified.
    """
    expected = _expected_sha256(url, sha256)
    target = os.path.join(cache_dir(root), _file_name(url))
    status = _stat(target)
    return target if status is not None and _record_matches(target, expected, status) else None


def download(url: str, root: Optional[PathLike] = None, *, sha256: Optional[str] = None,
             mirrors: Sequence[str] = ()) -> str:
    """Return the path of ``url``'s file in the cache, downloading and verifying it first if needed.

    Parameters
    ----------
    url : str
        The release URL; the file keeps its last path segment as its name.
    root : str or os.PathLike, optional
        The cache folder; see `cache_dir`.
    sha256 : str, optional
        The expected SHA-256; by default the URL's second-to-last path segment (see `sha256_from_url`).
    mirrors : sequence of str
        Further URLs serving the same bytes, tried after the URL and its automatic mirror.

    Returns
    -------
    str
        ``<cache folder>/<file name>``, a file whose SHA-256 is the expected one.

    Raises
    ------
    DownloadError
        If no source gave the right bytes, the cache folder cannot be written, or the machine is offline
        (``CLIP_OFFLINE``) and the file is not in the cache; the message names the URLs tried, the hashes, the bytes
        received, the folder and what to do.
    """
    expected = _expected_sha256(url, sha256)
    target = os.path.join(cache_dir(root), _file_name(url))
    seen = _inspect(target, expected)
    if seen.ok:
        return target
    sources = download_sources(url, mirrors)
    offline = _offline_variable()
    if offline is not None:
        raise DownloadError(_offline_message(offline, url, target, expected, sources, seen))
    with _locked(target, f"{_describe(url, target)} {_state(seen, expected)}"):
        current = _stat(target)
        if current is not None and _identity(current) != seen.identity:
            # The file appeared or changed while we waited for the lock: most likely another process downloaded it.
            seen = _inspect(target, expected)
            if seen.ok:
                return target
        if seen.actual is not None:
            warnings.warn(
                f"{target} does not match its expected SHA-256 (expected {expected}, got {seen.actual}); "
                "downloading it again", stacklevel=2)
            with contextlib.suppress(FileNotFoundError):  # a file known to be wrong is of no use to anyone
                os.remove(target)
        try:
            _fetch(sources, target, expected, _describe(url, target))
        except OSError as error:  # network errors are handled inside; this is the disk (full, read-only, ...)
            with contextlib.suppress(OSError):
                os.remove(target + PARTIAL_SUFFIX)
            raise DownloadError(
                f"could not write {os.path.basename(target)} into {os.path.dirname(target)} ({error}); free some "
                "space there or choose another folder with download_root= or CLIP_CACHE_DIR") from error
        _record_or_warn(target, expected, os.stat(target))
    return target


def verify_cache(root: Optional[PathLike] = None, *, files: Optional[Sequence[str]] = None) -> List[CacheCheck]:
    """Re-hash every file of the cache folder that has a record (or only the named ``files``), and report each.

    Hashing streams each file; nothing is written. A file whose bytes changed while its size and modification time
    stayed the same passes the quick check `download` makes, and only this full check finds it.

    Returns
    -------
    list of CacheCheck
        One result per record, sorted by path: ``ok`` and a message saying what is wrong and what to do.
    """
    folder = cache_dir(root)
    try:
        names = sorted(os.listdir(folder))
    except FileNotFoundError:
        return []
    results = []
    for name in names:
        file_name = name[:-len(RECORD_SUFFIX)]
        if name.endswith(RECORD_SUFFIX) and file_name and (files is None or file_name in files):
            results.append(_check_recorded(os.path.join(folder, file_name)))
    return results


# ----------------------------------------------------------------------------------------------------------------
# Names, settings and messages


def _offline_variable() -> Optional[str]:
    for name in _OFFLINE_VARIABLES:
        if os.environ.get(name, "").strip().lower() in _TRUTHY:
            return name
    return None


def _expected_sha256(url: str, sha256: Optional[str]) -> str:
    if sha256 is None:
        return sha256_from_url(url)
    if not _SHA256_HEX.fullmatch(sha256.strip().lower()):
        raise DownloadError(f"sha256={sha256!r} for {url} is not 64 hexadecimal digits")
    return sha256.strip().lower()


def _file_name(url: str) -> str:
    # The raw last segment, not unquoted: "%2F" must never turn into a path separator.
    name = posixpath.basename(urllib.parse.urlsplit(url).path)
    if name in ("", ".", "..") or any(sep and sep in name for sep in (os.sep, os.altsep)):
        raise DownloadError(f"{url} does not end in a file name")
    return name


def _describe(url: str, target: str) -> str:
    """The file name, with the model's name when the registry (clip.clip._MODELS, if imported) has the URL."""
    name = os.path.basename(target)
    models = getattr(sys.modules.get("clip.clip"), "_MODELS", None)
    if isinstance(models, dict):
        for model, model_url in models.items():
            if model_url == url:
                return f"{name} (model {model})"
    return name


@dataclasses.dataclass(frozen=True)
class _Settings:
    timeout: float
    retries: int
    backoff: float

    @classmethod
    def from_environment(cls) -> "_Settings":
        return cls(timeout=_number("CLIP_DOWNLOAD_TIMEOUT", DEFAULT_TIMEOUT, float, minimum=1e-3),
                   retries=_number("CLIP_DOWNLOAD_RETRIES", DEFAULT_RETRIES, int, minimum=0),
                   backoff=_number("CLIP_DOWNLOAD_BACKOFF", DEFAULT_BACKOFF, float, minimum=0))


def _number(variable: str, default, kind, minimum):
    text = os.environ.get(variable, "").strip()
    if not text:
        return default
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise DownloadError(f"{variable}={text!r} is not a valid setting: give a number of at least {minimum}")
    return value


def _state(seen: "_Seen", expected: str) -> str:
    if seen.actual is None:
        return "is not in the cache"
    return f"in the cache does not match (its SHA-256 is {seen.actual}, expected {expected})"


def _offline_message(variable: str, url: str, target: str, expected: str, sources: Sequence[str],
                     seen: "_Seen") -> str:
    urls = "".join(f"\n  {source}" for source in sources)
    return (
        f"{variable}={os.environ[variable]} is set, so clip does not use the network, and "
        f"{_describe(url, target)} {_state(seen, expected)}.\n"
        f"To use it offline, fetch it on a machine with network access from one of:{urls}\n"
        f"check that its SHA-256 is {expected}, and put it at {target} "
        f"(the folder {os.path.dirname(target)}, chosen by download_root, CLIP_CACHE_DIR or XDG_CACHE_HOME).\n"
        f"Or unset {variable} to let clip download it."
    )


# ----------------------------------------------------------------------------------------------------------------
# The cache: files, records, locks


@dataclasses.dataclass(frozen=True)
class _Seen:
    """What a look at a cached file found."""

    ok: bool
    identity: Optional[Tuple[int, int]] = None  # (size, mtime_ns) of the file looked at, None if there was none
    actual: Optional[str] = None  # its SHA-256 when it was hashed and found wrong


def _stat(path: str) -> Optional[os.stat_result]:
    try:
        status = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return status if stat.S_ISREG(status.st_mode) else None


def _identity(status: os.stat_result) -> Tuple[int, int]:
    return status.st_size, status.st_mtime_ns


def _sha256_of(path: str) -> "hashlib._Hash":
    """Hash a file in chunks (never the whole file in memory); the only place cached files are hashed."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(CHUNK_SIZE), b""):
            digest.update(block)
    return digest


def _read_record(target: str) -> Optional[dict]:
    try:
        with open(target + RECORD_SUFFIX, encoding="utf-8") as file:
            record = json.load(file)
    except (OSError, ValueError):  # missing, unreadable or not JSON: as if the file was never verified
        return None
    return record if isinstance(record, dict) else None


def _record_matches(target: str, expected: str, status: os.stat_result) -> bool:
    record = _read_record(target)
    return (record is not None and record.get("sha256") == expected
            and (record.get("size"), record.get("mtime_ns")) == _identity(status))


def _write_record(target: str, sha256: str, status: os.stat_result) -> None:
    """Write the record atomically (temporary file, then os.replace), so that readers never see half of one."""
    record = target + RECORD_SUFFIX
    text = json.dumps({"file": os.path.basename(target), "sha256": sha256, "size": status.st_size,
                       "mtime_ns": status.st_mtime_ns}, indent=1) + "\n"
    temporary = f"{record}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        with open(temporary, "x", encoding="utf-8") as file:  # mode "x" keeps the umask, unlike mkstemp's 0600
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, record)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise


def _inspect(target: str, expected: str) -> _Seen:
    """Look at the cached file: trusted by its record, or hashed (and then recorded if the folder allows)."""
    status = _stat(target)
    if status is None:
        return _Seen(ok=False)
    if _record_matches(target, expected, status):
        return _Seen(ok=True, identity=_identity(status))
    actual = _sha256_of(target).hexdigest()
    if actual != expected:
        return _Seen(ok=False, identity=_identity(status), actual=actual)
    _record_or_warn(target, expected, status)
    return _Seen(ok=True, identity=_identity(status))


def _record_or_warn(target: str, expected: str, status: os.stat_result) -> None:
    try:
        _write_record(target, expected, status)
    except OSError as error:  # a read-only shared cache: use the file all the same, and say what that costs
        warnings.warn(
            f"{target} is verified, but no record of that can be written beside it ({error}), so it is hashed "
            "again on every load; loading it once with write access to the folder records it", stacklevel=4)


def _check_recorded(target: str) -> CacheCheck:
    record = _read_record(target) or {}
    expected = record.get("sha256")
    if not isinstance(expected, str):
        return CacheCheck(target, "", False,
                          f"the record {target + RECORD_SUFFIX} is unreadable: delete it; the next load re-checks")
    if _stat(target) is None:
        return CacheCheck(target, expected, False, "missing: the record has no file beside it")
    try:
        actual = _sha256_of(target).hexdigest()
    except OSError as error:
        return CacheCheck(target, expected, False, f"cannot be read: {error}")
    if actual != expected:
        return CacheCheck(target, expected, False,
                          f"corrupt: SHA-256 is {actual}, expected {expected}; delete it and load it again "
                          "to download a fresh copy")
    return CacheCheck(target, expected, True, "ok")


@contextlib.contextmanager
def _locked(target: str, what: str) -> Iterator[None]:
    """Hold ``<target>.lock`` so that one process at a time downloads ``target``; the others wait here.

    ``what`` says which file is needed and why, for the error when the folder cannot be written.
    """
    folder = os.path.dirname(target)
    try:
        os.makedirs(folder, exist_ok=True)
        if not os.access(folder, os.W_OK):
            raise PermissionError(f"no write permission on {folder}")
        lock = _acquire_lock(target + LOCK_SUFFIX)
    except filelock.Timeout as error:
        raise DownloadError(
            f"waited {LOCK_TIMEOUT:.0f} s for {target + LOCK_SUFFIX}, held by another process downloading "
            f"{os.path.basename(target)}; if no such process runs any more, delete the lock file") from error
    except OSError as error:
        raise DownloadError(
            f"{what}, and it must be downloaded into {folder}, which cannot be written ({error}); choose a writable "
            "folder with download_root= or CLIP_CACHE_DIR, or put the verified file there") from error
    try:
        yield
    finally:
        lock.release()


def _acquire_lock(path: str) -> filelock.BaseFileLock:
    lock = filelock.FileLock(path, timeout=LOCK_TIMEOUT)
    try:
        lock.acquire()
    except NotImplementedError:
        # A file system without flock (some network ones): filelock 4 falls back by itself, older releases raise.
        # An exclusive-create lock file works everywhere, at the price of a stale file after kill -9.
        lock = filelock.SoftFileLock(path, timeout=LOCK_TIMEOUT)
        lock.acquire()
    return lock


# ----------------------------------------------------------------------------------------------------------------
# The network: sources, attempts, one transfer


class _Retry(Exception):
    """A failure worth another attempt at the same source: connection error, timeout, 5xx, cut-off body."""


class _SourceFailed(Exception):
    """This source will not give the file (4xx, wrong bytes, retries spent); the next source may."""


class _RangeRejected(Exception):
    """HTTP 416: the server has no bytes after the ones the partial file already holds."""


class _Partial:
    """The ``.partial`` file of one download, and the running SHA-256 of the bytes it holds."""

    def __init__(self, path: str) -> None:
        self.path = path
        status = _stat(path)
        # Bytes left by an interrupted earlier run are resumed; hashing them once lets the hash run on from there.
        self.size = status.st_size if status is not None else 0
        self.digest = _sha256_of(path) if self.size else hashlib.sha256()
        self.spliced = self.size > 0  # its bytes come from more than one response
        self.resumable = False  # a source has accepted (or offered) Range requests

    def reset(self) -> None:
        with open(self.path, "wb"):
            pass
        self.size, self.digest, self.spliced = 0, hashlib.sha256(), False

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)
        self.size, self.digest, self.spliced = 0, hashlib.sha256(), False

    def append(self, file, chunk: bytes) -> None:
        file.write(chunk)
        self.digest.update(chunk)
        self.size += len(chunk)

    def commit(self, target: str) -> None:
        """Flush the bytes to disk, then move them into place in one step."""
        with open(self.path, "ab") as file:
            os.fsync(file.fileno())  # so that a power cut cannot leave a recorded file of zeros
        os.replace(self.path, target)


def _fetch(sources: Sequence[str], target: str, expected: str, label: str) -> None:
    """Put the verified file at ``target`` from the first source that gives it, or raise DownloadError."""
    settings = _Settings.from_environment()
    opener = _opener()
    partial = _Partial(target + PARTIAL_SUFFIX)
    failures = []
    for url in sources:
        try:
            _fetch_from(url, partial, expected, settings, opener, label)
        except _SourceFailed as failure:
            failures.append(f"{url}: {failure}")
            continue
        partial.commit(target)
        return
    received = partial.size
    if received and partial.resumable:
        kept = f"The {received} bytes received are kept in {partial.path}; the next try resumes from there.\n"
    else:
        partial.remove()
        kept = ""
    tried = "".join(f"\n  {failure}" for failure in failures)
    raise DownloadError(
        f"could not download {label} into {os.path.dirname(target)}; tried:{tried}\n{kept}"
        "Check the network and any proxy (HTTPS_PROXY, NO_PROXY, SSL_CERT_FILE), then try again; or fetch the file "
        f"from one of those URLs yourself, check that its SHA-256 is {expected}, and put it at {target}; or set "
        "CLIP_DOWNLOAD_BASE to a mirror that has it."
    )


def _fetch_from(url: str, partial: _Partial, expected: str, settings: _Settings,
                opener: urllib.request.OpenerDirector, label: str) -> None:
    """Fill ``partial`` with the expected bytes from ``url``, retrying with backoff; raise _SourceFailed if not."""
    failures = 0
    best = partial.size
    restarted = False
    while True:
        try:
            _transfer(url, partial, settings.timeout, opener, label)
        except _RangeRejected:
            if partial.size and partial.digest.hexdigest() == expected:
                return  # the partial file already held every byte (a run killed just before moving it)
            if restarted or not partial.size:
                raise _SourceFailed("HTTP 416 Range Not Satisfiable") from None
            partial.reset()
            restarted = True
            continue
        except _Retry as error:
            if partial.size > best:  # new bytes arrived: a flaky link that keeps delivering is not failing
                best, failures = partial.size, 0
            failures += 1
            if failures > settings.retries:
                raise _SourceFailed(f"{error} (gave up after {failures} failed attempts)") from None
            _sleep(min(settings.backoff * 2 ** (failures - 1), MAX_BACKOFF))
            continue
        actual = partial.digest.hexdigest()
        if actual == expected:
            return
        if partial.spliced and not restarted:
            # Bytes kept from an earlier transfer may belong to another file or version: fetch it whole once more.
            partial.reset()
            restarted = True
            continue
        received = partial.size
        partial.remove()
        raise _SourceFailed(f"SHA-256 mismatch: expected {expected}, got {actual} ({received} bytes received)")


def _transfer(url: str, partial: _Partial, timeout: float, opener: urllib.request.OpenerDirector,
              label: str) -> None:
    """One request: resume or restart ``partial`` and append the body; raise _Retry if it ends early."""
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    if partial.size:
        request.add_header("Range", f"bytes={partial.size}-")
    try:
        response = opener.open(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        error.close()
        raise _status_failure(error.code, error.reason) from None
    except (OSError, http.client.HTTPException, ValueError) as error:
        raise _connection_failure(error, timeout) from None
    with response:
        total = _start(response, partial)
        progress = tqdm(total=total, initial=partial.size, unit="B", unit_scale=True, unit_divisor=1024,
                        desc=label, disable=None, leave=False)
        # read1 hands over whatever has arrived (up to a chunk), so the partial file keeps every byte received
        # when the connection breaks or the process is killed; read() would wait for a whole chunk first.
        read = getattr(response, "read1", response.read)
        with progress, open(partial.path, "ab") as file:
            while True:
                try:
                    chunk = read(CHUNK_SIZE)
                except (OSError, http.client.HTTPException) as error:
                    raise _Retry(f"connection broken after {partial.size} bytes: "
                                 f"{_connection_failure(error, timeout)}") from None
                if not chunk:
                    break
                partial.append(file, chunk)
                progress.update(len(chunk))
    if total is not None and partial.size < total:
        raise _Retry(f"connection closed after {partial.size} of {total} bytes")


def _start(response, partial: _Partial) -> Optional[int]:
    """Check how the server answered (resumed or whole file) and ready ``partial``; return the total size if known."""
    status = response.status or 200  # file:// answers have no status
    headers = response.headers
    if headers.get("Accept-Ranges", "").strip().lower() == "bytes":
        partial.resumable = True
    if status == 206:
        match = _CONTENT_RANGE.fullmatch(headers.get("Content-Range", "").strip())
        if match is None or int(match[1]) != partial.size:
            partial.reset()  # some other range than asked: splicing it would corrupt the file, so start over
            raise _Retry(f"the server answered the range request with {headers.get('Content-Range')!r}")
        partial.resumable = True
        partial.spliced = partial.spliced or partial.size > 0
        return None if match[3] == "*" else int(match[3])
    if not 200 <= status < 300:
        raise _SourceFailed(f"unexpected HTTP {status} {response.reason}")
    if partial.size:
        partial.reset()  # the server ignored the Range header and sends the whole file: restart cleanly
    length = headers.get("Content-Length", "").strip()
    return int(length) if length.isdigit() else None  # no Content-Length: read to the end, the hash decides


def _status_failure(code: int, reason: str) -> Exception:
    if code == 416:
        return _RangeRejected()
    if code >= 500 or code in _RETRY_STATUSES:
        return _Retry(f"HTTP {code} {reason}")
    return _SourceFailed(f"HTTP {code} {reason}")


def _connection_failure(error: BaseException, timeout: float) -> Exception:
    reason = error.reason if isinstance(error, urllib.error.URLError) else error
    if isinstance(reason, ssl.SSLCertVerificationError):
        return _SourceFailed(
            f"TLS certificate not trusted ({reason.verify_message}); behind a proxy or firewall that inspects TLS, "
            "point SSL_CERT_FILE or REQUESTS_CA_BUNDLE at its CA bundle")
    if isinstance(reason, socket.gaierror):
        return _SourceFailed(f"cannot resolve the host name ({reason}); offline machines should set CLIP_OFFLINE=1 "
                             "or CLIP_DOWNLOAD_BASE")
    if isinstance(reason, (socket.timeout, TimeoutError)):
        return _Retry(f"no answer within {timeout:g} s (CLIP_DOWNLOAD_TIMEOUT)")
    if (isinstance(error, ValueError) or isinstance(reason, (FileNotFoundError, PermissionError))
            or not isinstance(reason, (OSError, http.client.HTTPException))):
        return _SourceFailed(str(reason))  # a malformed URL, an unknown scheme, a missing file://: retries won't help
    return _Retry(str(reason) or type(reason).__name__)


def _opener() -> urllib.request.OpenerDirector:
    """An opener that follows redirects, uses the proxies of the environment and its CA bundle, if any."""
    context = _ssl_context()
    return urllib.request.build_opener(urllib.request.HTTPSHandler(context=context))


def _ssl_context() -> ssl.SSLContext:
    for variable in _CA_VARIABLES:
        bundle = os.environ.get(variable)
        if bundle:
            try:
                if os.path.isdir(bundle):
                    return ssl.create_default_context(capath=bundle)
                return ssl.create_default_context(cafile=bundle)
            except (OSError, ssl.SSLError) as error:
                raise DownloadError(f"{variable}={bundle} cannot be used as a CA bundle: {error}") from error
    return ssl.create_default_context()
