"""The download cache. ``download(url)`` returns ``<cache folder>/<file name>`` once its SHA-256 is the one the URL
carries, on one path: look -> lock -> look again -> fetch into ``<file>.partial`` -> verify -> move into place.
Beside a file: ``<file>.sha256.json`` records that it was verified, so it is hashed once; ``<file>.lock`` and
``<file>.partial`` exist while it downloads (a failed download's bytes stay in ``.partial`` to resume). It never
leaves an unverified file at a final name, and never follows nor writes through a link or special file there.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import re
import stat
import sys
import urllib.parse
import warnings
from typing import BinaryIO, List, Optional, Sequence

from . import _files, _http, _registry
from ._errors import CacheFolderError, DownloadError
from ._files import PathLike, write_atomically

__all__ = ["CacheCheck", "CacheFolderError", "DownloadError", "cache_dir", "cached_path", "check_file", "download",
           "sha256_from_url", "verify_cache"]

RECORD_MAX_BYTES = 1 << 16  # a record is about 150 bytes; a bigger "record" is not ours and is not read
RECORD_SUFFIX = ".sha256.json"
PARTIAL_SUFFIX = ".partial"
# A waiter's own temporary file untouched for this long, and that no live process holds, is a killed one's.
ABANDONED_AFTER = 60.0

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_ELSEWHERE = "choose another cache folder with download_root= or CLIP_CACHE_DIR"
# The simplest way forward on a machine without network: a checkpoint file already at hand needs no cache.
_LOCAL_FILE_HINT = "A checkpoint file you already have loads from its path: clip.load(PATH), or --model PATH."


@dataclasses.dataclass(frozen=True)
class CacheCheck:
    """The result of re-hashing one recorded file of the cache (see `verify_cache`)."""

    path: str
    sha256: str  # the expected SHA-256, from the file's record
    ok: bool
    message: str


@dataclasses.dataclass(frozen=True)
class _Found:
    """What is at a file's name: nothing, a regular file, a link that leads to one, or something else."""

    status: Optional[os.stat_result]  # the entry itself, never followed; None when nothing is there
    file: Optional[str] = None  # the regular file holding the bytes: the name itself, or where its link leads
    file_status: Optional[os.stat_result] = None  # that file's own status: its size and time go in the record
    link_to: Optional[str] = None  # where a link leads, every link on the way resolved; None for a regular file
    problem: str = ""  # what is there instead of a usable file, in words
    sha256: Optional[str] = None  # its SHA-256, once hashed and found wrong

    def state(self, expected: str) -> str:
        """Words that follow the file's name: what is wrong in the cache."""
        if self.status is None:
            return "is not in the cache"
        if self.problem:
            return f"in the cache is {self.problem}"
        return f"in the cache{self.linked()} does not match (its SHA-256 is {self.sha256}, expected {expected})"

    def linked(self) -> str:
        return "" if self.link_to is None else f" (a symbolic link to {self.link_to})"


def cache_dir(root: Optional[PathLike] = None) -> str:
    """The absolute cache folder, resolved now (not created): ``root`` (the caller's ``download_root``; empty counts
    as unset, as in the original), else ``$CLIP_CACHE_DIR``, else the original's ``~/.cache/clip`` whatever
    ``XDG_CACHE_HOME`` says, so that a cache the original filled is used."""
    folder = ((os.fspath(root) if root is not None else "") or os.environ.get("CLIP_CACHE_DIR")
              or os.path.join("~", ".cache", "clip"))
    return os.path.abspath(os.path.expanduser(folder))


def sha256_from_url(url: str) -> str:
    """The SHA-256 a release URL carries as its second-to-last path segment, in lower case; `DownloadError` if that
    segment is not 64 hexadecimal digits."""
    segments = urllib.parse.urlsplit(url).path.split("/")
    candidate = segments[-2].lower() if len(segments) >= 2 else ""
    if not _SHA256_HEX.fullmatch(candidate):
        raise DownloadError(f"cannot tell the expected SHA-256 of {url}: release URLs end in /<64 hex digits>/"
                            "<file name>")
    return candidate


