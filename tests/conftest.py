"""Shared fixtures: the golden data folder and a tokenizer-vocabulary cache seeded from ``../shared``.

The golden files live in ``../shared/golden`` beside the repository, or where ``CLIP_GOLDEN_DIR`` points. Under CI
(``CI`` set) they must be present: a missing folder fails the run instead of skipping tests.
"""
import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("CLIP_SHARED_DIR", REPO.parent / "shared"))
GOLDEN = pathlib.Path(os.environ.get("CLIP_GOLDEN_DIR", SHARED / "golden"))
VOCAB = SHARED / "bpe_simple_vocab_16e6.txt.gz"


def _require(path: pathlib.Path, what: str) -> pathlib.Path:
    if path.exists():
        return path
    if os.environ.get("CI"):
        pytest.fail(f"{what} is missing at {path}; CI must run with ../shared present", pytrace=False)
    pytest.skip(f"{what} not found at {path}")


@pytest.fixture
def local_network(monkeypatch):
    """Downloads on: no offline switch, no mirror, no proxy between us and the server on 127.0.0.1.

    (The environment running the tests may set ``HF_HUB_OFFLINE`` or a proxy.)
    """
    for name in ("CLIP_OFFLINE", "HF_HUB_OFFLINE", "CLIP_DOWNLOAD_BASE", "ALL_PROXY", "all_proxy", "HTTP_PROXY",
                 "http_proxy", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")


@pytest.fixture(scope="session")
def golden_dir() -> pathlib.Path:
    return _require(GOLDEN, "the golden data folder")


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
    return _require(SHARED, "the shared data folder")


@pytest.fixture(scope="session")
def vocab_path() -> pathlib.Path:
    return _require(VOCAB, "the tokenizer vocabulary")


def pytest_configure(config):
    """Give the whole run its own cache folder, seeded with the vocabulary, unless the caller set one.

    Tests must never read or write the user's real cache. ``.ci/run`` sets ``CLIP_CACHE_DIR`` to a folder it has
    seeded; a plain local ``pytest`` gets a temporary one here.
    """
    if os.environ.get("CLIP_CACHE_DIR"):
        return
    import shutil
    import tempfile

    cache = tempfile.mkdtemp(prefix="clip-test-cache-")
    if VOCAB.exists():
        shutil.copy(VOCAB, os.path.join(cache, VOCAB.name))
    os.environ["CLIP_CACHE_DIR"] = cache
