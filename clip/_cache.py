"""The download cache: names (final file, ``.partial``, ``.lock``, ``.sha256.json``), the per-file lock,
verification and verified-once records; ``download(url)`` returns the file once its SHA-256 is the one the URL
carries, and `write_atomically` replaces files. It never leaves an unverified file at a final name and never writes
through a link or special file.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import re
import socket
import stat
import sys
import time
import urllib.parse
import uuid
import warnings
from typing import BinaryIO, Callable, Iterator, List, Optional, Sequence, Tuple, Union

import filelock

try:
    import fcntl
except ImportError:  # Windows: a file open in another process cannot be removed there, which serves instead
    fcntl = None

from . import _http, _registry
from ._errors import CacheFolderError, DownloadError

__all__ = ["CacheCheck", "CacheFolderError", "DownloadError", "cache_dir", "cached_path", "check_file", "download",
           "sha256_from_url", "verify_cache", "write_atomically"]

PathLike = Union[str, "os.PathLike[str]"]

RECORD_MAX_BYTES = 1 << 16  # a record is about 150 bytes; a bigger "record" is not ours and is not read

RECORD_SUFFIX = ".sha256.json"
PARTIAL_SUFFIX = ".partial"
LOCK_SUFFIX = ".lock"
HOLDER_SUFFIX = ".lock.holder"  # "<pid> <host>" of the process holding the lock, for the processes that wait
# The most seconds between two looks at a held lock and at the holder's progress (shorter for a short stall bound).
LOCK_POLL = 1.0
# A waiter's own partial file is made, then locked: one younger than this may be a live one not yet locked.
ABANDONED_AFTER = 60.0

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_PRIVATE_PARTIAL = re.compile(r"\.[0-9a-f]{12}" + re.escape(PARTIAL_SUFFIX))  # after the name: `_own_partial`
# Opening flags that never follow a link and never block on a named pipe (absent flags are 0 where unsupported).
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_SAFE_OPEN = getattr(os, "O_NOFOLLOW", 0) | _NONBLOCK | getattr(os, "O_CLOEXEC", 0)
_BINARY = getattr(os, "O_BINARY", 0)  # Windows: no newline translation


class _NotAFile(OSError):
    """Something other than a plain file of its own is at a path the cache reads or writes."""


@dataclasses.dataclass(frozen=True)
class CacheCheck:
    """The result of re-hashing one recorded file of the cache (see `verify_cache`)."""

    path: str
    sha256: str  # the expected SHA-256, from the file's record
    ok: bool
    message: str


# ----------------------------------------------------------------------------------------------------------------
# Public functions


def cache_dir(root: Optional[PathLike] = None) -> str:
    """Return the cache folder, resolved now.

    Parameters
    ----------
    root : str or os.PathLike, optional
        The ``download_root`` a caller gave; used when set (an empty string counts as unset, as in the original).

    Returns
    -------
    str
        The absolute folder: ``root``, else ``$CLIP_CACHE_DIR``, else the original's ``~/.cache/clip`` (whatever
        ``XDG_CACHE_HOME`` says, so that a cache the original filled is used), with ``~`` expanded. The folder is
        not created.
    """
    if root is not None and os.fspath(root):
        folder = os.fspath(root)
    elif os.environ.get("CLIP_CACHE_DIR"):
        folder = os.environ["CLIP_CACHE_DIR"]
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
            f"cannot tell the expected SHA-256 of {url}: release URLs end in /<64 hex digits>/<file name>"
        )
    return candidate


def cached_path(url: str, root: Optional[PathLike] = None) -> Optional[str]:
    """Return the path of ``url``'s file if the cache holds it verified by its record, else None.

    Only the file's size and modification time (and, for a link, where it leads) are compared with the record:
    nothing is hashed, nothing is written and the network is never used. A file without a record, or that is neither
    a plain file nor a link to one, counts as not verified.
    """
    expected = sha256_from_url(url)
    target = _target(url, root)
    entry = _look(target)
    return target if entry.file is not None and _record_matches(target, expected, entry) else None


def download(url: str, root: Optional[PathLike] = None) -> str:
    """Return the path of ``url``'s file in the cache, downloading and verifying it first if needed.

    Parameters
    ----------
    url : str
        The release URL; the file keeps its last path segment as its name.
    root : str or os.PathLike, optional
        The cache folder; see `cache_dir`.

    Returns
    -------
    str
        ``<cache folder>/<file name>``, a plain file (or a link to one) whose SHA-256 is the expected one.

    Raises
    ------
    DownloadError
        If no source gave the right bytes, the cache folder cannot be written, a folder stands at the file's
        path, a setting is invalid, or the machine
        is offline (``CLIP_OFFLINE``) and the file is not in the cache; the message names the URLs tried, the
        hashes, the bytes received, the folder and what to do. A wrong file found in the cache is left in place
        until a verified one replaces it; a link there is replaced itself, and what it leads to is never written.
    """
    expected = sha256_from_url(url)
    target = _target(url, root)
    _remove_abandoned(target)
    seen = _inspect(target, expected)
    if seen.ok:
        return target
    if seen.entry.status is not None and stat.S_ISDIR(seen.entry.status.st_mode):
        # No file can replace a folder: fail before any download, as the original did.
        raise DownloadError(f"{target} is a folder, so {os.path.basename(target)} cannot be put there: move or "
                            "remove the folder, or choose another cache folder with download_root= or "
                            "CLIP_CACHE_DIR")
    label = _describe(url, target)
    try:
        offline = _http.offline_variable()
        sources = _http.download_sources(url)
        if offline is None:
            settings, opener = _http.Settings.from_environment(), _http.make_opener()
    except _http.SettingError as error:
        raise DownloadError(str(error)) from None
    if offline is not None:
        raise DownloadError(_offline_message(offline, label, target, expected, sources, seen))
    with _locked(target, f"{label} {_state(seen, expected)}", settings.stall_timeout) as held:
        now = _look(target)
        if now.identity != seen.entry.identity:
            # The file appeared or changed while we waited for the lock: most likely another process downloaded it.
            seen = _inspect(target, expected, now)
            if seen.ok:
                return target
        if seen.entry.status is not None:
            found = (f" is {seen.entry.problem}" if seen.entry.problem else
                     f"{_through(seen.entry)} does not match its expected SHA-256 (expected {expected}, got "
                     f"{seen.actual})")
            warnings.warn(f"{target}{found}; downloading it again (it is kept until a verified copy replaces it"
                          f"{_untouched(seen.entry)})", stacklevel=2)
        # Without the lock (its holder stalled), bytes go to a file of this process's own: the holder may resume.
        partial = target + PARTIAL_SUFFIX if held else _own_partial(target)
        try:
            _fetch(sources, target, partial, expected, label, settings, opener, seen.entry.identity, keep=held)
        except OSError as error:  # network errors are handled inside; this is the disk (full, read-only, ...)
            with contextlib.suppress(OSError):
                os.remove(partial)
            raise _write_error(target, error) from error
        except DownloadError as error:
            if seen.entry.status is None:
                raise
            raise DownloadError(f"{error}\nThe file that was at {target} before is left as it was ({label} "
                                f"{_state(seen, expected)}).") from None
        _record_or_warn(target, expected, _look(target))
    return target


def verify_cache(root: Optional[PathLike] = None, *, files: Optional[Sequence[str]] = None) -> List[CacheCheck]:
    """Re-hash every file of the cache folder that has a record (or only the named ``files``), and report each.

    Hashing streams each file; nothing is written. A file whose bytes changed while its size and modification time
    stayed the same passes the quick check `download` makes, and only this full check finds it.

    Returns
    -------
    list of CacheCheck
        One result per record, sorted by path: ``ok`` and a message saying what is wrong and what to do.

    Raises
    ------
    DownloadError
        If the cache folder exists but cannot be listed (no permission, a loop of symbolic links).
    """
    folder = cache_dir(root)
    try:
        names = sorted(os.listdir(folder))
    except FileNotFoundError:
        return []
    except OSError as error:
        raise DownloadError(f"cannot list the cache folder {folder}: {error}; fix it or choose another folder "
                            "with download_root= or CLIP_CACHE_DIR") from None
    results = []
    for name in names:
        file_name = name[:-len(RECORD_SUFFIX)]
        if name.endswith(RECORD_SUFFIX) and file_name and (files is None or file_name in files):
            results.append(_check_recorded(os.path.join(folder, file_name)))
    return results


def write_atomically(path: PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` whole or not at all: ``write`` fills a new file beside it, which then replaces ``path``.

    The new file is created exclusively (never through a link or into an existing file), flushed to disk and
    moved into place in one step, so readers see the old file or the complete new one, even after a power cut.
    A link at ``path`` is replaced, never followed. The file gets the permissions of the process's umask.

    Parameters
    ----------
    path : str or os.PathLike
        The file to write; its folder must exist.
    write : callable
        Called with the binary file object to fill.
    """
    path = os.fspath(path)
    temporary = f"{path}.{uuid.uuid4().hex[:12]}.tmp"
    file = _create(temporary)
    try:
        with file:
            write(file)
            _commit(file, temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise


# ----------------------------------------------------------------------------------------------------------------
# Names and messages


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


def _state(seen: "_Seen", expected: str) -> str:
    if seen.entry.status is None:
        return "is not in the cache"
    if seen.entry.problem:
        return f"in the cache is {seen.entry.problem}"
    return f"in the cache{_through(seen.entry)} does not match (its SHA-256 is {seen.actual}, expected {expected})"


def _through(entry: "_Entry") -> str:
    """Words naming where a link leads, to follow the file's name; nothing for a plain file."""
    return "" if entry.link_to is None else f" (a symbolic link to {entry.link_to})"


def _untouched(entry: "_Entry") -> str:
    return "" if entry.link_to is None else f"; the link itself is replaced, {entry.link_to} is never written"


def _offline_message(variable: str, label: str, target: str, expected: str, sources: Sequence[str],
                     seen: "_Seen") -> str:
    urls = "".join(f"\n  {source}" for source in sources)
    kept = " (the file there now is left as it is)" if seen.entry.status is not None else ""
    return (
        f"{variable}={os.environ[variable]} is set, so clip does not use the network, and "
        f"{label} {_state(seen, expected)}.\n"
        f"To use it offline, fetch it on a machine with network access from one of:{urls}\n"
        f"check that its SHA-256 is {expected}, and put it at {target}{kept}.\n"
        f"{_LOCAL_FILE_HINT}\n"
        f"Or unset {variable} to let clip download it."
    )


# The simplest way forward on a machine without network: a checkpoint file already at hand needs no cache.
_LOCAL_FILE_HINT = "A checkpoint file you already have loads from its path: clip.load(PATH), or --model PATH."


# ----------------------------------------------------------------------------------------------------------------
# Files that are never followed through links


def _lstat(path: str) -> Optional[os.stat_result]:
    """The entry at ``path`` itself (a link is not followed), or None if there is none."""
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as error:  # a loop of links in the folder's path, no permission, ...
        raise DownloadError(f"cannot look at {path}: {error}; fix the cache folder or choose another with "
                            "download_root= or CLIP_CACHE_DIR") from None


def _kind(status: os.stat_result) -> str:
    """What a directory entry that is not a plain file is, in words."""
    for test, words in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a folder"),
                        (stat.S_ISFIFO, "a named pipe")):
        if test(status.st_mode):
            return words
    return "a special file"


