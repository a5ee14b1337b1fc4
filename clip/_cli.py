"""The ``clip`` command line: list, download and verify the release models; classify images; embed images or texts.

Run ``clip --help`` (the console script) or ``python -m clip --help``; every command has its own ``--help``.

Commands that run a model take ``--model`` (a release name or a checkpoint path), ``--device`` and
``--download-root``; the cache commands take ``--download-root``. User errors (a missing image, an unknown model, no
labels) end with one ``clip: error: ...`` line on stderr and a non-zero exit status, never a traceback.

``clip embed`` is built to be fanned out: ``--shard I/N`` takes a deterministic slice of the sorted inputs and
writes ``<output>.shard-I-of-N.npy`` atomically, a rerun skips the shards already written, and ``clip merge``
joins them. numpy, tqdm and the data loader are imported inside the commands that use them.
"""
import argparse
import json
import os
import re
import sys
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

__all__ = ["main", "build_parser"]

DEFAULT_MODEL = "ViT-B/32"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")

# Approximate sizes of the release files, shown by `clip models` before a file is in the cache.
_RELEASE_SIZES = {
    "RN50.pt": 256e6, "RN101.pt": 292e6, "RN50x4.pt": 422e6, "RN50x16.pt": 661e6, "RN50x64.pt": 1.35e9,
    "ViT-B-32.pt": 354e6, "ViT-B-16.pt": 351e6, "ViT-L-14.pt": 933e6, "ViT-L-14-336px.pt": 934e6,
}


class CLIError(Exception):
    """A user error: ``main`` prints ``clip: error: <message>`` and returns ``code``."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


# ----------------------------------------------------------------------------------------------------------------
# The parser


def build_parser() -> argparse.ArgumentParser:
    """The ``clip`` argument parser, one sub-command per job."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="clip",
        description="CLIP from the shell: manage the release models, classify images, embed images or texts.",
        epilog="Run 'clip COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, handler: Callable[[argparse.Namespace], int], summary: str,
                description: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=summary, description=description,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.set_defaults(handler=handler, parser=sub)
        return sub

    models = command("models", _cmd_models, "list the release models and their cache status",
                     "List the release models: file, size, and whether each is in the cache and verified.")
    _add_model_options(models, default=None, model_help="show only this model")

    download = command("download", _cmd_download, "download release models into the cache",
                       "Download release models into the cache (verified against their SHA-256), e.g.\n"
                       "  clip download ViT-B/32 RN50\n"
                       "A file already there and verified is not fetched again.")
    download.add_argument("names", nargs="*", metavar="NAME", help="release model names (see 'clip models')")
    download.add_argument("--all", action="store_true", help="download every release model")
    _add_model_options(download, default=None, model_help="a release name to download, like NAME")

    verify = command("verify", _cmd_verify, "re-hash every file of the cache",
                     "Re-hash every verified file of the cache and report each; exit status 1 if any fails.")
    _add_model_options(verify, default=None, model_help="check only this model's file")

    classify = command("classify", _cmd_classify, "zero-shot classify images against text labels",
                       "Zero-shot classification: print each image's top labels with their probabilities, e.g.\n"
                       "  clip classify photo.jpg --labels dog cat --template 'a photo of a {}.'\n"
                       "Folders are searched recursively for images.")
    classify.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders of images")
    labels = classify.add_mutually_exclusive_group(required=True)
    labels.add_argument("--labels", nargs="+", metavar="LABEL", help="the candidate labels")
    labels.add_argument("--labels-file", metavar="FILE", help="a text file with one label per line")
    classify.add_argument("--template", action="append", metavar="TEMPLATE",
                          help="prompt template with {} for the label, e.g. 'a photo of a {}.' (default: the label "
                               "itself); give it several times to average the prompts (prompt ensembling)")
    classify.add_argument("--top-k", type=_positive_int, default=5, metavar="K",
                          help="how many labels to print per image (default: 5)")
    classify.add_argument("--json", action="store_true", help="print the results as JSON")
    classify.add_argument("--batch-size", type=_positive_int, default=32, metavar="N",
                          help="images per forward pass (default: 32)")
    _add_model_options(classify)

    embed = command("embed", _cmd_embed, "embed a folder of images or a text file into a .npy file",
                    "Write L2-normalised float32 features, one row per input, to OUTPUT (.npy) and the inputs in\n"
                    "row order to OUTPUT with .txt instead of .npy (image paths relative to the folder, or the\n"
                    "texts). INPUT is a folder of images (searched recursively) or a text file (one text per line;\n"
                    "blank lines are skipped, long texts truncated). Unreadable images are reported and skipped.\n\n"
                    "Split a large job with --shard I/N (0 <= I < N): each shard takes its slice of the sorted\n"
                    "inputs and writes OUTPUT.shard-I-of-N.npy/.txt atomically; a shard already written is\n"
                    "skipped, so rerunning a job resumes it. 'clip merge OUTPUT' joins the shards.")
    embed.add_argument("input", metavar="INPUT", help="a folder of images or a text file")
    embed.add_argument("-o", "--output", required=True, metavar="OUTPUT", help="the .npy file to write")
    embed.add_argument("--batch-size", type=_positive_int, default=64, metavar="N",
                       help="inputs per forward pass (default: 64)")
    embed.add_argument("--num-workers", type=_non_negative_int, default=None, metavar="N",
                       help="image-loading worker processes (default: the CPUs available, at most 8; 0 loads in "
                            "the main process)")
    embed.add_argument("--shard", type=_shard, default=None, metavar="I/N",
                       help="process only the I-th of N equal slices of the inputs (0-based)")
    embed.add_argument("--overwrite", action="store_true", help="recompute outputs that already exist")
    embed.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _add_model_options(embed)

    merge = command("merge", _cmd_merge, "join the shards of a sharded 'clip embed' run",
                    "Join OUTPUT.shard-I-of-N.npy/.txt, I = 0..N-1, into OUTPUT (.npy) and its .txt list, in\n"
                    "shard order, which is the order of the inputs. Fails if a shard is missing.")
    merge.add_argument("output", metavar="OUTPUT", help="the --output the 'clip embed' shards were given")
    return parser


