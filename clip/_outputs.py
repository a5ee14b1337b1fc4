"""The files ``clip embed`` writes and ``clip merge`` joins: names, the row-list format, the checks before any work,
atomic saves, the merge. It never imports torch (numpy only inside functions), so ``clip merge`` starts fast.
"""
import contextlib
import errno
import glob
import os
import re
import tempfile
from typing import Any, List, Optional, Sequence, Tuple

from . import _cache
from ._console import UNSAFE_CHARACTERS, CLIError, escape_character, printable

Shard = Optional[Tuple[int, int]]

# In a row list, a backslash and every character that could split or garble a line are escaped, so that each row is
# exactly one "\n"-terminated line whatever the text or file name holds.
_ROW_UNSAFE = re.compile(f"[\\\\{UNSAFE_CHARACTERS}]")
_ROW_ESCAPE = re.compile(r"\\(\\|x[0-9a-f]{2}|u[0-9a-f]{4})")


# ----------------------------------------------------------------------------------------------------------------
# The row list


def encode_row(row: str) -> str:
    r"""One row as its line in a row list (without the ``\n``): ``\`` as ``\\``, each control character, line or
    paragraph separator and lone surrogate as ``\xHH`` / ``\uHHHH``; everything else as it is."""
    return _ROW_UNSAFE.sub(lambda match: "\\\\" if match.group() == "\\" else escape_character(match.group()), row)


def decode_row(line: str) -> str:
    """The row that :func:`encode_row` wrote as ``line``; ``ValueError`` for a line it cannot have written."""
    if _ROW_UNSAFE.search(_ROW_ESCAPE.sub("", line)):
        raise ValueError("a raw control character, or a backslash that starts no escape")
    return _ROW_ESCAPE.sub(lambda match: "\\" if match.group(1) == "\\" else chr(int(match.group(1)[1:], 16)), line)


def format_rows(rows: Sequence[str]) -> bytes:
    """A row list: UTF-8, one escaped row per ``\\n``-terminated line."""
    return "".join(encode_row(row) + "\n" for row in rows).encode("utf-8")


def read_rows(path: str) -> List[str]:
    """The rows of a row list written by :func:`format_rows`; ``CLIError`` naming the file if it is not one."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
        if text and not text.endswith("\n"):
            raise ValueError("the last line is not complete")
        return [decode_row(line) for line in text.split("\n")[:-1]]
    except OSError as error:
        raise CLIError(f"cannot read {printable(path)}: {error.strerror or error}") from None
    except ValueError as error:  # UnicodeDecodeError included
        raise CLIError(f"{printable(path)} is not a row list written by clip embed ({error}): rerun the run that "
                       "wrote it with --overwrite") from None


# ----------------------------------------------------------------------------------------------------------------
# Output names and the checks before any work


def output_stem(output: str) -> str:
    return output[:-len(".npy")] if output.endswith(".npy") else output


def output_paths(output: str, shard: Shard) -> Tuple[str, str]:
    """The (.npy, .txt) pair an embed run writes: OUTPUT itself, or its shard's files."""
    stem = output_stem(output)
    if shard is not None:
        index, count = shard
        stem = f"{stem}.shard-{index:0{len(str(count))}d}-of-{count}"
    return stem + ".npy", stem + ".txt"


def prepare_outputs(features_path: str, list_path: str, *, overwrite: bool, sharded: bool,
                    inputs: Sequence[str] = ()) -> bool:
    """Check, before any work, that both outputs can be written; True if they exist already and the run is done.

    Fails (``CLIError``) on an output that is a folder or an input, a folder that cannot be created or written,
    and, without ``overwrite``, one output that exists without the other (a user's file, not a finished run), except
    the row list of an unfinished shard, which the rerun replaces.
    """
    features_exist, list_exists = os.path.exists(features_path), os.path.exists(list_path)
    for path, exists in ((features_path, features_exist), (list_path, list_exists)):
        if os.path.isdir(path):
            raise CLIError(f"--output: {printable(path)} is a folder; name a .npy file, e.g. "
                           f"{printable(os.path.join(path, 'features.npy'))}")
        if exists and any(os.path.exists(item) and os.path.samefile(path, item) for item in inputs):
            raise CLIError(f"--output {printable(features_path)} would overwrite the input {printable(path)}; "
                           "choose another output name")
    if features_exist and list_exists and not overwrite:
        return True
    if (features_exist or list_exists) and not overwrite and not (sharded and list_exists):
        present, absent = (features_path, list_path) if features_exist else (list_path, features_path)
        raise CLIError(f"{printable(present)} exists but {printable(absent)} does not, so it is not the output of a "
                       "finished run; pass --overwrite to replace it, or choose another --output")
    _check_writable(os.path.dirname(os.path.abspath(features_path)))
    for path in (features_path, list_path):
        remove_stale_temporaries(path)
    return False