def _open_file(path: str, flags: int) -> Optional[int]:
    """A descriptor of the plain file at ``path`` (never through a link), or None if there is none there.

    Raises
    ------
    OSError
        If something else is there: a link (refused by O_NOFOLLOW), a pipe, a folder, a device; or if the file
        has other names (a hard link: writing it would change another file).
    """
    try:
        descriptor = os.open(path, flags | _SAFE_OPEN | _BINARY)
    except FileNotFoundError:
        return None
    status = os.fstat(descriptor)
    writes = bool(flags & (os.O_WRONLY | os.O_RDWR))
    if not stat.S_ISREG(status.st_mode) or (writes and not _own_file(status)):
        os.close(descriptor)
        raise _NotAFile(f"{path} is not a plain file of its own")
    if _NONBLOCK:
        os.set_blocking(descriptor, True)
    return descriptor


def _own_file(status: os.stat_result) -> bool:
    """Whether an entry is a plain file with no other name (writing a hard link would change another file)."""
    return stat.S_ISREG(status.st_mode) and status.st_nlink == 1


def _create(path: str) -> BinaryIO:
    """A new, empty file at ``path``, created exclusively: fails if anything (a link included) is there."""
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | _SAFE_OPEN | _BINARY, 0o666)
    if _NONBLOCK:
        os.set_blocking(descriptor, True)
    return os.fdopen(descriptor, "r+b")


