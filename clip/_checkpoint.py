"""One checkpoint file to a flat ``{key: tensor}`` dict on the CPU, as stored: safetensors, zip checkpoints through a
restricted unpickler, ``torch.load(weights_only=True)`` for the rest. It never runs code from a file, and never maps
or inflates anything before checking the sizes, strides and offsets the file claims against the bytes it holds.
"""
import errno
import io
import mmap
import os
import pickle
import re
import stat
import struct
import zipfile
import zlib
from typing import Any, BinaryIO, Dict, List, Optional, Tuple

import torch

from . import _files
from ._errors import CheckpointError, CheckpointNotFoundError, format_keys

__all__ = ["CheckpointError", "format_keys", "is_torchscript_archive", "read_file"]

StateDict = Dict[str, torch.Tensor]

# The legacy typed-storage class names that archives name in their persistent ids, and the dtype each holds.
_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}
_DTYPES = frozenset(_STORAGE_DTYPES.values())

# A zip local file header is 30 bytes; its name and extra-field lengths are the two uint16 at offset 26.
_LOCAL_HEADER = struct.Struct("<4s22xHH")
# Deflate cannot expand data more than 1032-fold (a 258-byte match coded in 2 bits): an entry that claims more is
# lying, and is refused before anything is allocated for it.
_MAX_DEFLATE_RATIO = 1032
# Compressed entries are inflated in pieces of this size, so memory grows only with the bytes really inflated.
_INFLATE_CHUNK = 16 << 20
# A module tree deeper than this is not a model: the deepest CLIP key (visual.transformer.resblocks.0.attn.
# in_proj_weight) is 5 modules deep. The bound keeps keys short and the walk cheap on hostile trees.
_MAX_MODULE_DEPTH = 64

# A safetensors file starts with the byte length of its JSON header as a little-endian uint64, then the header.
_SAFETENSORS_HEADER_LENGTH = struct.Struct("<Q")
# safetensors refuses headers over 100 MB; a longer claimed length means the file is something else.
_SAFETENSORS_MAX_HEADER = 100_000_000


def no_checkpoint_error(path: str) -> CheckpointNotFoundError:
    """The error for a checkpoint path where nothing is."""
    return CheckpointNotFoundError(f"no checkpoint at {path}; expected a checkpoint file or folder, or a release "
                                   f"name from clip.available_models()")


def check_regular_file(path: str) -> int:
    """The size of ``path``, after checking that it is a non-empty regular file (never opening anything else).

    Raises
    ------
    CheckpointNotFoundError
        When nothing is at ``path`` (also a ``FileNotFoundError``).
    CheckpointError
        When ``path`` is a directory, a symbolic-link loop, a FIFO, a device or socket, or empty.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise no_checkpoint_error(path) from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CheckpointError(f"{path} is a loop of symbolic links; point it at the checkpoint file") from e
        raise
    if stat.S_ISDIR(info.st_mode):
        raise CheckpointError(f"{path} is a directory; expected a checkpoint file")
    if not stat.S_ISREG(info.st_mode):
        raise CheckpointError(f"{path} is not a regular file but {_files.kind(info.st_mode)}; expected a checkpoint "
                              f"file")
    if info.st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes), probably from an interrupted download or copy; "
                              f"delete it and fetch it again")
    return info.st_size


def read_file(path: str) -> StateDict:
    """Read one checkpoint file into a flat ``{key: tensor}`` dict on the CPU, keys as stored.

    Wrapped checkpoints (``{"state_dict": ...}``, ``{"model": ...}``) are unwrapped and DataParallel ``module.`` and
    ``torch.compile`` ``_orig_mod.`` prefixes removed. Tensors of stored zip entries are views of private memory
    maps of the file, one per entry, unmapped when the tensor is freed: callers that keep them copy them.

    Raises
    ------
    CheckpointError
        When ``path`` does not name a file.
    ImportError
        For a safetensors file when the ``safetensors`` package is missing.
    CheckpointError
        When the file is empty, truncated, damaged, not a checkpoint, wants to run code, or holds no tensors.
    """
    path = os.fspath(path)
    size = check_regular_file(path)
    header_length = _claimed_header_length(path)
    if header_length is not None:
        if header_length > size - _SAFETENSORS_HEADER_LENGTH.size:
            raise CheckpointError(
                f"{path} is a truncated safetensors file: its header alone claims {header_length:,} bytes and the "
                f"file has {size:,}; delete it and fetch it again")
        tensors = _unwrap(read_safetensors(path), path)
    elif zipfile.is_zipfile(path):
        tensors = _read_zip(path, size)
    else:
        tensors = _unwrap(_torch_load(path, mmap=False, hint=_TRUNCATION_HINT), path)
    _check_tensors(tensors, path)
    return tensors


# --------------------------------------------------------------------------------------------------------------
# safetensors


def _claimed_header_length(path: str) -> Optional[int]:
    """The header length the file's first bytes claim, when they start like a safetensors file; else None."""
    with open(path, "rb") as f:
        head = f.read(_SAFETENSORS_HEADER_LENGTH.size + 1)
    if len(head) < _SAFETENSORS_HEADER_LENGTH.size + 1 or head[-1:] != b"{":
        return None
    (length,) = _SAFETENSORS_HEADER_LENGTH.unpack(head[:_SAFETENSORS_HEADER_LENGTH.size])
    # "{}" is the shortest header; a zip or pickle file's first 8 bytes read as an absurd length.
    return length if 2 <= length <= _SAFETENSORS_MAX_HEADER else None