def _add_cache_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--download-root", metavar="DIR",
                        help="the cache folder (default: $CLIP_CACHE_DIR, else $XDG_CACHE_HOME/clip, else "
                             "~/.cache/clip)")


def _add_model_options(parser: argparse.ArgumentParser, default: Optional[str] = DEFAULT_MODEL,
                       model_help: Optional[str] = None) -> None:
    """--model, --device and --download-root, which every command takes so scripts can pass them uniformly."""
    parser.add_argument("-m", "--model", default=default,
                        help=model_help or f"a release name (see 'clip models') or a checkpoint path "
                                           f"(default: {DEFAULT_MODEL})")
    parser.add_argument("--device", default=None,
                        help="where to run, e.g. cpu, cuda, cuda:1 (default: cuda if available, else cpu)"
                        if default else "accepted like every command's, unused: this command runs no model")
    _add_cache_option(parser)


def _positive_int(text: str) -> int:
    value = _non_negative_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


def _shard(text: str) -> Tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not int(match.group(1)) < int(match.group(2)):
        raise argparse.ArgumentTypeError(f"expected I/N with 0 <= I < N, e.g. 0/8 for the first of 8 shards; "
                                         f"got {text!r}")
    return int(match.group(1)), int(match.group(2))


# ----------------------------------------------------------------------------------------------------------------
# Entry point


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line.

    Parameters
    ----------
    argv : sequence of str, optional
        The arguments after the program name; default ``sys.argv[1:]``.

    Returns
    -------
    int
        The exit status: 0 on success, 1 when the command failed (the reason is on stderr), 2 for usage errors,
        130 when interrupted.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return args.handler(args)
    except SystemExit as exit_:  # argparse's --help, --version and usage errors
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except CLIError as error:
        print(f"clip: error: {error}", file=sys.stderr)
        return error.code
    except KeyboardInterrupt:
        print("clip: interrupted", file=sys.stderr)
        return 130