def _replace_odd_entry(path: str) -> None:
    """Remove what is at ``path`` if it is not a plain file of its own (the entry itself, never a link's target).

    Raises
    ------
    DownloadError
        If it cannot be removed: in a shared folder with the sticky bit, only its owner may.
    """
    status = _lstat(path)
    if status is None or _own_file(status):
        return
    kind = _kind(status) if not stat.S_ISREG(status.st_mode) else "a hard link"
    try:
        os.remove(path)
    except OSError as error:
        raise DownloadError(
            f"{path} is {kind} (owned by user id {status.st_uid}), not a file of the cache, and it cannot be "
            f"removed ({error.strerror}); it is never followed nor written. Remove it yourself, or ask its owner "
            "to, or choose another cache folder with download_root= or CLIP_CACHE_DIR") from None
    warnings.warn(f"{path} is {kind}, not a file of the cache: removed, and a new file made in its place",
                  stacklevel=4)


def _write_error(target: str, error: OSError) -> DownloadError:
    """The error for a failed write into the cache folder, with the fix that fits its cause."""
    folder, name = os.path.split(target)
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free some space there"
    elif error.errno in (errno.EPERM, errno.EACCES):
        fix = ("check the folder's permissions; an entry another user owns in a shared folder with the sticky bit "
               "cannot be removed or replaced but by its owner: remove it yourself or ask its owner to")
    else:
        fix = "check the folder and its file system"
    return DownloadError(f"could not write {name} into {folder} ({error}); {fix}, or choose another folder with "
                         "download_root= or CLIP_CACHE_DIR")


