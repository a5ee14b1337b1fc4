"""The work of the commands that run a model, ``clip classify`` and ``clip embed``, once ``clip._cli`` has checked
everything that needs no model: the worker-decoded image dataset, the split of the CPU cores between its workers
and the model, the encoding, the results. Their features must never differ from ``clip.load`` +
``encode_image``/``encode_text``, L2-normalised (with ``--precision bf16``, the same under CPU autocast to bfloat16).
"""
import argparse
import contextlib
import json
import os
import sys
import time
import warnings
from typing import (Any, Callable, ContextManager, Dict, FrozenSet, Iterator, List, Optional, Sequence,
                    Tuple)

import numpy as np
import torch

from . import _decode, _outputs
from ._console import CLIError, json_safe, printable, progress_bar, warn
from ._outputs import open_regular as _open_regular  # how ImageFiles opens an image: never blocking on a FIFO

# classify shows a progress bar (on a terminal) from this many images on: fewer finish before a bar means anything.
CLASSIFY_PROGRESS_FROM = 16
# How many reasons the error for a folder of unreadable images quotes: enough to tell one cause from several.
REASONS_SHOWN = 3


# ----------------------------------------------------------------------------------------------------------------
# The model and the inputs


def load_model(args: argparse.Namespace, checkpoint: str) -> Tuple[Any, Any, torch.device]:
    """(model, preprocess, device) for the checkpoint file ``--model`` led to and --device, or a CLIError that
    says why not."""
    from . import clip as clip_module

    try:
        device = torch.device(args.device) if args.device else None
    except RuntimeError as error:
        raise CLIError(f"--device {args.device!r}: {error}") from None
    if device is not None and device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {args.device} was asked for, but CUDA is not available here; use --device cpu")
    try:
        model, preprocess = clip_module.load(checkpoint, device=device)
    except (RuntimeError, OSError) as error:  # an unreadable file, or not a CLIP checkpoint
        raise CLIError(str(error)) from None
    return model, preprocess, next(model.parameters()).device


class ImageFiles:
    """A map-style dataset of preprocessed images; an unreadable image gives its error instead of a tensor.

    Items are ``(index, tensor or None, error message or None, [warning messages], decoding CPU seconds)``, so a
    bad file is reported by the main process and skipped, and never stops the run, a warning the decoder gives
    (Pillow's DecompressionBombWarning) is shown with the file's name, and the run can weigh decoding against the
    model (``split_cores``). ``n_px`` and ``auto_orient`` are ``_decode.open_image``'s (``--fast-decode`` passes
    the model's input resolution as ``n_px``); without them, the original's pixels.
    """

    def __init__(self, paths: Sequence[str], preprocess: Callable, *, n_px: Optional[int] = None,
                 auto_orient: bool = False):
        self.paths = list(paths)
        self.preprocess = preprocess
        self.n_px = n_px
        self.auto_orient = auto_orient

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Tuple[int, Optional[torch.Tensor], Optional[str], List[str], float]:
        path = self.paths[index]
        tensor, error, file = None, None, None
        start = time.thread_time()  # this thread's CPU time: what the image cost, whatever else runs beside it
        # Entering catch_warnings also resets the once-per-place memory of warnings, so each image's own is seen.
        with warnings.catch_warnings(record=True) as caught:
            try:
                with _open_regular(path) as file, \
                        _decode.open_image(file, self.n_px, auto_orient=self.auto_orient) as image:
                    tensor = self.preprocess(image)
            # The one place any error is caught: a decoder can raise almost anything on a damaged file (OSError,
            # SyntaxError, ValueError, struct.error, DecompressionBombError), and each one is reported, not hidden.
            except Exception as failure:  # noqa: BLE001
                text = str(failure)
                if file is not None:  # Pillow names an open file by its repr ("<_io.BufferedReader name=12>")
                    text = text.replace(repr(file), repr(path))
                error = f"{type(failure).__name__}: {printable(text)}"
        notes = [f"{type(note.message).__name__}: {printable(str(note.message))}" for note in caught]
        return index, tensor, error, notes, time.thread_time() - start