def _show_warning(message: Warning, category: type, filename: str, lineno: int, file: Any = None,
                  line: Optional[str] = None) -> None:
    """Python warnings (a re-download, a JIT fallback) as one ``clip: warning:`` line, not a source location."""
    _warn(str(message))


def _warn(message: str) -> None:
    """A warning line on stderr that does not break a tqdm progress bar."""
    from tqdm import tqdm

    tqdm.write(f"clip: warning: {message}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------------
# clip models, download, verify


def _release_files() -> List[Tuple[str, str, str]]:
    """(name, url, file name) of every entry of the registry, read now (tests and clients replace it)."""
    from urllib.parse import urlsplit

    from . import clip as clip_module

    return [(name, url, os.path.basename(urlsplit(url).path)) for name, url in clip_module._MODELS.items()]


def _format_size(size: Optional[float]) -> str:
    if size is None:
        return "?"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}" if unit == "GB" else f"{size / scale:.0f} {unit}"
    return f"{size:.0f} B"


def _cache_status(url: str, path: str, root: Optional[str]) -> str:
    from . import _download

    try:
        if _download.cached_path(url, root) is not None:
            return "verified"
    except _download.DownloadError:  # a registry entry whose URL carries no hash: nothing to verify against
        return "cached, no hash to verify" if os.path.isfile(path) else "not cached"
    if os.path.isfile(path):
        return "cached, not verified yet (verified on first load or by 'clip download')"
    return "not cached"


def _release_or_error(name: str) -> str:
    """The registry name for ``name`` (any spelling ``load`` accepts), or load()'s unknown-name error."""
    from . import clip as clip_module

    release = clip_module._release_name(name, clip_module._MODELS)
    if release is None:
        # The same unknown-name error (with suggestions) that load() gives; a local file passes that check.
        try:
            clip_module._checkpoint_path(name, None)
        except (RuntimeError, OSError) as error:
            raise CLIError(str(error)) from None
        raise CLIError(f"{name} is a local file, not a release name: it has no place in the release cache")
    return release


def _cmd_models(args: argparse.Namespace) -> int:
    from . import _download

    folder = _download.cache_dir(args.download_root)
    only = _release_or_error(args.model) if args.model else None
    rows = []
    for name, url, file_name in _release_files():
        if only is not None and name != only:
            continue
        path = os.path.join(folder, file_name)
        size = os.path.getsize(path) if os.path.isfile(path) else _RELEASE_SIZES.get(file_name)
        rows.append((name, file_name, _format_size(size), _cache_status(url, path, args.download_root)))
    header = ("NAME", "FILE", "SIZE", "STATUS")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(3)]
    for row in [header, *rows]:
        print(f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:>{widths[2]}}  {row[3]}")
    print(f"\ncache: {folder}")
    return 0