def _commit(file: BinaryIO, temporary: str, path: str) -> None:
    """Flush ``file`` (open at ``temporary``) to disk, close it and move it to ``path`` in one step."""
    file.flush()
    os.fsync(file.fileno())  # so that a power cut cannot leave a recorded file of zeros
    file.close()
    os.replace(temporary, path)


def _identity(status: Optional[os.stat_result]) -> Optional[Tuple[int, int, int]]:
    return None if status is None else (status.st_mode, status.st_size, status.st_mtime_ns)


@dataclasses.dataclass(frozen=True)
class _Entry:
    """What is at the final name: nothing, a plain file, a link that leads to a plain file, or something else."""

    status: Optional[os.stat_result]  # the entry itself, never followed; None when nothing is there
    file: Optional[str] = None  # the plain file holding the bytes: the name itself, or where its link leads
    file_status: Optional[os.stat_result] = None  # that file's own status: its size and time go in the record
    link_to: Optional[str] = None  # where a link leads, every link on the way resolved; None for a plain file
    problem: str = ""  # what is there instead of a usable file ("a named pipe, not a plain file"), in words

    @property
    def identity(self) -> Optional[tuple]:
        """What changes whenever the entry or the file a link leads to changes (for the check under the lock)."""
        return None if self.status is None else (_identity(self.status), self.link_to, _identity(self.file_status))


