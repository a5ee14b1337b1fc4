"""The ``clip`` command line: the parser, the entry point, the commands that run no model (``models``,
``download``, ``verify``, ``merge``), and everything ``classify`` and ``embed`` check before their work. None of
it imports torch: the model commands' work lives in ``clip._embed``, imported only once every check has passed.
"""
import argparse
import os
import re
import signal
import sys
import warnings
from typing import Any, Callable, List, NoReturn, Optional, Sequence, Tuple

from . import _cache, _inputs, _outputs, _registry
from ._console import CLIError, printable, warn

__all__ = ["main", "build_parser"]

DEFAULT_MODEL = "ViT-B/32"
# The exit status after a closed pipe (``clip models | head -1``): 128 + SIGPIPE, as a shell reports a command that
# a closed pipe stopped; the pipeline's own status is the reader's.
CLOSED_PIPE = 128 + getattr(signal, "SIGPIPE", 13)

# ----------------------------------------------------------------------------------------------------------------
# The parser


class _Parser(argparse.ArgumentParser):
    """argparse's parser, with a usage error as one ``clip: error:`` line that points to ``--help``, like every
    other error of the command (argparse prints the whole usage first)."""

    def error(self, message: str) -> "NoReturn":
        self.exit(2, f"clip: error: {error_line(message)} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``clip`` argument parser, one sub-command per job."""
    parser = _Parser(
        prog="clip",
        description="CLIP from the shell: manage the release models, classify images, embed images or texts.",
        epilog="Run 'clip COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, handler: Callable[[argparse.Namespace], int], summary: str,
                description: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=summary, description=description,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.set_defaults(handler=handler, parser=sub)
        return sub

    models = command("models", _cmd_models, "list the release models and their cache status",
                     "List the release models: file, size, and whether each is in the cache and verified.")
    _add_release_options(models, "show only this model")

    download = command("download", _cmd_download, "download release models into the cache",
                       "Download release models into the cache (verified against their SHA-256), e.g.\n"
                       "  clip download ViT-B/32 RN50\n"
                       "A file already there and verified is not fetched again.")
    download.add_argument("names", nargs="*", metavar="NAME", help="release model names (see 'clip models')")
    download.add_argument("--all", action="store_true", help="download every release model")
    _add_release_options(download, "a release name to download, like NAME")

    verify = command("verify", _cmd_verify, "re-hash every file of the cache",
                     "Re-hash every verified file of the cache and report each; exit status 1 if any fails.")
    _add_release_options(verify, "check only this model's file")

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
    _add_progress_options(classify, "no progress bar (shown on a terminal from 16 images on)")
    _add_model_options(classify)
    _add_precision_options(classify)
    _add_decode_options(classify)

    embed = command("embed", _cmd_embed, "embed a folder of images or a text file into a .npy file",
                    "Write L2-normalised float32 features, one row per input, to OUTPUT (.npy) and the inputs in\n"
                    "row order to OUTPUT with .txt instead of .npy (image paths relative to the folder, or the\n"
                    "texts, one per line, escaped as the README's 'embed' section says). INPUT is a folder of\n"
                    "images (searched recursively) or a text file (one text per line; blank lines are skipped, long\n"
                    "texts truncated). Unreadable images are reported and skipped.\n\n"
                    "Beside them, OUTPUT with .json records what the rows were made from (model, inputs, options):\n"
                    "outputs already made from the same are kept and the run skipped; made from others, they are\n"
                    "recomputed (--keep-existing: refused instead).\n\n"
                    "Split a large job with --shard I/N (0 <= I < N): each shard takes its slice of the sorted\n"
                    "inputs and writes OUTPUT.shard-I-of-N.npy/.txt/.json; a shard already written from the\n"
                    "same job is skipped, so rerunning a job resumes it. 'clip merge OUTPUT' joins the shards.")
    embed.add_argument("input", metavar="INPUT", help="a folder of images or a text file")
    embed.add_argument("-o", "--output", required=True, metavar="OUTPUT", help="the .npy file to write")
    embed.add_argument("--batch-size", type=_positive_int, default=None, metavar="N",
                       help="inputs per forward pass (default: 256 on CUDA, 32 on the CPU)")
    embed.add_argument("--num-workers", type=_non_negative_int, default=None, metavar="N",
                       help="image-decoding worker processes, which work ahead of the model (default: on the "
                            "CPU, chosen with torch's thread count from what the first batches measure; on CUDA "
                            "the CPUs available, at most 16; 0 decodes in the main process)")
    embed.add_argument("--shard", type=_shard, default=None, metavar="I/N",
                       help="process only the I-th of N equal slices of the inputs (0-based)")
    existing = embed.add_mutually_exclusive_group()
    existing.add_argument("--overwrite", action="store_true", help="recompute outputs that already exist")
    existing.add_argument("--keep-existing", action="store_true",
                          help="never replace outputs made from other inputs, model or options: stop with an error")
    _add_progress_options(embed, "no progress bar (shown when stderr is a terminal)")
    _add_model_options(embed)
    _add_precision_options(embed)
    _add_decode_options(embed)

    merge = command("merge", _cmd_merge, "join the shards of a sharded 'clip embed' run",
                    "Join OUTPUT.shard-I-of-N.npy/.txt, I = 0..N-1, into OUTPUT (.npy) and its .txt list, in\n"
                    "shard order, which is the order of the inputs. Fails if a shard is missing, or if the shards'\n"
                    "records (.json) say they were cut from different inputs, models or options. Outputs merged\n"
                    "from the same shards already are kept, and the merge skipped, unless --overwrite is given.")
    merge.add_argument("output", metavar="OUTPUT", help="the --output the 'clip embed' shards were given")
    merge.add_argument("--overwrite", action="store_true", help="merge again into outputs that already exist")
    return parser


def _add_progress_options(parser: argparse.ArgumentParser, quiet_help: str) -> None:
    shown = parser.add_mutually_exclusive_group()
    shown.add_argument("-q", "--quiet", action="store_true", help=quiet_help)
    shown.add_argument("--progress", action="store_true",
                       help="show the progress bar (rows done, rate, time left) even when stderr is not a terminal")


def _add_precision_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="fp32: the model as clip.load gives it (default); bf16: on the CPU, run it under "
                             "bfloat16 autocast, faster where the CPU computes bfloat16 natively (AVX512-BF16, "
                             "AMX), at a small cost in accuracy (see the README); elsewhere it says so and runs "
                             "fp32. On CUDA the model runs in the release's float16 either way")
    parser.add_argument("--force-precision", action="store_true",
                        help="run --precision bf16 even on a CPU without native bfloat16 (several times slower)")


def _add_decode_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fast-decode", action="store_true",
                        help="decode JPEGs at a reduced size (1/2, 1/4 or 1/8, keeping both sides at least twice "
                             "the model's input), then preprocess as usual: several times less decoding on large "
                             "photos, features very close to the exact ones (see the README); other formats, and "
                             "small JPEGs, are decoded in full. Default: the original's pixels exactly")
    parser.add_argument("--auto-orient", action="store_true",
                        help="turn each image as its EXIF orientation says, as a photo viewer shows it (default: the "
                             "stored pixels, as the original embeds them)")