def cached_path(url: str, root: Optional[PathLike] = None) -> Optional[str]:
    """Return the path of ``url``'s file if the cache holds it verified by its record, else None.

    Only the file's size and modification time (and, for a link, where it leads) are compared with the record:
    nothing is hashed or written and the network is never used. Raises `DownloadError` when the folder cannot be
    looked into (no search permission, a loop of links).
    """
    expected = sha256_from_url(url)
    target = _target(url, root)
    return target if _record_matches(target, expected, _find(target)) else None


def download(url: str, root: Optional[PathLike] = None) -> str:
    """The path ``<cache folder>/<url's last segment>`` of a regular file (or a link to one) with the SHA-256 the
    URL carries, downloaded and verified first if needed (see `cache_dir` for ``root``).

    Raises `DownloadError`, naming what was tried and what to do, if no source gave the right bytes, the folder
    cannot be written, a folder stands at the file's path, a setting is invalid, or the machine is offline. A wrong
    file found there stays until a verified one replaces it; a link there is replaced, never written through.
    """
    expected = sha256_from_url(url)
    target = _target(url, root)
    _files.remove_abandoned(target, ABANDONED_AFTER)  # a killed waiter's own file
    found = _verify(target, expected, _find(target))
    if found is None:
        return target
    if found.status is not None and stat.S_ISDIR(found.status.st_mode):
        # No file can replace a folder: fail before any download, as the original did.
        raise DownloadError(f"{target} is a folder, so {os.path.basename(target)} cannot be put there: move or "
                            f"remove the folder, or {_ELSEWHERE}")
    label = _describe(url, target)
    try:
        offline = _http.offline_variable()
        sources = _http.download_sources(url)
        if offline is None:
            settings, opener = _http.Settings.from_environment(), _http.make_opener()
    except _http.SettingError as error:
        raise DownloadError(str(error)) from None
    if offline is not None:
        raise DownloadError(_offline_message(offline, label, target, expected, sources, found))
    # A holder silent for one stall timeout is bypassed (it may only be stopped); for two, its lock is a dead one's.
    lock = _files.Lock(target, stale_after=2 * settings.stall_timeout)
    with lock:
        held = _hold(lock, target, f"{label} {found.state(expected)}", settings.stall_timeout)
        if _record_matches(target, expected, _find(target)):
            return target  # another process put it there while this one waited
        if found.status is not None:
            kept = "" if found.link_to is None else f"; the link itself is replaced, {found.link_to} is never written"
            wrong = (f" is {found.problem}" if found.problem else f"{found.linked()} does not match its expected "
                     f"SHA-256 (expected {expected}, got {found.sha256})")
            warnings.warn(f"{target}{wrong}; downloading it again (it is kept until a verified copy replaces it"
                          f"{kept})", stacklevel=2)
        # The lock's holder fetches into .partial, which the next try resumes; a process that stopped waiting
        # for a stalled holder fetches into a temporary file of its own, so that the holder's file stays its own.
        partial = target + PARTIAL_SUFFIX if held else _files.temporary_name(target)
        try:
            _fetch(sources, target, partial, expected, label, settings, opener, lock if held else None)
        except _files.LockLost:  # stopped so long that another process took over: that one is waited for now
            return download(url, root)
        except OSError as error:  # network errors are handled inside; this is the disk (full, read-only, ...)
            with contextlib.suppress(OSError):
                os.remove(partial)
            folder, name = os.path.split(target)
            raise DownloadError(f"could not write {name} into {folder} ({error}); {_files.write_advice(error)}, or "
                                f"{_ELSEWHERE}") from error
        except DownloadError as error:
            if found.status is None:
                raise
            raise DownloadError(f"{error}\nThe file that was at {target} before is left as it was ({label} "
                                f"{found.state(expected)}).") from None
    return target