def _look(path: str) -> _Entry:
    """What is at ``path``; a link is resolved (only read, never opened) to see whether it leads to a plain file."""
    status = _lstat(path)
    if status is None or stat.S_ISREG(status.st_mode):
        return _Entry(status, None if status is None else path, status)
    if not stat.S_ISLNK(status.st_mode):
        return _Entry(status, problem=f"{_kind(status)}, not a plain file")
    resolved = os.path.realpath(path)
    try:
        followed = os.stat(path)
        file_status = os.lstat(resolved)  # the resolved name itself: a plain file, or the link was just changed
    except OSError as error:
        reason = ("it leads to a loop of links" if error.errno == errno.ELOOP else
                  f"it leads to {resolved}, which does not exist" if isinstance(error, FileNotFoundError) else
                  f"it cannot be followed: {error}")
        return _Entry(status, problem=f"a symbolic link, not a plain file nor a link to one ({reason})")
    if not stat.S_ISREG(followed.st_mode):
        return _Entry(status, problem=f"a symbolic link, not a plain file nor a link to one (it leads to "
                                      f"{_kind(followed)}, {resolved})")
    if (followed.st_dev, followed.st_ino) != (file_status.st_dev, file_status.st_ino):
        # The link or a folder on its way changed between the two looks: trust neither, as for a wrong file.
        return _Entry(status, problem=f"a symbolic link that changed while it was looked at (to {resolved})")
    return _Entry(status, resolved, file_status, link_to=resolved)


def _sha256_of(path: str) -> "hashlib._Hash":
    """Hash a cached file in chunks (never the whole file in memory); the only place cached files are hashed."""
    descriptor = _open_file(path, os.O_RDONLY)
    if descriptor is None:
        raise FileNotFoundError(path)
    with os.fdopen(descriptor, "rb") as file:
        return _hash_rest(file, hashlib.sha256())


def _hash_rest(file: BinaryIO, digest) -> "hashlib._Hash":
    for block in iter(lambda: file.read(_http.CHUNK_SIZE), b""):
        digest.update(block)
    return digest


# ----------------------------------------------------------------------------------------------------------------
# Records: verified once


@dataclasses.dataclass(frozen=True)
class _Seen:
    """What a look at a cached file found."""

    ok: bool
    entry: _Entry  # what was there
    actual: Optional[str] = None  # its SHA-256 when it was hashed and found wrong


def _read_record(target: str) -> Optional[dict]:
    try:
        descriptor = _open_file(target + RECORD_SUFFIX, os.O_RDONLY)
        if descriptor is None:
            return None
        with os.fdopen(descriptor, "rb") as file:
            text = file.read(RECORD_MAX_BYTES + 1)
        if len(text) > RECORD_MAX_BYTES:
            return None
        record = json.loads(text.decode("utf-8"))
    except (OSError, ValueError):  # missing, unreadable, not a file, not JSON: as if the file was never verified
        return None
    return record if isinstance(record, dict) else None


def _record_matches(target: str, expected: str, entry: _Entry) -> bool:
    """Whether the record vouches for the file as it is now: same hash, size and time, and a link leads where it did."""
    record = _read_record(target)
    status = entry.file_status
    return (record is not None and status is not None and record.get("sha256") == expected
            and (record.get("size"), record.get("mtime_ns")) == (status.st_size, status.st_mtime_ns)
            and record.get("link_to") == entry.link_to)


def _write_record(target: str, sha256: str, entry: _Entry) -> None:
    status = entry.file_status
    record = {"file": os.path.basename(target), "sha256": sha256, "size": status.st_size,
              "mtime_ns": status.st_mtime_ns}
    if entry.link_to is not None:  # a re-pointed link, even to a file of the same size and time, is hashed again
        record["link_to"] = entry.link_to
    text = json.dumps(record, indent=1) + "\n"
    write_atomically(target + RECORD_SUFFIX, lambda file: file.write(text.encode("utf-8")))


