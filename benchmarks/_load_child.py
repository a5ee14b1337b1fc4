"""One load in a fresh process, run by ``load.py``: prints a JSON line with the import and load times and memory.

    python benchmarks/_load_child.py LOADER PATH [--model NAME] [--device cpu] [--threads N]

Loaders:
    ours         clip.load(PATH, device, jit=False)
    ours-name    clip.load(NAME, device) from the cache folder ($CLIP_CACHE_DIR), the registry URL pointed at a
                 fake host with the file's SHA-256 (``$BENCH_SHA256``); the verified-once record makes it hash nothing
    ours-jit     clip.load(PATH, device, jit=True)
    open_clip    open_clip.load_openai_model(PATH, device=device) (float32 on CPU, float16 on CUDA)
    original     the original package's non-JIT algorithm, emulated with our modules (the package is not installed
                 here): torch.jit.load, a randomly initialised model, convert_weights, load_state_dict, .float()
    torchscript  torch.jit.load(PATH, map_location=device).float(): the floor of any JIT loader (no graph patching)
    floor        the irreducible work of a load, as one bulk operation: map the file, allocate the model's memory
                 in its final dtypes and convert the file's bytes into it (float16 -> float32 on the CPU); no
                 parsing, no modules. A loader can approach this, not beat it.

With ``$BENCH_CLIP_PATH`` set, ``clip`` is imported from that folder (a candidate change, see load.py).

Every process imports ``torch`` and ``torchvision`` first, so the import time of a loader is its own, then collects
garbage, so that no loader is charged the full collection those imports owe. Peak memory is
VmHWM after the load minus VmRSS before it (the peak is reset just before the load), so it counts only the load.
Calls to ``hashlib.sha256`` and ``torch.jit.load`` during the load are counted: a cached load by name must make none.
"""
import argparse
import gc
import hashlib
import json
import os
import sys
import time

_real_sha256 = hashlib.sha256
_counts = {"sha256_bytes": 0, "jit_load_calls": 0}


class _CountingHash:
    """Stands in for a SHA-256 object and counts the bytes it is fed."""

    def __init__(self, data: bytes = b"", **kwargs) -> None:
        self._hash = _real_sha256(**kwargs)
        if data:
            self.update(data)

    def update(self, data) -> None:
        _counts["sha256_bytes"] += memoryview(data).nbytes
        self._hash.update(data)

    def __getattr__(self, name):
        return getattr(self._hash, name)


hashlib.sha256 = _CountingHash

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if os.environ.get("BENCH_CLIP_PATH"):
    # A candidate copy of the package (load.py --candidate): its ``clip`` is imported instead of the repository's.
    sys.path.insert(0, os.environ["BENCH_CLIP_PATH"])

start = time.perf_counter()
import torch  # noqa: E402
import torchvision  # noqa: E402,F401

base_import_s = time.perf_counter() - start

from benchmarks._common import MODELS, proc_status_kib, reset_peak_rss  # noqa: E402