def read_safetensors(path: str) -> StateDict:
    """Every tensor of a safetensors file, on the CPU, as stored (the package checks offsets against the file).

    Raises
    ------
    ImportError
        When the optional ``safetensors`` package is not installed.
    CheckpointError
        When the file is damaged or truncated.
    """
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError as e:
        raise ImportError(f"{path} is a safetensors file, and reading it needs the safetensors package: "
                          f"pip install safetensors (or pip install 'clip-dropin[safetensors]')") from e
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:  # what the package raises for a bad file
        size = os.path.getsize(path)
        raise CheckpointError(f"{path} ({size:,} bytes) is not a readable safetensors file "
                              f"({type(e).__name__}: {e}). If it was downloaded or copied, it may be truncated: "
                              f"delete it and fetch it again") from e


# --------------------------------------------------------------------------------------------------------------
# torch.load and the unwrapping of what it returns


_TRUNCATION_HINT = "If it was downloaded, it may be truncated: delete it and fetch it again"


def _torch_load(path: str, *, mmap: bool, hint: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        refused = _refused_global(str(e))
        if refused:
            raise CheckpointError(
                f"{path} holds pickled objects other than tensors ({refused}), and loading them could run "
                f"arbitrary code; refusing it. Save the weights alone with torch.save(model.state_dict(), path)"
            ) from e
        raise _not_a_checkpoint(path, e, hint) from e
    except Exception as e:  # torch's parser meets arbitrary bytes: whatever it raises means "not a checkpoint"
        raise _not_a_checkpoint(path, e, hint) from e


def _refused_global(message: str) -> Optional[str]:
    """The Python global (a class or function) that ``torch.load(weights_only=True)`` refused, read from its error
    ``message``; None when the error is about something else.

    Every wording names it after "GLOBAL " (checked on torch 2.4.1, 2.14.1 and 2.15.0): "Unsupported global:
    GLOBAL fractions.Fraction was not an allowed global by default" (2.14.1 and 2.15.0 write a builtin without
    its ``builtins.`` prefix), and, for a module it always refuses (os, posix, sys, ...; in 2.14.1 and 2.15.0, not
    2.4.1), "Trying to load unsupported GLOBAL posix.system whose module posix is blocked".
    """
    refused = re.search(r"GLOBAL ([\w.]+)", message)
    return refused.group(1) if refused else None


def _not_a_checkpoint(path: str, cause: BaseException, hint: str) -> CheckpointError:
    size = os.path.getsize(path)
    return CheckpointError(
        f"{path} ({size:,} bytes) is not a readable CLIP checkpoint ({type(cause).__name__}: {cause}); expected a "
        f"release TorchScript archive, a torch.save state dict or a .safetensors file. {hint}")


def _is_tensor(value: Any) -> bool:
    return isinstance(value, (torch.Tensor, _TensorRef))


def _unwrap(obj: Any, path: str) -> Dict[str, Any]:
    """The state dict inside a checkpoint: unwrap ``state_dict``/``model`` entries and a ``module.`` prefix."""
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj:
        kind = "tensor" if _is_tensor(obj) else type(obj).__name__
        raise CheckpointError(f"{path} holds a {kind}, not a state dict of tensors")
    tensors = {k: v for k, v in obj.items() if _is_tensor(v)}
    if not tensors:
        raise CheckpointError(f"{path} holds a dict without tensors (keys: {format_keys(obj, 10)}); expected a "
                              f"state dict")
    bad_keys = [k for k in tensors if not isinstance(k, str)]
    if bad_keys:
        raise CheckpointError(f"{path} holds tensors under keys that are not strings ({format_keys(bad_keys, 5)}); "
                              f"expected a state dict")
    # DataParallel saves "module.", torch.compile "_orig_mod.", and a compiled DataParallel model both.
    for prefix in ("module.", "_orig_mod."):
        if all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    return tensors


def _check_tensors(tensors: StateDict, path: str) -> None:
    """Refuse tensors that no weight file holds: not dense, not on the CPU, of an odd dtype, or claiming more
    elements than their storage has (a zero-stride view that would be materialised at its claimed size)."""
    for key, tensor in tensors.items():
        problem = None
        if tensor.layout != torch.strided or tensor.is_quantized or tensor.device.type != "cpu":
            problem = f"a {tensor.layout} {tensor.device.type} tensor"
        elif tensor.dtype not in _DTYPES:
            problem = f"of dtype {tensor.dtype}"
        elif tensor.numel() * tensor.element_size() > tensor.untyped_storage().nbytes():
            problem = (f"a view of {tuple(tensor.shape)} ({tensor.numel():,} elements) over a storage of "
                       f"{tensor.untyped_storage().nbytes():,} bytes")
        if problem:
            raise CheckpointError(f"{path}: the tensor {key} is {problem}; expected dense CPU weights. The file is "
                                  f"damaged or was not written by torch.save or safetensors")


# --------------------------------------------------------------------------------------------------------------
# zip checkpoints: release TorchScript archives and torch.save files


def is_torchscript_archive(path: str) -> bool:
    """Whether ``path`` is a TorchScript archive (a zip with ``code/`` or ``constants.pkl``), as releases are."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return _is_scripted(names)


def _is_scripted(names: List[str]) -> bool:
    """Whether a zip's entry names are a TorchScript archive's (its code and constants beside the data)."""
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


class _Unsupported(pickle.UnpicklingError):
    """data.pkl holds something this unpickler does not rebuild; ``torch.load`` may read a plain file."""


class _Malformed(pickle.UnpicklingError):
    """data.pkl describes tensors that cannot be: the file is damaged or hand-made."""


class _Refuses:
    """Objects the pickle may only build: a BUILD opcode (``__setstate__``) on them means a malformed file."""

    what = "storage"

    def __setstate__(self, state: Any) -> None:
        raise _Malformed(f"a BUILD opcode on a {self.what}")


class _StorageRef(_Refuses):
    """A storage named in a persistent id: the zip entry ``data/<key>`` of ``numel`` elements of ``dtype``."""

    def __init__(self, key: str, dtype: torch.dtype, numel: int) -> None:
        self.key, self.dtype, self.numel = key, dtype, numel


class _TensorRef(_Refuses):
    """A tensor as data.pkl describes it, checked against its storage; materialised only once all are read."""

    what = "tensor"

    def __init__(self, storage: _StorageRef, offset: int, size: Tuple[int, ...], stride: Tuple[int, ...]) -> None:
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


class _ArchivedObject:
    """Stands in for any ``__torch__.*`` object of an archive: it keeps the attribute dict it is unpickled with."""

    def __init__(self) -> None:
        self.attributes: Dict[str, Any] = {}

    def __setstate__(self, state: Any) -> None:
        self.attributes = state if isinstance(state, dict) else {}


class _Dict(dict):
    """An ``OrderedDict`` of a checkpoint, read as a dict; the ``_metadata`` attribute torch.save adds is dropped."""

    def __setstate__(self, state: Any) -> None:
        pass


class _Storage:
    """A storage class named in a persistent id; only its dtype matters."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


def _is_int(value: Any) -> bool:
    return type(value) is int  # bool is an int subclass, and no size or stride


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *_unused: Any) -> _TensorRef:
    """``torch._utils._rebuild_tensor_v2``, checked: the view must lie inside its storage and not repeat it."""
    if not isinstance(storage, _StorageRef):
        raise _Malformed(f"a tensor over a {type(storage).__name__}, not over a storage")
    if not (_is_int(offset) and isinstance(size, tuple) and isinstance(stride, tuple)
            and len(size) == len(stride) and all(map(_is_int, size + stride))):
        raise _Malformed(f"a tensor of storage {storage.key} with an offset, size or stride that is not integers")
    if offset < 0 or min(size + stride, default=0) < 0:
        raise _Malformed(f"a tensor of storage {storage.key} with a negative offset, size or stride")
    numel = 1
    for n in size:
        numel *= n
    last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if numel else offset - 1
    if last >= storage.numel or numel > storage.numel:
        raise _Malformed(f"a tensor of size {size} and stride {stride} at offset {offset} over storage "
                         f"{storage.key} of {storage.numel:,} elements: it "
                         f"{'reaches past' if last >= storage.numel else 'repeats elements of'} its storage")
    return _TensorRef(storage, offset, size, stride)