def _inspect(target: str, expected: str, entry: Optional[_Entry] = None) -> _Seen:
    """Look at the cached file (or the plain file its link leads to): trusted by its record, or hashed (and then
    recorded if the folder allows). ``entry`` is what `_look` just saw there, if the caller has it."""
    entry = _look(target) if entry is None else entry
    if entry.file is None:
        return _Seen(ok=False, entry=entry)
    if _record_matches(target, expected, entry):
        return _Seen(ok=True, entry=entry)
    try:
        actual = _sha256_of(entry.file).hexdigest()
    except OSError as error:
        raise DownloadError(f"cannot read {entry.file}: {error}") from None
    if actual != expected:
        return _Seen(ok=False, entry=entry, actual=actual)
    _record_or_warn(target, expected, entry)
    return _Seen(ok=True, entry=entry)


def _record_or_warn(target: str, expected: str, entry: _Entry) -> None:
    try:
        _write_record(target, expected, entry)
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
    return check_file(target, expected)


def check_file(target: str, expected: str) -> CacheCheck:
    """Re-hash the file at ``target`` (streaming, writing nothing) against the ``expected`` SHA-256."""
    entry = _look(target)
    if entry.status is None:
        return CacheCheck(target, expected, False, "missing: the record has no file beside it")
    if entry.file is None:
        return CacheCheck(target, expected, False, f"{entry.problem}: the cache never reads one; delete it and "
                                                   "load the model again")
    try:
        actual = _sha256_of(entry.file).hexdigest()
    except OSError as error:
        return CacheCheck(target, expected, False, f"cannot be read: {error}")
    if actual != expected:
        return CacheCheck(target, expected, False,
                          f"corrupt{_through(entry)}: SHA-256 is {actual}, expected {expected}; delete it and load "
                          "it again to download a fresh copy")
    return CacheCheck(target, expected, True, "ok")


# ----------------------------------------------------------------------------------------------------------------
# Locks


@contextlib.contextmanager
def _locked(target: str, what: str, stall_timeout: float) -> Iterator[bool]:
    """Hold ``<target>.lock`` so that one process at a time downloads ``target``; the others wait here.

    Yields True once the lock is held. A waiter says once, on stderr, which process it waits for and how far that
    download is. When the holder adds nothing to ``<target>.partial`` for ``stall_timeout`` seconds (a stopped or
    hung process) the waiter stops waiting and yields False: it then fetches the file on its own, into a file of
    its own, without the lock. A holder that dies releases the lock at once (the system drops it with the process).

    ``what`` says which file is needed and why, for the error when the folder cannot be written. The lock file
    stays after use: removing it would let a process still waiting on the old file and a newcomer that creates a
    new one both hold "the" lock (filelock locks the open file, not the name).
    """
    folder = os.path.dirname(target)
    try:
        os.makedirs(folder, exist_ok=True)
        if not os.access(folder, os.W_OK):
            raise PermissionError(f"no write permission on {folder}")
        _replace_odd_entry(target + LOCK_SUFFIX)  # older filelock releases open it following links, and truncate
        lock = _wait_for_lock(target, stall_timeout)
    except OSError as error:
        kind = CacheFolderError if isinstance(error, FileExistsError) else DownloadError
        raise kind(
            f"{what}, and it must be downloaded into {folder}, which cannot be written ({error}); choose a writable "
            "folder with download_root= or CLIP_CACHE_DIR, or put the verified file there") from error
    if lock is None:
        yield False
        return
    try:
        with contextlib.suppress(OSError):  # only words for the waiters: a download never fails for want of them
            _write_holder(target)
        yield True
    finally:
        with contextlib.suppress(OSError):
            os.remove(target + HOLDER_SUFFIX)
        lock.release()


