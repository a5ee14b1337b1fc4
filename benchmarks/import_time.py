"""What ``import clip`` costs on top of ``import torch, torchvision``, in fresh processes, and what it imports.

    python benchmarks/import_time.py [--repeats 10] [--top 15]

Two measures, each the median of ``--repeats`` fresh processes, run interleaved:

- in-process: the time of ``import clip`` in a process that has just imported ``torch`` and ``torchvision``;
- whole process: the wall time of ``python -c "import torch, torchvision, clip"`` minus that of
  ``python -c "import torch, torchvision"`` (the issue's measure; noisier, as it differences two process times).

``open_clip`` is measured the same way for reference. Then ``python -X importtime`` lists the modules that
``import clip`` loads beyond those of ``torch`` and ``torchvision``, the slowest first (self time), with the
package's own modules (cumulative time). The issue's target: at most 0.1 s.
"""
import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import REPO, child_env, median, print_machine, table  # noqa: E402

BASE = "import torch, torchvision"
TARGET_S = 0.1

# Prints the time of the base imports and of the package import after them.
IN_PROCESS = """
import time
t0 = time.perf_counter()
import torch, torchvision
t1 = time.perf_counter()
import {package}
t2 = time.perf_counter()
print(t1 - t0, t2 - t1)
"""


def whole_process(code: str, env: dict) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], env=env, cwd=str(REPO), check=True, capture_output=True)
    return time.perf_counter() - start


def in_process(package: str, env: dict) -> tuple:
    out = subprocess.run([sys.executable, "-c", IN_PROCESS.format(package=package)], env=env, cwd=str(REPO),
                         check=True, capture_output=True, text=True).stdout.split()
    return float(out[0]), float(out[1])


def import_times(code: str, env: dict) -> dict:
    """``{module: (self us, cumulative us)}`` from ``python -X importtime``."""
    err = subprocess.run([sys.executable, "-X", "importtime", "-c", code], env=env, cwd=str(REPO), check=True,
                         capture_output=True, text=True).stderr
    times = {}
    for line in err.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \| (\s*)(\S+)", line)
        if m:
            times[m.group(4)] = (int(m.group(1)), int(m.group(2)))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    env = child_env()
    print_machine()

    packages = ("clip", "open_clip")
    runs = {"base": [], **{p: [] for p in packages}}
    inside = {p: [] for p in packages}
    whole_process(BASE, env)  # warm the file system caches: not counted
    for _ in range(args.repeats):
        runs["base"].append(whole_process(BASE, env))
        for package in packages:
            runs[package].append(whole_process(f"{BASE}, {package}", env))
            inside[package].append(in_process(package, env)[1])
    base = median(runs["base"])
    rows = [["torch, torchvision", f"{base:.3f}", "-", "-"]]
    for package in packages:
        rows.append([f"+ {package}", f"{median(runs[package]):.3f}", f"{median(runs[package]) - base:+.3f}",
                     f"{median(inside[package]):.3f}"])
    print(f"\nmedians of {args.repeats} fresh processes, seconds\n")
    print(table(["imports", "process wall s", "added s (whole process)", "added s (in-process)"], rows))
    added = median(inside["clip"])
    print(f"\nimport clip adds {added:.3f} s in-process, {median(runs['clip']) - base:+.3f} s as whole processes "
          f"(target <= {TARGET_S} s): {'ok' if added <= TARGET_S else 'MISSED'}")

    before = import_times(BASE, env)
    after = import_times(f"{BASE}, clip", env)
    new = {m: t for m, t in after.items() if m not in before}
    own = sorted(((m, t) for m, t in new.items() if m == "clip" or m.startswith("clip.")), key=lambda x: -x[1][1])
    others = sorted(((m, t) for m, t in new.items() if not (m == "clip" or m.startswith("clip."))),
                    key=lambda x: -x[1][0])
    print(f"\n-X importtime: {len(new)} modules imported by clip beyond torch and torchvision, "
          f"{sum(t[0] for t in new.values()) / 1e3:.0f} ms of self time in all")
    print(table(["clip module", "cumulative ms", "self ms"],
                [[m, f"{t[1] / 1e3:.1f}", f"{t[0] / 1e3:.1f}"] for m, t in own]))
    print()
    print(table(["other module it pulls in", "self ms", "cumulative ms"],
                [[m, f"{t[0] / 1e3:.1f}", f"{t[1] / 1e3:.1f}"] for m, t in others[:args.top]]))


if __name__ == "__main__":
    main()
