"""Reading checkpoint files into plain state dicts, without running TorchScript or arbitrary pickled code.

One entry point, :func:`read_state_dict`, serves both load paths. It recognises (``_formats`` adds safetensors
files, Hugging Face and open_clip folders and key layouts)

- release TorchScript archives: the module tree in ``data.pkl`` is unpickled by a restricted unpickler that can
  only rebuild tensors (from the zip's ``data/<key>`` entries) and record attribute names; the TorchScript code
  and constants are never read;
- plain ``torch.save`` zip files, read by the same unpickler, or by ``torch.load(weights_only=True)`` when they
  hold objects it does not know; legacy (non-zip) ``torch.save`` files with ``weights_only=True``;
- wrapped checkpoints ``{"state_dict": ...}`` or ``{"model": ...}``, a DataParallel ``module.`` prefix and a
  ``torch.compile`` ``_orig_mod.`` prefix.
"""
import mmap
import os
import pickle
import re
import struct
import zipfile
from typing import Any, BinaryIO, Dict, List, Optional

import torch

from . import _formats

__all__ = ["CheckpointError", "read_state_dict", "is_torchscript_archive"]

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

# A zip local file header is 30 bytes; its name and extra-field lengths are the two uint16 at offset 26.
_LOCAL_HEADER = struct.Struct("<4s22xHH")


class CheckpointError(RuntimeError, ValueError):
    """A file that cannot be read as a CLIP checkpoint; the message names the file and what was expected."""


def read_state_dict(path: str) -> StateDict:
    """Read a checkpoint file or folder into a flat ``{key: tensor}`` dict on the CPU, in the release layout.

    Tensors of zip files are views of private memory maps of the file, one per entry, unmapped when the tensor is
    freed: callers that keep them copy them (``build_model`` does), and a loader that converts them one at a time
    and drops each never holds the whole file in memory.

    Raises
    ------
    FileNotFoundError, IsADirectoryError
        When ``path`` does not name a file.
    CheckpointError
        When the file is empty, truncated, not a checkpoint, wants to run code, or holds no tensors.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        return _formats.read_folder(path)
    _check_is_file(path)
    if _formats.is_safetensors(path):
        state_dict = _formats.read_safetensors(path)
    elif zipfile.is_zipfile(path):
        state_dict = _read_zip(path)
    else:
        state_dict = _torch_load(path, mmap=False)
    return _formats.to_openai_layout(_unwrap(state_dict, path), path)


def _check_is_file(path: str) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}; expected a file path or a release name from "
                                f"clip.available_models()")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path} is empty (0 bytes), probably from an interrupted download or copy; "
                              f"delete it and fetch it again")


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


def _torch_load(path: str, *, mmap: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        # weights_only refuses a file that names a Python global (a class or function) it does not allow.
        refused = re.search(r"GLOBAL:? ?([\w.]+)", str(e))
        if refused:
            raise CheckpointError(
                f"{path} holds pickled objects other than tensors ({refused.group(1)}), and loading them could run "
                f"arbitrary code; refusing it. Save the weights alone with torch.save(model.state_dict(), path)"
            ) from e
        raise _not_a_checkpoint(path) from e
    except Exception as e:  # unpickling arbitrary bytes can fail in many ways; each means "not a checkpoint"
        raise _not_a_checkpoint(path, e) from e


def _not_a_checkpoint(path: str, cause: Optional[BaseException] = None) -> CheckpointError:
    size = os.path.getsize(path)
    why = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
    return CheckpointError(
        f"{path} ({size:,} bytes) is not a readable CLIP checkpoint{why}; expected a release TorchScript archive, "
        f"a torch.save state dict or a .safetensors file. If it was downloaded, it may be truncated: delete it and "
        f"fetch it again")


def _unwrap(obj: Any, path: str) -> StateDict:
    """The state dict inside a checkpoint: unwrap ``state_dict``/``model`` entries and a ``module.`` prefix."""
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path} holds a dict without tensors (keys: {', '.join(map(str, list(obj)[:10]))}); "
                              f"expected a state dict")
    # DataParallel saves "module.", torch.compile "_orig_mod.", and a compiled DataParallel model both.
    for prefix in ("module.", "_orig_mod."):
        if all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    return tensors


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


def _rebuild_tensor(storage: torch.Tensor, offset: int, size: tuple, stride: tuple, *_unused: Any) -> torch.Tensor:
    return storage.as_strided(size, stride, offset)


def _identity(value: Any, *_unused: Any) -> Any:
    return value


class _ArchiveUnpickler(pickle.Unpickler):
    """Unpickles a zip checkpoint's ``data.pkl`` allowing nothing but tensors, storages, dicts and module stand-ins."""

    def __init__(self, file: BinaryIO, load_storage) -> None:
        super().__init__(file)
        self._load_storage = load_storage
        self._storages: Dict[str, torch.Tensor] = {}

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
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a checkpoint archive may only hold tensors")

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _Storage)):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r:.80}")
        _, storage_type, key, _location, numel = pid
        if key not in self._storages:
            self._storages[key] = self._load_storage(str(key), storage_type.dtype, int(numel))
        return self._storages[key]


