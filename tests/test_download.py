"""Downloads and the cache (clip._cache over clip._http), against a real HTTP server on 127.0.0.1 with injected faults.

No test can reach another host: every source points at the local server, proxy variables are cleared, and
name resolution of any host but 127.0.0.1/localhost fails (see the ``sandbox`` fixture).
"""
import hashlib
import json
import os
import pathlib
import random
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import warnings

import pytest

from clip import _cache, _files, _http, _registry
from clip._cache import DownloadError
from httpserver import LocalServer

REPO = pathlib.Path(__file__).resolve().parents[1]
SIZE = 300_000  # a few hundred KB: several network reads, still instant
RETRIES = 3
BACKOFF = 0.01


def payload(seed: int = 0, size: int = SIZE) -> bytes:
    return random.Random(seed).randbytes(size)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def publish(server: LocalServer, data: bytes, name: str = "model.pt", prefix: str = "/clip/models"):
    """Serve ``data`` at a release-shaped path; return (url, path)."""
    path = f"{prefix}/{sha(data)}/{name}"
    server.files[path] = data
    return server.url(path), path


def listing(folder) -> dict:
    """Every entry of a folder with its size and modification time, to prove nothing was written."""
    return {entry.name: (entry.stat().st_size, entry.stat().st_mtime_ns) for entry in os.scandir(folder)}


def gets(server: LocalServer, path: str) -> list:
    return [headers for method, requested, headers in server.requests if requested == path]


@pytest.fixture(autouse=True)
def sandbox(monkeypatch, tmp_path, local_network):
    """A fresh cache folder, fast retries, no proxies, no offline switch, and no host but 127.0.0.1."""
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("CLIP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CLIP_DOWNLOAD_RETRIES", str(RETRIES))
    monkeypatch.setenv("CLIP_DOWNLOAD_BACKOFF", str(BACKOFF))
    monkeypatch.setenv("CLIP_DOWNLOAD_TIMEOUT", "10")

    real_getaddrinfo = socket.getaddrinfo

    def local_only(host, *args, **kwargs):
        if host not in ("127.0.0.1", "localhost", b"127.0.0.1", b"localhost"):
            raise socket.gaierror(socket.EAI_NONAME, f"tests may only reach 127.0.0.1, not {host!r}")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", local_only)
    return tmp_path / "cache"


@pytest.fixture
def server():
    with LocalServer() as running:
        yield running


@pytest.fixture
def sleeps(monkeypatch):
    """The waits between retries, recorded instead of slept."""
    waited = []
    monkeypatch.setattr(_http, "_sleep", waited.append)
    return waited


@pytest.fixture
def no_hashing(monkeypatch):
    """Fail the test if any cached file is hashed."""
    def forbidden(path):
        raise AssertionError(f"{path} was hashed")

    monkeypatch.setattr(_cache, "_sha256_of", forbidden)


@pytest.fixture
def hashed(monkeypatch):
    """The paths of the cached files hashed, in order."""
    paths = []
    real = _cache._sha256_of
    monkeypatch.setattr(_cache, "_sha256_of", lambda path: paths.append(path) or real(path))
    return paths


def child_env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.update(extra)
    return env


# ---------------------------------------------------------------------------------------------------------------
# Names, settings and sources (pure functions)


