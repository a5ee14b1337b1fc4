"""Write ``preprocess.json``: the original package's preprocessing of every case, as tensor fingerprints.

Run with OpenAI's original ``clip`` package importable (and not this one), e.g. from an unpacked ``clip-anytorch``
wheel: ``PYTHONPATH=/path/to/unpacked python tests/data/make_preprocess_expected.py``.
"""
import json
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(1, str(HERE.parent))  # preprocess_cases, after the original package on PYTHONPATH

import clip.clip as original  # noqa: E402
from preprocess_cases import SIZES, fingerprint, images  # noqa: E402

expected = {f"{name}.{n_px}": fingerprint(original._transform(n_px)(image))
            for name, image in images().items() for n_px in SIZES}
(HERE / "preprocess.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")
print(f"{len(expected)} fingerprints from {original.__file__}")