def _read_zip(path: str) -> Any:
    """A zip checkpoint's contents, each tensor mapped from the file, without running TorchScript or pickled code.

    TorchScript archives and ``torch.save`` files share a layout: ``<top>/data.pkl`` pickles an object tree whose
    tensors name their storages' entries ``<top>/data/<key>``. An archive's tree is modules, whose dotted attribute
    paths are the state-dict keys; a ``torch.save`` file's is the saved dict. A ``torch.save`` file holding more
    than tensors and plain containers (an optimizer's state, numpy scalars, ...) goes to ``torch.load`` with
    ``weights_only=True``, which decides what is safe; so does one written on a big-endian machine.
    """
    try:
        with zipfile.ZipFile(path) as archive, open(path, "rb") as raw:
            names = archive.namelist()
            scripted = _is_scripted(names)
            try:
                root = _unpickle_zip(path, archive, raw, names, little_endian_only=not scripted)
            except pickle.UnpicklingError as e:
                if scripted:
                    raise CheckpointError(f"{path}: {e}; refusing it") from e
                return _torch_load(path, mmap=True)
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, EOFError, KeyError, struct.error, TypeError, ValueError, AttributeError,
            IndexError) as e:  # a damaged or hand-made data.pkl feeding our builders something else
        raise _not_a_checkpoint(path, e) from e
    if not scripted:
        return root
    if not isinstance(root, _ArchivedObject):
        raise CheckpointError(f"{path} is a TorchScript archive, but its data.pkl holds no module")
    state_dict: StateDict = {}
    _collect_tensors(root, "", state_dict)
    return state_dict


def _unpickle_zip(path: str, archive: zipfile.ZipFile, raw: BinaryIO, names: List[str], *,
                  little_endian_only: bool) -> Any:
    data_pkl = next((n for n in names if n.endswith("/data.pkl") and n.count("/") == 1), None)
    if data_pkl is None:
        raise CheckpointError(f"{path} is a zip file without data.pkl; expected a checkpoint")
    top = data_pkl.rsplit("/", 1)[0]
    if little_endian_only and f"{top}/byteorder" in names and archive.read(f"{top}/byteorder") != b"little":
        raise pickle.UnpicklingError("tensors stored big-endian")

    def load_storage(key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
        return _read_entry(archive, raw, f"{top}/data/{key}", dtype, numel, path)

    with archive.open(data_pkl) as f:
        return _ArchiveUnpickler(f, load_storage).load()


def _collect_tensors(obj: _ArchivedObject, prefix: str, out: StateDict) -> None:
    """Walk the module tree, joining attribute names with dots: the paths are the state-dict keys."""
    for name, value in obj.attributes.items():
        if isinstance(value, torch.Tensor):
            out[prefix + name] = value
        elif isinstance(value, _ArchivedObject):
            _collect_tensors(value, f"{prefix}{name}.", out)


def _read_entry(archive: zipfile.ZipFile, raw: BinaryIO, name: str, dtype: torch.dtype, numel: int,
                path: str) -> torch.Tensor:
    """One storage entry as a CPU tensor of ``numel`` elements, mapped from the file where it is stored as is."""
    info = archive.getinfo(name)
    itemsize = torch.empty((), dtype=dtype).element_size()
    nbytes = numel * itemsize
    if info.file_size != nbytes:
        raise CheckpointError(f"{path}: entry {name} has {info.file_size} bytes, expected {nbytes}; it is damaged")
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
            raise CheckpointError(f"{path} is truncated: entry {name} has {max(available, 0)} of {nbytes} bytes; "
                                  f"delete the file and fetch it again")
        if offset % itemsize == 0:  # an unaligned entry (a hand-made zip) is read into aligned memory below
            return _map_entry(raw, offset, numel, dtype)
    buffer = bytearray(nbytes)
    with archive.open(info) as f:
        received = f.readinto(buffer)
    if received != nbytes:
        raise CheckpointError(f"{path} is truncated: entry {name} has {received} of {nbytes} bytes; "
                              f"delete the file and fetch it again")
    return torch.frombuffer(buffer, dtype=dtype)


def _map_entry(raw: BinaryIO, offset: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A tensor over ``numel`` elements of the file at ``offset``, through a private memory map of just those pages.

    Nothing is read until the tensor is used, and each entry has its own map, which is unmapped when its tensor is
    freed: a loader that converts tensors one by one and drops them holds the file's pages only for the tensor at
    hand, never the whole file beside the converted model. The map is copy-on-write, so the tensor is writable and
    writes never reach the file.
    """
    start = offset - offset % mmap.ALLOCATIONGRANULARITY  # maps must start on a granularity boundary
    length = offset - start + numel * torch.empty((), dtype=dtype).element_size()
    mapped = mmap.mmap(raw.fileno(), length, offset=start, access=mmap.ACCESS_COPY)
    return torch.frombuffer(mapped, dtype=dtype, count=numel, offset=offset - start)
