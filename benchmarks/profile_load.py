"""Where the time and memory of one ``clip.load`` go, phase by phase, in fresh processes.

    python benchmarks/profile_load.py [--models ViT-L/14] [--kinds archive state_dict] [--repeats 3]
                                      [--device cpu] [--threads N] [--cprofile] [--candidate DIR]

Each run wraps the package's internal steps (whichever of them exist: the names follow ``clip/clip.py``,
``clip/_checkpoint.py`` and ``clip/model.py`` and may change) and reports for each the wall time, the CPU time and
the process's peak RSS when it ends, above the RSS before the load. Nested steps are indented; "(rest)" lines are
the time of a step outside the steps listed under it, e.g. the dtype conversion loop of ``model_from_state_dict``.
``--cprofile`` also prints the functions with the most own time in one run.
"""
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Steps to time, outermost first; a step's children are the steps listed under it with a deeper indent.
STEPS = [
    (0, "clip.clip._checkpoint_path"),
    (0, "clip.clip._build"),
    (1, "clip._layouts.read_state_dict"),
    (2, "clip._checkpoint.read_file"),
    (3, "clip._checkpoint._read_zip"),
    (4, "clip._checkpoint._read_entry"),
    (3, "clip._checkpoint._torch_load"),
    (2, "clip._layouts.to_openai_layout"),
    (1, "clip.model.model_from_state_dict"),
    (2, "clip.model.infer_dims"),
    (2, "clip.model._empty_model"),
    (2, "clip.model._check_keys"),
    (2, "torch.nn.Module.load_state_dict"),
    (0, "clip._jit.load_jit"),
    (0, "clip.clip._transform"),
]


def child(path: str, device: str, jit: bool, cprofile: bool) -> None:
    """Runs in the fresh process: wrap the steps, load once, print one JSON line."""
    import importlib
    import json
    import time

    import torch
    import torchvision  # noqa: F401

    import clip
    import clip._checkpoint  # noqa: F401
    import clip.model  # noqa: F401
    from benchmarks._common import proc_status_kib, reset_peak_rss

    try:
        importlib.import_module("clip._jit")
    except ImportError:
        pass
    totals = {}

    def wrap(name, function):
        def timed(*args, **kwargs):
            start, cpu = time.perf_counter(), time.process_time()
            try:
                return function(*args, **kwargs)
            finally:
                entry = totals.setdefault(name, {"s": 0.0, "cpu_s": 0.0, "calls": 0})
                entry["s"] += time.perf_counter() - start
                entry["cpu_s"] += time.process_time() - cpu
                entry["calls"] += 1
                entry["peak"] = (proc_status_kib("VmHWM")["VmHWM"] - base) * 1024
        return timed

    for _, name in STEPS:
        module_name, attribute = name.rsplit(".", 1)
        owner = _resolve(module_name)
        original = getattr(owner, attribute, None) if owner is not None else None
        if original is None:
            continue
        wrapped = wrap(name, original)
        setattr(owner, attribute, wrapped)
        # Also where other modules imported it by name (clip.clip imports read_state_dict, model_from_state_dict).
        for module in [m for n, m in list(sys.modules.items()) if n == "clip" or n.startswith("clip.")]:
            for key, value in list(vars(module).items()):
                if value is original:
                    setattr(module, key, wrapped)

    base = proc_status_kib("VmRSS")["VmRSS"]
    reset_peak_rss()
    profiler = None
    if cprofile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    start, cpu = time.perf_counter(), time.process_time()
    loaded = clip.load(path, device=device, jit=jit)  # kept: freeing the model must not be timed
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    total = {"s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu, "calls": 1,
             "peak": (proc_status_kib("VmHWM")["VmHWM"] - base) * 1024}
    if profiler is not None:
        import io
        import pstats

        profiler.disable()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(20)
        print(out.getvalue(), file=sys.stderr)
    print(json.dumps({"total": total, "steps": totals}))
    del loaded


def _resolve(dotted: str):
    """The object a dotted module or class path names, or None."""
    import importlib

    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for part in parts[i:]:
            obj = getattr(obj, part, None)
            if obj is None:
                return None
        return obj
    return None


def main() -> None:
    from benchmarks._common import (KINDS, MODELS, checkpoint_path, child_env, float32_model_bytes, median,
                                    print_machine, require_checkpoints, run_child, warm_page_cache)

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["ViT-L/14"], choices=list(MODELS))
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--jit", action="store_true", help="profile jit=True")
    parser.add_argument("--cprofile", action="store_true", help="print cProfile's top functions of the first run")
    parser.add_argument("--candidate", type=Path, help="profile the clip package in this folder instead")
    parser.add_argument("--child", nargs=2, metavar=("PATH", "DEVICE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.candidate:
            sys.path.insert(0, str(args.candidate))
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        child(args.child[0], args.child[1], args.jit, args.cprofile)
        return

    require_checkpoints(args.models, args.kinds)
    print_machine()
    print(f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    for model in args.models:
        size = float32_model_bytes(model)
        for kind in args.kinds:
            path = checkpoint_path(model, kind)
            warm_page_cache(path)
            runs = []
            for i in range(args.repeats):
                argv = [__file__, "--child", str(path), args.device, "--threads", str(args.threads)]
                argv += ["--jit"] * args.jit + ["--cprofile"] * (args.cprofile and i == 0)
                argv += ["--candidate", str(args.candidate.resolve())] if args.candidate else []
                runs.append(_run_verbose(run_child, argv, child_env(args.threads or None), args.cprofile and i == 0))
            print(f"\n{model} {kind}{' jit' if args.jit else ''} on {args.device}: medians of {args.repeats} "
                  f"fresh processes (float32 model {size / 1e9:.2f} GB)")
            print(f"{'step':<52} {'wall ms':>8} {'cpu ms':>8} {'calls':>6} {'peak GB':>8}")
            _print_row("load (total)", [r["total"] for r in runs], median)
            for i, (depth, name) in enumerate(STEPS):
                found = [r["steps"][name] for r in runs if name in r["steps"]]
                if not found:
                    continue
                _print_row("  " * depth + name.split(".", 1)[1], found, median)
                children = [n for d, n in _children(STEPS, i)]
                if any(n in runs[0]["steps"] for n in children):
                    rest = [{"s": r["steps"][name]["s"] - sum(r["steps"][n]["s"] for n in children if n in r["steps"]),
                             "cpu_s": r["steps"][name]["cpu_s"]
                             - sum(r["steps"][n]["cpu_s"] for n in children if n in r["steps"]),
                             "calls": 1, "peak": r["steps"][name]["peak"]} for r in runs if name in r["steps"]]
                    _print_row("  " * (depth + 1) + "(rest)", rest, median)


def _children(steps, index):
    depth = steps[index][0]
    for d, name in steps[index + 1:]:
        if d <= depth:
            return
        if d == depth + 1:
            yield d, name


def _run_verbose(run_child, argv, env, show_stderr):
    if not show_stderr:
        return run_child(argv, env)
    import subprocess

    from benchmarks._common import REPO

    proc = subprocess.run([sys.executable] + argv, env=env, cwd=str(REPO), capture_output=True, text=True)
    print(proc.stderr)
    import json

    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


def _print_row(label, entries, median):
    print(f"{label:<52} {1000 * median([e['s'] for e in entries]):8.0f} "
          f"{1000 * median([e['cpu_s'] for e in entries]):8.0f} {entries[0]['calls']:6d} "
          f"{median([e['peak'] for e in entries]) / 1e9:8.2f}")


if __name__ == "__main__":
    main()