def _cmd_download(args: argparse.Namespace) -> int:
    from . import _download
    from . import clip as clip_module

    names = args.names + ([args.model] if args.model else [])
    if not names and not args.all:
        args.parser.error("name the models to download (see 'clip models'), or pass --all")
    releases = list(clip_module._MODELS) if args.all else [_release_or_error(name) for name in names]

    folder = _download.cache_dir(args.download_root)
    failed = 0
    for release in dict.fromkeys(releases):
        url = clip_module._MODELS[release]
        try:
            path = clip_module._download(url, folder)  # looked up now: clients and tests replace it
        except (RuntimeError, OSError) as error:
            print(f"clip: error: {release}: {error}", file=sys.stderr)
            failed += 1
            continue
        print(f"{release}: {path}")
    return 1 if failed else 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from . import _download

    folder = _download.cache_dir(args.download_root)
    only = _release_or_error(args.model) if args.model else None
    files = [f for name, _url, f in _release_files() if name == only] if only else None
    results = _download.verify_cache(args.download_root, files=files)
    for result in results:
        status = "ok" if result.ok else "FAILED"
        print(f"{status:<6}  {result.path}" + ("" if result.ok else f": {result.message}"))
    checked = {os.path.abspath(result.path) for result in results}
    unchecked = 0
    for name, _url, file_name in _release_files():
        path = os.path.join(folder, file_name)
        if (only is None or name == only) and os.path.isfile(path) and os.path.abspath(path) not in checked:
            unchecked += 1
            print(f"{'-':<6}  {path}: never verified, so there is no hash on record to check; "
                  f"'clip download {name}' verifies it")
    failed = sum(not result.ok for result in results)
    if not results and not unchecked:
        print(f"no verified files in {folder}")
        return 0
    summary = f"{len(results)} file(s) checked, {failed} failed"
    if unchecked:
        summary += f", {unchecked} never verified"
    print(f"\n{summary} in {folder}")
    return 1 if failed else 0


# ----------------------------------------------------------------------------------------------------------------
# Shared by classify and embed: the model, the inputs, image loading


def _load_model(args: argparse.Namespace) -> Tuple[Any, Any, Any]:
    """(model, preprocess, device) for --model/--device/--download-root, or a CLIError that says why not."""
    import torch

    from . import clip as clip_module

    try:
        device = torch.device(args.device) if args.device else None
    except RuntimeError as error:
        raise CLIError(f"--device {args.device!r}: {error}") from None
    if device is not None and device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {args.device} was asked for, but CUDA is not available here; use --device cpu")
    try:
        model, preprocess = clip_module.load(args.model, device=device, download_root=args.download_root)
    except (RuntimeError, OSError) as error:  # unknown name, missing or unreadable file, failed download
        raise CLIError(str(error)) from None
    return model, preprocess, next(model.parameters()).device


def _list_images(folder: str) -> List[str]:
    """The image files under ``folder``, recursively, as sorted paths relative to it with ``/`` separators.

    The order depends only on the names, so every machine that sees the same tree cuts the same shards.
    """
    found = []
    for directory, _, files in os.walk(folder):
        for name in files:
            if name.lower().endswith(IMAGE_EXTENSIONS):
                relative = os.path.relpath(os.path.join(directory, name), folder)
                found.append(relative.replace(os.sep, "/"))
    return sorted(found)


class _ImageFiles:
    """A map-style dataset of preprocessed images; an unreadable image gives its error instead of a tensor.

    Items are ``(index, tensor or None, error message or None)``, so a bad file is reported by the main process and
    skipped, and never stops the run.
    """

    def __init__(self, paths: Sequence[str], preprocess: Callable):
        self.paths = list(paths)
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Tuple[int, Any, Optional[str]]:
        from PIL import Image

        try:
            with Image.open(self.paths[index]) as image:
                return index, self.preprocess(image), None
        # The one place any error is caught: a decoder can raise almost anything on a damaged file (OSError,
        # SyntaxError, ValueError, struct.error, DecompressionBombError), and each one is reported, not hidden.
        except Exception as error:  # noqa: BLE001
            return index, None, f"{type(error).__name__}: {error}"


def _collate_readable(items: List[Tuple[int, Any, Optional[str]]]) -> Tuple[List[int], Any, List[Tuple[int, str]]]:
    """Batch the readable images of ``items``: (their indices, stacked tensor or None, [(index, error)])."""
    import torch

    good = [(index, tensor) for index, tensor, _ in items if tensor is not None]
    failures = [(index, error) for index, tensor, error in items if tensor is None]
    batch = torch.stack([tensor for _, tensor in good]) if good else None
    return [index for index, _ in good], batch, failures


