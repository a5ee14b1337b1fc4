"""Record the original ``clip`` package's behaviour table: ``tests/data/original-behaviour.json``.

Run it with the Python of a virtual environment that holds the original (``clip-anytorch`` 2.6.0 is the
original's code; it imports ``pkg_resources``, so it needs ``setuptools<81``) and torch, torchvision, ftfy, regex
and tqdm, for example::

    python3 -m venv /tmp/venv-orig
    /tmp/venv-orig/bin/pip install clip-anytorch==2.6.0 'setuptools<81'
    /tmp/venv-orig/bin/python tests/data/record_original.py

The cases and the runner are ``tests/original_cases.py`` (shared with the replay test); this script only checks
that the ``clip`` it imports is not this repository's, plays every case on it in a temporary folder, and writes the
table. No case reaches any address but 127.0.0.1.
"""
import json
import pathlib
import platform
import sys
import tempfile

TESTS = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))

import clip  # noqa: E402
import torch  # noqa: E402

import original_cases  # noqa: E402


def main() -> None:
    if getattr(clip, "_DISTRIBUTION", None) is not None or TESTS.parent in pathlib.Path(clip.__file__).parents:
        sys.exit(f"{clip.__file__} is this repository's clip; run this with the original's virtual environment")
    with tempfile.TemporaryDirectory() as folder:
        table = original_cases.record(pathlib.Path(folder))
    from importlib import metadata

    table = {
        "original": f"clip-anytorch {metadata.version('clip-anytorch')}",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda_available": torch.cuda.is_available(),
        **table,
    }
    text = json.dumps(table, indent=1, ensure_ascii=False) + "\n"
    original_cases.TABLE.write_text(text, encoding="utf-8")
    print(f"{len(table['names'])} names and {len(table['cases'])} cases written to {original_cases.TABLE}")


if __name__ == "__main__":
    main()
