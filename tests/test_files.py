"""clip._files: regular-file opening, temporary names, atomic writes, write advice and the lock, on real files and
real processes (a killed holder, another "host" on a file system whose flock excludes nobody or fails)."""
import errno
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from clip import _files

REPO = pathlib.Path(__file__).resolve().parents[1]

# A child that takes the lock of argv[2] and holds it until killed; it imports clip._files alone.
HOLD = r"""
import sys, time, types
package = types.ModuleType("clip"); package.__path__ = [sys.argv[1]]; sys.modules["clip"] = package
from clip import _files
lock = _files.Lock(sys.argv[2], stale_after=60)
assert lock.acquire(0)
print("held", flush=True)
time.sleep(600)
"""


def hold_in_child(path) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(REPO / "clip"), str(path)], stdout=subprocess.PIPE,
                             text=True)
    assert child.stdout.readline().strip() == "held"
    return child


@pytest.fixture
def no_flock(monkeypatch):
    """A file system whose flock fails (ENOLCK), as NFS without a lock manager."""
    class Failing:
        LOCK_EX, LOCK_SH, LOCK_NB = 2, 1, 4

        @staticmethod
        def flock(descriptor, operation):
            raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(_files, "fcntl", Failing)


def plant_marker(path: pathlib.Path, pid: int, host: str, age: float = 0.0) -> pathlib.Path:
    marker = pathlib.Path(str(path) + ".lock")
    marker.write_text(f"{pid} {host}\n")
    then = time.time() - age
    os.utime(marker, (then, then))
    return marker


# ---------------------------------------------------------------------------------------------------------------
# Opening, temporary names, atomic writes, advice


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX links and pipes")
def test_open_regular_refuses_links_and_never_blocks_on_a_pipe(tmp_path):
    (tmp_path / "file").write_bytes(b"x")
    os.symlink(tmp_path / "file", tmp_path / "link")
    os.mkfifo(tmp_path / "pipe")
    os.link(tmp_path / "file", tmp_path / "hard")
    os.close(_files.open_regular(str(tmp_path / "link"), follow_links=True))
    for name, what in (("link", "a symbolic link"), ("pipe", "a FIFO (named pipe)")):
        with pytest.raises(_files.NotAFile, match=re.escape(f"{name} ({what})")):
            _files.open_regular(str(tmp_path / name), follow_links=name == "pipe")
    with pytest.raises(_files.NotAFile, match="a hard link"):
        _files.open_regular(str(tmp_path / "hard"), own=True)
    with pytest.raises(FileNotFoundError):
        _files.open_regular(str(tmp_path / "nothing"))


def test_temporary_names_are_made_and_recognised_in_one_place(tmp_path):
    path = str(tmp_path / "out.npy")
    name = os.path.basename(_files.temporary_name(path))
    assert len(name) == len("out.npy") + _files.TEMPORARY_EXTRA
    assert _files.is_temporary(name, "out.npy")
    for other in ("out.npy.0123456789.tmp", "out.npy.0123456789ab.tmp.bak", "out.npy2.0123456789ab.tmp",
                  "out.npy.0123456789AB.tmp", "other.npy.0123456789ab.tmp"):
        assert not _files.is_temporary(other, "out.npy"), other


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX links")
def test_write_atomically_replaces_a_link_syncs_and_never_leaves_half_a_file(tmp_path, monkeypatch):
    victim = tmp_path / "victim"
    victim.write_bytes(b"another user's file")
    out = tmp_path / "out.txt"
    os.symlink(victim, out)
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.fstat(fd).st_size) or real_fsync(fd))
    _files.write_atomically(out, lambda file: file.write(b"new"))
    assert victim.read_bytes() == b"another user's file" and not out.is_symlink() and out.read_bytes() == b"new"
    assert synced == [3]  # the bytes reach the disk before the name points at them

    def fails(file):
        file.write(b"half")
        raise ValueError("the writer failed")

    with pytest.raises(ValueError):
        _files.write_atomically(str(out), fails)
    assert out.read_bytes() == b"new" and sorted(os.listdir(tmp_path)) == ["out.txt", "victim"]


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "free some space"), (errno.EDQUOT, "free some space"),
                                         (errno.EFBIG, "ulimit -f"), (errno.EACCES, "permissions"),
                                         (errno.EPERM, "sticky bit"), (errno.ENAMETOOLONG, "shorter name"),
                                         (errno.EIO, "check the folder and its file system")])
def test_write_advice_fits_the_cause(code, words):
    assert words in _files.write_advice(OSError(code, os.strerror(code)))


# ---------------------------------------------------------------------------------------------------------------
# The lock