def _image_batches(paths: Sequence[str], preprocess: Callable, batch_size: int, num_workers: int, *,
                   progress: bool = False, errors: Optional[Dict[int, str]] = None) -> Iterator[Tuple[List[int], Any]]:
    """Yield (indices, image batch) for the readable images of ``paths``.

    Each unreadable image is named in a warning and its error stored in ``errors`` (index -> message) if given.
    """
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    loader = DataLoader(_ImageFiles(paths, preprocess), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=_collate_readable)
    with tqdm(total=len(paths), unit="image", disable=not progress, file=sys.stderr, dynamic_ncols=True) as bar:
        for indices, batch, failures in loader:
            for index, error in failures:
                _warn(f"skipping {paths[index]}: cannot read it as an image ({error})")
                if errors is not None:
                    errors[index] = error
            bar.update(len(indices) + len(failures))
            if batch is not None:
                yield indices, batch


def _normalised(features: Any) -> Any:
    import torch.nn.functional as F

    return F.normalize(features.float(), dim=-1)


# ----------------------------------------------------------------------------------------------------------------
# clip classify


def _read_labels(args: argparse.Namespace) -> List[str]:
    if args.labels_file is not None:
        try:
            with open(args.labels_file, encoding="utf-8") as f:
                labels = [line.strip() for line in f]
        except OSError as error:
            args.parser.error(f"cannot read --labels-file: {error}")
        labels = [label for label in labels if label]
        if not labels:
            args.parser.error(f"no labels in {args.labels_file}: write one label per line")
        return labels
    labels = [label.strip() for label in args.labels]
    if not all(labels):
        args.parser.error("empty label in --labels: every label needs some text")
    return labels


def _image_paths(inputs: Sequence[str]) -> List[str]:
    """Expand folders into their images; fail on a path that does not exist, before any model is loaded."""
    paths, missing = [], []
    for item in inputs:
        if os.path.isdir(item):
            found = _list_images(item)
            if not found:
                raise CLIError(f"no images in folder {item} (looked for {', '.join(IMAGE_EXTENSIONS)})")
            paths += [os.path.join(item, name) for name in found]
        elif os.path.exists(item):
            paths.append(item)
        else:
            missing.append(item)
    if missing:
        raise CLIError(f"image not found: {', '.join(missing)}")
    return paths


def _cmd_classify(args: argparse.Namespace) -> int:
    import torch

    from . import clip as clip_module

    labels = _read_labels(args)
    templates = args.template or ["{}"]
    for template in templates:
        if "{}" not in template:
            args.parser.error(f"--template {template!r} has no {{}} for the label; e.g. 'a photo of a {{}}.'")
    paths = _image_paths(args.images)
    model, preprocess, device = _load_model(args)

    with torch.inference_mode():
        # One text embedding per label: the normalised mean of its normalised prompt embeddings.
        per_template = []
        for template in templates:
            try:
                tokens = clip_module.tokenize([template.replace("{}", label) for label in labels])
            except RuntimeError as error:  # a prompt longer than the context
                raise CLIError(str(error)) from None
            per_template.append(_normalised(model.encode_text(tokens.to(device))))
        text_features = _normalised(torch.stack(per_template).mean(dim=0))  # [labels, dim]
        scale = model.logit_scale.exp().float()

        results: List[Optional[dict]] = [None] * len(paths)
        errors: Dict[int, str] = {}
        for indices, batch in _image_batches(paths, preprocess, args.batch_size, num_workers=0, errors=errors):
            image_features = _normalised(model.encode_image(batch.to(device)))  # [batch, dim]
            probabilities = (scale * image_features @ text_features.T).softmax(dim=-1)
            top = probabilities.topk(min(args.top_k, len(labels)), dim=-1)
            for row, index in enumerate(indices):
                results[index] = {"image": paths[index], "labels": [
                    {"label": labels[j], "probability": p}
                    for p, j in zip(top.values[row].tolist(), top.indices[row].tolist())]}

    if args.json:
        print(json.dumps([result or {"image": paths[i], "error": errors[i]} for i, result in enumerate(results)],
                         indent=2, ensure_ascii=False))
    else:
        for result in results:
            if result is not None:
                print(result["image"])
                for entry in result["labels"]:
                    print(f"  {100 * entry['probability']:6.2f}%  {entry['label']}")
    if errors:
        print(f"clip: error: {len(errors)} of {len(paths)} image(s) could not be read", file=sys.stderr)
    return 1 if errors else 0