def _add_cache_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--download-root", metavar="DIR",
                        help="the cache folder (default: $CLIP_CACHE_DIR, else ~/.cache/clip)")


def _add_release_options(parser: argparse.ArgumentParser, model_help: str) -> None:
    """--model (one release) and --download-root, for the commands that manage the cache and run no model."""
    parser.add_argument("-m", "--model", default=None, help=model_help)
    _add_cache_option(parser)


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    """--model, --device and --download-root, for the commands that run a model."""
    parser.add_argument("-m", "--model", default=DEFAULT_MODEL,
                        help=f"a release name (see 'clip models') or a checkpoint path (default: {DEFAULT_MODEL})")
    parser.add_argument("--device", default=None,
                        help="where to run, e.g. cpu, cuda, cuda:1 (default: cuda if available, else cpu)")
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
    if int(match.group(2)) > _outputs.MAX_SHARDS:
        raise argparse.ArgumentTypeError(f"N is at most {_outputs.MAX_SHARDS}; got {text!r}")
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
        130 when interrupted, 141 (`CLOSED_PIPE`) when the reader of its output went away, with nothing said.
    """
    try:
        code = _run(argv)
        sys.stdout.flush()  # here, where a closed pipe is caught, rather than at exit
        return code
    except BrokenPipeError:  # the reader went away (clip models | head -1): what it wanted, it has read
        _quiet_closed_pipe()
        return CLOSED_PIPE


def _run(argv: Optional[Sequence[str]]) -> int:
    try:
        parser = build_parser()
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
        print(f"clip: error: {error_line(str(error))}", file=sys.stderr)
        return error.code
    except KeyboardInterrupt:
        print("clip: interrupted", file=sys.stderr)
        return 130


def error_line(message: str) -> str:
    """A message as one line for ``clip: error:``: its lines joined, each control character escaped."""
    return printable(" ".join(line.strip() for line in message.splitlines() if line.strip()))


def _quiet_closed_pipe() -> None:
    """Point stdout at the null device, so that Python's flush at exit meets no closed pipe and prints nothing."""
    try:
        descriptor = os.open(os.devnull, os.O_WRONLY)
        os.dup2(descriptor, sys.stdout.fileno())
        os.close(descriptor)
    except (OSError, ValueError, AttributeError):  # no real stdout (captured by a test, or closed)
        pass


