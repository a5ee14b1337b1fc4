"""Build the release-shaped synthetic checkpoints the benchmarks load, once, under ``benchmarks/_work/``.

For each model: random weights in the release dtypes (``tests/checkpoints.random_state_dict``), saved as a
TorchScript archive traced from our own model (``tests/checkpoints.save_archive``: the release layout, a zip with
``data.pkl``, ``code/``, ``constants.pkl`` and the three integer scalars) and as a plain ``torch.save`` state dict.
Existing files are kept; ``--force`` rebuilds them. ViT-L/14 takes about a minute and ~4 GB of RAM to build.

    python benchmarks/make_checkpoints.py [--models RN50 ViT-B/32 ViT-L/14] [--force]
"""
import argparse
import gc
import hashlib
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import KINDS, MODELS, WORK, checkpoint_path, release_dims, release_shapes  # noqa: E402


def build(model: str, force: bool = False) -> None:
    targets = {kind: checkpoint_path(model, kind) for kind in KINDS}
    if not force and all(p.exists() for p in targets.values()):
        return
    from tests.checkpoints import random_state_dict, save_archive, save_state_dict

    start = time.perf_counter()
    state_dict = random_state_dict(release_dims(model))
    _check_release_layout(model, state_dict)
    for kind, path in targets.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        (save_archive if kind == "archive" else save_state_dict)(partial, state_dict)
        os.replace(partial, path)
    del state_dict
    gc.collect()
    print(f"built {model} in {time.perf_counter() - start:.1f} s: "
          + ", ".join(f"{p} ({p.stat().st_size / 1e6:.0f} MB)" for p in targets.values()))


def _check_release_layout(model: str, state_dict: dict) -> None:
    """The synthetic weights must have exactly the release keys, shapes and dtypes."""
    expected = release_shapes(model)
    got = {k: (tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in state_dict.items()}
    if got != expected:
        diff = sorted(set(got.items()) ^ set(expected.items()))[:10]
        raise SystemExit(f"{model}: the synthetic state dict differs from the release layout: {diff}")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_info() -> dict:
    """Record size, modification time and SHA-256 of every checkpoint (re-hashing only files that changed)."""
    path = WORK / "checkpoints.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    info = {}
    for model in MODELS:
        for kind in KINDS:
            file = checkpoint_path(model, kind)
            if not file.exists():
                continue
            key = f"{kind}/{file.name}"
            stat = file.stat()
            entry = old.get(key, {})
            if (entry.get("size"), entry.get("mtime_ns")) != (stat.st_size, stat.st_mtime_ns):
                entry = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256_of(file)}
            info[key] = entry
    path.write_text(json.dumps(info, indent=1) + "\n")
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--force", action="store_true", help="rebuild files that exist")
    args = parser.parse_args()
    for model in args.models:
        build(model, args.force)
    for key, entry in write_info().items():
        print(f"{key}: {entry['size'] / 1e6:.0f} MB sha256 {entry['sha256'][:16]}...")


if __name__ == "__main__":
    main()