def _identity(value: Any, *_unused: Any) -> Any:
    return value


class _ArchiveUnpickler(pickle.Unpickler):
    """Unpickles a zip checkpoint's ``data.pkl`` allowing nothing but tensors, storages, dicts and module stand-ins.

    Tensors come out as :class:`_TensorRef` descriptions, checked against their storages; nothing is read from
    the storage entries here.
    """

    def __init__(self, file: BinaryIO) -> None:
        super().__init__(file)
        self.storages: Dict[str, _StorageRef] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("__torch__"):
            return _ArchivedObject
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _Storage(_STORAGE_DTYPES[name])
        if module == "collections" and name == "OrderedDict":
            return _Dict
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _identity  # a saved nn.Parameter: its data is the tensor
        if module == "torch.jit._pickle" and (name.startswith("build_") or name == "restore_type_tag"):
            return _identity  # typed list and dict wrappers: the plain value is all we need
        raise _Unsupported(f"refusing to load {module}.{name}: a checkpoint archive may only hold tensors")

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _Storage)
                and isinstance(pid[2], str) and _is_int(pid[4]) and pid[4] >= 0):
            raise _Unsupported(f"unexpected persistent id (a {type(pid).__name__})")
        _, storage_type, key, _location, numel = pid
        known = self.storages.setdefault(key, _StorageRef(key, storage_type.dtype, numel))
        if (known.dtype, known.numel) != (storage_type.dtype, numel):
            raise _Malformed(f"storage {key} named twice with different dtypes or sizes")
        return known