def _version() -> str:
    """This package's version. Whether the package is ours (not another distribution's files over it) was checked
    before this module was imported, by ``clip_dropin_launcher``, where the ``clip`` command starts."""
    from . import __version__

    return __version__


def _show_warning(message: Warning, category: type, filename: str, lineno: int, file: Any = None,
                  line: Optional[str] = None) -> None:
    """Python warnings (a re-download, a JIT fallback) as one ``clip: warning:`` line, not a source location."""
    warn(str(message))


# ----------------------------------------------------------------------------------------------------------------
# clip models, download, verify: the registry, without importing torch


def _release_files() -> List[Tuple[str, str, str]]:
    """(name, url, file name) of every entry of the registry, ``_registry.MODELS`` read at call time (tests point
    it at files served on 127.0.0.1)."""
    return [(name, url, _registry.file_name(url)) for name, url in _registry.MODELS.items()]


def _format_size(size: Optional[float]) -> str:
    if size is None:
        return "?"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}" if unit == "GB" else f"{size / scale:.0f} {unit}"
    return f"{size:.0f} B"


def _cache_status(url: str, path: str, root: Optional[str]) -> str:
    try:
        _cache.sha256_from_url(url)
    except _cache.DownloadError:  # a registry entry whose URL carries no hash: nothing to verify against
        return "cached, no hash to verify" if os.path.isfile(path) else "not cached"
    try:
        if _cache.cached_path(url, root) is not None:
            return "verified"
    except _cache.DownloadError as error:  # the folder cannot be looked into: its cause, not "not cached"
        raise CLIError(str(error)) from None
    if os.path.isfile(path):
        return "cached, not verified yet (verified on first load or by 'clip download')"
    return "not cached"


def _release_or_error(name: str) -> str:
    """The registry name for ``name`` (any spelling ``load`` accepts), or load()'s unknown-name error."""
    model = _inputs.find_model(name)
    if model.url is None:
        raise CLIError(f"{printable(name)} is a local file, not a release name: it has no place in the release cache")
    return model.name


def _cmd_models(args: argparse.Namespace) -> int:
    folder = _cache.cache_dir(args.download_root)
    only = _release_or_error(args.model) if args.model else None
    rows = []
    for name, url, file_name in _release_files():
        if only is not None and name != only:
            continue
        path = os.path.join(folder, file_name)
        size = os.path.getsize(path) if os.path.isfile(path) else _registry.APPROXIMATE_SIZES.get(file_name)
        rows.append((name, file_name, _format_size(size), _cache_status(url, path, args.download_root)))
    header = ("NAME", "FILE", "SIZE", "STATUS")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(3)]
    for row in [header, *rows]:
        print(f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:>{widths[2]}}  {row[3]}")
    print(f"\ncache: {folder}")
    return 0


def _cmd_download(args: argparse.Namespace) -> int:
    names = args.names + ([args.model] if args.model else [])
    if not names and not args.all:
        args.parser.error("name the models to download (see 'clip models'), or pass --all")
    releases = list(_registry.MODELS) if args.all else [_release_or_error(name) for name in names]

    folder = _cache.cache_dir(args.download_root)
    failed = 0
    for release in dict.fromkeys(releases):
        try:
            path = _cache.download(_registry.MODELS[release], folder)
        except (RuntimeError, OSError) as error:
            print(f"clip: error: {release}: {error_line(str(error))}", file=sys.stderr)
            failed += 1
            continue
        print(f"{release}: {path}")
    return 1 if failed else 0


