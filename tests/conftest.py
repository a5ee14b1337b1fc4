"""Shared fixtures, and a private, throw-away environment for every test run.

The suite reads only the repository: its test data is under ``tests/data`` (see the README there) and the tokenizer
vocabulary ships inside the package. Each run gets one temporary folder that holds the clip cache, a home folder
and the temporary files of the run (pytest's ``tmp_path`` included); it is removed when the run ends, so nothing is
written to the user's cache, home folder or temporary directory.
"""
import atexit
import os
import pathlib
import shutil
import tempfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
VOCAB = REPO / "clip" / "bpe_simple_vocab_16e6.txt.gz"

_run_folder = None


def _base_folder() -> str:
    """Where the run's folder goes: the temporary directory, or /tmp where that is too long for sockets.

    A Unix socket's path holds at most 107 bytes, and Python's multiprocessing (which DataLoader workers use to
    pass tensors) makes its sockets two folders down in the run's temporary folder; under a long TMPDIR, their
    paths would not fit.
    """
    base = tempfile.gettempdir()
    deepest = os.path.join(base, "clip-tests-12345678", "tmp", "pymp-12345678", "listener-12345678")
    return "/tmp" if len(deepest) > 107 and os.path.isdir("/tmp") else base


def pytest_configure(config):
    """Point the cache, home, config and temporary folders of this run (and its subprocesses) at a fresh folder."""
    global _run_folder
    if _run_folder is not None or hasattr(config, "workerinput"):
        return
    _run_folder = tempfile.mkdtemp(prefix="clip-tests-", dir=_base_folder())
    folders = {
        "CLIP_CACHE_DIR": "cache",
        "HOME": "home",  # anything that writes under ~ (jupyter, matplotlib, torch.hub) writes here
        "XDG_CACHE_HOME": "home/.cache",
        "XDG_CONFIG_HOME": "home/.config",
        "XDG_DATA_HOME": "home/.local/share",
        "TMPDIR": "tmp",
    }
    for variable, relative in folders.items():
        path = os.path.join(_run_folder, relative)
        os.makedirs(path, exist_ok=True)
        os.environ[variable] = path
    for variable in [name for name in os.environ if name.startswith("CLIP_")]:
        if variable != "CLIP_CACHE_DIR":
            del os.environ[variable]  # a developer's CLIP_OFFLINE or CLIP_BPE_PATH must not change what tests see
    tempfile.tempdir = os.environ["TMPDIR"]  # pytest's tmp_path and every mkdtemp of the run go here too
    # Removed at exit rather than in pytest_unconfigure: multiprocessing removes its own temporary folder (pymp-*,
    # made in the run's TMPDIR by a forkserver, the default start method from Python 3.14) in its atexit handler,
    # and fails with a traceback if the folder is already gone. That handler is registered when multiprocessing.util
    # is first imported, by torch during the tests, after this; atexit runs the last registered first.
    atexit.register(shutil.rmtree, _run_folder, ignore_errors=True)


@pytest.fixture
def local_network(monkeypatch):
    """Downloads on: no offline switch, no mirror, no proxy and no custom CA between us and a server on 127.0.0.1.

    (The environment running the tests may set ``HF_HUB_OFFLINE``, a proxy or a CA bundle.)
    """
    for name in ("CLIP_OFFLINE", "HF_HUB_OFFLINE", "CLIP_DOWNLOAD_BASE", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE",
                 "CURL_CA_BUNDLE", "ALL_PROXY", "all_proxy", "HTTP_PROXY", "http_proxy", "HTTPS_PROXY",
                 "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
    return DATA


@pytest.fixture(scope="session")
def vocab_path() -> pathlib.Path:
    return VOCAB