def verify_cache(root: Optional[PathLike] = None, *, files: Optional[Sequence[str]] = None) -> List[CacheCheck]:
    """Re-hash (streaming, writing nothing) every recorded file of the cache folder, or only the named ``files``:
    one `CacheCheck` per record, sorted by path. Only this finds bytes changed under the same size and time.
    `DownloadError` if the folder exists but cannot be listed or looked into (no permission, a loop of links)."""
    folder = cache_dir(root)
    try:
        names = sorted(os.listdir(folder))
    except FileNotFoundError:
        return []
    except OSError as error:
        raise DownloadError(f"cannot list the cache folder {folder}: {error}; fix it or {_ELSEWHERE}") from None
    results = []
    for name in names:
        file_name = name[:-len(RECORD_SUFFIX)]
        if name.endswith(RECORD_SUFFIX) and file_name and (files is None or file_name in files):
            target = os.path.join(folder, file_name)
            _lstat(target)  # a folder without search permission: its cause, never "delete the record"
            expected = (_read_record(target) or {}).get("sha256")
            results.append(check_file(target, expected) if isinstance(expected, str) else CacheCheck(
                target, "", False, f"the record {target + RECORD_SUFFIX} is unreadable: delete it; the next load "
                                   "re-checks"))
    return results


def check_file(target: str, expected: str) -> CacheCheck:
    """Re-hash the file at ``target`` (streaming, writing nothing) against the ``expected`` SHA-256."""
    found = _find(target)
    if found.status is None:
        return CacheCheck(target, expected, False, "missing: the record has no file beside it")
    if found.file is None:
        return CacheCheck(target, expected, False, f"{found.problem}: the cache never reads one; delete it and "
                                                   "load the model again")
    try:
        actual = _sha256_of(found.file).hexdigest()
    except OSError as error:
        return CacheCheck(target, expected, False, f"cannot be read: {error}")
    if actual != expected:
        return CacheCheck(target, expected, False, f"corrupt{found.linked()}: SHA-256 is {actual}, expected "
                                                   f"{expected}; delete it and load it again to download a fresh copy")
    return CacheCheck(target, expected, True, "ok")


def _target(url: str, root: Optional[PathLike]) -> str:
    """``<cache folder>/<file name>``; the raw last URL segment (never unquoted, so "%2F" cannot become a "/")."""
    name = _registry.file_name(url)
    if name in ("", ".", "..") or any(sep and sep in name for sep in (os.sep, os.altsep)):
        raise DownloadError(f"{url} does not end in a file name")
    return os.path.join(cache_dir(root), name)


def _size_bound(target: str) -> Optional[int]:
    """The most bytes a download of ``target`` may bring: a release file's known size with a margin, else none."""
    size = _registry.APPROXIMATE_SIZES.get(os.path.basename(target))
    # The published sizes are rounded to at most 10 MB, under 4% of the smallest release: 10% more never cuts one.
    return None if size is None else size + size // 10


def _describe(url: str, target: str) -> str:
    """The file name, with the model's name when the registry has the URL."""
    name = os.path.basename(target)
    model = next((model for model, model_url in _registry.MODELS.items() if model_url == url), None)
    return name if model is None else f"{name} (model {model})"


def _offline_message(variable: str, label: str, target: str, expected: str, sources: Sequence[str],
                     found: _Found) -> str:
    kept = " (the file there now is left as it is)" if found.status is not None else ""
    return (f"{label} {found.state(expected)}, and {variable}={os.environ[variable]} keeps clip off the network.\n"
            f"{_LOCAL_FILE_HINT}\n"
            f"Or put the file whose SHA-256 is {expected} at {target}{kept}, from {' or '.join(sources)}; or unset "
            f"{variable}.")