def _unpickle(data: bytes) -> Tuple[Any, Dict[str, _StorageRef]]:
    """The object tree of a data.pkl and the storages it names; a malformed pickle raises UnpicklingError."""
    unpickler = _ArchiveUnpickler(io.BytesIO(data))
    try:
        return unpickler.load(), unpickler.storages
    except (EOFError, ValueError, TypeError, AttributeError, KeyError, IndexError, OverflowError) as e:
        # The pickle machine raises these itself on malformed opcodes (then no Python frame lies below this one).
        # Raised inside our own find_class, persistent_load or rebuild functions, they are our bugs: let them be.
        if e.__traceback__ is not None and e.__traceback__.tb_next is not None:
            raise
        raise _Malformed(f"{type(e).__name__}: {e}") from e


def _check_entries(archive: zipfile.ZipFile, size: int, path: str) -> None:
    """Refuse entries that cannot be read, or that claim more bytes than the archive can hold or inflate to."""
    for info in archive.infolist():
        problem = None
        if info.flag_bits & 0x1:
            problem = "is encrypted"
        elif info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            problem = f"uses compression method {info.compress_type}, where checkpoints are stored or deflated"
        elif info.header_offset + info.compress_size > size:
            problem = f"claims {info.compress_size:,} bytes at offset {info.header_offset:,}, past the file's end"
        elif info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size:
            problem = f"is stored, yet claims {info.file_size:,} bytes from {info.compress_size:,}"
        elif info.file_size > _MAX_DEFLATE_RATIO * info.compress_size:
            problem = (f"claims {info.file_size:,} bytes inflated from {info.compress_size:,}, more than deflate "
                       f"can produce")
        if problem:
            raise CheckpointError(f"{path}: the zip entry {info.filename!r:.200} {problem}; the file is damaged or "
                                  f"hand-made")