def _cmd_verify(args: argparse.Namespace) -> int:
    folder = _cache.cache_dir(args.download_root)
    only = _release_or_error(args.model) if args.model else None
    files = [f for name, _url, f in _release_files() if name == only] if only else None
    try:
        results = _cache.verify_cache(args.download_root, files=files)
    except _cache.DownloadError as error:  # the folder cannot be listed
        raise CLIError(str(error)) from None
    checked = {os.path.abspath(result.path) for result in results}
    # A release file without a record (put there by hand, as the download error suggests): hashed against the
    # registry's SHA-256, which its URL carries.
    for name, url, file_name in _release_files():
        path = os.path.join(folder, file_name)
        if (only is None or name == only) and os.path.lexists(path) and os.path.abspath(path) not in checked:
            try:
                expected = _cache.sha256_from_url(url)
            except _cache.DownloadError:  # a registry entry whose URL carries no hash: nothing to verify against
                continue
            results.append(_cache.check_file(path, expected))
    for result in sorted(results, key=lambda result: result.path):
        status = "ok" if result.ok else "FAILED"
        print(f"{status:<6}  {result.path}" + ("" if result.ok else f": {result.message}"))
    failed = sum(not result.ok for result in results)
    if not results:
        print(f"no verified files in {folder}")
        return 0
    print(f"\n{len(results)} file(s) checked, {failed} failed in {folder}")
    return 1 if failed else 0


# ----------------------------------------------------------------------------------------------------------------
# clip merge


def _cmd_merge(args: argparse.Namespace) -> int:
    features_path, _ = _outputs.output_paths(args.output, None)
    with _outputs.writing(features_path):
        merged = _outputs.merge(args.output, overwrite=args.overwrite)
    if merged is None:
        print(f"{printable(features_path)} already exists, merged from the same shards; skipping (pass --overwrite "
              "to merge again)", file=sys.stderr)
        return 0
    count, rows, features_path, list_path = merged
    print(f"{count} shards, {rows} rows merged into {printable(features_path)} and {printable(list_path)}",
          file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------------------------------------------
# clip classify and clip embed: every check before the work, then the work (clip._embed, which imports torch)


def _check_precision(args: argparse.Namespace) -> None:
    if args.force_precision and args.precision != "bf16":
        args.parser.error("--force-precision applies to --precision bf16 only; add --precision bf16, or drop it")


def _read_labels(args: argparse.Namespace) -> List[str]:
    if args.labels_file is not None:
        try:
            labels = _inputs.read_lines(args.labels_file)
        except (OSError, UnicodeDecodeError) as error:
            args.parser.error(f"cannot read --labels-file: {error}")
        if not labels:
            args.parser.error(f"no labels in {args.labels_file}: write one label per line")
        return labels
    labels = [label.strip() for label in args.labels]
    if not all(labels):
        args.parser.error("empty label in --labels: every label needs some text")
    return labels


def _cmd_classify(args: argparse.Namespace) -> int:
    _check_precision(args)
    labels = _read_labels(args)
    templates = args.template or ["{}"]
    for template in templates:
        if "{}" not in template:
            args.parser.error(f"--template {template!r} has no {{}} for the label; e.g. 'a photo of a {{}}.'")
    paths = _inputs.image_paths(args.images)
    checkpoint = _inputs.model_file(_inputs.find_model(args.model), args.download_root)
    from . import _embed

    return _embed.cmd_classify(args, checkpoint, labels, templates, paths)


def _cmd_embed(args: argparse.Namespace) -> int:
    _check_precision(args)
    features_path, list_path = _outputs.output_paths(args.output, args.shard)
    label = "" if args.shard is None else f"shard {args.shard[0]}/{args.shard[1]}: "
    with _outputs.writing(features_path):
        kind, inputs = _inputs.embed_inputs(args.input)
        if args.shard is not None and args.shard[1] > len(inputs):
            raise CLIError(f"--shard {args.shard[0]}/{args.shard[1]}: {len(inputs)} {kind} cannot be cut into "
                           f"{args.shard[1]} shards without empty ones; use at most {len(inputs)}")
        model = _inputs.find_model(args.model)
        name, identity = _inputs.model_identity(model)
        record = _outputs.new_record(model=name, checkpoint=identity, kind=kind, count=len(inputs),
                                     digest=_inputs.listing_digest(inputs), shard=args.shard, options=vars(args))
        if _outputs.prepare_outputs(features_path, list_path, record, overwrite=args.overwrite,
                                    keep_existing=args.keep_existing, inputs=[args.input], label=label):
            print(f"{label}{printable(features_path)} already exists, made from the same inputs, model and options; "
                  "skipping (pass --overwrite to recompute it)", file=sys.stderr)
            return 0
        if args.shard is not None:
            index, count = args.shard
            inputs = inputs[index * len(inputs) // count:(index + 1) * len(inputs) // count]
        checkpoint = _inputs.model_file(model, args.download_root)
        from . import _embed

        return _embed.cmd_embed(args, checkpoint, kind, inputs, record, features_path, list_path, label)