def _count_jit_loads() -> None:
    real = torch.jit.load

    def counting(*args, **kwargs):
        _counts["jit_load_calls"] += 1
        return real(*args, **kwargs)

    torch.jit.load = counting


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("loader")
    parser.add_argument("path")
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    start = time.perf_counter()
    if args.loader == "open_clip":
        import open_clip

        def load():
            return open_clip.load_openai_model(args.path, device=args.device)
    elif args.loader == "floor":
        def load():
            return _floor_load(args.path, args.model, device)
    elif args.loader in ("original", "torchscript"):
        import clip.model as clip_model

        load = {"original": lambda: _original_load(clip_model, args.path, device),
                "torchscript": lambda: torch.jit.load(args.path, map_location=device).eval().float()}[args.loader]
    else:
        import clip
        import clip.clip  # noqa: F401  (``import clip`` is lazy; this is the import every load pays)

        if args.loader == "ours-name":
            # The registry entry points at a host that does not exist: only a cached, recorded file can serve it.
            file = MODELS[args.model]
            clip.clip._MODELS[args.model] = f"https://clip.invalid/models/{os.environ['BENCH_SHA256']}/{file}"

            def load():
                return clip.load(args.model, device=device)[0]
        else:
            def load():
                return clip.load(args.path, device=device, jit=args.loader == "ours-jit")[0]
    import_s = time.perf_counter() - start
    _count_jit_loads()
    # The imports leave ~340,000 objects for Python's cyclic collector, which owes them a full collection (0.15 s
    # here); without this it lands in whichever load first crosses the collector's threshold, not in the loader
    # that is slower.
    gc.collect()

    before = proc_status_kib("VmRSS", "RssFile")
    if device.type == "cuda":
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats()
    reset_peak_rss()
    _counts.update(sha256_bytes=0, jit_load_calls=0)
    start, cpu_start = time.perf_counter(), time.process_time()
    model = load()
    if device.type == "cuda":
        torch.cuda.synchronize()
    load_s, cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
    counts = dict(_counts)
    after = proc_status_kib("VmRSS", "VmHWM", "RssFile")

    result = {
        "loader": args.loader,
        "base_import_s": base_import_s,
        "import_s": import_s,
        "load_s": load_s,
        "cpu_s": cpu_s,
        "base_rss": before["VmRSS"] * 1024,
        "peak_above_base": (after["VmHWM"] - before["VmRSS"]) * 1024,
        "kept_above_base": (after["VmRSS"] - before["VmRSS"]) * 1024,
        "kept_file_backed": (after["RssFile"] - before["RssFile"]) * 1024,
        **counts,
        **_describe(model),
    }
    if device.type == "cuda":
        result["cuda_peak_allocated"] = torch.cuda.max_memory_allocated()
    print(json.dumps(result))


def _original_load(clip_model, path: str, device: torch.device) -> torch.nn.Module:
    """The original package's jit=False algorithm, step by step, on our module classes."""
    import dataclasses

    archive = torch.jit.load(path, map_location="cpu").eval()
    state_dict = archive.state_dict()
    dims = clip_model.infer_dims(state_dict)
    model = clip_model.CLIP(**dataclasses.asdict(dims))  # eager: the full random initialisation
    for key in clip_model.ARCHIVE_SCALAR_KEYS:
        state_dict.pop(key, None)
    clip_model.convert_weights(model)
    model.load_state_dict(state_dict)
    model = model.to(device).eval()
    if device.type == "cpu":
        model.float()
    return model


def _floor_load(path: str, model: str, device: torch.device) -> torch.nn.Module:
    """Allocate the model's tensors in their final dtypes in one block and fill them from the mapped file's bytes."""
    from benchmarks._common import release_shapes

    numel = {"float16": 0, "float32": 0}
    for key, (shape, dtype) in release_shapes(model).items():
        if dtype in numel:
            numel[dtype] += int(torch.Size(shape).numel())
    half = device.type == "cuda"
    mapped = torch.from_file(path, shared=False, size=os.path.getsize(path), dtype=torch.uint8)
    source16 = mapped[:2 * numel["float16"]].view(torch.float16)
    source32 = mapped[2 * numel["float16"]:2 * numel["float16"] + 4 * numel["float32"]].view(torch.float32)
    module = torch.nn.Module()
    module.a = torch.nn.Parameter(source16.to(device, torch.float16 if half else torch.float32, copy=True))
    module.b = torch.nn.Parameter(source32.to(device, copy=True))
    return module


def _describe(model: torch.nn.Module) -> dict:
    """What was loaded: the floating dtypes and a checksum of the weights (equal across loaders of one file)."""
    tensors = list(model.state_dict().items())
    dtypes = sorted({str(t.dtype).replace("torch.", "") for _, t in tensors if t.is_floating_point()})
    probe = dict(tensors).get("visual.conv1.weight")
    return {
        "dtypes": dtypes,
        "params": sum(p.numel() for p in model.parameters()),
        "checksum": float(probe.double().sum()) if probe is not None else None,
    }


if __name__ == "__main__":
    main()
