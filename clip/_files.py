"""File helpers that the cache, the checkpoint reader and the files of ``clip embed`` share: opening only regular
files (never through a link where asked, never blocking on a named pipe), temporary names, atomic writes, the fix
for a failed write, and `Lock`, one holder at a time per path that says who it is. Standard library only.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import socket
import stat
import time
import uuid
from typing import BinaryIO, Callable, NamedTuple, Optional, Union

try:
    import fcntl
except ImportError:  # Windows: no flock; a lock's holder is then judged by its heartbeat
    fcntl = None

__all__ = ["Holder", "Lock", "LockLost", "NotAFile", "PathLike", "TEMPORARY_EXTRA", "create", "commit", "is_temporary", "kind",
           "open_regular", "remove_abandoned", "temporary_name", "try_flock", "write_advice", "write_atomically"]

PathLike = Union[str, "os.PathLike[str]"]

# Opening flags that never follow a link and never block on a named pipe (absent flags are 0 where unsupported).
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_FLAGS = _NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)  # O_BINARY: no newline translation

TEMPORARY_EXTRA = len(".0123456789ab.tmp")  # what a temporary name adds to its file's name, always the same
_TEMPORARY = re.compile(r"\.[0-9a-f]{12}\.tmp")
LOCK_SUFFIX = ".lock"
LOCK_POLL = 1.0  # the most seconds between two looks at a held lock


class NotAFile(OSError):
    """Something other than a regular file (of its own, where that was asked) is at a path."""


class LockLost(Exception):
    """A holder stopped for longer than ``stale_after`` had its lock cleared as a dead one's: it may not go on."""


def kind(mode: int) -> str:
    """What a directory entry that is not a regular file is, in words."""
    kinds = ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((words for test, words in kinds if test(mode)), "a special file")


def open_regular(path: str, flags: int = os.O_RDONLY, *, follow_links: bool = False, own: bool = False) -> int:
    """A blocking descriptor of the regular file at ``path``, opened without waiting on a named pipe.

    ``follow_links=False`` refuses a link; ``own=True`` also a file with other names (writing a hard link would
    change another file). Raises FileNotFoundError when nothing is there, `NotAFile` when something else is.
    """
    try:
        descriptor = os.open(path, flags | _FLAGS | (0 if follow_links else _NOFOLLOW))
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.EMLINK) and not follow_links:  # O_NOFOLLOW met a link
            raise NotAFile(f"not a regular file: {path} (a symbolic link)") from None
        raise
    status = os.fstat(descriptor)
    if not stat.S_ISREG(status.st_mode) or (own and status.st_nlink != 1):
        os.close(descriptor)
        what = "a hard link" if stat.S_ISREG(status.st_mode) else kind(status.st_mode)
        raise NotAFile(f"not a regular file: {path} ({what})")
    if _NONBLOCK:
        os.set_blocking(descriptor, True)
    return descriptor


# ----------------------------------------------------------------------------------------------------------------
# Temporary names and atomic writes


def temporary_name(path: str) -> str:
    """A new name beside ``path`` for a file that will replace it: ``<path>.<12 hex digits>.tmp``."""
    return f"{path}.{uuid.uuid4().hex[:12]}.tmp"


def is_temporary(name: str, of: str) -> bool:
    """Whether the file name ``name`` is one that `temporary_name` makes for a file named ``of``."""
    return name.startswith(of) and _TEMPORARY.fullmatch(name, len(of)) is not None


def create(path: str) -> BinaryIO:
    """A new, empty file at ``path``, created exclusively (fails if anything, a link included, is there), and
    flock-held while it is open: the mark of a live writer that `remove_abandoned` looks for."""
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _FLAGS, 0o666)
    if _NONBLOCK:
        os.set_blocking(descriptor, True)
    try_flock(descriptor)
    return os.fdopen(descriptor, "r+b")


