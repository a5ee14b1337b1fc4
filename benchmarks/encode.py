"""Inference speed, ours vs open_clip on the same weights: encode_text, encode_image and preprocess.

    python benchmarks/encode.py [--models ViT-B/32] [--device cpu|cuda] [--threads 2] [--repeats 5]
                                [--text-batch 64] [--image-batch 16] [--what text image preprocess]
                                [--candidate DIR] [--clock wall|cpu]

Both models come from the same release-shaped archive (``clip.load`` and ``open_clip.load_openai_model``), so
outputs must agree: every comparison prints the largest difference relative to the largest output magnitude, and
fails above 1e-5 (float32) or 1e-2 (CUDA float16). Timings are medians of ``--repeats`` calls after warm-up calls,
under ``torch.inference_mode()``, with CUDA synchronised around each call; the contestants of one workload take
turns, call by call, so that a busy machine slows them alike.

- text: three workloads of ``--text-batch`` rows (64), tokenized by ``clip.tokenize`` (open_clip's tokenizer if
  ours is unavailable): short captions (4 to 10 words, hence 6 to 12 tokens with the start and end tokens); the
  same with one row of 77 tokens (a long caption, truncated); and rows that all fill the 77 positions, where
  nothing can be saved and nothing may be lost. Contestants: open_clip (the original's full-length computation),
  ``--candidate DIR`` (``DIR/clip/model.py`` of another version of this package, e.g. made by
  ``git archive <rev> clip | tar -x -C DIR``, on the same weights) and ours. On CUDA each row also counts the
  device syncs of one call (``torch.cuda.set_sync_debug_mode("warn")``). Ours also runs with a forward hook on
  ``ln_final`` (clients that hook the text path must get the full 77-long computation and its shapes: the hook's
  output shape is printed and checked), and ``model.transformer`` is called directly on a full-length input.
- image: random images at the model's resolution.
- preprocess: PIL images of various sizes and modes through ``preprocess`` vs open_clip's ``image_transform``.
Run ``make_checkpoints.py`` first.
"""
import argparse
import importlib
import os
import random
import statistics
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (MODELS, checkpoint_path, print_machine, require_checkpoints, table,  # noqa: E402
                                vocabulary_path)

# Issue targets: short captions >= 4x open_clip; 63 short captions and one 77-token row >= 5x; full rows no slower.
TEXT_SPEEDUP_TARGETS = {"short": 4.0, "one long row": 5.0, "full rows": 0.95}
WORDS = ("a photo of the small large red blue green dog cat car tree house person man woman child on in with near "
         "sitting running standing beach street table bicycle old young bright dark white black two three many "
         "playing eating looking at under over beside park field room kitchen window water mountain sky").split()


def captions(n: int, seed: int = 0) -> list:
    """``n`` short captions of 4 to 10 words, the same every run."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10))) for _ in range(n)]


def tokenize(texts: list):
    try:
        import clip

        return clip.tokenize(texts, truncate=True).long(), "clip.tokenize"
    except Exception as e:  # the tokenizer is being rewritten; the benchmark only needs the ids
        import open_clip

        print(f"clip.tokenize unavailable ({type(e).__name__}: {e}); using open_clip.tokenize")
        return open_clip.tokenize(texts), "open_clip.tokenize"


def text_workloads(n: int) -> dict:
    """``{name: [texts]}``: short captions; the same with one row of 77 tokens; all rows 77 tokens."""
    long = [" ".join(captions(12, seed=1000 + i)) for i in range(n)]  # ~90 words: truncated to 77 tokens
    mixed = captions(n - 1)
    mixed.insert(n // 2, long[0])
    return {"short": captions(n), "one long row": mixed, "full rows": long}


# What a call's time is read from: wall time, or this process's CPU time (steadier on a machine that others load;
# with one thread it counts no time spent waiting for other threads).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]


def timed(function, repeats: int, warmup: int, device) -> float:
    """Median seconds of one call."""
    return timed_by_turns({"": function}, repeats, warmup, device)[""]


def relative_error(ours, reference) -> float:
    return float((ours.float() - reference.float()).abs().max() / reference.float().abs().max())


def load_both(model: str, device):
    import open_clip

    import clip

    path = str(checkpoint_path(model, "archive"))
    ours, preprocess = clip.load(path, device=device)
    theirs = open_clip.load_openai_model(path, device=str(device))
    return ours.eval(), preprocess, theirs.eval()


def load_candidate(folder: Path, ours, device):
    """``folder/clip/model.py`` (another version of this package) built on our model's weights."""
    # model.py imports its siblings relatively: it is imported as a module of a package of its own, whose
    # __init__ is not run.
    package = types.ModuleType("candidate_clip")
    package.__path__ = [str(folder / "clip")]
    sys.modules[package.__name__] = package
    module = importlib.import_module("candidate_clip.model")
    # Our weights came from a release-dtype archive, so build_model's float16 conversion loses nothing.
    candidate = module.build_model(ours.state_dict()).to(device)
    return (candidate if device.type == "cuda" else candidate.float()).eval()


