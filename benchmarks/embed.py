"""Embedding throughput of whole commands on a folder of JPEGs: ``clip embed``, clip-retrieval's ``inference``, and
the limit that any tool running our model on this machine approaches.

    python benchmarks/embed.py [--images 2000] [--model ViT-B/32] [--device cpu|cuda] [--skip-clip-retrieval]
                               [--precisions fp32 bf16] [--force-precision] [--repeats 1] [--skip-limit]

- The folder: ``--images`` JPEGs (quality 90) of the sizes photos come in (500x375 to 1024x768, landscape and
  portrait), generated from smooth random fields with noise so that they compress like photos; made once under
  ``benchmarks/_work/embed-images/``.
- ours: ``python -m clip embed FOLDER -o OUT.npy --model CHECKPOINT --precision P`` with its defaults, timed from
  start to exit, for each of ``--precisions`` (fp32, bf16). ``bf16`` is what a user gets: float32, with a warning,
  on a CPU without native bfloat16; ``--force-precision`` adds a row that runs bfloat16 there anyway. The bf16
  rows are compared with the fp32 rows (smallest and median cosine).
- clip-retrieval: ``clip-retrieval inference`` 2.45 with its defaults (images only; ``--use_jit False``, the
  plain model as ours), in its own virtual environment
  under ``benchmarks/_work/clip-retrieval-venv`` (it installs ``clip-anytorch``, a second ``clip`` package). That
  environment sees this one's packages after its own (a ``.pth`` line), so torch is not installed twice. Both get
  the same checkpoint file (``make_checkpoints.py``: release layout, random weights), so their outputs must agree:
  the mean cosine between the two tools' rows is printed and must be above 0.999.
- the limit: ``encode_image`` on preprocessed batches (all cores), plus the decoding and preprocessing CPU time per
  image measured on one core and spread over all cores: ``1 / (t_model + t_decode / cores)`` images/s.

Run ``make_checkpoints.py`` first. Each command runs ``--repeats`` times (default once), the commands taking turns,
so a busy machine slows them alike; the median wall time gives images/s, and the CPU seconds of each command (its
processes and their children: ``getrusage``) are printed beside it, steadier than wall time on a loaded machine.
The folder is in the page cache after the first read.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import REPO, WORK, checkpoint_path, print_machine, require_checkpoints, table  # noqa: E402

CLIP_RETRIEVAL = "clip-retrieval==2.45.0"
VENV = WORK / "clip-retrieval-venv"
# (width, height) of the generated photos: common camera and web sizes, landscape and portrait.
SIZES = [(500, 375), (640, 480), (800, 600), (1024, 768), (375, 500), (768, 1024), (640, 427), (1000, 667)]
TARGET_VS_LIMIT = 0.8  # the goal: at least 80% of the limit
# The goals of --precision bf16 on a CPU with native bfloat16: 2.5x clip-retrieval and 1.5x our float32.
BF16_VS_CLIP_RETRIEVAL, BF16_VS_FP32 = 2.5, 1.5


def make_images(folder: Path, count: int) -> None:
    """``count`` photo-like JPEGs in ``folder`` (kept between runs; made again if the count differs)."""
    from PIL import Image

    existing = sorted(folder.glob("*.jpg")) if folder.is_dir() else []
    if len(existing) == count:
        return
    folder.mkdir(parents=True, exist_ok=True)
    for path in existing:
        path.unlink()
    rng = np.random.default_rng(0)
    for i in range(count):
        width, height = SIZES[i % len(SIZES)]
        coarse = rng.uniform(0, 255, size=(height // 32 + 2, width // 32 + 2, 3)).astype(np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.int16)
        noisy = np.clip(smooth + rng.normal(0, 12, size=smooth.shape), 0, 255).astype(np.uint8)  # [h, w, 3]
        Image.fromarray(noisy).save(folder / f"{i:06d}.jpg", quality=90)


def clip_retrieval_venv() -> Path:
    """The clip-retrieval environment, made once; returns its ``clip-retrieval`` script."""
    script = VENV / "bin" / "clip-retrieval"
    if script.exists():
        return script
    import sysconfig

    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    site = next((VENV / "lib").glob("python*/site-packages"))
    # After the venv's own packages: torch and friends come from here unless clip-retrieval needs other versions.
    (site / "zz_base_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    start = time.perf_counter()
    # clip-anytorch imports pkg_resources, which setuptools 81 removed.
    subprocess.run([str(VENV / "bin" / "pip"), "install", "-q", CLIP_RETRIEVAL, "setuptools<81"], check=True)
    print(f"installed {CLIP_RETRIEVAL} in {time.perf_counter() - start:.0f} s")
    return script


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(argv: list, env: dict) -> tuple:
    """(wall seconds, CPU seconds) of a command and all its processes."""
    cpu = _children_cpu()
    start = time.perf_counter()
    result = subprocess.run(argv, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{argv[0]} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    if result.stderr.strip():
        print(f"  {argv[2:4]}... said: {result.stderr.strip().splitlines()[0]}")
    return elapsed, _children_cpu() - cpu


def run_ours(folder: Path, model: Path, device: str, out: Path, precision: str = "fp32",
             force: bool = False) -> tuple:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    name = f"ours-{precision}{'-forced' if force else ''}"
    return timed([sys.executable, "-m", "clip", "embed", str(folder), "-o", str(out / f"{name}.npy"), "--model",
                  str(model), "--device", device, "--overwrite", "-q", "--precision", precision]
                 + (["--force-precision"] if force else []), env)


def run_clip_retrieval(folder: Path, model: Path, device: str, out: Path) -> tuple:
    script = clip_retrieval_venv()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    target = out / "clip-retrieval"
    if target.exists():
        import shutil

        shutil.rmtree(target)
    return timed([str(script), "inference", "--input_dataset", str(folder), "--output_folder", str(target),
                  "--clip_model", str(model), "--enable_text", "False", "--enable_metadata", "False",
                  # The plain model, as ours runs: its TorchScript path on the CPU took minutes for 20 images here.
                  "--use_jit", "False"], env)


def agreement(out: Path, folder: Path) -> float:
    """Mean cosine between our float32 rows and clip-retrieval's (float16) rows for the same images."""
    ours = np.load(out / "ours-fp32.npy")
    rows = (out / "ours-fp32.txt").read_text().splitlines()
    theirs = np.concatenate([np.load(p) for p in sorted((out / "clip-retrieval" / "img_emb").glob("*.npy"))])
    read_paths = ("import glob, json, sys, pyarrow.parquet as pq; print(json.dumps([p for f in sorted(glob.glob("
                  "sys.argv[1] + '/*.parquet')) for p in pq.read_table(f).column('image_path').to_pylist()]))")
    listing = subprocess.run([str(VENV / "bin" / "python"), "-c", read_paths, str(out / "clip-retrieval" / "metadata")],
                             capture_output=True, text=True, check=True).stdout  # pyarrow lives in that venv
    names = [os.path.relpath(p, folder) for p in json.loads(listing)]
    position = {name: i for i, name in enumerate(rows)}
    ours = ours[[position[name] for name in names]]
    theirs = theirs.astype(np.float32)
    theirs /= np.linalg.norm(theirs, axis=1, keepdims=True)
    return float(np.mean(np.sum(ours * theirs, axis=1)))