def test_a_lock_excludes_says_who_holds_it_and_leaves_nothing(tmp_path):
    first, second = _files.Lock(tmp_path / "f", stale_after=60), _files.Lock(tmp_path / "f", stale_after=60)
    assert first.acquire(0)
    assert not second.acquire(0) and not second.acquire(0.3)
    holder = second.holder()
    assert (holder.pid, holder.host) == (os.getpid(), socket.gethostname()) and holder.this_process
    assert str(holder) == "another thread of this process"  # never "waiting for process <its own pid>"
    first.release()
    assert second.acquire(0) and second.holder().this_process
    second.release()
    assert os.listdir(tmp_path) == []


def test_a_waiter_waits_while_the_holder_makes_progress(tmp_path):
    holder, waiter = _files.Lock(tmp_path / "f", stale_after=60), _files.Lock(tmp_path / "f", stale_after=60)
    assert holder.acquire(0)

    def work():  # progress for 1.5 s, well past the waiter's 0.5 s bound, then done
        for _ in range(15):
            time.sleep(0.1)
            holder.touch()
        holder.release()

    worker = threading.Thread(target=work)
    worker.start()
    try:
        assert waiter.acquire(0.5)
    finally:
        worker.join()
    waiter.release()


@pytest.mark.skipif(sys.platform == "win32", reason="needs SIGKILL")
def test_a_killed_holder_releases_at_once(tmp_path):
    child = hold_in_child(tmp_path / "f")
    lock = _files.Lock(tmp_path / "f", stale_after=60)
    try:
        assert not lock.acquire(0) and lock.holder().pid == child.pid and str(lock.holder()) == f"process {child.pid}"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert lock.acquire(0)  # no wait for the stall bound: the marker of a dead process is cleared
    lock.release()


@pytest.mark.skipif(sys.platform == "win32", reason="needs SIGKILL")
def test_without_flock_a_dead_holder_on_this_host_is_told_by_its_process(tmp_path, no_flock):
    child = hold_in_child(tmp_path / "f")  # the child has flock; this process judges without
    lock = _files.Lock(tmp_path / "f", stale_after=60)
    try:
        assert not lock.acquire(0)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert lock.acquire(0)
    lock.release()


@pytest.mark.parametrize("flock", ["works", "fails"])
def test_a_marker_from_another_host_is_waited_for_while_fresh_and_cleared_once_stale(tmp_path, request, flock):
    if flock == "fails":
        request.getfixturevalue("no_flock")
    marker = plant_marker(tmp_path / "f", 12345, "elsewhere.example")
    lock = _files.Lock(tmp_path / "f", stale_after=30)
    assert not lock.acquire(0)
    assert str(lock.holder()) == "process 12345 on elsewhere.example"
    marker.unlink()
    plant_marker(tmp_path / "f", 12345, "elsewhere.example", age=31)  # its holder died half a minute ago
    started = time.monotonic()
    assert lock.acquire(0)  # cleared at once, not waited on for the stall bound
    assert time.monotonic() - started < 5
    lock.release()
    plant_marker(tmp_path / "f", 12345, "elsewhere.example", age=-3600)  # dated in the future: a skewed clock
    assert lock.acquire(0)
    lock.release()


def test_a_marker_left_by_this_pid_in_an_earlier_life_is_cleared(tmp_path, no_flock):
    """A restarted container often gets its dead predecessor's pid: that marker is not this process's."""
    plant_marker(tmp_path / "f", os.getpid(), socket.gethostname())
    lock = _files.Lock(tmp_path / "f", stale_after=60)
    assert lock.acquire(0)
    lock.release()


def test_an_old_empty_lock_file_is_cleared(tmp_path):
    """The lock files earlier versions left (empty, kept for ever) block nobody."""
    marker = plant_marker(tmp_path / "f", 1, "x", age=120)
    marker.write_bytes(b"")
    os.utime(marker, (time.time() - 120,) * 2)
    lock = _files.Lock(tmp_path / "f", stale_after=60)
    assert lock.acquire(0)
    lock.release()


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX links")
def test_a_link_at_the_marker_is_refused(tmp_path):
    (tmp_path / "victim").write_bytes(b"x")
    os.symlink(tmp_path / "victim", tmp_path / "f.lock")
    with pytest.raises(_files.NotAFile):
        _files.Lock(tmp_path / "f", stale_after=60).acquire(0)
    assert (tmp_path / "victim").read_bytes() == b"x"


def test_a_holder_whose_lock_was_cleared_learns_it_and_leaves_the_new_one(tmp_path):
    """Stopped past ``stale_after`` on another host's view, a holder is taken for dead; when it goes on it must stop."""
    lock = _files.Lock(tmp_path / "f", stale_after=60)
    assert lock.acquire(0)
    lock.touch()
    os.remove(lock.path)
    plant_marker(tmp_path / "f", 4242, "elsewhere.example")  # the process that took over
    with pytest.raises(_files.LockLost):
        lock.touch()
    lock.release()
    assert (tmp_path / "f.lock").read_text() == "4242 elsewhere.example\n"