def _so_far(target: str) -> str:
    status, total = _lstat(target + PARTIAL_SUFFIX), _registry.APPROXIMATE_SIZES.get(os.path.basename(target))
    of = "" if total is None else f" of about {total / 1e6:.0f} MB"
    return f"{(status.st_size if status else 0) / 1e6:.1f} MB{of} received so far"


def _lstat(path: str) -> Optional[os.stat_result]:
    """The entry at ``path`` itself (a link is not followed), or None if there is none."""
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as error:  # a loop of links in the folder's path, no permission, ...
        fix = (f"give this user search permission on the folder (chmod u+x {os.path.dirname(path)})"
               if error.errno == errno.EACCES else "fix the cache folder")
        raise DownloadError(f"cannot look at {path}: {error.strerror}; {fix}, or {_ELSEWHERE}") from None


def _find(path: str) -> _Found:
    """What is at ``path``; a link is resolved (only read, never opened) to see whether it leads to a regular file."""
    status = _lstat(path)
    if status is None or stat.S_ISREG(status.st_mode):
        return _Found(status, None if status is None else path, status)
    if not stat.S_ISLNK(status.st_mode):
        return _Found(status, problem=f"{_files.kind(status.st_mode)}, not a plain file")
    resolved = os.path.realpath(path)
    try:
        followed = os.stat(path)
        file_status = os.lstat(resolved)  # the resolved name itself: a regular file, or the link was just changed
    except OSError as error:
        reason = ("it leads to a loop of links" if error.errno == errno.ELOOP else
                  f"it leads to {resolved}, which does not exist" if isinstance(error, FileNotFoundError) else
                  f"it cannot be followed: {error}")
        return _Found(status, problem=f"a symbolic link, not a plain file nor a link to one ({reason})")
    if not stat.S_ISREG(followed.st_mode):
        return _Found(status, problem=f"a symbolic link, not a plain file nor a link to one (it leads to "
                                      f"{_files.kind(followed.st_mode)}, {resolved})")
    if (followed.st_dev, followed.st_ino) != (file_status.st_dev, file_status.st_ino):
        # The link or a folder on its way changed between the two looks: trust neither, as for a wrong file.
        return _Found(status, problem=f"a symbolic link that changed while it was looked at (to {resolved})")
    return _Found(status, resolved, file_status, link_to=resolved)


def _verify(target: str, expected: str, found: _Found) -> Optional[_Found]:
    """None if ``found`` is the verified file (by its record, or hashed now and then recorded); else ``found``,
    with its SHA-256 when it was hashed."""
    if found.file is None:
        return found
    if _record_matches(target, expected, found):
        return None
    try:
        actual = _sha256_of(found.file).hexdigest()
    except OSError as error:
        raise DownloadError(f"cannot read {found.file}: {error}") from None
    if actual != expected:
        return dataclasses.replace(found, sha256=actual)
    _record(target, expected, found)
    return None


def _sha256_of(path: str) -> "hashlib._Hash":
    """Hash a cached file in chunks (never the whole file in memory); the only place cached files are hashed."""
    with os.fdopen(_files.open_regular(path), "rb") as file:
        return _hash_rest(file, hashlib.sha256())


def _hash_rest(file: BinaryIO, digest) -> "hashlib._Hash":
    for block in iter(lambda: file.read(_http.CHUNK_SIZE), b""):
        digest.update(block)
    return digest


def _read_record(target: str) -> Optional[dict]:
    try:
        with os.fdopen(_files.open_regular(target + RECORD_SUFFIX), "rb") as file:
            text = file.read(RECORD_MAX_BYTES + 1)
        record = json.loads(text.decode("utf-8")) if len(text) <= RECORD_MAX_BYTES else None
    except (OSError, ValueError):  # missing, unreadable, not a file, not JSON: as if the file was never verified
        return None
    return record if isinstance(record, dict) else None


