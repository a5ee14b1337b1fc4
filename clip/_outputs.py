"""The files ``clip embed`` writes and ``clip merge`` joins: names, the row-list format, the record of what the rows
were made from, the checks before any work, atomic saves, the merge. It never imports torch (numpy only inside
functions), so ``clip merge`` starts fast.
"""
import contextlib
import errno
import glob
import itertools
import json
import os
import re
import threading
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from . import _files
from ._console import UNSAFE_CHARACTERS, CLIError, escape_character, printable, warn

Shard = Optional[Tuple[int, int]]
Record = Dict[str, Any]

# The options of `clip embed` that change the rows it writes, by their argparse names: the record keeps their
# values, and a finished output made with other values is not this run's. An option that changes rows joins here.
ROW_OPTIONS = ("precision", "fast_decode", "auto_orient")
# What the first field of a record says, so that a JSON file of someone else's is never taken for one.
RECORD_FORMAT = "clip embed record 1"
# Fields of a record that say how the rows were computed, for information: they are not compared.
_INFORMATION = ("format", "model", "computed")
# The most shards a job may be cut into: past any job array, and it keeps shard names short.
MAX_SHARDS = 1_000_000
# Seconds between two touches of a held output lock, and after which an untouched one is a dead run's: 20 missed
# beats, so a run stopped for a while, or a file system's clock a little off, is not taken for dead.
HEARTBEAT = 30
STALE_AFTER = 600

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
        with open_regular(path) as f:
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
    """The (.npy, .txt) pair an embed run writes: OUTPUT itself, or its shard's files; ``CLIError`` for an OUTPUT
    that names a folder (``res/``) or no file name (``.npy``), which would write hidden ``.npy`` and ``.txt``."""
    stem = output_stem(output)
    if output.endswith(tuple(filter(None, (os.sep, os.altsep)))) or not os.path.basename(stem):
        example = os.path.join(output if os.path.basename(stem) == "" and output != ".npy" else "", "features.npy")
        raise CLIError(f"--output {printable(output)} names no file; name a .npy file, e.g. {printable(example)}")
    if shard is not None:
        index, count = shard
        stem = f"{stem}.shard-{index:0{len(str(count))}d}-of-{count}"
    return stem + ".npy", stem + ".txt"


def record_path(features_path: str) -> str:
    """Where the record of ``features_path`` lives: ``OUT.json`` beside ``OUT.npy`` and ``OUT.txt``."""
    return output_stem(features_path) + ".json"


# ----------------------------------------------------------------------------------------------------------------
# The record: what the rows were made from


def new_record(*, model: str, checkpoint: str, kind: str, count: int, digest: str, shard: Shard,
               options: Dict[str, Any]) -> Record:
    """The record of a run: the model and its checkpoint's identity, the input listing (kind, count and digest of
    every input, not only the shard's), the shard ``I/N`` (None unsharded) and the values of `ROW_OPTIONS`."""
    return {"format": RECORD_FORMAT, "model": model, "checkpoint": checkpoint,
            "inputs": {"kind": kind, "count": count, "sha256": digest},
            "shard": None if shard is None else f"{shard[0]}/{shard[1]}",
            "options": {name: options[name] for name in ROW_OPTIONS}}


def read_record(path: str) -> Optional[Record]:
    """The record at ``path``; None if there is none, or if the file there is not a record (someone else's)."""
    try:
        with open_regular(path) as file:
            record = json.loads(file.read(1 << 20).decode("utf-8"))  # a record is a few hundred bytes
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("format") == RECORD_FORMAT else None


def differences(old: Record, new: Record, *, ignore: Sequence[str] = ()) -> List[str]:
    """What differs between two records, field by field, each as ``field: old vs new`` in words."""
    found = []
    for field in sorted(set(old) | set(new)):
        if field in _INFORMATION or field in ignore or old.get(field) == new.get(field):
            continue
        if field == "options" and isinstance(old.get(field), dict) and isinstance(new.get(field), dict):
            changed = {key for key in set(old[field]) | set(new[field]) if old[field].get(key) != new[field].get(key)}
            old, new = ({**record, field: {k: v for k, v in record[field].items() if k in changed}}
                        for record in (old, new))  # name only the options that differ
        found.append(f"{field}: {_describe(old, field)} vs {_describe(new, field)}")
    return found