def _collate_readable(items: List[Tuple[int, Any, Optional[str], List[str], float]]
                      ) -> Tuple[List[int], Any, List[Tuple[int, str]], List[Tuple[int, str]], float]:
    """Batch the readable images of ``items``: (their indices, stacked tensor or None, [(index, error)],
    [(index, warning)], the CPU seconds their decoding took).

    In a worker process the batch is stacked straight into shared memory, as torch's default collate does, so that
    handing it to the main process copies nothing.
    """
    from torch.utils.data import get_worker_info

    good = [(index, tensor) for index, tensor, _, _, _ in items if tensor is not None]
    failures = [(index, error) for index, tensor, error, _, _ in items if tensor is None]
    notes = [(index, note) for index, _, _, notes, _ in items for note in notes]
    batch = None
    if good:
        tensors = [tensor for _, tensor in good]
        out = None
        if get_worker_info() is not None:
            out = torch.empty((len(tensors), *tensors[0].shape), dtype=tensors[0].dtype).share_memory_()
        batch = torch.stack(tensors, out=out)  # [batch, 3, n_px, n_px]
    return [index for index, _ in good], batch, failures, notes, sum(item[4] for item in items)


# How many batches a balanced run (``image_batches(balance=True)``) takes to measure before it splits the cores: the
# model's time comes from the first (the second is in hand when the choice is made, so the new workers start
# decoding while the model runs it, and the model never waits for their start).
PROBE_BATCHES = 2
MAX_WORKERS = 16  # decoding processes at most: past 16, their start-up outweighs what they add


def image_batches(paths: Sequence[str], preprocess: Callable, batch_size: int, num_workers: int, *,
                  pin_memory: bool = False, balance: bool = False, n_px: Optional[int] = None,
                  auto_orient: bool = False
                  ) -> Iterator[Tuple[List[int], Optional[torch.Tensor], List[Tuple[int, str]]]]:
    """Yield (indices, image batch or None, [(index, error)]) for ``paths``, decoded by ``num_workers`` processes
    that work ahead of the model (0: in this process). Each unreadable image, and each warning about an image, is
    named in a warning line. ``n_px`` and ``auto_orient``: as ``ImageFiles``.

    ``balance`` (the CPU, when the user left the worker count to us): ``num_workers`` only starts the run. The
    first ``PROBE_BATCHES`` batches measure decoding (CPU seconds per image, in the workers) and the model (the
    time the caller holds a batch, times torch's threads); the rest of the run gets the workers and torch threads
    that ``split_cores`` chooses for them (never more threads than torch had). torch's thread count is restored at
    the end.
    """
    from torch.utils.data import DataLoader

    dataset = ImageFiles(paths, preprocess, n_px=n_px, auto_orient=auto_orient)

    def batches(start: int, stop: int, workers: int) -> Iterator:
        # A range as the sampler: the same batches, in the same order, as one loader over all the paths would cut.
        return iter(DataLoader(dataset, batch_size=batch_size, sampler=range(start, stop), num_workers=workers,
                               collate_fn=_collate_readable, pin_memory=pin_memory))

    probe = min(len(paths), PROBE_BATCHES * batch_size) if balance else len(paths)
    threads = torch.get_num_threads()
    decode_seconds, decoded, model_seconds, encoded = 0.0, 0, 0.0, 0
    rest: Iterator = iter(())
    try:
        for number, (indices, batch, failures, notes, seconds) in enumerate(batches(0, probe, num_workers)):
            decode_seconds, decoded = decode_seconds + seconds, decoded + len(indices) + len(failures)
            if number == PROBE_BATCHES - 1 and probe < len(paths):
                workers = num_workers
                if encoded:
                    # The cores this run was given (torch's threads and its first workers), not every core
                    # the machine has: OMP_NUM_THREADS or a container quota may have given it fewer.
                    cores = min(available_cores(), threads + num_workers)
                    workers, model_threads = split_cores(decode_seconds / decoded,
                                                         model_seconds * threads / encoded, cores)
                    workers = min(workers, MAX_WORKERS)
                    torch.set_num_threads(min(model_threads, threads))  # never more than torch was given
                rest = batches(probe, len(paths), workers)  # its workers start now, while the model runs this one
            _report(paths, notes, failures)
            start = time.perf_counter()
            yield indices, batch, failures
            if batch is not None:
                model_seconds, encoded = model_seconds + time.perf_counter() - start, encoded + len(indices)
        for indices, batch, failures, notes, _ in rest:
            _report(paths, notes, failures)
            yield indices, batch, failures
    finally:
        torch.set_num_threads(threads)


def _report(paths: Sequence[str], notes: List[Tuple[int, str]], failures: List[Tuple[int, str]]) -> None:
    for index, note in notes:
        warn(f"{printable(paths[index])}: {note}")
    for index, error in failures:
        warn(f"skipping {printable(paths[index])}: cannot read it as an image ({error})")