def _record_matches(target: str, expected: str, found: _Found) -> bool:
    """Whether the record vouches for the file as it is now: same hash, size and time, and a link leads where it did.
    The one test of "this file is verified": a file another process verified is recorded before it is trusted."""
    status = found.file_status
    record = _read_record(target) if status is not None else None
    return (record is not None and record.get("sha256") == expected and record.get("link_to") == found.link_to
            and (record.get("size"), record.get("mtime_ns")) == (status.st_size, status.st_mtime_ns))


def _record(target: str, expected: str, found: _Found) -> None:
    """Record that ``found``, the file at ``target``, is verified, or warn what it costs that the folder forbids it."""
    record = {"file": os.path.basename(target), "sha256": expected, "size": found.file_status.st_size,
              "mtime_ns": found.file_status.st_mtime_ns}
    # A re-pointed link, even to a file of the same size and time, is hashed again: where it leads is recorded.
    text = json.dumps(record if found.link_to is None else {**record, "link_to": found.link_to}, indent=1) + "\n"
    try:
        write_atomically(target + RECORD_SUFFIX, lambda file: file.write(text.encode("utf-8")))
    except OSError as error:  # a read-only shared cache: use the file all the same, and say what that costs
        warnings.warn(f"{target} is verified, but no record of that can be written beside it ({error}), so it is "
                      "hashed again on every load; loading it once with write access to the folder records it",
                      stacklevel=4)


def _hold(lock: _files.Lock, target: str, needed: str, stall_timeout: float) -> bool:
    """Take ``lock``: True once held; False when its holder adds nothing for ``stall_timeout`` seconds (stopped or
    hung), so that this process fetches the file itself. A waiter says once, on stderr, whom it waits for."""
    folder, name = os.path.split(target)
    try:
        os.makedirs(folder, exist_ok=True)
        try:
            free = lock.acquire(0)
        except _files.NotAFile:  # a link or special file planted there: removed (if it may be), then try again
            _replace_odd_entry(lock.path)
            free = lock.acquire(0)
        if free:
            return True
        sys.stderr.write(f"clip: waiting for {lock.holder() or 'another process'}, which is downloading {name} into "
                         f"{folder} ({_so_far(target)}); if it makes no progress for {stall_timeout:g} s this "
                         "process downloads the file itself\n")
        sys.stderr.flush()
        if lock.acquire(stall_timeout):
            return True
    except OSError as error:
        kind = CacheFolderError if isinstance(error, FileExistsError) else DownloadError
        raise kind(f"{needed}, and it must be downloaded into {folder}, which cannot be written ({error}); choose a "
                   "writable folder with download_root= or CLIP_CACHE_DIR, or put the verified file there") from error
    warnings.warn(f"{lock.holder() or 'another process'}, which holds {lock.path}, has added nothing to "
                  f"{name + PARTIAL_SUFFIX} for {stall_timeout:g} s ({_so_far(target)}; stopped or hung?): downloading "
                  "the file in this process instead, into a file of its own. CLIP_DOWNLOAD_STALL_TIMEOUT sets how "
                  "long to wait", stacklevel=3)
    return False


def _replace_odd_entry(path: str) -> None:
    """Remove what is at ``path`` if it is not a regular file of its own (the entry itself, never a link's target).
    Raises DownloadError if it cannot be removed: in a shared folder with the sticky bit, only its owner may."""
    status = _lstat(path)
    if status is None or (stat.S_ISREG(status.st_mode) and status.st_nlink == 1):
        return
    what = "a hard link" if stat.S_ISREG(status.st_mode) else _files.kind(status.st_mode)
    try:
        os.remove(path)
    except OSError as error:
        raise DownloadError(
            f"{path} is {what} (owned by user id {status.st_uid}), not a file of the cache, and it cannot be "
            f"removed ({error.strerror}); it is never followed nor written. Remove it yourself, or ask its owner "
            f"to, or {_ELSEWHERE}") from None
    warnings.warn(f"{path} is {what}, not a file of the cache: removed, and a new file made in its place",
                  stacklevel=4)