def limit(folder: Path, model_path: Path, device: str, sample: int = 200, batch: int = 32) -> dict:
    """Decode+preprocess seconds per image on one core, and encode_image seconds per image on all cores."""
    import torch
    from PIL import Image

    import clip

    model, preprocess = clip.load(str(model_path), device=device)
    paths = sorted(folder.glob("*.jpg"))[:sample]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    start = time.process_time()
    images = []
    for path in paths:
        with Image.open(path) as image:
            images.append(preprocess(image))
    decode = (time.process_time() - start) / len(paths)
    torch.set_num_threads(threads)
    batches = [torch.stack(images[i:i + batch]).to(device) for i in range(0, len(images) - batch + 1, batch)]
    with torch.inference_mode():
        model.encode_image(batches[0])  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for tensor in batches:
            model.encode_image(tensor).float().cpu()
        encode = (time.perf_counter() - start) / (len(batches) * batch)
    cores = len(os.sched_getaffinity(0))
    return {"decode_s": decode, "encode_s": encode, "cores": cores,
            "images_per_s": 1 / (encode + decode / cores)}


def precision_agreement(out: Path, name: str) -> tuple:
    """(smallest, median) cosine between the rows of run ``name`` and the float32 run's; the row lists must match."""
    if (out / f"{name}.txt").read_text() != (out / "ours-fp32.txt").read_text():
        raise SystemExit(f"{name}: its row list differs from the float32 run's")
    cosines = np.sum(np.load(out / f"{name}.npy") * np.load(out / "ours-fp32.npy"), axis=1)
    return float(cosines.min()), float(np.median(cosines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--model", default="ViT-B/32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-clip-retrieval", action="store_true")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--force-precision", action="store_true",
                        help="also run bf16 with --force-precision (on a CPU without native bfloat16)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--skip-limit", action="store_true")
    args = parser.parse_args()
    if "fp32" not in args.precisions:
        args.precisions.insert(0, "fp32")  # the reference of every comparison

    require_checkpoints([args.model], ["archive"])
    model = checkpoint_path(args.model, "archive")
    folder = WORK / "embed-images"
    make_images(folder, args.images)
    out = WORK / "embed-out"
    out.mkdir(exist_ok=True)
    print_machine()
    megapixels = sum(w * h for w, h in SIZES) / len(SIZES) / 1e6
    print(f"folder: {args.images} JPEGs, {megapixels:.2f} MP on average; model {args.model} ({model.name}, random "
          f"weights in the release layout); device {args.device}\n")

    results, seconds, cpu = {}, {}, {}
    if not args.skip_limit:
        bound = limit(folder, model, args.device)
        results["limit"] = bound["images_per_s"]
        print(f"limit: decode+preprocess {1000 * bound['decode_s']:.1f} ms/image on one core, encode_image "
              f"{1000 * bound['encode_s']:.1f} ms/image on {bound['cores']} cores")
    contestants = {f"ours {p}": (lambda p=p: run_ours(folder, model, args.device, out, p)) for p in args.precisions}
    if args.force_precision and "bf16" in args.precisions:
        contestants["ours bf16 forced"] = lambda: run_ours(folder, model, args.device, out, "bf16", force=True)
    if not args.skip_clip_retrieval:
        contestants["clip-retrieval"] = lambda: run_clip_retrieval(folder, model, args.device, out)
    walls = {name: [] for name in contestants}
    cpus = {name: [] for name in contestants}
    for repeat in range(args.repeats):
        for name, command in contestants.items():  # taking turns
            wall, used = command()
            walls[name].append(wall)
            cpus[name].append(used)
            print(f"  run {repeat + 1}: {name}: {wall:.1f} s wall, {used:.1f} s CPU", flush=True)
    for name in contestants:
        seconds[name] = statistics.median(walls[name])
        cpu[name] = statistics.median(cpus[name])
        results[name] = args.images / seconds[name]

    rows = []
    base = results["ours fp32"]
    for name in [*contestants, "limit"]:
        if name in results:
            per_cpu = f"{args.images / cpu[name]:.2f}" if name in cpu else "-"
            rows.append([name, f"{seconds[name]:.1f}" if name in seconds else "-", f"{results[name]:.2f}",
                         f"{cpu[name]:.1f}" if name in cpu else "-", per_cpu,
                         f"{results[name] / base:.2f}",
                         f"{results[name] / results['clip-retrieval']:.2f}" if "clip-retrieval" in results else "-"])
    print(table(["", "seconds", "images/s", "CPU s", "images per CPU s", "x ours fp32", "x clip-retrieval"], rows))
    if "limit" in results:
        share = base / results["limit"]
        print(f"\nours fp32 / limit = {share:.2f} ({'ok' if share >= TARGET_VS_LIMIT else 'MISSED'}: >= "
              f"{TARGET_VS_LIMIT})")
    if "ours bf16" in results and "clip-retrieval" in results:
        for name, goal in (("clip-retrieval", BF16_VS_CLIP_RETRIEVAL), ("ours fp32", BF16_VS_FP32)):
            ratio = results["ours bf16"] / results[name]
            print(f"ours bf16 / {name} = {ratio:.2f} ({'ok' if ratio >= goal else 'MISSED'}: >= {goal})")
    for name in contestants:
        if name.startswith("ours bf16"):
            file = name.replace(" ", "-")  # run_ours names its outputs so
            low, middle = precision_agreement(out, file)
            print(f"{name} vs ours fp32 rows: cosine min {low:.6f}, median {middle:.6f}; same row list")
    if "clip-retrieval" in results:
        cosine = agreement(out, folder)
        print(f"mean cosine, ours fp32 vs clip-retrieval rows: {cosine:.6f} ({'ok' if cosine > 0.999 else 'MISSED'})")
    (WORK / "embed.json").write_text(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "images_per_s": results}))

if __name__ == "__main__":
    main()
