"""Load time and peak memory, ours vs open_clip, each load in a fresh process, the file in the page cache.

    python benchmarks/load.py [--models RN50 ViT-B/32 ViT-L/14] [--kinds archive state_dict] [--repeats 3]
                              [--device cpu|cuda] [--threads N] [--loaders ...] [--json out.json]

For every model and file kind (release-shaped TorchScript archive, plain state dict) each loader runs ``--repeats``
times in fresh processes, interleaved; the table shows medians. Loaders (see ``_load_child.py``):

- ``ours`` ``clip.load(path, device)``; ``ours-name`` ``clip.load(name, device)`` from a cache folder whose file was
  verified once before (it must hash nothing and call no TorchScript); ``ours-jit`` ``jit=True``;
- ``open_clip`` ``open_clip.load_openai_model(path, device=device)``, the reference of the speed-up column;
- ``original`` the original package's ``jit=False`` algorithm (emulated, archives only);
- ``torchscript`` bare ``torch.jit.load(...).float()``, the floor for any ``jit=True`` loader (archives only);
- ``floor`` the irreducible work in one bulk operation: map the file, allocate the model's memory in its final
  dtypes, convert the bytes into it (no parsing, no modules): what a perfect loader would approach;
- with ``--candidate DIR`` (repeatable): ``clip.load(path, device)`` with ``clip`` imported from DIR, a scratch
  copy of the package holding a change to try, measured beside ``ours`` under the name ``cand:<DIR name>``.

"load s" is the median wall time of the load alone, "min s" the fastest run, "cpu s" the median CPU time (user +
system, all threads), which other processes on the machine disturb less. "peak" is the peak RSS during the load
above the RSS before it; "peak/fp32" divides it by the model's float32 size (the issue's target: at most 1.3).
"hashed MB" and "jit.load" count SHA-256 input and ``torch.jit.load`` calls during the load. Run
``make_checkpoints.py`` first.
"""
import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (KINDS, MODELS, WORK, checkpoint_info, checkpoint_path, child_env,  # noqa: E402
                                float32_model_bytes, median, print_machine, require_checkpoints, run_child, table,
                                warm_page_cache)

CHILD = str(Path(__file__).resolve().parent / "_load_child.py")
LOADERS = ("ours", "ours-name", "open_clip", "ours-jit", "torchscript", "original", "floor")
ARCHIVE_ONLY = ("ours-name", "ours-jit", "torchscript", "original")

# The targets: speed-up over open_clip, and peak RSS over the float32 model size.
SPEEDUP_TARGET = {"ViT-L/14": 5.0, "ViT-B/32": 4.0, "RN50": 4.0}
RSS_TARGET = 1.3


def prepare_cache(model: str) -> dict:
    """A cache folder holding the archive under its release name (a hard link), for ``ours-name``."""
    source = checkpoint_path(model, "archive")
    cache = WORK / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / MODELS[model]
    if not (target.exists() and os.path.samefile(source, target)):
        if target.exists():
            target.unlink()
        os.link(source, target)
    sha256 = checkpoint_info()[f"archive/{source.name}"]["sha256"]
    return {"CLIP_CACHE_DIR": str(cache), "BENCH_SHA256": sha256}


def measure(model: str, kind: str, loaders, repeats: int, device: str, threads: int,
            candidates: Sequence[Path] = ()) -> dict:
    path = checkpoint_path(model, kind)
    warm_page_cache(path)
    loaders = [loader for loader in loaders if kind == "archive" or loader not in ARCHIVE_ONLY]
    candidates = {f"cand:{c.name}": c for c in candidates}
    loaders[1:1] = list(candidates)
    extra = prepare_cache(model) if "ours-name" in loaders else {}
    env = child_env(threads or None, **extra)

    def run(loader: str) -> dict:
        child_loader, child_env_ = loader, env
        if loader in candidates:
            child_loader, child_env_ = "ours", dict(env, BENCH_CLIP_PATH=str(candidates[loader]))
        args = [CHILD, child_loader, str(path), "--model", model, "--device", device, "--threads", str(threads)]
        return run_child(args, child_env_)

    if "ours-name" in loaders:
        run("ours-name")  # the first load by name verifies the file and writes its record: not timed
    runs = {loader: [] for loader in loaders}
    for _ in range(repeats):
        for loader in loaders:
            runs[loader].append(run(loader))
    return runs