def split_cores(decode_seconds: float, model_seconds: float, cores: int) -> Tuple[int, int]:
    """(decoding worker processes, torch threads for the model) for ``cores`` CPU cores, from the CPU seconds
    decoding and preprocessing take per image and the model's CPU seconds per image (its time x its threads).

    The rule: giving ``w`` cores to ``w`` workers and the other ``cores - w`` to the model's threads runs at
    ``min(w / decode, (cores - w) / model)`` images/s, with no core shared. Sharing (one worker decoding ahead of
    a model on every core, which suits small images, whose decoding is a few percent of the work) runs at least
    at ``1 / (decode + model / cores)``: each image's decoding at worst holds up the whole model, as a worker
    that preempts one of the model's threads stalls the others at their next barrier. The fastest wins; sharing
    on a tie, as it keeps the model's full width.
    """
    best_rate, best = 1 / (decode_seconds + model_seconds / cores), (1, cores)
    for workers in range(1, cores):
        rate = min(workers / decode_seconds if decode_seconds else float("inf"), (cores - workers) / model_seconds)
        if rate > best_rate:
            best_rate, best = rate, (workers, cores - workers)
    return best


def available_cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def normalised(features: torch.Tensor) -> torch.Tensor:
    """Float32 rows of unit length, so a dot product is a cosine similarity."""
    return torch.nn.functional.normalize(features.float(), dim=-1)


def _show_progress(args: argparse.Namespace) -> Optional[bool]:
    """-q: never; --progress: always; otherwise only on a terminal."""
    return False if args.quiet else (True if args.progress else None)


def default_workers(device: torch.device) -> int:
    """Image-loading processes: on CUDA enough to keep the model fed (one decodes a fraction of what the model
    eats); on the CPU one to start with, decoding ahead of a model on every core, until the first batches say how
    to split the cores (``image_batches(balance=True)``)."""
    return min(available_cores(), MAX_WORKERS) if device.type == "cuda" else 1


def decoding_options(args: argparse.Namespace, model: Any, device: torch.device, count: int,
                     batch_size: int) -> Dict[str, Any]:
    """``image_batches``' keywords for a command's ``count`` images: the workers (``--num-workers`` as given, else
    ``default_workers``, balanced on the CPU; ``classify`` of one batch decodes in this process, as a worker's
    start would cost more than it saves), ``--fast-decode`` (the model's input resolution) and ``--auto-orient``."""
    workers = getattr(args, "num_workers", None)  # classify has no --num-workers
    chosen = workers is None and (args.command == "embed" or count > batch_size)
    return {"num_workers": default_workers(device) if chosen else (workers or 0),
            "balance": chosen and device.type == "cpu",
            "n_px": model.visual.input_resolution if args.fast_decode else None, "auto_orient": args.auto_orient}


def default_batch_size(device: torch.device) -> int:
    # On the CPU a bigger batch gains nothing and delays the first result; a GPU needs large batches to be busy.
    return 256 if device.type == "cuda" else 32


# ----------------------------------------------------------------------------------------------------------------
# Precision (--precision bf16)

# Feature flags, as Linux's /proc/cpuinfo names them, of CPUs whose instructions multiply bfloat16 matrices:
# x86's AVX512-BF16 and AMX-BF16, Arm's BF16 extension. Without one, torch converts every element and runs
# bfloat16 several times slower than float32 (5x on an AVX2 EPYC, benchmarks/README.md).
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
CPUINFO = "/proc/cpuinfo"


def cpu_flags(path: Optional[str] = None) -> Optional[FrozenSet[str]]:
    """The CPU's feature flags from Linux's ``/proc/cpuinfo`` (x86 ``flags``, Arm ``Features``); an empty set
    where the file has neither line (RISC-V, POWER, s390x: no native bfloat16 flag known); None where the file is
    missing, unreadable or empty (macOS, Windows, some containers), so nothing is known."""
    read = False
    try:
        with open(path or CPUINFO, encoding="utf-8", errors="replace") as f:
            for line in f:
                read = True
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        return None
    return frozenset() if read else None