def _describe(record: Record, field: str) -> str:
    value = record.get(field)
    if field == "checkpoint":
        return f"{record.get('model')} ({str(value)[:19]})"  # "sha256:" and 12 hex digits tell files apart
    if field == "inputs" and isinstance(value, dict):
        return f"{value.get('count')} {value.get('kind')} (listing sha256 {str(value.get('sha256'))[:12]})"
    if isinstance(value, dict):
        return ", ".join(f"--{key.replace('_', '-')} {item}" for key, item in sorted(value.items()))
    return printable(str(value))


def prepare_outputs(features_path: str, list_path: str, record: Record, *, overwrite: bool = False,
                    keep_existing: bool = False, inputs: Sequence[str] = (), label: str = "",
                    redo: str = "recomputing it") -> bool:
    """Check, before any work, what the run will write; True if its outputs exist already, made from what
    ``record`` says, so the run is done.

    Outputs whose record differs are this command's own, made from other inputs, model or options: it says so
    and the run replaces them (``keep_existing``: refuses instead). An unfinished write of its own (a record
    without the .npy file) is replaced. It fails (``CLIError``) on an output that is a folder or an input, a folder
    where the run's longest name cannot be created, and, without ``overwrite``, outputs beside no record of
    clip embed's (a user's files, or an older version's).
    """
    paths = (features_path, list_path, record_path(features_path))
    for path in paths:
        if os.path.isdir(path):
            raise CLIError(f"--output: {printable(path)} is a folder; name a .npy file, e.g. "
                           f"{printable(os.path.join(path, 'features.npy'))}")
        if os.path.exists(path) and any(os.path.exists(item) and os.path.samefile(path, item) for item in inputs):
            raise CLIError(f"--output {printable(features_path)} would overwrite the input {printable(path)}; "
                           "choose another output name")
    _check_writable(features_path, max(paths, key=len))
    old = read_record(paths[2])
    present = [path for path in paths if os.path.exists(path)]
    if not overwrite and old is None and present:
        raise CLIError(f"{_join(present)} {'exist' if len(present) > 1 else 'exists'} but "
                       f"{printable(paths[2]) + ' holds no' if os.path.exists(paths[2]) else 'without the'} record "
                       f"clip embed writes beside its outputs, so {'they are' if len(present) > 1 else 'it is'} not "
                       "the output of a run of this command (or of an older version); pass --overwrite to replace "
                       f"{'them' if len(present) > 1 else 'it'}, or choose another --output")
    if not overwrite and old is not None and os.path.exists(features_path) and os.path.exists(list_path):
        changed = differences(old, record)
        if not changed:
            return True
        because = f"{printable(features_path)} was made from other inputs, model or options ({'; '.join(changed)})"
        if keep_existing:
            raise CLIError(f"{label}{because}; --keep-existing keeps it: run without --keep-existing to replace it, "
                           "or choose another --output")
        warn(f"{label}{because}: {redo}")
    for path in paths:  # what a killed write left: this run holds the output's lock, no live run is writing them
        _files.remove_abandoned(path, older_than=0)
    return False


def _join(paths: Sequence[str]) -> str:
    return " and ".join(map(printable, paths))


def _check_writable(features_path: str, longest: str) -> None:
    """Create ``folder`` if needed, then create and remove the longest name the run will create there (the
    temporary name of its longest output), so that a run never fails after its work for want of permission or
    for a name its file system cannot hold."""
    folder = os.path.dirname(os.path.abspath(features_path))
    try:
        os.makedirs(folder, exist_ok=True)
        probe = _files.temporary_name(longest)
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.remove(probe)
    except OSError as error:
        if error.errno == errno.ENAMETOOLONG:
            raise CLIError(f"the output name {printable(os.path.basename(features_path))} is too long for its "
                           f"file system once the run's own suffixes are added (its longest file is named like "
                           f"{printable(os.path.basename(_files.temporary_name(longest)))}); choose a shorter "
                           "--output") from None
        raise _unwritable(folder, error) from None


def _unwritable(folder: str, error: OSError) -> CLIError:
    return CLIError(f"cannot write the output into {printable(folder)}: {error.strerror or error}; choose another "
                    "--output or fix the folder's permissions")


def open_regular(path: str) -> Any:
    """A binary file object for ``path`` (or the file a link there leads to) if it is a regular file: opening it
    never blocks, as a FIFO's would."""
    return os.fdopen(_files.open_regular(path, follow_links=True), "rb")