def _wait_for_lock(target: str, stall_timeout: float) -> Optional[filelock.BaseFileLock]:
    """The lock of ``target``, once its holder releases it; None if the holder makes no progress for
    ``stall_timeout`` seconds. (filelock falls back by itself to a lock file where the file system lacks flock.)"""
    lock = filelock.FileLock(target + LOCK_SUFFIX)
    try:
        lock.acquire(timeout=0)
        return lock
    except filelock.Timeout:
        pass
    progress = _progress(target)
    sys.stderr.write(f"clip: waiting for {_holder(target)}, which is downloading {os.path.basename(target)} "
                     f"into {os.path.dirname(target)} ({_so_far(progress, target)}); if it makes no progress for "
                     f"{stall_timeout:g} s this process downloads the file itself\n")
    sys.stderr.flush()
    changed = time.monotonic()
    while True:
        try:
            lock.acquire(timeout=min(LOCK_POLL, stall_timeout / 4))
            return lock
        except filelock.Timeout:
            pass
        now = _progress(target)
        if now != progress:
            progress, changed = now, time.monotonic()
        elif time.monotonic() - changed >= stall_timeout:
            warnings.warn(
                f"{_holder(target)}, which holds {target + LOCK_SUFFIX}, has added nothing to "
                f"{os.path.basename(target) + PARTIAL_SUFFIX} for {stall_timeout:g} s ({_so_far(progress, target)}; "
                "stopped or hung?): downloading the file in this process instead, into a file of its own. "
                "CLIP_DOWNLOAD_STALL_TIMEOUT sets how long to wait", stacklevel=5)
            return None


def _progress(target: str) -> Optional[Tuple[int, int]]:
    """(size, modification time) of the holder's ``.partial`` file, None while there is none."""
    try:
        status = os.lstat(target + PARTIAL_SUFFIX)
    except OSError:
        return None
    return status.st_size, status.st_mtime_ns


def _so_far(progress: Optional[Tuple[int, int]], target: str) -> str:
    total = _registry.APPROXIMATE_SIZES.get(os.path.basename(target))
    of = "" if total is None else f" of about {total / 1e6:.0f} MB"
    received = 0 if progress is None else progress[0]
    return f"{received / 1e6:.1f} MB{of} received so far"


def _write_holder(target: str) -> None:
    text = f"{os.getpid()} {socket.gethostname()}\n"
    write_atomically(target + HOLDER_SUFFIX, lambda file: file.write(text.encode("utf-8")))


def _holder(target: str) -> str:
    """The process holding the lock of ``target`` in words, as far as its ``.lock.holder`` file tells."""
    try:
        descriptor = _open_file(target + HOLDER_SUFFIX, os.O_RDONLY)
        if descriptor is None:
            return "another process"
        with os.fdopen(descriptor, "rb") as file:
            pid, host = file.read(256).decode("utf-8").split()
        int(pid)
    except (OSError, ValueError):
        return "another process"
    return f"process {pid}" + ("" if host == socket.gethostname() else f" on {host}")


# ----------------------------------------------------------------------------------------------------------------
# Filling the cache


def _own_partial(target: str) -> str:
    """A new name for a waiter's own partial file: ``<target>.<12 random hex digits>.partial``."""
    return f"{target}.{uuid.uuid4().hex[:12]}{PARTIAL_SUFFIX}"


def _claim(file: BinaryIO) -> None:
    """Lock a waiter's own partial file for as long as this process has it open: the mark of a live download
    that `_remove_abandoned` looks for. The system drops the lock with the process, however it ends. Where the
    file system has no locks, nobody can take this one either, so the file is never taken for abandoned."""
    if fcntl is not None:
        with contextlib.suppress(OSError):
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