def remove_abandoned(path: str, older_than: float) -> None:
    """Remove the temporary files of ``path`` that killed writers left: no live process holds their flock, and the
    file system's clock is ``older_than`` seconds from their time either way (a skewed clock dates some ahead)."""
    folder, name = os.path.split(path)
    try:
        found = [entry for entry in os.listdir(folder) if is_temporary(entry, name)]
    except OSError:
        return
    now = _file_system_now(folder) if found else 0.0
    for entry in found:
        with contextlib.suppress(OSError):  # gone meanwhile, held, or not ours to remove: left as it is
            descriptor = open_regular(os.path.join(folder, entry), own=True)
            try:
                if abs(now - os.fstat(descriptor).st_mtime) >= older_than and try_flock(descriptor) is not False:
                    os.remove(os.path.join(folder, entry))
            finally:
                os.close(descriptor)


def commit(file: BinaryIO, temporary: str, path: str) -> None:
    """Flush ``file`` (open at ``temporary``) to disk, close it and move it to ``path`` in one step."""
    file.flush()
    os.fsync(file.fileno())  # so that a power cut cannot leave a complete-looking file of zeros
    file.close()
    os.replace(temporary, path)


def write_atomically(path: PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` whole or not at all: ``write`` fills a new temporary file, which then replaces ``path``.

    Readers see the old file or the complete new one, even after a power cut; a link at ``path`` is replaced, never
    followed. The file gets the permissions of the process's umask.
    """
    path = os.fspath(path)
    temporary = temporary_name(path)
    file = create(temporary)
    try:
        with file:
            write(file)
            commit(file, temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise


def write_advice(error: OSError) -> str:
    """What to do about a failed write, by its cause, as words that follow a semicolon."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free some space on its disk"
    if error.errno == errno.EFBIG:
        return "raise the file-size limit (ulimit -f), or use a file system that allows the size"
    if error.errno in (errno.EPERM, errno.EACCES):
        return ("check the folder's permissions; an entry another user owns in a shared folder with the sticky bit "
                "cannot be removed or replaced but by its owner: remove it yourself or ask its owner to")
    if error.errno == errno.ENAMETOOLONG:
        return "choose a shorter name"
    return "check the folder and its file system"


# ----------------------------------------------------------------------------------------------------------------
# Locks


class Holder(NamedTuple):
    """Who holds a `Lock`, as its marker file says."""

    pid: int
    host: str

    @property
    def this_process(self) -> bool:
        return self.pid == os.getpid() and self.host == socket.gethostname()

    def __str__(self) -> str:
        if self.this_process:
            return "another thread of this process"
        return f"process {self.pid}" + ("" if self.host == socket.gethostname() else f" on {self.host}")


_HELD = {}  # marker path -> the Lock of this process that holds it, for file systems without flock


class Lock:
    """One holder at a time for ``path``: the marker file ``<path>.lock``, created exclusively, naming its holder.

    The holder keeps an flock on the marker and removes it on `release`. A dead holder releases at once: on its
    own host no process holds the marker's flock (or, without flock, its process is gone); from another host, or
    where nothing tells, a marker the holder has not `touch`-ed for ``stale_after`` seconds (by the file system's
    clock) is a dead holder's, and is cleared. Exclusion never rests on flock, so file systems whose flock
    excludes nobody (NFS with host-local locks) or fails are served too.
    """

    def __init__(self, path: PathLike, *, stale_after: float) -> None:
        self.path = os.path.abspath(os.fspath(path)) + LOCK_SUFFIX
        self.stale_after = stale_after
        self._descriptor: Optional[int] = None

    def acquire(self, timeout: float) -> bool:
        """Hold the lock, waiting while its holder makes progress; False once it has made none for ``timeout`` s.

        Raises `NotAFile` if something other than a regular file of its own is at the marker's path.
        """
        seen, changed = None, time.monotonic()
        while True:
            if self._create():
                return True
            alive = self._judge()  # (inode, mtime) of a live holder's marker; None once cleared or released
            if alive is None:
                continue
            now = time.monotonic()
            if alive != seen:
                seen, changed = alive, now
            if now - changed >= timeout:
                return False
            time.sleep(min(LOCK_POLL, timeout / 4, timeout - (now - changed)))

    def holder(self) -> Optional[Holder]:
        """Who holds the lock now, if its marker says."""
        with contextlib.suppress(OSError), os.fdopen(open_regular(self.path), "rb") as file:
            return _read_holder(file.fileno())
        return None

    def touch(self) -> None:
        """Say that the holder is alive and making progress (its waiters watch the marker's time); `LockLost` if
        the marker is no longer this holder's."""
        if self._descriptor is None:
            return
        if not _same_file(self.path, os.fstat(self._descriptor)):
            raise LockLost(f"{self.path} was cleared as a dead holder's while this process made no progress")
        os.utime(self._descriptor if os.utime in os.supports_fd else self.path)

    def release(self) -> None:
        if _HELD.get(self.path) is self:
            del _HELD[self.path]
        descriptor, self._descriptor = self._descriptor, None
        if descriptor is None:
            return
        try:
            if _same_file(self.path, os.fstat(descriptor)):  # not a marker made since ours was cleared as stale
                os.remove(self.path)
        except OSError:
            pass
        finally:
            os.close(descriptor)

    def __enter__(self) -> "Lock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _create(self) -> bool:
        try:
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _FLAGS, 0o666)
        except FileExistsError:
            return False
        _HELD[self.path] = self  # before the marker names this process: another thread judging it sees it held
        try:
            if fcntl is not None:
                with contextlib.suppress(OSError):  # blocking: a waiter looking at it lets go at once
                    fcntl.flock(descriptor, fcntl.LOCK_EX)
            os.write(descriptor, f"{os.getpid()} {socket.gethostname()}\n".encode("utf-8"))
        except BaseException:
            del _HELD[self.path]
            os.close(descriptor)
            with contextlib.suppress(OSError):
                os.remove(self.path)
            raise
        self._descriptor = descriptor
        return True

    def _judge(self) -> Optional[tuple]:
        """Look at the marker: the (inode, mtime) of a live holder's, None if none is there or it was cleared."""
        try:
            descriptor = open_regular(self.path, own=True)
        except FileNotFoundError:
            return None
        try:
            status = os.fstat(descriptor)
            flocked = try_flock(descriptor)  # held while the marker is judged and cleared: one clearer at a time
            if flocked is not False and not self._alive(descriptor, status, flocked):
                if _same_file(self.path, status):
                    os.remove(self.path)
                return None
            return status.st_ino, status.st_mtime_ns
        finally:
            os.close(descriptor)

    def _alive(self, descriptor: int, status: os.stat_result, flocked: Optional[bool]) -> bool:
        holder = _read_holder(descriptor)
        if holder is not None and holder.host == socket.gethostname():
            if holder.this_process:
                return self.path in _HELD
            if flocked or os.name != "nt":  # flock works here, so no process holds it; or its process tells
                return not flocked and _process_lives(holder.pid)
        return abs(_file_system_now(os.path.dirname(self.path)) - status.st_mtime) < self.stale_after


def try_flock(descriptor: int) -> Optional[bool]:
    """True once this descriptor holds the flock, False while another does, None where flock fails."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return None
    return True


def _read_holder(descriptor: int) -> Optional[Holder]:
    try:
        os.lseek(descriptor, 0, os.SEEK_SET)
        pid, host = os.read(descriptor, 512).decode("utf-8").split()
        return Holder(int(pid), host) if int(pid) > 0 else None
    except (OSError, ValueError):  # being written, or not ours
        return None


def _same_file(path: str, status: os.stat_result) -> bool:
    with contextlib.suppress(FileNotFoundError):
        return os.path.samestat(os.lstat(path), status)
    return False


def _process_lives(pid: int) -> bool:
    try:  # not on Windows, where os.kill(pid, 0) would end the process: the heartbeat decides there
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def _file_system_now(folder: str) -> float:
    """The time by the clock that dates files in ``folder`` (another host's, on a network share)."""
    probe = temporary_name(os.path.join(folder, "clock"))
    try:
        with create(probe) as file:
            now = os.fstat(file.fileno()).st_mtime
    except OSError:
        return time.time()
    with contextlib.suppress(OSError):
        os.remove(probe)
    return now