def summarise(model: str, kind: str, runs: dict) -> list:
    size = float32_model_bytes(model)
    reference = median([r["load_s"] for r in runs["open_clip"]]) if "open_clip" in runs else None
    rows = []
    for loader, results in runs.items():
        load_s = median([r["load_s"] for r in results])
        peak = median([r["peak_above_base"] for r in results])
        rows.append({
            "model": model, "kind": kind, "loader": loader,
            "load_s": load_s,
            "min_s": min(r["load_s"] for r in results),
            "cpu_s": median([r["cpu_s"] for r in results]),
            "speedup": reference / load_s if reference else None,
            "peak_gb": peak / 1e9,
            "peak_over_fp32": peak / size,
            "kept_gb": median([r["kept_above_base"] for r in results]) / 1e9,
            "import_s": median([r["import_s"] for r in results]),
            "sha256_mb": max(r["sha256_bytes"] for r in results) / 1e6,
            "jit_loads": max(r["jit_load_calls"] for r in results),
            "dtypes": "/".join(results[0]["dtypes"]),
            "checksum": results[0]["checksum"],
            "cuda_peak_gb": (median([r["cuda_peak_allocated"] for r in results]) / 1e9
                             if "cuda_peak_allocated" in results[0] else None),
        })
    sums = {round(r["checksum"], 3) for r in rows if r["checksum"] is not None}
    if len(sums) > 1:
        print(f"WARNING: {model} {kind}: loaders disagree on the weights (checksums {sums})")
    return rows


def report(rows: list, device: str) -> None:
    header = ["model", "file", "loader", "load s", "min s", "cpu s", "x open_clip", "peak GB", "peak/fp32", "kept GB",
              "import s", "hashed MB", "jit.load", "dtypes"]
    if device.startswith("cuda"):
        header.append("CUDA peak GB")
    lines = []
    for r in rows:
        line = [r["model"], r["kind"], r["loader"], f"{r['load_s']:.2f}", f"{r['min_s']:.2f}", f"{r['cpu_s']:.2f}",
                f"{r['speedup']:.1f}x" if r["speedup"] else "-", f"{r['peak_gb']:.2f}",
                f"{r['peak_over_fp32']:.2f}", f"{r['kept_gb']:.2f}", f"{r['import_s']:.2f}",
                f"{r['sha256_mb']:.0f}", r["jit_loads"], r["dtypes"]]
        if device.startswith("cuda"):
            line.append(f"{r['cuda_peak_gb']:.2f}")
        lines.append(line)
    print(table(header, lines))
    print()
    for r in rows:
        if not (r["loader"] in ("ours", "ours-name") or r["loader"].startswith("cand:")):
            continue
        target = SPEEDUP_TARGET.get(r["model"])
        checks = []
        if target and r["speedup"]:
            checks.append(f"speed-up {r['speedup']:.1f}x (target >= {target:.0f}x): "
                          + ("ok" if r["speedup"] >= target else "MISSED"))
        if device == "cpu":
            checks.append(f"peak {r['peak_over_fp32']:.2f}x fp32 (target <= {RSS_TARGET}): "
                          + ("ok" if r["peak_over_fp32"] <= RSS_TARGET else "MISSED"))
        if r["loader"] == "ours-name":
            checks.append("no hashing, no TorchScript: "
                          + ("ok" if r["sha256_mb"] == 0 and r["jit_loads"] == 0 else "MISSED"))
        print(f"{r['model']:>9} {r['kind']:<10} {r['loader']:<12} " + "; ".join(checks))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    parser.add_argument("--loaders", nargs="+", default=list(LOADERS), choices=list(LOADERS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in the children (default: torch's)")
    parser.add_argument("--candidate", type=Path, action="append", default=[],
                        help="a folder holding a changed copy of the clip package, measured as 'cand:<name>' "
                             "(repeatable)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    require_checkpoints(args.models, args.kinds)

    print_machine()
    print(f"device: {args.device}; medians of {args.repeats} fresh processes; file in the page cache; "
          f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}\n")
    rows = []
    for model in args.models:
        for kind in args.kinds:
            runs = measure(model, kind, args.loaders, args.repeats, args.device, args.threads,
                           [c.resolve() for c in args.candidate])
            rows += summarise(model, kind, runs)
    print(f"load average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())} "
          f"(above {os.cpu_count()}: other processes shared the CPUs; compare 'cpu s' and 'min s')\n")
    report(rows, args.device)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