def _read_zip(path: str, size: int) -> StateDict:
    """A zip checkpoint's contents, each tensor mapped from the file, without running TorchScript or pickled code.

    TorchScript archives and ``torch.save`` files share a layout: ``<top>/data.pkl`` pickles an object tree whose
    tensors name their storages' entries ``<top>/data/<key>``. An archive's tree is modules, whose dotted attribute
    paths are the state-dict keys; a ``torch.save`` file's is the saved dict. A ``torch.save`` file holding more
    than tensors and plain containers (an optimizer's state, numpy scalars, ...) goes to ``torch.load`` with
    ``weights_only=True``, which decides what is safe; so does one written on a big-endian machine.
    """
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, EOFError) as e:  # a central directory that does not parse
        raise CheckpointError(f"{path} is a damaged zip file ({e}). {_TRUNCATION_HINT}") from e
    with archive, open(path, "rb") as raw:
        _check_entries(archive, size, path)
        names = archive.namelist()
        scripted = _is_scripted(names)
        data_pkl = next((n for n in names if n.endswith("/data.pkl") and n.count("/") == 1), None)
        if data_pkl is None:
            raise CheckpointError(f"{path} is a zip file without data.pkl; expected a checkpoint")
        top = data_pkl.rsplit("/", 1)[0]
        try:
            if not scripted and _read_member(archive, f"{top}/byteorder", path, default=b"little") != b"little":
                raise _Unsupported("tensors stored big-endian")
            root, storages = _unpickle(_read_member(archive, data_pkl, path))
        except _Unsupported as e:
            if scripted:
                raise CheckpointError(f"{path}: {e}; refusing it") from e
            return _unwrap(_torch_load(path, mmap=True, hint=""), path)
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"{path}: its {data_pkl} is malformed ({e}); the file is damaged or hand-made, "
                                  f"not written by torch.save or torch.jit.save") from e
        refs = _unwrap(_archive_tensors(root, path) if scripted else root, path)
        # Every description was checked against its storage while unpickling; now read each storage once.
        used = {ref.storage.key for ref in refs.values()}
        tensors = {key: _read_entry(archive, raw, f"{top}/data/{key}", ref.dtype, ref.numel, path)
                   for key, ref in storages.items() if key in used}
        return {key: tensors[ref.storage.key].as_strided(ref.size, ref.stride, ref.offset)
                for key, ref in refs.items()}


def _read_member(archive: zipfile.ZipFile, name: str, path: str, default: Optional[bytes] = None) -> bytes:
    """The bytes of a small entry (data.pkl, byteorder); its size was bounded by ``_check_entries``."""
    if default is not None and name not in archive.NameToInfo:
        return default
    try:
        return archive.read(name)
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:  # a bad header, CRC or deflate stream
        raise CheckpointError(f"{path}: the zip entry {name} is damaged ({e}). {_TRUNCATION_HINT}") from e


def _archive_tensors(root: Any, path: str) -> Dict[str, Any]:
    """Walk an archive's module tree, joining attribute names with dots: the paths are the state-dict keys.

    The walk is iterative and visits each module once: a module reached twice (a cycle, or a shared module that
    would multiply the keys) or a tree deeper than ``_MAX_MODULE_DEPTH`` is refused.
    """
    if not isinstance(root, _ArchivedObject):
        raise CheckpointError(f"{path} is a TorchScript archive, but its data.pkl holds no module")
    out: Dict[str, Any] = {}
    seen = {id(root)}
    stack = [(root, "", 0)]
    while stack:
        obj, prefix, depth = stack.pop()
        for name, value in obj.attributes.items():
            if not isinstance(name, str):
                raise CheckpointError(f"{path}: a module of its data.pkl has an attribute named by a "
                                      f"{type(name).__name__}; the file is damaged or hand-made")
            if _is_tensor(value):
                out[prefix + name] = value
            elif isinstance(value, _ArchivedObject):
                if id(value) in seen:
                    raise CheckpointError(f"{path}: the module {prefix}{name} of its data.pkl is reached twice (a "
                                          f"cycle or a shared module); a checkpoint's modules form a tree")
                if depth + 1 >= _MAX_MODULE_DEPTH:
                    raise CheckpointError(f"{path}: the module tree of its data.pkl is more than "
                                          f"{_MAX_MODULE_DEPTH} levels deep; it is not a model")
                seen.add(id(value))
                stack.append((value, f"{prefix}{name}.", depth + 1))
    return out