# ----------------------------------------------------------------------------------------------------------------
# clip embed and clip merge


def _output_stem(output: str) -> str:
    return output[:-len(".npy")] if output.endswith(".npy") else output


def _output_paths(output: str, shard: Optional[Tuple[int, int]]) -> Tuple[str, str]:
    """The (.npy, .txt) pair an embed run writes: OUTPUT itself, or its shard's files."""
    stem = _output_stem(output)
    if shard is not None:
        index, count = shard
        stem = f"{stem}.shard-{index:0{len(str(count))}d}-of-{count}"
    return stem + ".npy", stem + ".txt"


def _write_atomically(path: str, write: Callable[[Any], None]) -> None:
    """Write ``path`` through a temporary file in its folder, moved into place only once complete."""
    temporary = f"{path}.tmp-{os.getpid()}"
    try:
        with open(temporary, "wb") as f:
            write(f)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def _save_outputs(features_path: str, list_path: str, features: Any, rows: Sequence[str]) -> None:
    """Write the row list, then the features: a run counts as finished once its .npy file exists."""
    import numpy as np

    folder = os.path.dirname(os.path.abspath(features_path))
    os.makedirs(folder, exist_ok=True)
    _write_atomically(list_path, lambda f: f.write("".join(row + "\n" for row in rows).encode("utf-8")))
    _write_atomically(features_path, lambda f: np.save(f, features, allow_pickle=False))