def bf16_decision(device_type: str, flags: Optional[FrozenSet[str]], force: bool) -> Tuple[bool, Optional[str]]:
    """For ``--precision bf16``: (run the model under CPU autocast to bfloat16?, the one-line warning to show, if
    any), from the device type, the CPU's flags (``cpu_flags``) and ``--force-precision``."""
    if device_type != "cpu":
        return False, (f"--precision bf16 applies to the CPU; on {device_type} the model runs in the release's "
                       "float16 weights, as clip.load gives them: running that")
    if force:
        return True, None
    if flags is None:
        reason = f"cannot tell whether this CPU computes bfloat16 natively ({CPUINFO} is not readable)"
    elif not flags:
        reason = (f"no native bfloat16 flags are known for this CPU ({CPUINFO} lists no x86 flags or Arm "
                  "features), so it may be slower")
    elif not flags & NATIVE_BF16_FLAGS:
        reason = "this CPU has no native bfloat16 (no avx512_bf16, amx_bf16 or bf16 flag), so it would be slower"
    else:
        return True, None
    return False, f"--precision bf16: {reason}; running float32 (--force-precision runs bfloat16 anyway)"


def precision_context(args: argparse.Namespace, device: torch.device) -> Tuple[Callable[[], ContextManager], str]:
    """What to run each encode call in, and how the rows are computed in words (for the record): nothing for the
    model as clip.load gives it (float32 on the CPU, the release's float16 elsewhere), or CPU autocast to bfloat16,
    where only the matrix products and convolutions take bfloat16 inputs (CLIP's LayerNorm computes in float32
    either way). Warns, in one line, when bf16 was asked for but does not run."""
    as_loaded = (contextlib.nullcontext, f"{'float32' if device.type == 'cpu' else 'float16'} on {device.type}")
    if args.precision != "bf16":
        return as_loaded
    use, message = bf16_decision(device.type, cpu_flags() if device.type == "cpu" else None, args.force_precision)
    if message:
        warn(message)
    if not use:
        return as_loaded
    return (lambda: torch.autocast("cpu", dtype=torch.bfloat16)), "bfloat16 autocast on cpu"


# ----------------------------------------------------------------------------------------------------------------
# clip classify


def _text_features(model: Any, device: torch.device, labels: Sequence[str], templates: Sequence[str],
                   cast: Callable[[], ContextManager] = contextlib.nullcontext) -> torch.Tensor:
    """One text embedding per label: the normalised mean of its normalised prompt embeddings, [labels, dim]."""
    from . import clip as clip_module

    per_template = []
    for template in templates:
        try:
            tokens = clip_module.tokenize([template.replace("{}", label) for label in labels])
        except RuntimeError as error:  # a prompt longer than the context
            raise CLIError(str(error)) from None
        with cast():
            features = model.encode_text(tokens.to(device))
        per_template.append(normalised(features))
    return normalised(torch.stack(per_template).mean(dim=0))  # [templates, labels, dim] -> [labels, dim]


def cmd_classify(args: argparse.Namespace, checkpoint: str, labels: Sequence[str], templates: Sequence[str],
                 paths: Sequence[str]) -> int:
    """Classify ``paths`` against ``labels`` (checked by ``clip._cli``) with the model in ``checkpoint``."""
    model, preprocess, device = load_model(args, checkpoint)
    cast, _ = precision_context(args, device)
    show = _show_progress(args)
    if show is None and len(paths) < CLASSIFY_PROGRESS_FROM:
        show = False

    results: List[Optional[dict]] = [None] * len(paths)
    errors: Dict[int, str] = {}
    with torch.inference_mode(), progress_bar(len(paths), "image", show) as bar:
        text_features = _text_features(model, device, labels, templates, cast)
        scale = model.logit_scale.exp().float()
        decoding = decoding_options(args, model, device, len(paths), args.batch_size)
        for indices, batch, failures in image_batches(paths, preprocess, args.batch_size, **decoding):
            errors.update(failures)
            if batch is not None:
                with cast():
                    image_features = model.encode_image(batch.to(device))
                image_features = normalised(image_features)  # [batch, dim]
                probabilities = (scale * image_features @ text_features.T).softmax(dim=-1)  # [batch, labels]
                top = probabilities.topk(min(args.top_k, len(labels)), dim=-1)
                for row, index in enumerate(indices):
                    results[index] = {"image": paths[index], "labels": [
                        {"label": labels[j], "probability": p}
                        for p, j in zip(top.values[row].tolist(), top.indices[row].tolist())]}
            bar.update(len(indices) + len(failures))

    if args.json:
        print(json_safe(json.dumps([result or {"image": paths[i], "error": errors[i]}
                                    for i, result in enumerate(results)], indent=2, ensure_ascii=False)))
    else:
        for result in results:
            if result is not None:
                print(printable(result["image"]))
                for entry in result["labels"]:
                    print(f"  {100 * entry['probability']:6.2f}%  {printable(entry['label'])}")
    if errors:
        print(f"clip: error: {len(errors)} of {len(paths)} image(s) could not be read", file=sys.stderr)
    return 1 if errors else 0