def test_cache_dir_resolves_at_call_time(monkeypatch, tmp_path):
    monkeypatch.setenv("CLIP_CACHE_DIR", str(tmp_path / "a"))
    assert _cache.cache_dir() == str(tmp_path / "a")
    assert _cache.cache_dir(tmp_path / "root") == str(tmp_path / "root")
    assert _cache.cache_dir("") == str(tmp_path / "a")  # the original's `download_root or default`
    monkeypatch.delenv("CLIP_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert _cache.cache_dir() == str(tmp_path / "home" / ".cache" / "clip")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # the original's folder, whatever XDG says
    assert _cache.cache_dir() == str(tmp_path / "home" / ".cache" / "clip")
    assert _cache.cache_dir("~/models") == str(tmp_path / "home" / "models")


def test_sha256_from_url():
    digest = "ab" * 32
    assert _cache.sha256_from_url(f"https://host/clip/models/{digest}/RN50.pt") == digest
    assert _cache.sha256_from_url(f"https://host/{digest.upper()}/RN50.pt") == digest
    for bad in ("https://host/clip/RN50.pt", f"https://host/{digest[:-1]}/RN50.pt", "RN50.pt"):
        with pytest.raises(DownloadError, match="cannot tell the expected SHA-256"):
            _cache.sha256_from_url(bad)


@pytest.mark.parametrize("value, offline", [("1", True), ("true", True), ("YES", True), (" on ", True),
                                            ("0", False), ("", False), ("false", False), ("off", False)])
@pytest.mark.parametrize("variable", ["CLIP_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_variable(monkeypatch, variable, value, offline):
    monkeypatch.setenv(variable, value)
    assert _http.offline_variable() == (variable if offline else None)


def test_sources_in_order_without_fetching(monkeypatch):
    digest = "cd" * 32
    release = f"https://openaipublic.azureedge.net/clip/models/{digest}/ViT-B-32.pt"
    origin = f"https://openaipublic.blob.core.windows.net/clip/models/{digest}/ViT-B-32.pt"
    assert _http.download_sources(release) == [release, origin]
    monkeypatch.setenv("CLIP_DOWNLOAD_BASE", "file:///srv/clip/")
    assert _http.download_sources(release) == ["file:///srv/clip/ViT-B-32.pt", release, origin]
    other = f"http://127.0.0.1:1/{digest}/ViT-B-32.pt"
    assert _http.download_sources(other) == ["file:///srv/clip/ViT-B-32.pt", other]


def test_invalid_settings_are_named(monkeypatch, server):
    url, _ = publish(server, payload())
    monkeypatch.setenv("CLIP_DOWNLOAD_RETRIES", "many")
    with pytest.raises(DownloadError, match="CLIP_DOWNLOAD_RETRIES='many'"):
        _cache.download(url)
    assert server.requests == []


# ---------------------------------------------------------------------------------------------------------------
# Fresh downloads and the cache


def test_fresh_download_is_verified_and_recorded(server, sandbox):
    data = payload()
    url, path = publish(server, data, "ViT-X.pt")
    target = _cache.download(url)
    assert target == str(sandbox / "ViT-X.pt")
    assert pathlib.Path(target).read_bytes() == data
    record = json.loads(pathlib.Path(target + ".sha256.json").read_text())
    status = os.stat(target)
    assert record == {"file": "ViT-X.pt", "sha256": sha(data), "size": SIZE, "mtime_ns": status.st_mtime_ns}
    assert sorted(os.listdir(sandbox)) == ["ViT-X.pt", "ViT-X.pt.sha256.json"]
    assert len(gets(server, path)) == 1
    assert _cache.cached_path(url) == target


def test_cached_call_makes_no_request_and_no_hash(server, no_hashing):
    url, _ = publish(server, payload())
    first = _cache.download(url)
    before = listing(os.path.dirname(first))
    assert _cache.download(url) == first
    assert len(server.requests) == 1
    assert listing(os.path.dirname(first)) == before


def test_file_without_record_is_hashed_once_then_trusted(server, sandbox, monkeypatch):
    data = payload()
    url, _ = publish(server, data)
    sandbox.mkdir()
    (sandbox / "model.pt").write_bytes(data)  # put there by hand, or by the original package
    hashed = []
    real = _cache._sha256_of
    monkeypatch.setattr(_cache, "_sha256_of", lambda path: hashed.append(path) or real(path))
    assert _cache.download(url) == str(sandbox / "model.pt")
    assert _cache.download(url) == str(sandbox / "model.pt")
    assert hashed == [str(sandbox / "model.pt")]
    assert server.requests == []


def test_touched_file_is_hashed_again_without_download(server, sandbox, recwarn):
    url, _ = publish(server, payload())
    target = _cache.download(url)
    os.utime(target, ns=(1, 1))
    assert _cache.cached_path(url) is None  # cached_path never hashes: the record no longer vouches for it
    assert _cache.download(url) == target
    assert len(server.requests) == 1 and not recwarn.list
    assert _cache.cached_path(url) == target  # re-recorded


def test_modified_cached_file_is_detected_and_repaired(server):
    data = payload()
    url, path = publish(server, data)
    target = _cache.download(url)
    with open(target, "r+b") as file:
        file.seek(1000)
        file.write(b"corrupted")
    os.utime(target, ns=(10**18, 10**18))  # a modification shows in the mtime, even on a coarse-clock system
    with pytest.warns(UserWarning, match=f"does not match.*expected {sha(data)}"):
        assert _cache.download(url) == target
    assert pathlib.Path(target).read_bytes() == data
    assert len(gets(server, path)) == 2
    assert _cache.cached_path(url) == target


def test_cached_path_never_writes_nor_hashes(server, sandbox, no_hashing):
    data = payload()
    url, _ = publish(server, data)
    assert _cache.cached_path(url) is None
    assert not sandbox.exists()
    sandbox.mkdir()
    (sandbox / "model.pt").write_bytes(data)
    assert _cache.cached_path(url) is None  # no record: not verified
    assert sorted(os.listdir(sandbox)) == ["model.pt"]
    assert server.requests == []


def test_verify_cache_rehashes_every_recorded_file(server, sandbox):
    good, bad, gone = payload(1), payload(2), payload(3)
    urls = [publish(server, data, name)[0] for data, name in ((good, "a.pt"), (bad, "b.pt"), (gone, "c.pt"))]
    for url in urls:
        _cache.download(url)
    b = sandbox / "b.pt"
    status = b.stat()
    with open(b, "r+b") as file:  # same size, same mtime: only a full re-hash can tell
        file.write(b"X" * 16)
    os.utime(b, ns=(status.st_atime_ns, status.st_mtime_ns))
    (sandbox / "c.pt").unlink()
    results = _cache.verify_cache()
    assert [(pathlib.Path(r.path).name, r.ok) for r in results] == [("a.pt", True), ("b.pt", False), ("c.pt", False)]
    assert results[0].sha256 == sha(good) and results[0].message == "ok"
    assert sha(bad) in results[1].message and sha(b.read_bytes()) in results[1].message
    assert "missing" in results[2].message
    assert _cache.verify_cache(sandbox / "nowhere") == []


def test_a_url_without_hash_is_refused_before_any_request(server, sandbox):
    server.files["/vocab/bpe.txt.gz"] = payload()
    url = server.url("/vocab/bpe.txt.gz")
    for call in (_cache.download, _cache.cached_path):
        with pytest.raises(DownloadError, match="cannot tell the expected SHA-256 of .*64 hex digits"):
            call(url)
    assert server.requests == []
    assert not sandbox.exists()


def test_one_argument_download_uses_clip_cache_dir(server, monkeypatch, tmp_path):
    import clip.clip

    monkeypatch.setenv("CLIP_CACHE_DIR", str(tmp_path / "env-cache"))
    url, _ = publish(server, payload())
    assert clip.clip._download(url) == str(tmp_path / "env-cache" / "model.pt")
    assert clip.clip._download(url, str(tmp_path / "given")) == str(tmp_path / "given" / "model.pt")
    assert _cache.download(url) == str(tmp_path / "env-cache" / "model.pt")
    assert len(server.requests) == 2


# ---------------------------------------------------------------------------------------------------------------
# Faults


def test_dropped_connection_is_resumed_with_range(server):
    data = payload()
    url, path = publish(server, data)
    server.add_fault(path, "truncate", 100_000)
    target = _cache.download(url)
    assert pathlib.Path(target).read_bytes() == data
    assert gets(server, path)[1]["Range"] == "bytes=100000-"
    assert server.responses == [(path, 200, 100_000), (path, 206, SIZE - 100_000)]  # every byte sent once


def test_read_timeout_is_retried_and_resumed(server, monkeypatch):
    data = payload()
    url, path = publish(server, data)
    monkeypatch.setenv("CLIP_DOWNLOAD_TIMEOUT", "0.3")
    server.add_fault(path, "pause", 50_000, seconds=5)
    started = time.monotonic()
    target = _cache.download(url)
    assert time.monotonic() - started < 4
    assert pathlib.Path(target).read_bytes() == data
    assert gets(server, path)[1]["Range"] == "bytes=50000-"


def test_no_answer_at_all_times_out_and_is_retried(server, monkeypatch):
    data = payload()
    url, path = publish(server, data)
    monkeypatch.setenv("CLIP_DOWNLOAD_TIMEOUT", "0.3")
    server.add_fault(path, "stall", seconds=5)  # connected, but no status line
    started = time.monotonic()
    assert pathlib.Path(_cache.download(url)).read_bytes() == data
    assert time.monotonic() - started < 4 and len(gets(server, path)) == 2


def test_always_truncated_body_fails_and_leaves_no_file(server, sandbox, sleeps):
    url, path = publish(server, payload())
    server.ranges = False
    server.add_fault(path, "truncate", 1000, times=None)
    with pytest.raises(DownloadError) as caught:
        _cache.download(url)
    message = str(caught.value)
    assert url in message and "1000 of 300000 bytes" in message and str(sandbox) in message
    assert len(gets(server, path)) == RETRIES + 1
    assert sleeps == [BACKOFF, 2 * BACKOFF, 4 * BACKOFF]
    assert os.listdir(sandbox) == []  # no final file, no useless partial


def test_broken_download_keeps_resumable_partial_for_next_call(server, sandbox):
    data = payload()
    url, path = publish(server, data)
    server.add_fault(path, "truncate", 120_000)
    server.add_fault(path, "status", 503, times=None)
    with pytest.raises(DownloadError, match="120000 bytes received are kept"):
        _cache.download(url)
    assert not (sandbox / "model.pt").exists()
    assert (sandbox / "model.pt.partial").stat().st_size == 120_000
    server.faults.clear()
    assert pathlib.Path(_cache.download(url)).read_bytes() == data
    assert gets(server, path)[-1]["Range"] == "bytes=120000-"
    assert not (sandbox / "model.pt.partial").exists()


def test_wrong_bytes_fail_with_both_hashes(server, sandbox):
    expected, served = payload(1), payload(2)
    path = f"/clip/models/{sha(expected)}/model.pt"
    server.files[path] = served
    with pytest.raises(DownloadError) as caught:
        _cache.download(server.url(path))
    message = str(caught.value)
    assert f"expected {sha(expected)}, got {sha(served)}" in message
    assert "300000 bytes received" in message and server.url(path) in message
    assert len(gets(server, path)) == 1  # wrong bytes are not worth a retry from the same source
    assert os.listdir(sandbox) == []


@pytest.mark.parametrize("status", [503, 500, 502, 504, 429, 408])
def test_503_twice_then_success(server, sleeps, status):
    data = payload()
    url, path = publish(server, data)
    server.add_fault(path, "status", status, times=2)
    assert pathlib.Path(_cache.download(url)).read_bytes() == data
    assert [answer for _, answer, _ in server.responses] == [status, status, 200]
    assert sleeps == [BACKOFF, 2 * BACKOFF]  # exponential backoff


def test_connection_closed_before_answering_is_retried(server, sleeps):
    data = payload()
    url, path = publish(server, data)
    server.add_fault(path, "drop", times=2)
    assert pathlib.Path(_cache.download(url)).read_bytes() == data
    assert len(gets(server, path)) == 3 and len(sleeps) == 2


@pytest.mark.parametrize("status", [404, 401, 403, 410])
def test_404_fails_fast_with_the_url(server, sandbox, sleeps, status):
    url = server.url(f"/clip/models/{'0' * 64}/missing.pt")
    server.add_fault(f"/clip/models/{'0' * 64}/missing.pt", "status", status)
    with pytest.raises(DownloadError, match=f"HTTP {status}") as caught:
        _cache.download(url)
    assert url in str(caught.value) and "clip.load(PATH), or --model PATH" in str(caught.value)
    assert len(server.requests) == 1 and sleeps == []
    assert not (sandbox / "missing.pt").exists() and not (sandbox / "missing.pt.partial").exists()


def test_redirect_loop_fails_fast(server, sleeps):
    url, path = publish(server, payload())
    server.add_fault(path, "redirect", path, times=None)
    with pytest.raises(DownloadError, match="HTTP 30") as caught:
        _cache.download(url)
    assert url in str(caught.value) and sleeps == []


def test_missing_content_length(server):
    data = payload()
    url, path = publish(server, data)
    server.content_length = False
    assert pathlib.Path(_cache.download(url)).read_bytes() == data
    assert len(gets(server, path)) == 1


def test_missing_content_length_and_cut_body_fails_on_the_hash(server, sandbox):
    url, path = publish(server, payload())
    server.content_length = False
    server.ranges = False
    server.add_fault(path, "truncate", 5000, times=None)
    with pytest.raises(DownloadError, match="5000 bytes received"):
        _cache.download(url)
    assert not (sandbox / "model.pt").exists()


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_redirect_is_followed(server, code):
    if code == 308 and sys.version_info < (3, 11):
        pytest.skip("urllib follows 308 from Python 3.11")
    data = payload()
    with LocalServer() as storage:
        target_url, _ = publish(storage, data)
        old = f"/clip/models/{sha(data)}/model.pt"
        server.add_fault(old, "redirect", target_url, code=code, times=None)
        assert pathlib.Path(_cache.download(server.url(old))).read_bytes() == data
        assert len(storage.requests) == 1


def test_resume_after_redirect_keeps_the_range(server):
    data = payload()
    with LocalServer() as storage:
        target_url, path = publish(storage, data)
        old = f"/clip/models/{sha(data)}/model.pt"
        server.add_fault(old, "redirect", target_url, times=None)
        storage.add_fault(path, "truncate", 70_000)
        assert pathlib.Path(_cache.download(server.url(old))).read_bytes() == data
        assert gets(storage, path)[1]["Range"] == "bytes=70000-"


def test_server_without_range_support_restarts_cleanly(server, sandbox):
    data = payload()
    url, path = publish(server, data)
    server.ranges = False
    server.add_fault(path, "truncate", 100_000)
    assert pathlib.Path(_cache.download(url)).read_bytes() == data
    assert gets(server, path)[1]["Range"] == "bytes=100000-"  # asked, refused: the whole file came again
    assert server.responses == [(path, 200, 100_000), (path, 200, SIZE)]
    assert not (sandbox / "model.pt.partial").exists()


def test_wrong_range_in_answer_is_not_spliced(server):
    data = payload()
    url, path = publish(server, data)
    server.add_fault(path, "truncate", 100_000)
    server.add_fault(path, "bad_range")  # 206, but from byte 0
    assert pathlib.Path(_cache.download(url)).read_bytes() == data
    ranges = [headers.get("Range") for headers in gets(server, path)]
    assert ranges == [None, "bytes=100000-", None]  # the odd answer was dropped and the file fetched whole


def test_stale_partial_with_wrong_bytes_restarts_from_zero(server, sandbox):
    data = payload()
    url, path = publish(server, data)
    sandbox.mkdir()
    (sandbox / "model.pt.partial").write_bytes(b"left by some other download" * 100)
    assert pathlib.Path(_cache.download(url)).read_bytes() == data
    first, second = gets(server, path)
    assert first["Range"] == "bytes=2700-" and "Range" not in second


def test_complete_partial_is_accepted_on_416(server, sandbox):
    data = payload()
    url, path = publish(server, data)
    sandbox.mkdir()
    (sandbox / "model.pt.partial").write_bytes(data)  # killed just before the move into place
    assert pathlib.Path(_cache.download(url)).read_bytes() == data
    assert server.responses == [(path, 416, 0)]


def test_partial_longer_than_the_file_restarts_from_zero(server, sandbox):
    data = payload()
    url, path = publish(server, data)
    sandbox.mkdir()
    (sandbox / "model.pt.partial").write_bytes(data + b"from a bigger file")
    assert pathlib.Path(_cache.download(url)).read_bytes() == data
    assert [status for _, status, _ in server.responses] == [416, 200]


def test_empty_file(server):
    url, _ = publish(server, b"")
    assert pathlib.Path(_cache.download(url)).read_bytes() == b""
    assert _cache.download(url) == _cache.cached_path(url)


def test_next_source_is_used_when_the_first_fails(server, sleeps, monkeypatch):
    data = payload()
    url, path = publish(server, data)
    monkeypatch.setenv("CLIP_DOWNLOAD_BASE", server.url("/empty/"))  # tried first; 404 here
    assert pathlib.Path(_cache.download(url)).read_bytes() == data
    assert [requested for _, requested, _ in server.requests] == ["/empty/model.pt", path]
    assert sleeps == []


def test_next_source_is_used_when_the_first_host_refuses_connections(server, sandbox, sleeps, monkeypatch):
    data = payload()
    url, _ = publish(server, data)
    with socket.socket() as unused:  # a port nobody listens on
        unused.bind(("127.0.0.1", 0))
        monkeypatch.setenv("CLIP_DOWNLOAD_BASE", f"http://127.0.0.1:{unused.getsockname()[1]}/")
    assert pathlib.Path(_cache.download(url)).read_bytes() == data
    assert len(sleeps) == RETRIES  # connection errors are retried before moving on


def test_all_sources_failing_names_each(server, sandbox, monkeypatch):
    data = payload()
    monkeypatch.setenv("CLIP_DOWNLOAD_BASE", server.url("/a/"))
    first = server.url("/a/model.pt")
    second = server.url(f"/b/{sha(data)}/model.pt")
    server.files[f"/b/{sha(data)}/model.pt"] = b"not the model"
    with pytest.raises(DownloadError) as caught:
        _cache.download(second)
    message = str(caught.value)
    assert f"{first}: HTTP 404" in message
    assert f"{second}: SHA-256 mismatch: expected {sha(data)}, got {sha(b'not the model')}" in message
    assert str(sandbox / "model.pt") in message and "CLIP_DOWNLOAD_BASE" in message


def test_download_base_is_tried_first(server, monkeypatch):
    data = payload()
    server.files["/airgap/model.pt"] = data
    release = server.url(f"/clip/models/{sha(data)}/model.pt")  # would 404; never asked
    monkeypatch.setenv("CLIP_DOWNLOAD_BASE", server.url("/airgap/"))
    assert pathlib.Path(_cache.download(release)).read_bytes() == data
    assert [requested for _, requested, _ in server.requests] == ["/airgap/model.pt"]


def test_download_base_may_be_a_folder(server, monkeypatch, tmp_path):
    data = payload()
    (tmp_path / "share").mkdir()
    (tmp_path / "share" / "model.pt").write_bytes(data)
    monkeypatch.setenv("CLIP_DOWNLOAD_BASE", (tmp_path / "share").as_uri())
    release = server.url(f"/clip/models/{sha(data)}/model.pt")
    assert pathlib.Path(_cache.download(release)).read_bytes() == data
    assert server.requests == []


def test_exception_mid_transfer_leaves_no_final_file(server, sandbox, monkeypatch):
    data = payload()
    url, path = publish(server, data)
    server.content_length = False  # one connection, many reads
    real = _http.Sink.append

    def interrupted(self, chunk):
        real(self, chunk)
        raise KeyboardInterrupt

    monkeypatch.setattr(_http.Sink, "append", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _cache.download(url)
    assert not (sandbox / "model.pt").exists()
    kept = (sandbox / "model.pt.partial").stat().st_size
    assert 0 < kept < SIZE
    monkeypatch.setattr(_http.Sink, "append", real)
    monkeypatch.setenv("CLIP_DOWNLOAD_STALL_TIMEOUT", "5")  # a lock left held would warn here (an error), not hang
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pathlib.Path(_cache.download(url)).read_bytes() == data
    assert gets(server, path)[-1]["Range"] == f"bytes={kept}-"  # Ctrl-C, then run again: it resumes


def test_disk_error_fails_clearly_and_cleans_up(server, sandbox, monkeypatch):
    url, _ = publish(server, payload())

    def disk_full(self, chunk):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_http.Sink, "append", disk_full)
    with pytest.raises(DownloadError, match="could not write model.pt into .*No space left on device"):
        _cache.download(url)
    assert os.listdir(sandbox) == []
    assert len(server.requests) == 1  # a local error is not retried


# ---------------------------------------------------------------------------------------------------------------
# Offline mode


@pytest.mark.parametrize("variable", ["CLIP_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_makes_no_request_and_says_what_to_do(server, sandbox, monkeypatch, variable):
    import clip.clip

    data = payload()
    url, _ = publish(server, data, "ViT-T-1.pt")
    monkeypatch.setitem(clip.clip._MODELS, "ViT-T/1", url)
    monkeypatch.setenv(variable, "1")
    monkeypatch.setenv("CLIP_DOWNLOAD_BASE", "http://127.0.0.1:1/m/")
    with pytest.raises(DownloadError) as caught:
        _cache.download(url)
    message = str(caught.value)
    for part in (f"{variable}=1", "ViT-T-1.pt", "model ViT-T/1", sha(data), str(sandbox / "ViT-T-1.pt"), url,
                 "http://127.0.0.1:1/m/ViT-T-1.pt", f"unset {variable}", "clip.load(PATH)", "--model PATH"):
        assert part in message
    assert "))" not in message and "download_root" not in message and "CLIP_CACHE_DIR" not in message
    lines = message.splitlines()
    assert len(lines) == 3 and "clip.load(PATH)" in lines[1] and sha(data) in lines[2], message
    assert server.requests == []
    assert not sandbox.exists()


def test_offline_uses_a_verified_cached_file(server, monkeypatch):
    url, _ = publish(server, payload())
    target = _cache.download(url)
    monkeypatch.setenv("CLIP_OFFLINE", "true")
    assert _cache.download(url) == target
    assert len(server.requests) == 1


def test_offline_with_a_corrupt_cached_file(server, sandbox, monkeypatch):
    data = payload()
    url, _ = publish(server, data)
    sandbox.mkdir()
    (sandbox / "model.pt").write_bytes(b"garbage")
    monkeypatch.setenv("CLIP_OFFLINE", "1")
    expected = f"does not match \\(its SHA-256 is {sha(b'garbage')}, expected {sha(data)}\\)"
    with pytest.raises(DownloadError, match=expected):
        _cache.download(url)
    assert server.requests == []


# ---------------------------------------------------------------------------------------------------------------
# Several processes, killed processes, read-only caches


# The children import clip._cache without clip/__init__.py: it needs only the standard library, filelock and tqdm,
# and skipping the package's torch import keeps these tests fast (four cold torch imports take half a minute on
# 2 cores). sys.argv[1] is the package folder.
PRELUDE = r"""
import os, sys, time, types, warnings
package = types.ModuleType("clip")
package.__path__ = [sys.argv[1]]
sys.modules["clip"] = package
from clip import _cache
args = sys.argv[2:]
"""
MODULE = str(REPO / "clip")

CONCURRENT = PRELUDE + r"""
ready, url, count = args[0], args[1], int(args[2])
open(os.path.join(ready, str(os.getpid())), "w").close()
deadline = time.monotonic() + 60
while len(os.listdir(ready)) < count and time.monotonic() < deadline:  # start together
    time.sleep(0.005)
print(_cache.download(url))
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX process handling")
def test_four_processes_make_one_download(server, sandbox, tmp_path):
    data = payload()
    url, path = publish(server, data)
    server.add_fault(path, "pause", 100_000, seconds=1.0)  # the download holds the lock while the others arrive
    ready = tmp_path / "ready"
    ready.mkdir()
    children = [subprocess.Popen([sys.executable, "-c", CONCURRENT, MODULE, str(ready), url, "4"], cwd=REPO,
                                 env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for _ in range(4)]
    outputs = [child.communicate(timeout=120) for child in children]
    assert [child.returncode for child in children] == [0] * 4, [err for _, err in outputs]
    assert {out.strip() for out, _ in outputs} == {str(sandbox / "model.pt")}
    assert len(gets(server, path)) == 1
    assert (sandbox / "model.pt").read_bytes() == data
    assert sorted(os.listdir(sandbox)) == ["model.pt", "model.pt.sha256.json"]


KILLED = PRELUDE + r"""
_cache.download(args[0])
"""


@pytest.mark.skipif(sys.platform == "win32", reason="needs SIGKILL")
def test_process_killed_mid_download_leaves_no_final_file(server, sandbox):
    data = payload()
    url, path = publish(server, data)
    server.add_fault(path, "pause", 100_000, seconds=60)  # send a third, then stall
    child = subprocess.Popen([sys.executable, "-c", KILLED, MODULE, url], cwd=REPO, env=child_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = sandbox / "model.pt.partial"
    deadline = time.monotonic() + 60
    while not (partial.exists() and partial.stat().st_size >= 90_000):  # all but what a write buffer holds
        assert child.poll() is None and time.monotonic() < deadline, "the child never got the first bytes"
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert not (sandbox / "model.pt").exists()
    kept = partial.stat().st_size
    assert 90_000 <= kept <= 100_000
    assert pathlib.Path(_cache.download(url)).read_bytes() == data
    assert gets(server, path)[-1]["Range"] == f"bytes={kept}-"  # resumed from what the killed process wrote
    assert not partial.exists()


DOWNLOAD = PRELUDE + r"""
print(_cache.download(args[0]))
"""


@pytest.mark.skipif(sys.platform == "win32", reason="needs SIGSTOP")
def test_a_stopped_download_is_fetched_by_the_waiter_and_the_holder_resumes_harmlessly(server, sandbox):
    """The process holding the lock is stopped mid-transfer (Ctrl-Z, a paused container): a second process says it
    waits, gives up after CLIP_DOWNLOAD_STALL_TIMEOUT seconds without progress, fetches the file itself into a file
    of its own and puts it in place; the first, continued, finishes and leaves that verified file as it is."""
    data = payload()
    url, path = publish(server, data)
    server.add_fault(path, "pause", 100_000, seconds=1.0, times=1)  # the holder's transfer: a third, then the rest
    holder = subprocess.Popen([sys.executable, "-c", DOWNLOAD, MODULE, url], cwd=REPO, env=child_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    partial, target = sandbox / "model.pt.partial", sandbox / "model.pt"
    try:
        deadline = time.monotonic() + 60
        while not (partial.exists() and partial.stat().st_size >= 90_000):
            assert holder.poll() is None and time.monotonic() < deadline, "the holder never got the first bytes"
            time.sleep(0.02)
        holder.send_signal(signal.SIGSTOP)
        stopped_at = partial.stat().st_size
        waiter = subprocess.run([sys.executable, "-c", DOWNLOAD, MODULE, url], cwd=REPO, timeout=120,
                                env=child_env(CLIP_DOWNLOAD_STALL_TIMEOUT="2"), capture_output=True, text=True)
        # The waiter finished while the holder was still stopped: it did not wait for it.
        assert waiter.returncode == 0, waiter.stderr
        assert waiter.stdout.strip() == str(target) and target.read_bytes() == data
        said = waiter.stderr.splitlines()
        waiting = [line for line in said if line.startswith("clip: waiting for ")]
        assert len(waiting) == 1, said
        assert waiting[0].startswith(f"clip: waiting for process {holder.pid}, which is downloading model.pt into "
                                     f"{sandbox} (0.1 MB received so far); if it makes no progress for 2 s")
        assert any(f"process {holder.pid}, which holds {sandbox / 'model.pt.lock'}, has added nothing to "
                   "model.pt.partial for 2 s" in line for line in said), said
        assert partial.stat().st_size == stopped_at  # the holder's file is not touched
        placed = target.stat().st_ino
    finally:
        holder.send_signal(signal.SIGCONT)
    out, err = holder.communicate(timeout=120)
    assert holder.returncode == 0, err
    assert out.strip() == str(target)
    assert target.stat().st_ino == placed and target.read_bytes() == data  # put in place once, by the waiter
    assert _cache.cached_path(url) == str(target)  # its record vouches for it: nothing to hash again
    assert [check.ok for check in _cache.verify_cache()] == [True]
    assert sorted(os.listdir(sandbox)) == ["model.pt", "model.pt.sha256.json"]
    assert len(gets(server, path)) == 2


OWN_PARTIAL = re.compile(r"model\.pt\.[0-9a-f]{12}\.tmp")


def age(path: pathlib.Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_the_next_download_removes_an_abandoned_own_partial_and_nothing_else(server, sandbox):
    """A waiter killed while it fetched into a file of its own leaves that file; the next download of the same
    file removes it (here: one that finds the file in the cache). Whatever else lies there stays."""
    data = payload()
    url, _ = publish(server, data)
    target = pathlib.Path(_cache.download(url))
    abandoned = sandbox / "model.pt.0123456789ab.tmp"
    skewed = sandbox / "model.pt.fedcba987654.tmp"  # dated a day ahead by another host's clock: not young either
    fresh = sandbox / "model.pt.ba9876543210.tmp"  # just made: its waiter may not have locked it yet
    others = [sandbox / name for name in ("model.pt.partial", "other.pt.0123456789ab.tmp",
                                          "model.pt.0123456789ab.tmp.bak", "model.pt.0123456789.tmp",
                                          "model.pt2.0123456789ab.tmp")]
    for path in [abandoned, skewed, fresh] + others:
        path.write_bytes(b"x" * 1000)
        if path != fresh:
            age(path, 2 * _cache.ABANDONED_AFTER)
    age(fresh, _cache.ABANDONED_AFTER / 2)
    age(skewed, -86_400)
    assert _cache.download(url) == str(target)
    assert not abandoned.exists() and not skewed.exists()
    assert fresh.exists() and all(path.exists() for path in others)
    assert target.read_bytes() == data


@pytest.mark.skipif(sys.platform == "win32", reason="needs SIGKILL")
def test_a_waiters_own_partial_is_kept_while_it_lives_and_removed_once_it_is_killed(server, sandbox, monkeypatch):
    data = payload()
    url, path = publish(server, data)
    server.add_fault(path, "pause", 100_000, seconds=60)  # the waiter's transfer: a third, then a stall
    sandbox.mkdir(parents=True, exist_ok=True)
    stalled_holder = _files.Lock(sandbox / "model.pt", stale_after=60)
    assert stalled_holder.acquire(0)  # held, with no progress: the waiter soon fetches into a file of its own
    try:
        waiter = subprocess.Popen([sys.executable, "-c", DOWNLOAD, MODULE, url], cwd=REPO,
                                  env=child_env(CLIP_DOWNLOAD_STALL_TIMEOUT="1"), stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not ((own := [entry for entry in sandbox.iterdir() if OWN_PARTIAL.fullmatch(entry.name)])
                   and own[0].stat().st_size >= 90_000):  # locked before its first byte
            assert waiter.poll() is None and time.monotonic() < deadline, "the waiter never fetched on its own"
            time.sleep(0.02)
        # Seen as old at once: only the flock tells the live from the abandoned.
        _files.remove_abandoned(str(sandbox / "model.pt"), 0.0)
        assert own[0].exists() and waiter.poll() is None  # the waiter lives: its file stays
        waiter.send_signal(signal.SIGKILL)
        waiter.wait(timeout=30)
        assert own[0].exists()
        _files.remove_abandoned(str(sandbox / "model.pt"), 0.0)
        assert not own[0].exists()
    finally:
        stalled_holder.release()
    assert pathlib.Path(_cache.download(url)).read_bytes() == data
    assert sorted(os.listdir(sandbox)) == ["model.pt", "model.pt.sha256.json"]


# Two hosts sharing a cache on a file system whose flock excludes nobody (NFS with host-local locks): each child
# calls itself another host, and flock does nothing in it.
OTHER_HOST = PRELUDE + r"""
import socket
from clip import _files
socket.gethostname = lambda: args[1]
class NoFlock:
    LOCK_EX, LOCK_SH, LOCK_NB = 2, 1, 4
    flock = staticmethod(lambda descriptor, operation: None)
_files.fcntl = NoFlock
print(_cache.download(args[0]))
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX process handling")
def test_two_hosts_whose_flock_excludes_nobody_make_one_download(server, sandbox):
    data = payload()
    url, path = publish(server, data)
    server.add_fault(path, "pause", 100_000, seconds=1.0)  # the first holds the lock while the second arrives
    first = subprocess.Popen([sys.executable, "-c", OTHER_HOST, MODULE, url, "node-a"], cwd=REPO, env=child_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (sandbox / "model.pt.partial").exists():
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.01)
    second = subprocess.run([sys.executable, "-c", OTHER_HOST, MODULE, url, "node-b"], cwd=REPO, env=child_env(),
                            capture_output=True, text=True, timeout=120)
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0 and second.returncode == 0, (err, second.stderr)
    assert out.strip() == second.stdout.strip() == str(sandbox / "model.pt")
    assert f"clip: waiting for process {first.pid} on node-a" in second.stderr
    assert (sandbox / "model.pt").read_bytes() == data and len(gets(server, path)) == 1
    assert sorted(os.listdir(sandbox)) == ["model.pt", "model.pt.sha256.json"]


def test_a_dead_hosts_lock_is_cleared_at_once_and_a_live_ones_waited_for(server, sandbox, monkeypatch, capfd):
    """A marker another host left when it died blocks nobody; a fresh one is waited for, then bypassed."""
    data = payload()
    url, path = publish(server, data)
    sandbox.mkdir()
    marker = sandbox / "model.pt.lock"
    marker.write_text("4242 node-gone\n")
    age(marker, 300)  # untouched for five minutes: past twice the 60 s stall bound
    assert pathlib.Path(_cache.download(url)).read_bytes() == data
    assert "waiting" not in capfd.readouterr().err and not marker.exists()
    os.remove(sandbox / "model.pt")
    marker.write_text("4242 node-busy\n")  # fresh: its holder may be downloading right now
    monkeypatch.setenv("CLIP_DOWNLOAD_STALL_TIMEOUT", "1")
    with pytest.warns(UserWarning, match="process 4242 on node-busy, which holds .* has added nothing"):
        assert pathlib.Path(_cache.download(url)).read_bytes() == data
    assert "clip: waiting for process 4242 on node-busy" in capfd.readouterr().err
    assert marker.exists()  # not this process's to remove


def test_a_thread_waiting_for_another_thread_does_not_name_its_own_process(server, sandbox, capsys):
    data = payload()
    url, path = publish(server, data)
    server.add_fault(path, "pause", 100_000, seconds=1.0)
    results = []
    first = threading.Thread(target=lambda: results.append(_cache.download(url)))
    first.start()
    deadline = time.monotonic() + 60
    while not (sandbox / "model.pt.partial").exists():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    results.append(_cache.download(url))
    first.join()
    assert results == [str(sandbox / "model.pt")] * 2 and len(gets(server, path)) == 1
    said = capsys.readouterr().err
    assert "clip: waiting for another thread of this process, which is downloading model.pt" in said
    assert f"process {os.getpid()}" not in said


def test_a_waiter_says_once_whom_it_waits_for_during_a_healthy_shared_download(server, sandbox):
    data = payload()
    url, path = publish(server, data)
    server.add_fault(path, "drip", 10_000, seconds=0.15, times=1)  # 4.5 s of steady progress
    holder = subprocess.Popen([sys.executable, "-c", DOWNLOAD, MODULE, url], cwd=REPO, env=child_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    partial = sandbox / "model.pt.partial"
    deadline = time.monotonic() + 60
    while not partial.exists():
        assert holder.poll() is None and time.monotonic() < deadline, "the holder never started"
        time.sleep(0.01)
    # A stall bound below the whole transfer, above the gap between two pieces: progress keeps it waiting.
    waiter = subprocess.run([sys.executable, "-c", DOWNLOAD, MODULE, url], cwd=REPO, timeout=120,
                            env=child_env(CLIP_DOWNLOAD_STALL_TIMEOUT="2"), capture_output=True, text=True)
    holder.communicate(timeout=120)
    assert holder.returncode == 0 and waiter.returncode == 0, waiter.stderr
    assert waiter.stderr.count(f"clip: waiting for process {holder.pid}, which is downloading model.pt") == 1
    assert "has added nothing" not in waiter.stderr
    assert len(gets(server, path)) == 1 and (sandbox / "model.pt").read_bytes() == data


READ_ONLY = PRELUDE + r"""
warnings.simplefilter(args[1])
try:
    print(_cache.download(args[0]))
except _cache.DownloadError as error:
    print("DownloadError:", error)
"""
# What lets root write anyway: CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH and CAP_FOWNER.
ROOT_WITHOUT_OVERRIDES = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner", "--"]


def run_without_write_access(folder, url: str, warning_action: str = "error") -> subprocess.CompletedProcess:
    """Download in a process for which ``folder`` is read-only (as root: one without the override capabilities)."""
    if sys.platform == "win32":
        pytest.skip("POSIX permissions")
    prefix = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("as root, needs setpriv to give up the capabilities that ignore permissions")
        prefix = ROOT_WITHOUT_OVERRIDES
    os.chmod(folder, 0o555)
    try:
        done = subprocess.run(prefix + [sys.executable, "-c", READ_ONLY, MODULE, url, warning_action], cwd=REPO,
                              env=child_env(CLIP_CACHE_DIR=str(folder)), capture_output=True, text=True, timeout=120)
    finally:
        os.chmod(folder, 0o755)
    assert done.returncode == 0, done.stderr
    return done


@pytest.fixture
def shared_folder(tmp_path):
    folder = tmp_path / "shared"
    folder.mkdir()
    return str(folder)


def test_read_only_cache_with_verified_file_loads_without_writing(server, shared_folder, monkeypatch):
    data = payload()
    url, _ = publish(server, data)
    monkeypatch.setenv("CLIP_CACHE_DIR", shared_folder)
    target = _cache.download(url)  # the cache's owner fills it
    before = listing(shared_folder)
    assert run_without_write_access(shared_folder, url).stdout.strip() == target  # warnings would be errors
    assert listing(shared_folder) == before  # no lock, no record, nothing
    assert len(server.requests) == 1


def test_read_only_cache_without_record_is_hashed_and_used(server, shared_folder):
    data = payload()
    url, _ = publish(server, data)
    with open(os.path.join(shared_folder, "model.pt"), "wb") as file:
        file.write(data)
    os.chmod(os.path.join(shared_folder, "model.pt"), 0o644)
    before = listing(shared_folder)
    done = run_without_write_access(shared_folder, url, "always")
    assert done.stdout.strip() == os.path.join(shared_folder, "model.pt")
    assert "hashed again on every load" in done.stderr  # the cost is said, once per load
    assert listing(shared_folder) == before
    assert server.requests == []


@pytest.mark.parametrize("present", [b"", b"garbage"])
def test_read_only_cache_without_a_good_file_says_so(server, shared_folder, present):
    url, _ = publish(server, payload())
    if present:
        pathlib.Path(shared_folder, "model.pt").write_bytes(present)
    before = listing(shared_folder)
    out = run_without_write_access(shared_folder, url).stdout
    assert out.startswith("DownloadError:") and "cannot be written" in out and shared_folder in out
    assert "download_root" in out and "CLIP_CACHE_DIR" in out
    assert ("is not in the cache" in out) if not present else (sha(present) in out)
    assert listing(shared_folder) == before and server.requests == []


UNSEARCHABLE = PRELUDE + r"""
package.__version__ = "0"  # the real package's __init__ (and its torch import) is skipped here
from clip import _cli
for call in (lambda: _cache.cached_path(args[0]), _cache.verify_cache):
    try:
        print("returned", call())
    except _cache.DownloadError as error:
        print("DownloadError:", error)
print("models exit", _cli.main(["models"]))
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions")
def test_a_cache_folder_without_search_permission_says_so(server, shared_folder, monkeypatch):
    """Readable but not searchable (mode r--): neither "not cached" nor "delete the record" (which cannot be done)."""
    url, _ = publish(server, payload())
    monkeypatch.setenv("CLIP_CACHE_DIR", shared_folder)
    _cache.download(url)
    prefix = ROOT_WITHOUT_OVERRIDES if os.geteuid() == 0 else []
    if prefix and shutil.which("setpriv") is None:
        pytest.skip("as root, needs setpriv to give up the capabilities that ignore permissions")
    os.chmod(shared_folder, 0o644)
    try:
        done = subprocess.run(prefix + [sys.executable, "-c", UNSEARCHABLE, MODULE, url], cwd=REPO, timeout=120,
                              env=child_env(CLIP_CACHE_DIR=shared_folder), capture_output=True, text=True)
    finally:
        os.chmod(shared_folder, 0o755)
    said = done.stdout + done.stderr
    assert done.returncode == 0 and said.count("Permission denied; give this user search permission on the folder "
                                               f"(chmod u+x {shared_folder})") == 3, said
    assert "not cached" not in said and "delete" not in said and "models exit 1" in said, said


# ---------------------------------------------------------------------------------------------------------------
# Proxies and certificates from the environment


def test_http_proxy_from_environment(monkeypatch):
    data = payload()
    with LocalServer() as proxy:
        path = f"/clip/models/{sha(data)}/model.pt"
        proxy.files[path] = data
        monkeypatch.setenv("http_proxy", proxy.url(""))
        url = f"http://clip-release.invalid{path}"  # a name that never resolves: only the proxy can answer
        assert pathlib.Path(_cache.download(url)).read_bytes() == data
        assert [requested for _, requested, _ in proxy.requests] == [url]


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1, made with the openssl command."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True, timeout=60)
    return cert, key


@pytest.mark.parametrize("variable", ["SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"])
def test_custom_ca_bundle_from_environment(certificate, monkeypatch, tmp_path, variable):
    cert, key = certificate
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    data = payload()
    with LocalServer(tls=context) as secure:
        url, path = publish(secure, data)
        with pytest.raises(DownloadError, match="SSL_CERT_FILE or REQUESTS_CA_BUNDLE"):
            _cache.download(url, tmp_path / "untrusted")
        monkeypatch.setenv(variable, str(cert))
        assert pathlib.Path(_cache.download(url, tmp_path / "trusted")).read_bytes() == data
        assert len(gets(secure, path)) == 1  # the untrusted attempt never got past the handshake


def test_unusable_ca_bundle_is_named(server, monkeypatch, tmp_path):
    url, _ = publish(server, payload())
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tmp_path / "missing.pem"))
    with pytest.raises(DownloadError, match="REQUESTS_CA_BUNDLE=.*missing.pem"):
        _cache.download(url)


def test_no_warnings_on_the_happy_path(server):
    url, _ = publish(server, payload())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _cache.download(url)
        _cache.download(url)


# ---------------------------------------------------------------------------------------------------------------
# Hostile caches and servers: links and special files, wrong files kept, size and time bounds, settings


@pytest.fixture
def bounded():
    """Fail (rather than hang) a test that runs past 30 s: a followed pipe or a stuck read would block for ever."""
    if not hasattr(signal, "setitimer"):
        yield
        return

    def too_long(signum, frame):
        raise TimeoutError("the test ran past its 30 s bound")

    previous = signal.signal(signal.SIGALRM, too_long)
    signal.setitimer(signal.ITIMER_REAL, 30)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


VICTIM = b"another user's file"


def plant(kind: str, path: pathlib.Path, victim: pathlib.Path) -> None:
    """Put something that is not a plain file of the cache at ``path``.

    A dangling link leads to ``<victim's folder>/nowhere``, a link to a folder to ``<victim's folder>/folder``:
    neither may exist or hold anything afterwards.
    """
    if kind == "symlink":
        os.symlink(victim, path)
    elif kind == "hardlink":
        os.link(victim, path)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "dangling":
        os.symlink(victim.parent / "nowhere", path)
    elif kind == "folder link":
        (victim.parent / "folder").mkdir()
        os.symlink(victim.parent / "folder", path)
    else:  # a link to itself: every stat() of it fails with ELOOP
        os.symlink(path.name, path)


def test_a_folder_at_the_file_s_path_fails_before_any_request(server, sandbox):
    """No file can replace a folder: the original's RuntimeError at once, and nothing fetched."""
    url, _ = publish(server, payload())
    (sandbox / "model.pt").mkdir(parents=True)
    with pytest.raises(DownloadError, match="model.pt is a folder"):
        _cache.download(url)
    assert server.requests == [] and (sandbox / "model.pt").is_dir()


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX links and pipes")
@pytest.mark.parametrize("kind", ["symlink", "hardlink", "fifo", "loop", "dangling", "folder link"])
@pytest.mark.parametrize("name", ["model.pt.partial", "model.pt.lock", "model.pt.sha256.json", "model.pt"])
def test_links_and_special_files_are_never_followed_nor_reused(server, sandbox, tmp_path, bounded, name, kind):
    data = payload()
    url, path = publish(server, data)
    victim = tmp_path / "victim"
    victim.write_bytes(VICTIM)
    sandbox.mkdir()
    plant(kind, sandbox / name, victim)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # replacing a planted partial or lock file says so
        target = _cache.download(url)
    assert victim.read_bytes() == VICTIM and victim.stat().st_nlink == 1  # nothing written through, nothing kept
    assert pathlib.Path(target).read_bytes() == data
    for entry in os.scandir(sandbox):  # the final file, its record and the lock: plain files of their own
        assert entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_nlink == 1, entry.name
    assert sorted(os.listdir(sandbox)) == ["model.pt", "model.pt.sha256.json"]
    assert _cache.cached_path(url) == target
    assert len(gets(server, path)) == 1
    assert not os.path.lexists(tmp_path / "nowhere")  # a dangling link was not written through
    assert kind != "folder link" or os.listdir(tmp_path / "folder") == []


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX links")
@pytest.mark.parametrize("name", ["model.pt.partial", "model.pt.lock"])
def test_a_link_to_the_right_bytes_is_still_replaced_at_the_partial_and_lock_names(server, sandbox, tmp_path, name):
    data = payload()
    url, path = publish(server, data)
    shared = tmp_path / "shared.pt"
    shared.write_bytes(data)  # a complete, correct copy: followed, a partial would be "resumed" into a 416
    before = os.stat(shared)
    sandbox.mkdir()
    os.symlink(shared, sandbox / name)
    with pytest.warns(UserWarning, match="a symbolic link, not a file of the cache: removed"):
        target = _cache.download(url)
    assert pathlib.Path(target).read_bytes() == data
    assert "Range" not in gets(server, path)[0] and len(gets(server, path)) == 1  # fetched whole, nothing reused
    assert not os.path.lexists(sandbox / name)  # both exist only while a download runs: the link is gone
    assert shared.read_bytes() == data and os.stat(shared).st_mtime_ns == before.st_mtime_ns


# In a shared cache folder with the sticky bit (mode 1777, like /tmp), another user can plant entries that the
# downloading user may neither follow nor remove. The download runs as an unprivileged process (as root: one
# without the capabilities that ignore permissions and the sticky bit); it must never write through what it finds,
# and must either succeed or stop with an error that names the entry and what to do.
OTHER_USER = 65534  # "nobody": owns the shared folder and everything planted in it


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX links, pipes and users")
@pytest.mark.parametrize("kind", ["symlink", "fifo", "dangling"])
@pytest.mark.parametrize("name", ["model.pt.partial", "model.pt.lock", "model.pt.sha256.json", "model.pt"])
def test_entries_another_user_planted_in_a_shared_folder(server, tmp_path, name, kind):
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("planting entries as another user needs root, and dropping root's overrides needs setpriv")
    data = payload()
    url, path = publish(server, data)
    victim = tmp_path / "victim"  # the downloading user's own file: writing through the link would succeed
    victim.write_bytes(VICTIM)
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chown(shared, OTHER_USER, OTHER_USER)
    os.chmod(shared, 0o1777)
    planted = shared / name
    plant(kind, planted, victim)
    os.lchown(planted, OTHER_USER, OTHER_USER)
    done = subprocess.run(ROOT_WITHOUT_OVERRIDES + [sys.executable, "-c", READ_ONLY, MODULE, url, "always"],
                          cwd=REPO, env=child_env(CLIP_CACHE_DIR=str(shared)), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert victim.read_bytes() == VICTIM and not os.path.lexists(tmp_path / "nowhere")
    assert os.lstat(planted).st_uid == OTHER_USER  # still there: it could not be removed
    if name.endswith(".sha256.json"):  # only the record could not be written: the file is used, and hashed
        assert done.stdout.strip() == str(shared / "model.pt") and (shared / "model.pt").read_bytes() == data
        assert "no record of that can be written" in done.stderr
        assert sorted(os.listdir(shared)) == ["model.pt", name]
        return
    out = done.stdout
    assert out.startswith("DownloadError:") and str(planted) in out, out
    assert ("cannot be removed" in out) if name != "model.pt" else ("cannot be removed or replaced" in out), out
    assert "CLIP_CACHE_DIR" in out and "free some space" not in out, out
    assert not os.path.lexists(shared / "model.pt") or name == "model.pt"
    left = {entry for entry in os.listdir(shared) if entry not in (name, "model.pt.lock")}
    assert left == set(), left  # no partial or temporary file of ours is left behind
    assert len(gets(server, path)) == (1 if name == "model.pt" else 0)  # stopped before the download if it can


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX links")
def test_a_record_behind_a_link_vouches_for_nothing(server, sandbox, tmp_path):
    data = payload()
    url, path = publish(server, data)
    sandbox.mkdir()
    target = sandbox / "model.pt"
    target.write_bytes(b"not the model")
    status = target.stat()
    forged = tmp_path / "forged.json"
    forged.write_text(json.dumps({"file": "model.pt", "sha256": sha(data), "size": status.st_size,
                                  "mtime_ns": status.st_mtime_ns}))
    before = forged.read_bytes()
    os.symlink(forged, str(target) + ".sha256.json")
    assert _cache.cached_path(url) is None
    with pytest.warns(UserWarning, match="does not match"):
        assert pathlib.Path(_cache.download(url)).read_bytes() == data
    assert forged.read_bytes() == before and not os.path.islink(str(target) + ".sha256.json")
    assert len(gets(server, path)) == 1


# A link at the final name that leads to a plain file (`ln -s /shared/models/ViT-B-32.pt ~/.cache/clip/`) is used
# once its bytes verify; one that does not verify is replaced itself, and what it leads to is never written.


def shared_copy(tmp_path, data: bytes, name: str = "model.pt") -> pathlib.Path:
    """A copy in a folder outside the cache, as on a cluster's shared file system."""
    folder = tmp_path / "shared models"
    folder.mkdir(exist_ok=True)
    (folder / name).write_bytes(data)
    return folder / name


def snapshot(path: pathlib.Path) -> tuple:
    """A file's bytes and everything a write, a move or a new name would change."""
    status = os.stat(path)
    return path.read_bytes(), status.st_ino, status.st_nlink, status.st_size, status.st_mtime_ns, status.st_mode


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX links")
@pytest.mark.parametrize("offline", [False, True])
def test_a_link_to_a_verified_shared_copy_is_hashed_once_then_trusted(server, sandbox, tmp_path, monkeypatch,
                                                                      hashed, offline):
    data = payload()
    url, _ = publish(server, data)
    shared = shared_copy(tmp_path, data)
    before = snapshot(shared)
    sandbox.mkdir()
    link = sandbox / "model.pt"
    os.symlink(shared, link)
    if offline:
        monkeypatch.setenv("CLIP_OFFLINE", "1")
    assert _cache.cached_path(url) is None  # no record yet: cached_path never hashes
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _cache.download(url) == str(link)
        assert _cache.download(url) == str(link)
    assert hashed == [os.path.realpath(shared)]  # hashed when first seen, then trusted through the record
    assert server.requests == []
    assert os.readlink(link) == str(shared) and snapshot(shared) == before  # the link and its file as they were
    assert os.listdir(shared.parent) == ["model.pt"]
    record = json.loads((sandbox / "model.pt.sha256.json").read_text())
    assert record == {"file": "model.pt", "sha256": sha(data), "size": SIZE, "mtime_ns": before[4],
                      "link_to": os.path.realpath(shared)}
    assert _cache.cached_path(url) == str(link)
    assert [(check.path, check.ok) for check in _cache.verify_cache()] == [(str(link), True)]  # re-hashes
    assert len(hashed) == 2


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX links")
def test_a_re_pointed_link_is_hashed_again_even_to_a_file_of_the_same_size_and_time(server, sandbox, tmp_path,
                                                                                   hashed):
    data, wrong = payload(1), payload(2)  # the same size
    url, path = publish(server, data)
    first = shared_copy(tmp_path, data, "first.pt")
    second = shared_copy(tmp_path, data, "second.pt")
    bad = shared_copy(tmp_path, wrong, "bad.pt")
    times = (first.stat().st_atime_ns, first.stat().st_mtime_ns)
    for copy in (second, bad):
        os.utime(copy, ns=times)  # as `cp -p` or rsync leave them: only where the link leads tells them apart
    sandbox.mkdir()
    link = sandbox / "model.pt"

    def point(to):
        os.symlink(to, str(link) + ".new")
        os.replace(str(link) + ".new", link)

    point(first)
    assert _cache.download(url) == str(link)
    point(second)
    assert _cache.cached_path(url) is None  # the record was about the first copy
    assert _cache.download(url) == str(link) and os.path.islink(link)
    assert hashed == [os.path.realpath(first), os.path.realpath(second)] and server.requests == []
    point(bad)
    with pytest.warns(UserWarning, match=f"symbolic link to {re.escape(os.path.realpath(bad))}.* does not match"):
        assert _cache.download(url) == str(link)
    assert not os.path.islink(link) and link.read_bytes() == data
    assert bad.read_bytes() == wrong and len(gets(server, path)) == 1
    assert _cache.cached_path(url) == str(link)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX links")
def test_a_link_whose_file_changes_is_hashed_again_and_replaced(server, sandbox, tmp_path, hashed):
    data = payload()
    url, path = publish(server, data)
    shared = shared_copy(tmp_path, data)
    sandbox.mkdir()
    link = sandbox / "model.pt"
    os.symlink(shared, link)
    assert _cache.download(url) == str(link)
    with open(shared, "r+b") as file:  # someone changes the shared copy in place
        file.seek(1000)
        file.write(b"changed")
    os.utime(shared, ns=(10**18, 10**18))  # a modification shows in the mtime, even on a coarse-clock system
    changed = snapshot(shared)
    assert _cache.cached_path(url) is None
    with pytest.warns(UserWarning, match=f"does not match its expected SHA-256 \\(expected {sha(data)}, got "
                                         f"{sha(changed[0])}\\).*{re.escape(str(os.path.realpath(shared)))} is "
                                         "never written"):
        assert _cache.download(url) == str(link)
    assert hashed == [os.path.realpath(shared)] * 2
    assert not os.path.islink(link) and link.read_bytes() == data and len(gets(server, path)) == 1
    assert snapshot(shared) == changed
    assert "link_to" not in json.loads((sandbox / "model.pt.sha256.json").read_text())  # a plain file's record


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX links")
@pytest.mark.parametrize("first_try", ["offline", "failing server"])
def test_a_link_to_wrong_bytes_is_kept_until_replaced_and_its_file_never_written(server, sandbox, tmp_path,
                                                                                 monkeypatch, first_try):
    data = payload()
    url, path = publish(server, data)
    shared = shared_copy(tmp_path, b"another version of the model")
    before = snapshot(shared)
    sandbox.mkdir()
    link = sandbox / "model.pt"
    os.symlink(shared, link)
    named = f"{link} (a symbolic link to {os.path.realpath(shared)})"
    with pytest.raises(DownloadError) as caught:
        if first_try == "offline":
            monkeypatch.setenv("CLIP_OFFLINE", "1")
            _cache.download(url)
        else:
            server.add_fault(path, "status", 404)
            with pytest.warns(UserWarning, match="kept until a verified copy replaces it"):
                _cache.download(url)
    message = str(caught.value)
    assert f"(a symbolic link to {os.path.realpath(shared)}) does not match" in message and str(link) in message
    assert sha(before[0]) in message and sha(data) in message
    assert os.readlink(link) == str(shared) and snapshot(shared) == before  # kept: the link and its file
    monkeypatch.delenv("CLIP_OFFLINE", raising=False)
    with pytest.warns(UserWarning, match=re.escape(named) + ".* does not match"):
        assert _cache.download(url) == str(link)
    assert not os.path.islink(link) and link.read_bytes() == data  # the link itself replaced
    assert snapshot(shared) == before and os.listdir(shared.parent) == ["model.pt"]  # byte for byte untouched
    assert _cache.cached_path(url) == str(link)


def test_a_wrong_file_is_kept_until_a_verified_one_replaces_it(server, sandbox):
    data = payload()
    url, path = publish(server, data)
    sandbox.mkdir()
    mine = sandbox / "model.pt"
    mine.write_bytes(b"my own file")
    server.add_fault(path, "status", 404)
    with pytest.warns(UserWarning, match="kept until a verified copy replaces it"):
        with pytest.raises(DownloadError) as caught:
            _cache.download(url)
    message = str(caught.value)
    assert f"The file that was at {mine} before is left as it was" in message and sha(b"my own file") in message
    assert mine.read_bytes() == b"my own file"
    with pytest.warns(UserWarning, match="does not match"):
        assert pathlib.Path(_cache.download(url)).read_bytes() == data  # replaced only now, by a verified copy


@pytest.mark.parametrize("kind", ["wrong bytes", "loop", "dangling"])
def test_offline_keeps_what_is_there_and_says_where(server, sandbox, monkeypatch, kind):
    url, _ = publish(server, payload())
    sandbox.mkdir()
    mine = sandbox / "model.pt"
    if kind != "wrong bytes" and sys.platform == "win32":
        pytest.skip("POSIX links")
    if kind == "loop":
        os.symlink(mine.name, mine)
    elif kind == "dangling":
        os.symlink(sandbox / "nowhere.pt", mine)
    else:
        mine.write_bytes(b"my own file")
    monkeypatch.setenv("CLIP_OFFLINE", "1")
    with pytest.raises(DownloadError) as caught:
        _cache.download(url)
    message = str(caught.value)
    assert str(mine) in message and "(the file there now is left as it is)" in message
    assert ("symbolic link, not a plain file" in message) if kind != "wrong bytes" else (sha(b"my own file") in message)
    assert os.path.islink(mine) if kind != "wrong bytes" else mine.read_bytes() == b"my own file"
    assert server.requests == []
    assert kind != "loop" or "a loop of links" in message
    assert kind != "dangling" or (f"{sandbox / 'nowhere.pt'}, which does not exist" in message
                                  and not os.path.lexists(sandbox / "nowhere.pt"))


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX links")
def test_a_loop_of_links_in_the_cache_path_is_a_clear_error(server, tmp_path, monkeypatch, bounded):
    import clip.clip

    url, _ = publish(server, payload())
    loop = tmp_path / "loop"
    os.symlink(loop.name, loop)  # the cache folder is a link to itself
    monkeypatch.setenv("CLIP_CACHE_DIR", str(loop))
    for call in (_cache.download, _cache.cached_path, clip.clip._download):
        with pytest.raises(DownloadError, match=f"cannot look at {re.escape(str(loop))}.*CLIP_CACHE_DIR"):
            call(url)
    with pytest.raises(DownloadError, match=f"cannot list the cache folder {re.escape(str(loop))}"):
        _cache.verify_cache()
    assert server.requests == []


@pytest.mark.parametrize("with_length", [True, False])
def test_a_body_past_the_release_size_bound_is_cut_off(server, sandbox, monkeypatch, bounded, with_length):
    monkeypatch.setitem(_registry.APPROXIMATE_SIZES, "model.pt", 100_000)  # bound: 110,000 bytes
    path = f"/clip/models/{'0' * 64}/model.pt"
    server.files[path] = payload(size=3_000_000)
    server.content_length = with_length
    with pytest.raises(DownloadError, match="more than 110000 bytes, more than model.pt can have"):
        _cache.download(server.url(path))
    assert os.listdir(sandbox) == []  # nothing past the bound kept to resume
    assert len(gets(server, path)) == 1  # a bound is not retried


@pytest.mark.parametrize("with_length", [True, False])
def test_a_release_a_little_over_its_published_size_still_downloads(server, monkeypatch, with_length):
    monkeypatch.setitem(_registry.APPROXIMATE_SIZES, "model.pt", 100_000)
    data = payload(size=109_000)  # published sizes are rounded: a true file may be a few percent larger
    url, _ = publish(server, data)
    server.content_length = with_length
    assert pathlib.Path(_cache.download(url)).read_bytes() == data


def test_every_release_has_a_size_bound_above_its_published_size():
    for name, url in _registry.MODELS.items():
        file = _registry.file_name(url)
        assert _cache._size_bound(file) >= _registry.APPROXIMATE_SIZES[file] * 1.05, name
    assert _cache._size_bound("custom.pt") is None  # unknown size: the hash alone decides


def test_a_dripping_server_hits_the_rate_deadline(server, sandbox, monkeypatch, bounded):
    monkeypatch.setattr(_http, "RATE_GRACE", 0.5)
    monkeypatch.setenv("CLIP_DOWNLOAD_MIN_RATE", "1000")
    url, path = publish(server, payload())
    server.add_fault(path, "drip", 1, seconds=0.01, times=None)  # about 100 bytes a second, never a read timeout
    started = time.monotonic()
    with pytest.raises(DownloadError, match="too slow: .* under the 1000 bytes a second that CLIP_DOWNLOAD_MIN_RATE"):
        _cache.download(url)
    assert time.monotonic() - started < 5
    assert len(gets(server, path)) == 1


def test_a_slow_steady_link_finishes(server, monkeypatch, bounded):
    monkeypatch.setattr(_http, "RATE_GRACE", 0.2)
    monkeypatch.setenv("CLIP_DOWNLOAD_MIN_RATE", "10000")
    data = payload(size=20_000)
    url, path = publish(server, data)
    server.add_fault(path, "drip", 2000, seconds=0.05)  # 40 kB/s for half a second
    assert pathlib.Path(_cache.download(url)).read_bytes() == data
    assert len(gets(server, path)) == 1


@pytest.mark.parametrize("variable, value", [
    ("CLIP_DOWNLOAD_TIMEOUT", "inf"), ("CLIP_DOWNLOAD_TIMEOUT", "nan"), ("CLIP_DOWNLOAD_TIMEOUT", "0"),
    ("CLIP_DOWNLOAD_TIMEOUT", "1e300"), ("CLIP_DOWNLOAD_BACKOFF", "nan"), ("CLIP_DOWNLOAD_BACKOFF", "-1"),
    ("CLIP_DOWNLOAD_BACKOFF", "inf"), ("CLIP_DOWNLOAD_RETRIES", "2.5"), ("CLIP_DOWNLOAD_RETRIES", "-1"),
    ("CLIP_DOWNLOAD_MIN_RATE", "nan"), ("CLIP_DOWNLOAD_MIN_RATE", "-5"), ("CLIP_DOWNLOAD_STALL_TIMEOUT", "0"),
    ("CLIP_DOWNLOAD_STALL_TIMEOUT", "soon"), ("CLIP_DOWNLOAD_BASE", "ftp://m/clip"),
    ("CLIP_DOWNLOAD_BASE", "/srv/clip"), ("CLIP_OFFLINE", "maybe"), ("HF_HUB_OFFLINE", "2"),
])
def test_every_setting_is_checked_when_read(server, monkeypatch, variable, value):
    url, _ = publish(server, payload())
    monkeypatch.setenv(variable, value)
    with pytest.raises(DownloadError, match=re.escape(f"{variable}={value!r}")):
        _cache.download(url)
    assert server.requests == []


def test_offline_switch_values(monkeypatch):
    monkeypatch.setenv("CLIP_OFFLINE", "no")
    assert _http.offline_variable() is None
    monkeypatch.setenv("CLIP_OFFLINE", "maybe")
    with pytest.raises(_http.SettingError, match="CLIP_OFFLINE='maybe'"):
        _http.offline_variable()


def test_default_cache_is_the_originals_whatever_xdg_says(server, monkeypatch, tmp_path):
    monkeypatch.delenv("CLIP_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    data = payload()
    url, _ = publish(server, data)
    original = tmp_path / "home" / ".cache" / "clip"
    original.mkdir(parents=True)
    (original / "model.pt").write_bytes(data)  # as the original package left it: no record
    assert _cache.download(url) == str(original / "model.pt")
    assert server.requests == [] and not (tmp_path / "xdg").exists()


def test_paths_work_wherever_strings_do(server, monkeypatch, tmp_path):
    import clip.clip

    data = payload()
    url, _ = publish(server, data, "ViT-T-1.pt")
    root = tmp_path / "as a path"
    expected = str(root / "ViT-T-1.pt")
    assert _cache.download(url, root) == expected
    assert _cache.cached_path(url, root) == expected
    assert [(check.path, check.ok) for check in _cache.verify_cache(root)] == [(expected, True)]
    assert clip.clip._download(url, root) == expected
    assert [check.ok for check in clip.clip.verify_cache(root)] == [True]
    monkeypatch.setitem(clip.clip._MODELS, "ViT-T/1", url)
    assert clip.clip._checkpoint_path("ViT-T/1", root) == expected
    assert len(server.requests) == 1


def test_the_layers_import_one_way_and_without_torch():
    """_http knows nothing of the cache; _cache needs only _files, _http, _registry and _errors; none imports torch."""
    code = ("import sys, types; package = types.ModuleType('clip'); package.__path__ = [sys.argv[1]]; "
            "sys.modules['clip'] = package; import importlib; importlib.import_module(sys.argv[2]); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('clip', 'torch')))")
    for module, loaded in (("clip._http", ["clip", "clip._http", "clip._registry"]),
                           ("clip._cache", ["clip", "clip._cache", "clip._errors", "clip._files", "clip._http",
                                            "clip._registry"])):
        done = subprocess.run([sys.executable, "-c", code, str(REPO / "clip"), module], capture_output=True,
                              text=True, timeout=60, check=True)
        assert done.stdout.strip() == str(loaded)