def _read_entry(archive: zipfile.ZipFile, raw: BinaryIO, name: str, dtype: torch.dtype, numel: int,
                path: str) -> torch.Tensor:
    """One storage entry as a CPU tensor of ``numel`` elements, mapped from the file where it is stored as is."""
    if name not in archive.NameToInfo:
        raise CheckpointError(f"{path}: data.pkl names the storage entry {name}, which the zip lacks; the file is "
                              f"damaged")
    info = archive.getinfo(name)
    itemsize = dtype.itemsize
    nbytes = numel * itemsize
    if info.file_size != nbytes:  # file_size itself was bounded by the archive's size in _check_entries
        raise CheckpointError(f"{path}: entry {name} has {info.file_size:,} bytes, expected {nbytes:,}; it is "
                              f"damaged")
    if nbytes == 0:
        return torch.empty(0, dtype=dtype)
    if info.compress_type == zipfile.ZIP_STORED:  # torch stores tensors uncompressed, 64-byte aligned
        raw.seek(info.header_offset)
        signature, name_length, extra_length = _LOCAL_HEADER.unpack(raw.read(_LOCAL_HEADER.size))
        if signature != b"PK\x03\x04":
            raise CheckpointError(f"{path}: entry {name} has a broken header; the file is damaged")
        offset = info.header_offset + _LOCAL_HEADER.size + name_length + extra_length
        available = os.fstat(raw.fileno()).st_size - offset
        if available < nbytes:
            raise CheckpointError(f"{path} is truncated: entry {name} has {max(available, 0):,} of {nbytes:,} "
                                  f"bytes; delete the file and fetch it again")
        if offset % itemsize == 0:  # an unaligned entry (a hand-made zip) is read into aligned memory below
            return _map_entry(raw, offset, numel, dtype)
    buffer = _inflate(archive, info, nbytes, path)
    return torch.frombuffer(buffer, dtype=dtype)


def _inflate(archive: zipfile.ZipFile, info: zipfile.ZipInfo, nbytes: int, path: str) -> bytearray:
    """An entry's ``nbytes`` bytes, read in pieces: memory grows with what really arrives, not what is claimed."""
    buffer = bytearray()
    try:
        with archive.open(info) as f:
            while len(buffer) < nbytes:
                piece = f.read(min(_INFLATE_CHUNK, nbytes - len(buffer)))
                if not piece:
                    break
                buffer += piece
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:  # a bad header, CRC or deflate stream
        raise CheckpointError(f"{path}: the zip entry {info.filename} is damaged ({e}). {_TRUNCATION_HINT}") from e
    if len(buffer) != nbytes:
        raise CheckpointError(f"{path} is truncated: entry {info.filename} has {len(buffer):,} of {nbytes:,} bytes; "
                              f"delete the file and fetch it again")
    return buffer


def _map_entry(raw: BinaryIO, offset: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A tensor over ``numel`` elements of the file at ``offset``, through a private memory map of just those pages.

    Nothing is read until the tensor is used, and each entry has its own map, which is unmapped when its tensor is
    freed: a loader that converts tensors one by one and drops them holds the file's pages only for the tensor at
    hand, never the whole file beside the converted model. The map is copy-on-write, so the tensor is writable and
    writes never reach the file.
    """
    start = offset - offset % mmap.ALLOCATIONGRANULARITY  # maps must start on a granularity boundary
    length = offset - start + numel * dtype.itemsize
    mapped = mmap.mmap(raw.fileno(), length, offset=start, access=mmap.ACCESS_COPY)
    return torch.frombuffer(mapped, dtype=dtype, count=numel, offset=offset - start)
