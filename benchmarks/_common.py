"""Shared pieces of the benchmark scripts: release-shaped checkpoints, fresh-process runs, machine facts.

Checkpoints live under ``benchmarks/_work/`` (git-ignored), built once by ``make_checkpoints.py`` and reused:

- ``_work/archive/<file>``: a TorchScript archive traced from our own model in the release dtypes, with the
  three integer scalars of release archives (``tests/checkpoints.save_archive``), as released files are;
- ``_work/state_dict/<file>``: the same weights as a plain ``torch.save`` state dict (release dtypes);
- ``_work/checkpoints.json``: size and SHA-256 of each file, for the load-by-name measurement.

The weights are random (no real checkpoint can be fetched here); shapes and dtypes are those of the release files,
read from ``tests/data/state-dicts/<file>.tsv``.
"""
import json
import os
import platform
import re
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORK = HERE / "_work"

# The models the suite measures: the smallest ResNet, the common ViT and the largest common ViT.
MODELS = {"RN50": "RN50.pt", "ViT-B/32": "ViT-B-32.pt", "ViT-L/14": "ViT-L-14.pt"}
KINDS = ("archive", "state_dict")

def release_shapes(model: str) -> Dict[str, tuple]:
    """``{key: (shape, dtype name)}`` of the release checkpoint, from ``tests/data/state-dicts/<file>.tsv``."""
    from tests.checkpoints import release_table

    return release_table(MODELS[model][:-len(".pt")])


def release_dims(model: str):
    """The ``ModelDims`` of a release model, inferred from its key shapes exactly as loading infers them."""
    import torch

    from clip.model import infer_dims

    meta = {k: torch.empty(shape, device="meta") for k, (shape, _) in release_shapes(model).items()}
    return infer_dims(meta)


def float32_model_bytes(model: str) -> int:
    """The size of the model's weights in float32 (what a CPU load ends up holding)."""
    from clip.model import ARCHIVE_SCALAR_KEYS  # the archives' integer scalars are not weights

    total = 0
    for key, (shape, _) in release_shapes(model).items():
        if key not in ARCHIVE_SCALAR_KEYS:
            n = 1
            for d in shape:
                n *= d
            total += 4 * n
    return total


def checkpoint_path(model: str, kind: str) -> Path:
    return WORK / kind / MODELS[model]


def checkpoint_info() -> dict:
    """``{"<kind>/<file>": {"size": ..., "sha256": ...}}`` as written by ``make_checkpoints.py``."""
    path = WORK / "checkpoints.json"
    return json.loads(path.read_text()) if path.exists() else {}


def require_checkpoints(models: Sequence[str], kinds: Sequence[str] = KINDS) -> None:
    missing = [str(checkpoint_path(m, k)) for m in models for k in kinds if not checkpoint_path(m, k).exists()]
    if missing:
        sys.exit("missing checkpoints (run `python benchmarks/make_checkpoints.py` first):\n  " + "\n  ".join(missing))


def warm_page_cache(path: Path) -> None:
    """Read the file once so every timed run finds it in the page cache (the issue's 'cached load')."""
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


def child_env(threads: Optional[int] = None, **extra: str) -> Dict[str, str]:
    """The environment of a measuring child process: the repository importable, offline."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["CLIP_OFFLINE"] = "1"
    if threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(threads)
    env.update(extra)
    return env


def vocabulary_path() -> Path:
    """The tokenizer vocabulary shipped inside the package."""
    return REPO / "clip" / "bpe_simple_vocab_16e6.txt.gz"


def run_child(args: List[str], env: Dict[str, str], timeout: float = 900) -> dict:
    """Run ``python <args>`` in a fresh process; its last stdout line is a JSON object, returned here."""
    proc = subprocess.run([sys.executable] + args, env=env, cwd=str(REPO), capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"child {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"child {' '.join(args)} printed no result:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1])


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def proc_status_kib(*fields: str) -> Dict[str, int]:
    """Fields of /proc/self/status in KiB (VmRSS, VmHWM, RssAnon, RssFile)."""
    text = Path("/proc/self/status").read_text()
    return {f: int(re.search(rf"^{f}:\s+(\d+)", text, re.M).group(1)) for f in fields}


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the next peak is that of the code measured."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def machine() -> Dict[str, str]:
    """The machine and software the figures were taken on."""
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": f"{cpu} ({os.cpu_count()} logical cores, torch threads {torch.get_num_threads()})",
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    try:
        mem = Path("/proc/meminfo").read_text().split("\n", 1)[0].split()[1]
        info["ram"] = f"{int(mem) / 2**20:.1f} GiB"
    except (OSError, IndexError, ValueError):
        pass
    try:
        import open_clip

        info["open_clip"] = open_clip.__version__
    except ImportError:
        info["open_clip"] = "not installed"
    if torch.cuda.is_available():
        info["cuda"] = f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    return info


def print_machine() -> None:
    for key, value in machine().items():
        print(f"{key:>10}: {value}")


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table, columns padded so it also reads well in a terminal."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