def save_outputs(features_path: str, list_path: str, features: Any, rows: Sequence[str], record: Record) -> None:
    """Write the record, the row list, then the features: outputs count as finished once their .npy file exists.

    An old .npy file goes first, so that the outputs never look finished before all new files are in place, and
    the record next, so that whatever a killed run leaves is known for its own by the rerun. A write that fails (a
    full disk, a quota, a file-size limit) leaves none of the new files behind and no finished-looking output (the
    old .npy is gone), so the rerun recomputes, and raises ``CLIError`` naming the file and the cause.
    """
    import numpy as np

    steps = [(record_path(features_path), lambda f: f.write(json.dumps(record, indent=1).encode("utf-8") + b"\n")),
             (list_path, lambda f: f.write(format_rows(rows))),
             (features_path, lambda f: np.save(f, features, allow_pickle=False))]
    path, written = features_path, []
    try:
        _check_still_held(features_path)
        if os.path.lexists(features_path):
            os.remove(features_path)
        for path, write in steps:
            _check_still_held(features_path)
            _files.write_atomically(path, write)
            written.append(path)
    except OSError as error:
        for done in written:  # alone, they would make the rerun refuse or look finished
            with contextlib.suppress(OSError):
                os.remove(done)
        raise CLIError(_write_failure(path, error)) from None


def _write_failure(path: str, error: OSError) -> str:
    """Why ``path`` could not be written, and what to do, in one line."""
    cause = printable(error.strerror or str(error))
    return (f"cannot write {printable(path)}: {cause}; {_files.write_advice(error)} (or choose another --output), "
            "then run the command again")


# ----------------------------------------------------------------------------------------------------------------
# One writer per output


@contextlib.contextmanager
def writing(features_path: str) -> Iterator[None]:
    """Hold the lock of an output (``OUT.lock`` beside ``OUT.npy``, `_files.Lock`) for the whole run, so that one
    run at a time checks, cleans up and writes it; ``CLIError`` naming the process and host of the run that holds
    it. A thread touches the lock every `HEARTBEAT` seconds: the sign of life a run on another host, or on a file
    system without flock, judges it by."""
    lock = _files.Lock(output_stem(features_path), stale_after=STALE_AFTER)
    folder = os.path.dirname(lock.path)
    try:
        os.makedirs(folder, exist_ok=True)
        held = lock.acquire(timeout=0)
    except OSError as error:
        raise _unwritable(folder, error) from None
    if not held:
        raise CLIError(f"another run ({lock.holder() or 'another process'}) is writing "
                       f"{printable(output_stem(features_path))}.npy: wait for it to finish, or choose another "
                       "--output")
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(lock, stop), name="clip output lock", daemon=True)
    beat.start()
    _WRITERS[os.path.abspath(features_path)] = lock
    try:
        yield
    finally:
        _WRITERS.pop(os.path.abspath(features_path), None)
        stop.set()
        beat.join()
        lock.release()


# The output locks this process holds, by features path: save_outputs checks, before each write, that its lock is
# still its own (a run stopped for longer than STALE_AFTER may have been taken over by another).
_WRITERS: Dict[str, "_files.Lock"] = {}


def _heartbeat(lock: "_files.Lock", stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT):
        try:
            lock.touch()
        except OSError:  # a missed beat costs nothing until STALE_AFTER
            pass
        except _files.LockLost:  # taken over: save_outputs finds out before it writes, and says so
            return


def _check_still_held(features_path: str) -> None:
    """``CLIError`` if the lock `writing` took for ``features_path`` is no longer this run's."""
    lock = _WRITERS.get(os.path.abspath(features_path))
    try:
        if lock is not None:
            lock.touch()
    except _files.LockLost:
        raise CLIError(f"another run took {printable(lock.path)} over while this one made no progress for "
                       f"{STALE_AFTER} s (stopped or suspended?), so this one wrote nothing: let the other finish, "
                       "then run the command again") from None
    except OSError:
        pass


# ----------------------------------------------------------------------------------------------------------------
# clip merge


def _find_shards(stem: str) -> int:
    """N, the number of shards of ``stem``; ``CLIError`` if there are none, some are missing, or they were cut in
    different ways."""
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
    count = counts[0]
    if count > MAX_SHARDS:
        raise CLIError(f"{shown}.shard-*-of-{count}.npy names {count} shards, more than clip embed cuts a job into "
                       f"({MAX_SHARDS}); remove those files")
    missing = count - sum(1 for _, n in found if n == count)
    if missing:
        first = list(itertools.islice((str(i) for i in range(count) if (i, count) not in found), 10))  # enough to act
        more = ", ..." if missing > 10 else ""
        raise CLIError(f"{missing} of {count} shards are missing (I = {', '.join(first)}{more}): run clip embed with "
                       "those --shard values first")
    return count


