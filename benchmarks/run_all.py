"""Run the whole suite in one go: build the checkpoints if needed, then load, import and encode benchmarks.

    python benchmarks/run_all.py [--device cpu|cuda] [--quick]

Prints the machine (CPU, RAM, torch and open_clip versions, the CUDA device if any) and each script's tables.
``--quick`` measures ViT-B/32 alone with fewer repeats (a smoke run, a couple of minutes); the full run measures
RN50, ViT-B/32 and ViT-L/14 and takes about half an hour on a 2-core machine. ``--device cuda`` measures CUDA
float16 loads and CUDA throughput (the import benchmark does not depend on the device and runs anyway).
"""
import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks._common import MODELS, print_machine  # noqa: E402


def run(script: str, *args: str) -> None:
    command = [sys.executable, str(HERE / script), *args]
    print(f"\n$ {' '.join(['python', 'benchmarks/' + script, *args])}", flush=True)
    subprocess.run(command, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    models = ["ViT-B/32"] if args.quick else list(MODELS)
    device = ["--device", args.device]

    print_machine()
    run("make_checkpoints.py", "--models", *models)
    run("load.py", "--models", *models, "--repeats", "1" if args.quick else "3", *device)
    run("import_time.py", "--repeats", "3" if args.quick else "10")
    repeats = ["--repeats", "2" if args.quick else "5"]
    run("encode.py", "--models", *(models if args.device != "cpu" else ["ViT-B/32"]), *repeats, *device)
    if not args.quick and args.device == "cpu":
        # ViT-L/14 encodes slowly on a CPU: fewer images and repeats.
        run("encode.py", "--models", "ViT-L/14", "--image-batch", "4", "--repeats", "3", "--what", "text", "image")


if __name__ == "__main__":
    main()