def timed_by_turns(functions: dict, repeats: int, warmup: int, device) -> dict:
    """``{name: median seconds of one call}``, the functions called in turn so that load changes hit all alike."""
    import torch

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for function in functions.values():
        for _ in range(warmup):
            function()
    sync()
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start = clock()
            function()
            sync()
            times[name].append(clock() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def device_syncs(function, device) -> object:
    """How many times one call synchronises with the device (CUDA only; "-" elsewhere)."""
    from tests.gpu.cuda_syncs import device_syncs as count

    return count(function) if device.type == "cuda" else "-"


def bench_text(name, ours, theirs, device, args, tolerance) -> list:
    import torch

    contestants = {"open_clip": theirs}
    for folder in args.candidate:
        contestants[f"candidate {folder.name}"] = load_candidate(folder, ours, device)
    contestants["ours"] = ours
    rows = []
    with torch.inference_mode():
        for workload, texts in text_workloads(args.text_batch).items():
            tokens, source = tokenize(texts)
            tokens = tokens.to(device)
            lengths = (tokens.argmax(dim=-1) + 1).tolist()
            label = f"encode_text, {workload} ({min(lengths)}-{max(lengths)} tokens, sum {sum(lengths)})"
            print(f"{name} {label}: {len(lengths)} rows ({source})")
            reference = theirs.encode_text(tokens)
            calls = {who: (lambda m=m: m.encode_text(tokens)) for who, m in contestants.items()}
            seconds = timed_by_turns(calls, args.repeats, args.warmup, device)
            for who, call in calls.items():
                error = relative_error(call(), reference)
                _check(error, tolerance, f"{name} {label} {who}")
                speedup = seconds["open_clip"] / seconds[who]
                rows.append([name, label, who, f"{seconds[who] * 1e3:.1f}", f"{len(lengths) / seconds[who]:.1f}",
                             f"{speedup:.2f}x", "-" if who == "open_clip" else f"{error:.1e}",
                             device_syncs(call, device)])
            target = TEXT_SPEEDUP_TARGETS[workload]
            print(f"{name} {label}: ours {speedup:.2f}x open_clip (target >= {target}x): "
                  + ("ok" if speedup >= target else "MISSED"))

        # With a hook on the text path, clients must see the original's full shapes.
        tokens = tokenize(text_workloads(args.text_batch)["short"])[0].to(device)
        reference = theirs.encode_text(tokens)
        seen = []
        handle = ours.ln_final.register_forward_hook(lambda module, inputs, output: seen.append(tuple(output.shape)))
        try:
            hooked = ours.encode_text(tokens)
            t_hooked = timed(lambda: ours.encode_text(tokens), args.repeats, args.warmup, device)
        finally:
            handle.remove()
        full = (tokens.shape[0], ours.context_length, ours.ln_final.weight.shape[0])
        print(f"{name} encode_text with a hook on ln_final: the hook saw {seen[0]} (expected {full}): "
              + ("ok" if seen[0] == full else "WRONG"))
        error_hooked = relative_error(hooked, reference)
        _check(error_hooked, tolerance, f"{name} encode_text with a hook")
        rows.append([name, "encode_text, short, ln_final hooked", "ours", f"{t_hooked * 1e3:.1f}",
                     f"{tokens.shape[0] / t_hooked:.1f}", "-", f"{error_hooked:.1e}", "-"])

        # The text transformer called directly, sequence-first, at full length.
        x = torch.randn(ours.context_length, tokens.shape[0], full[2], device=device, dtype=ours.dtype)
        y = ours.transformer(x)
        assert y.shape == x.shape, f"model.transformer changed the shape: {tuple(y.shape)}"
    return rows


def bench_image(name, ours, theirs, device, args, tolerance) -> list:
    import torch

    n, size = args.image_batch, ours.visual.input_resolution
    images = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.inference_mode():
        if device.type == "cuda":
            images = images.half()
        error = relative_error(ours.encode_image(images), theirs.encode_image(images))
        t_theirs = timed(lambda: theirs.encode_image(images), args.repeats, args.warmup, device)
        t_ours = timed(lambda: ours.encode_image(images), args.repeats, args.warmup, device)
    _check(error, tolerance, f"{name} encode_image")
    return [[name, f"encode_image {n}x{size}px", "open_clip", f"{t_theirs * 1e3:.1f}", f"{n / t_theirs:.1f}",
             "1.0x", "-", "-"],
            [name, f"encode_image {n}x{size}px", "ours", f"{t_ours * 1e3:.1f}", f"{n / t_ours:.1f}",
             f"{t_theirs / t_ours:.2f}x", f"{error:.1e}", "-"]]


def test_images():
    """PIL images of the sizes and modes clients feed: photos, small and large, grey, palette, RGBA."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    images = []
    for width, height in [(640, 480), (1024, 768), (300, 200), (2048, 1536), (224, 224), (37, 53)]:
        images.append(Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB"))
    images.append(Image.fromarray(rng.integers(0, 256, (480, 640), dtype=np.uint8), "L"))
    images.append(images[0].convert("P"))
    images.append(Image.fromarray(rng.integers(0, 256, (480, 640, 4), dtype=np.uint8), "RGBA"))
    return images


def bench_preprocess(name, preprocess, size, args) -> list:
    import open_clip
    import torch

    theirs = open_clip.image_transform(size, is_train=False, mean=open_clip.OPENAI_DATASET_MEAN,
                                       std=open_clip.OPENAI_DATASET_STD)
    images = test_images()
    error = max(float((preprocess(im) - theirs(im)).abs().max()) for im in images)
    _check(error, 1e-6, f"{name} preprocess (absolute)")
    t_theirs = timed(lambda: [theirs(im) for im in images], args.repeats, 1, torch.device("cpu"))
    t_ours = timed(lambda: [preprocess(im) for im in images], args.repeats, 1, torch.device("cpu"))
    n = len(images)
    return [[name, f"preprocess {n} images", "open_clip", f"{t_theirs * 1e3:.1f}", f"{n / t_theirs:.0f}", "1.0x",
             "-", "-"],
            [name, f"preprocess {n} images", "ours", f"{t_ours * 1e3:.1f}", f"{n / t_ours:.0f}",
             f"{t_theirs / t_ours:.2f}x", f"{error:.1e} abs", "-"]]


def _check(error: float, tolerance: float, what: str) -> None:
    if not error <= tolerance:
        print(f"MISMATCH: {what}: relative difference {error:.2e} > {tolerance:.0e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["ViT-B/32"], choices=list(MODELS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--text-batch", type=int, default=64)
    parser.add_argument("--image-batch", type=int, default=16)
    parser.add_argument("--what", nargs="+", default=["text", "image", "preprocess"],
                        choices=["text", "image", "preprocess"])
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall",
                        help="time calls by wall time, or by this process's CPU time (use with --threads 1)")
    parser.add_argument("--candidate", type=Path, action="append", default=[],
                        help="a folder holding clip/model.py of another version, timed on the same weights")
    args = parser.parse_args()
    global clock
    clock = CLOCKS[args.clock]
    require_checkpoints(args.models, ["archive"])
    os.environ.setdefault("CLIP_BPE_PATH", str(vocabulary_path()))
    os.environ.setdefault("CLIP_OFFLINE", "1")

    import torch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print_machine()
    print(f"device: {device}; medians of {args.repeats} calls after {args.warmup} warm-up, {args.clock} time; "
          f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}\n")
    tolerance = 1e-2 if device.type == "cuda" else 1e-5
    rows = []
    for name in args.models:
        ours, preprocess, theirs = load_both(name, device)
        if "text" in args.what:
            rows += bench_text(name, ours, theirs, device, args, tolerance)
        if "image" in args.what:
            rows += bench_image(name, ours, theirs, device, args, tolerance)
        if "preprocess" in args.what:
            rows += bench_preprocess(name, preprocess, ours.visual.input_resolution, args)
        del ours, theirs
    print()
    print(table(["model", "what", "who", "ms per call", "items/s", "x open_clip", "max rel diff", "syncs/call"],
                rows))


if __name__ == "__main__":
    main()