def _load_features(path: str) -> Any:
    """A shard's feature matrix; ``CLIError`` naming the file if it is not a regular file, or its header does not
    describe the float32 matrix clip embed writes in exactly the bytes that follow it (read before any memory is
    given to the rows, so a damaged header claiming terabytes is an error, not an allocation)."""
    import numpy as np

    fix = "rerun that shard with --overwrite"
    try:
        with open_regular(path) as file:
            version = np.lib.format.read_magic(file)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f".npy format version {version}, not one numpy's np.save writes for a matrix")
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, fortran_order, dtype = read_header(file)
            if len(shape) != 2 or dtype != np.float32 or fortran_order:
                raise CLIError(f"{printable(path)} holds a {dtype} array of shape {shape}, not the float32 matrix "
                               f"clip embed writes: {fix}")
            claimed = shape[0] * shape[1] * dtype.itemsize
            size = os.fstat(file.fileno()).st_size - file.tell()
            if size != claimed:
                raise CLIError(f"{printable(path)} is damaged: its header describes a {shape[0]} x {shape[1]} "
                               f"matrix ({claimed} bytes) but {size} bytes follow it: {fix}")
            file.seek(0)
            return np.lib.format.read_array(file, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:  # what numpy raises for a truncated or foreign file
        raise CLIError(f"cannot read {printable(path)} ({printable(str(error))}): {fix}") from None


def _shard_records(output: str, count: int) -> Record:
    """The record the shards of ``output`` share (with ``shard`` None: what one unsharded run records), after
    checking that each shard has one, for its own place, and that they were all cut from the same job."""
    records = []
    for index in range(count):
        features_path, _ = output_paths(output, (index, count))
        record = read_record(record_path(features_path))
        if record is None:
            raise CLIError(f"{printable(features_path)} has no record of what it was made from beside it "
                           f"({printable(record_path(features_path))}: written by an older clip embed?): rerun that "
                           "shard with --overwrite")
        if record.get("shard") != f"{index}/{count}":
            raise CLIError(f"{printable(record_path(features_path))} is the record of shard {record.get('shard')}, "
                           f"not of {index}/{count}: rerun that shard with --overwrite")
        records.append(record)
    for index, record in enumerate(records[1:], 1):
        changed = differences(records[0], record, ignore=("shard",))
        if changed:
            raise CLIError(f"shards 0 and {index} of {printable(output_stem(output))}.npy were not cut from the same "
                           f"job ({'; '.join(changed)}): rerun the stale shards with the job's inputs, model and "
                           "options (clip embed redoes a shard whose record differs), then merge")
    computed = sorted({str(record.get("computed")) for record in records})
    if len(computed) > 1:
        warn(f"the shards of {printable(output_stem(output))}.npy were computed in different ways "
             f"({', '.join(computed)}): their rows differ slightly in precision")
    return dict(records[0], shard=None, computed=" and ".join(computed))


def merge(output: str, *, overwrite: bool = False) -> Optional[Tuple[int, int, str, str]]:
    """Join the shards of ``output`` into its unsharded files: (shards, rows, features path, list path), or None
    when those exist already, merged from the same job (nothing to do)."""
    import numpy as np

    count = _find_shards(output_stem(output))
    record = _shard_records(output, count)
    merged_features, merged_list = output_paths(output, None)
    if prepare_outputs(merged_features, merged_list, record, overwrite=overwrite, redo="merging again"):
        return None
    features, rows = [], []
    for i in range(count):
        features_path, list_path = output_paths(output, (i, count))
        if not os.path.exists(list_path):
            raise CLIError(f"{printable(list_path)} is missing: rerun that shard with --overwrite")
        shard_features, shard_rows = _load_features(features_path), read_rows(list_path)
        now = read_record(record_path(features_path))  # a run that rewrites the shard writes its record first
        if now is None or now.get("shard") != f"{i}/{count}" or differences(record, now, ignore=("shard",)):
            raise CLIError(f"{printable(features_path)} changed while it was merged (a run is writing that "
                           "shard): merge again once it has finished")
        if len(shard_rows) != len(shard_features):
            raise CLIError(f"{printable(features_path)} has {len(shard_features)} rows but {printable(list_path)} "
                           f"lists {len(shard_rows)}: rerun that shard with --overwrite")
        if features and shard_features.shape[1] != features[0].shape[1]:
            raise CLIError(f"{printable(features_path)} has rows of {shard_features.shape[1]} values but shard 0 has "
                           f"{features[0].shape[1]}: the shards were made with different models; rerun them with one")
        features.append(shard_features)
        rows += shard_rows
    save_outputs(merged_features, merged_list, np.concatenate(features), rows, record)
    return count, len(rows), merged_features, merged_list