def _read_texts(path: str) -> List[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    except UnicodeDecodeError as error:
        raise CLIError(f"{path} is not UTF-8 text ({error}); clip embed takes a folder of images or a text file "
                       "with one text per line") from None


def _embed_inputs(path: str) -> Tuple[str, List[str]]:
    """("images", paths relative to the folder) or ("texts", lines) for an embed INPUT."""
    if os.path.isdir(path):
        images = _list_images(path)
        if not images:
            raise CLIError(f"no images in folder {path} (looked for {', '.join(IMAGE_EXTENSIONS)}, recursively)")
        skipped = [name for name in images if "\n" in name or "\r" in name]
        for name in skipped:
            _warn(f"skipping {name!r}: a line break in its name cannot be written to the file list")
        return "images", [name for name in images if name not in skipped]
    if not os.path.exists(path):
        raise CLIError(f"input not found: {path}")
    if path.lower().endswith(IMAGE_EXTENSIONS):
        raise CLIError(f"{path} is an image; clip embed takes a folder of images or a text file with one text per "
                       "line (use clip classify for single images)")
    texts = _read_texts(path)
    if not texts:
        raise CLIError(f"no texts in {path}: write one text per line")
    return "texts", texts


def _default_workers() -> int:
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(8, available)


def _cmd_embed(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from . import clip as clip_module

    features_path, list_path = _output_paths(args.output, args.shard)
    if os.path.abspath(list_path) == os.path.abspath(args.input):
        raise CLIError(f"--output {args.output} would overwrite the input {args.input} with its row list; "
                       "choose another output name")
    label = "" if args.shard is None else f"shard {args.shard[0]}/{args.shard[1]}: "
    if os.path.exists(features_path) and os.path.exists(list_path) and not args.overwrite:
        print(f"{label}{features_path} already exists; skipping (pass --overwrite to recompute it)", file=sys.stderr)
        return 0
    kind, inputs = _embed_inputs(args.input)
    if args.shard is not None:
        index, count = args.shard
        inputs = inputs[index * len(inputs) // count:(index + 1) * len(inputs) // count]

    model, preprocess, device = _load_model(args)
    batches: List[np.ndarray] = []
    rows: List[str] = []
    with torch.inference_mode():
        if kind == "images":
            workers = _default_workers() if args.num_workers is None else args.num_workers
            paths = [os.path.join(args.input, name) for name in inputs]
            for indices, batch in _image_batches(paths, preprocess, args.batch_size, workers, progress=not args.quiet):
                batches.append(_normalised(model.encode_image(batch.to(device))).cpu().numpy())
                rows += [inputs[i] for i in indices]
        else:
            from tqdm import tqdm

            for start in tqdm(range(0, len(inputs), args.batch_size), unit="batch", disable=args.quiet,
                              file=sys.stderr, dynamic_ncols=True):
                texts = inputs[start:start + args.batch_size]
                tokens = clip_module.tokenize(texts, truncate=True)  # a caption past 77 tokens keeps its start
                batches.append(_normalised(model.encode_text(tokens.to(device))).cpu().numpy())
                rows += texts

    dim = model.text_projection.shape[1]
    features = np.concatenate(batches) if batches else np.zeros((0, dim), dtype=np.float32)
    if args.overwrite and os.path.exists(features_path):
        os.remove(features_path)  # not finished again until the new files are both in place
    _save_outputs(features_path, list_path, features.astype(np.float32, copy=False), rows)
    skipped = len(inputs) - len(rows)
    print(f"{label}{len(rows)} {kind} embedded into {features_path} (rows listed in {list_path})"
          + (f"; {skipped} unreadable, skipped" if skipped else ""), file=sys.stderr)
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    import glob

    import numpy as np

    stem = _output_stem(args.output)
    pattern = re.compile(re.escape(os.path.basename(stem)) + r"\.shard-(\d+)-of-(\d+)\.npy")
    shards = {}
    for path in glob.glob(glob.escape(stem) + ".shard-*-of-*.npy"):
        match = pattern.fullmatch(os.path.basename(path))
        if match:
            shards[(int(match.group(1)), int(match.group(2)))] = path
    counts = sorted({count for _, count in shards})
    if not counts:
        raise CLIError(f"no shards of {stem}.npy found (expected {stem}.shard-I-of-N.npy from clip embed --shard)")
    if len(counts) > 1:
        raise CLIError(f"shards of {stem}.npy were cut in different ways (N = {', '.join(map(str, counts))}); "
                       "keep the shards of one run only")
    count = counts[0]
    missing = [i for i in range(count) if (i, count) not in shards]
    if missing:
        raise CLIError(f"{len(missing)} of {count} shards are missing (I = {', '.join(map(str, missing))}): run "
                       "clip embed with those --shard values first")

    features, rows = [], []
    for i in range(count):
        features_path, list_path = _output_paths(args.output, (i, count))
        if not os.path.exists(list_path):
            raise CLIError(f"{list_path} is missing: rerun that shard with --overwrite")
        shard_features = np.load(features_path, allow_pickle=False)
        with open(list_path, encoding="utf-8") as f:
            shard_rows = f.read().splitlines()
        if len(shard_rows) != len(shard_features):
            raise CLIError(f"{features_path} has {len(shard_features)} rows but {list_path} lists {len(shard_rows)}: "
                           "rerun that shard with --overwrite")
        features.append(shard_features)
        rows += shard_rows
    features_path, list_path = _output_paths(args.output, None)
    _save_outputs(features_path, list_path, np.concatenate(features), rows)
    print(f"{count} shards, {len(rows)} rows merged into {features_path} and {list_path}", file=sys.stderr)
    return 0