# ----------------------------------------------------------------------------------------------------------------
# clip embed


def _embed_images(model: Any, preprocess: Callable, device: torch.device, folder: str, names: Sequence[str],
                  batch_size: int, decoding: Dict[str, Any], bar: Any,
                  cast: Callable[[], ContextManager] = contextlib.nullcontext
                  ) -> Tuple[np.ndarray, List[int], List[str]]:
    """(features of the readable images, their positions in ``names``, the first reasons an image was unreadable),
    counted on ``bar`` as they are embedded; ``decoding``: ``image_batches``' keywords (``decoding_options``)."""
    features = np.empty((len(names), model.visual.output_dim), dtype=np.float32)  # filled in place: no concatenation
    done: List[int] = []
    reasons: List[str] = []
    paths = [os.path.join(folder, name) for name in names]
    batches = image_batches(paths, preprocess, batch_size, pin_memory=device.type == "cuda", **decoding)
    for indices, batch, failures in batches:
        if batch is not None:
            with cast():
                rows = model.encode_image(batch.to(device, non_blocking=True))
            rows = normalised(rows)  # [batch, dim]
            features[len(done):len(done) + len(indices)] = rows.cpu().numpy()
            done += indices
        reasons += [f"{printable(names[index])}: {error}" for index, error in failures][:REASONS_SHOWN - len(reasons)]
        bar.update(len(indices) + len(failures))
    return features[:len(done)], done, reasons


def _embed_texts(model: Any, device: torch.device, texts: Sequence[str], batch_size: int, bar: Any,
                 cast: Callable[[], ContextManager] = contextlib.nullcontext) -> np.ndarray:
    from . import clip as clip_module

    features = np.empty((len(texts), model.text_projection.shape[1]), dtype=np.float32)
    for start in range(0, len(texts), batch_size):
        tokens = clip_module.tokenize(texts[start:start + batch_size], truncate=True)  # a long caption keeps its start
        with cast():
            rows = model.encode_text(tokens.to(device))
        rows = normalised(rows)  # [batch, dim]
        features[start:start + len(rows)] = rows.cpu().numpy()
        bar.update(len(rows))
    return features


def cmd_embed(args: argparse.Namespace, checkpoint: str, kind: str, inputs: Sequence[str], record: _outputs.Record,
              features_path: str, list_path: str, label: str) -> int:
    """Embed ``inputs`` (this run's slice, checked by ``clip._cli``) with the model in ``checkpoint`` and write
    them, with ``record``, to ``features_path`` and ``list_path``."""
    model, preprocess, device = load_model(args, checkpoint)
    cast, computed = precision_context(args, device)
    batch_size = args.batch_size or default_batch_size(device)
    unit = kind[:-1]  # "image" or "text"
    with torch.inference_mode(), progress_bar(len(inputs), unit, _show_progress(args), description=label) as bar:
        if kind == "images":
            decoding = decoding_options(args, model, device, len(inputs), batch_size)
            features, positions, reasons = _embed_images(model, preprocess, device, args.input, inputs, batch_size,
                                                         decoding, bar, cast)
            rows = [inputs[i] for i in positions]
        else:
            features, rows = _embed_texts(model, device, inputs, batch_size, bar, cast), inputs

    if inputs and not rows:
        # Written out, an empty result would count as finished, and a rerun would skip it: report it as a failure.
        more = "; ..." if len(inputs) > len(reasons) else ""
        raise CLIError(f"{label}none of the {len(inputs)} images could be read, so nothing was written ("
                       f"{'; '.join(reasons)}{more}); fix them, or the disk or mount they are on, and run again")
    _outputs.save_outputs(features_path, list_path, features, rows, dict(record, computed=computed))
    skipped = len(inputs) - len(rows)
    print(f"{label}{len(rows)} {unit if len(rows) == 1 else kind} embedded into {printable(features_path)} (rows "
          f"listed in {printable(list_path)})" + (f"; {skipped} unreadable, skipped" if skipped else ""),
          file=sys.stderr)
    return 0