def _open_partial(path: str) -> _http.Sink:
    """The ``.partial`` file to resume (its bytes hashed once) or a new one; anything else there is replaced."""
    try:
        file = os.fdopen(_files.open_regular(path, os.O_RDWR, own=True), "r+b")
    except OSError as error:  # nothing there; or a link, a pipe, a hard link: never written through
        if not isinstance(error, FileNotFoundError):
            _replace_odd_entry(path)
        return _http.Sink(_files.create(path), hashlib.sha256(), 0)
    try:
        digest = _hash_rest(file, hashlib.sha256())  # bytes left by an interrupted run: the hash runs on from here
    except BaseException:
        file.close()
        raise
    return _http.Sink(file, digest, file.tell())


def _fetch(sources: Sequence[str], target: str, partial: str, expected: str, label: str, settings: _http.Settings,
           opener, lock: Optional[_files.Lock]) -> None:
    """Put the verified file at ``target`` from the first source that gives it, through ``partial``, or raise
    DownloadError. With the ``lock`` held, the bytes of a failed download stay in ``partial`` for the next try."""
    limit = _size_bound(target)
    sink = _open_partial(partial)
    failures = []
    try:
        if lock is not None:
            sink.on_write = lock.touch  # its waiters see the progress
        for url in sources:
            try:
                _fetch_from(url, sink, expected, settings, opener, label, limit)
            except _http.TransferError as failure:
                failures.append(f"{url}: {failure}")
                continue
            if lock is not None:
                lock.touch()  # still this process's lock, so still its .partial
            _place(sink.file, partial, target, expected)
            return
    finally:
        sink.file.close()
    if sink.size and sink.resumable and lock is not None:
        kept = f"The {sink.size} bytes received are kept in {partial}; the next try resumes from there.\n"
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(partial)
        kept = ""
    tried = "".join(f"\n  {failure}" for failure in failures)
    raise DownloadError(
        f"could not download {label} into {os.path.dirname(target)}; tried:{tried}\n{kept}{_LOCAL_FILE_HINT}\n"
        "Or check the network and any proxy (HTTPS_PROXY, NO_PROXY, SSL_CERT_FILE) and try again; or fetch the file "
        f"from one of those URLs yourself, check that its SHA-256 is {expected}, and put it at {target}; or set "
        "CLIP_DOWNLOAD_BASE to a mirror that has it."
    )


def _place(file: BinaryIO, partial: str, target: str, expected: str) -> None:
    """Move the verified ``partial`` to ``target`` and record it, unless another process has put a verified file
    there since (one that stopped waiting for a stalled holder): a file in use is not replaced."""
    if _record_matches(target, expected, _find(target)):
        file.close()
        with contextlib.suppress(FileNotFoundError):  # removed meanwhile as abandoned, where flock fails
            os.remove(partial)
        return
    _files.commit(file, partial, target)
    _record(target, expected, _find(target))


def _fetch_from(url: str, sink: _http.Sink, expected: str, settings: _http.Settings, opener, label: str,
                limit: Optional[int]) -> None:
    """Fill ``sink`` with the expected bytes from ``url``; raise TransferError if this source will not give them."""
    restarted = False
    while True:
        try:
            _http.fetch(url, sink, settings, opener, label=label, limit=limit)
        except _http.RangeNotSatisfiable:
            if sink.size and sink.digest.hexdigest() == expected:
                return  # the partial file already held every byte (a run killed just before moving it)
            if restarted or not sink.size:
                raise
            sink.restart()
            restarted = True
            continue
        actual = sink.digest.hexdigest()
        if actual == expected:
            return
        if sink.spliced and not restarted:
            # Bytes kept from an earlier transfer may belong to another file or version: fetch it whole once more.
            sink.restart()
            restarted = True
            continue
        received = sink.size
        sink.restart()
        raise _http.TransferError(f"SHA-256 mismatch: expected {expected}, got {actual} ({received} bytes received)")