def _check_writable(folder: str) -> None:
    """Create ``folder`` if needed and prove a file can be made in it, so a run never fails after its work."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise CLIError(f"cannot write the output into {printable(folder)}: {error.strerror or error}; choose "
                       "another --output or fix the folder's permissions") from None


def save_outputs(features_path: str, list_path: str, features: Any, rows: Sequence[str]) -> None:
    """Write the row list, then the features: a run counts as finished once its .npy file exists.

    An old .npy file goes first, so that the outputs never look finished before both new files are in place. A
    write that fails (a full disk, a quota, a file-size limit) leaves neither file behind, so the rerun starts
    afresh, and raises ``CLIError`` naming the file and the cause.
    """
    import numpy as np

    path, written = features_path, None
    try:
        if os.path.lexists(features_path):
            os.remove(features_path)
        path = list_path
        _cache.write_atomically(list_path, lambda f: f.write(format_rows(rows)))
        path, written = features_path, list_path
        _cache.write_atomically(features_path, lambda f: np.save(f, features, allow_pickle=False))
    except OSError as error:
        if written is not None:
            with contextlib.suppress(OSError):
                os.remove(written)  # the new row list: alone it would make the rerun refuse
        raise CLIError(_write_failure(path, error)) from None


def _write_failure(path: str, error: OSError) -> str:
    """Why ``path`` could not be written, and what to do, in one line."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free some space on its disk (or choose another --output)"
    elif error.errno == errno.EFBIG:
        fix = "raise the file-size limit (ulimit -f), or choose an --output on a file system that allows the size"
    else:
        fix = "check the folder and its file system"
    cause = printable(error.strerror or str(error))
    return f"cannot write {printable(path)}: {cause}; {fix}, then run the command again"


def remove_stale_temporaries(path: str) -> None:
    """Remove the temporary files (``<path>.<12 hex digits>.tmp``) a killed run left while writing ``path``."""
    pattern = re.compile(re.escape(os.path.basename(path)) + r"\.[0-9a-f]{12}\.tmp")
    for found in glob.glob(glob.escape(path) + ".*.tmp"):
        if pattern.fullmatch(os.path.basename(found)):
            with contextlib.suppress(OSError):
                os.remove(found)


# ----------------------------------------------------------------------------------------------------------------
# clip merge


def _find_shards(stem: str) -> Tuple[int, List[int]]:
    """(N, the missing I) of the shards of ``stem``; ``CLIError`` if there are none or they were cut differently."""
    pattern = re.compile(re.escape(os.path.basename(stem)) + r"\.shard-(\d+)-of-(\d+)\.npy")
    found = set()
    for path in glob.glob(glob.escape(stem) + ".shard-*-of-*.npy"):
        match = pattern.fullmatch(os.path.basename(path))
        if match:
            found.add((int(match.group(1)), int(match.group(2))))
    counts = sorted({count for _, count in found})
    shown = printable(stem)
    if not counts:
        raise CLIError(f"no shards of {shown}.npy found (expected {shown}.shard-I-of-N.npy from clip embed --shard)")
    if len(counts) > 1:
        raise CLIError(f"shards of {shown}.npy were cut in different ways (N = {', '.join(map(str, counts))}); "
                       "keep the shards of one run only")
    return counts[0], [i for i in range(counts[0]) if (i, counts[0]) not in found]


def _load_features(path: str) -> Any:
    """A shard's feature matrix; ``CLIError`` naming the file if it is unreadable, truncated or not a matrix."""
    import numpy as np

    try:
        features = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:  # what numpy raises for a truncated or foreign file
        raise CLIError(f"cannot read {printable(path)} ({error}): rerun that shard with --overwrite") from None
    if features.ndim != 2 or features.dtype != np.float32:
        raise CLIError(f"{printable(path)} holds a {features.dtype} array of shape {features.shape}, not the float32 "
                       "matrix clip embed writes: rerun that shard with --overwrite")
    return features


def merge(output: str) -> Tuple[int, int, str, str]:
    """Join the shards of ``output`` into its unsharded files: (shards, rows, features path, list path).

    The caller has checked the outputs with `prepare_outputs`; existing ones are replaced.
    """
    import numpy as np

    stem = output_stem(output)
    count, missing = _find_shards(stem)
    if missing:
        raise CLIError(f"{len(missing)} of {count} shards are missing (I = {', '.join(map(str, missing))}): run "
                       "clip embed with those --shard values first")
    features, rows = [], []
    for i in range(count):
        features_path, list_path = output_paths(output, (i, count))
        if not os.path.exists(list_path):
            raise CLIError(f"{printable(list_path)} is missing: rerun that shard with --overwrite")
        shard_features, shard_rows = _load_features(features_path), read_rows(list_path)
        if len(shard_rows) != len(shard_features):
            raise CLIError(f"{printable(features_path)} has {len(shard_features)} rows but {printable(list_path)} "
                           f"lists {len(shard_rows)}: rerun that shard with --overwrite")
        if features and shard_features.shape[1] != features[0].shape[1]:
            raise CLIError(f"{printable(features_path)} has rows of {shard_features.shape[1]} values but shard 0 has "
                           f"{features[0].shape[1]}: the shards were made with different models; rerun them with one")
        features.append(shard_features)
        rows += shard_rows
    features_path, list_path = output_paths(output, None)
    if os.path.exists(features_path):
        os.remove(features_path)  # not finished again until the new files are both in place
    save_outputs(features_path, list_path, np.concatenate(features), rows)
    return count, len(rows), features_path, list_path