def _remove_abandoned(target: str) -> None:
    """Remove the waiters' own partial files of ``target`` (``<name>.<12 hex digits>.partial``) that no live
    process holds: those of a waiter killed mid-download. Anything else, or anything in doubt, stays."""
    folder, name = os.path.split(target)
    try:
        entries = os.listdir(folder)
    except OSError:
        return
    for entry in entries:
        if entry.startswith(name) and _PRIVATE_PARTIAL.fullmatch(entry, len(name)):
            with contextlib.suppress(OSError):  # gone meanwhile, held, or not ours to remove: left as it is
                _remove_if_unclaimed(os.path.join(folder, entry))


def _remove_if_unclaimed(path: str) -> None:
    descriptor = os.open(path, os.O_RDONLY | _SAFE_OPEN | _BINARY)
    try:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode) or time.time() - status.st_mtime < ABANDONED_AFTER:
            return
        if fcntl is not None:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises OSError while its process lives
            os.remove(path)
    finally:
        os.close(descriptor)
    if fcntl is None:
        os.remove(path)  # Windows refuses to remove a file that another process has open


def _open_partial(path: str) -> _http.Sink:
    """The ``.partial`` file to resume (its bytes hashed once) or a new one; anything else there is replaced."""
    try:
        descriptor = _open_file(path, os.O_RDWR)
    except OSError:  # a link, a pipe, a hard link to another file: never written through
        _replace_odd_entry(path)
        descriptor = None
    if descriptor is None:
        return _http.Sink(_create(path), hashlib.sha256(), 0)
    file = os.fdopen(descriptor, "r+b")
    try:
        digest = _hash_rest(file, hashlib.sha256())  # bytes left by an interrupted run: the hash runs on from here
    except BaseException:
        file.close()
        raise
    return _http.Sink(file, digest, file.tell())


def _fetch(sources: Sequence[str], target: str, partial: str, expected: str, label: str, settings: _http.Settings,
           opener, before: Optional[tuple], *, keep: bool) -> None:
    """Put the verified file at ``target`` from the first source that gives it, through ``partial``, or raise
    DownloadError. ``before`` is the identity of what was at ``target`` when the download began (see `_place`);
    ``keep``: whether the bytes of a failed download stay in ``partial`` for the next try to resume."""
    limit = _size_bound(target)
    sink = _open_partial(partial)
    failures = []
    try:
        if not keep:
            _claim(sink.file)
        for url in sources:
            try:
                _fetch_from(url, sink, expected, settings, opener, label, limit)
            except _http.TransferError as failure:
                failures.append(f"{url}: {failure}")
                continue
            _place(sink.file, partial, target, expected, before)
            return
    finally:
        sink.file.close()
    received = sink.size
    if received and sink.resumable and keep:
        kept = f"The {received} bytes received are kept in {partial}; the next try resumes from there.\n"
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(partial)
        kept = ""
    tried = "".join(f"\n  {failure}" for failure in failures)
    raise DownloadError(
        f"could not download {label} into {os.path.dirname(target)}; tried:{tried}\n{kept}"
        "Check the network and any proxy (HTTPS_PROXY, NO_PROXY, SSL_CERT_FILE), then try again; or fetch the file "
        f"from one of those URLs yourself, check that its SHA-256 is {expected}, and put it at {target}; or set "
        f"CLIP_DOWNLOAD_BASE to a mirror that has it.\n{_LOCAL_FILE_HINT}"
    )


def _place(file: BinaryIO, partial: str, target: str, expected: str, before: Optional[tuple]) -> None:
    """Move the verified ``partial`` to ``target``, unless a verified file got there since the download began.

    Two processes download the same file when one gave up waiting for the other (a stopped holder that later
    resumes): whichever finishes first puts the file in place and the other drops its copy, so a file in use is
    not replaced. Both copies verify, so even the two finishing at the same moment put the same bytes there.
    """
    now = _look(target)
    if now.identity != before and now.file is not None and _inspect(target, expected, now).ok:
        file.close()
        os.remove(partial)
        return
    _commit(file, partial, target)


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
