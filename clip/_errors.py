"""The exceptions clients catch, one base per concern: a checkpoint that cannot be read (``CheckpointError``), a
state dict that is not CLIP's (``StateDictError``), a download that failed (``DownloadError``). Each is an instance
of the class the original raised in the same case, so ``except`` clauses written for the original keep working.
It imports nothing of the package and never imports torch.
"""
import reprlib
from typing import Any, Iterable

__all__ = ["CacheFolderError", "CheckpointError", "CheckpointNotFoundError", "DownloadError", "StateDictError",
           "format_keys"]


class CheckpointError(RuntimeError):
    """A file that cannot be read as a CLIP checkpoint; the message names the file and what was expected.

    A ``RuntimeError``, as the original's ``load`` raised for a name or path it could not load.
    """


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """Nothing at a checkpoint path: the original's ``RuntimeError``, and the ``FileNotFoundError`` it is."""


class StateDictError(CheckpointError, KeyError):
    """A state dict that is not one of a CLIP model; the message lists the keys or shapes that do not fit.

    A ``RuntimeError`` (as every ``CheckpointError``) and a ``KeyError``: the errors the original's ``build_model``
    raised for keys or shapes ``load_state_dict`` refused and for a missing key. Made in one place,
    ``clip.model._not_clip``, for a dict, a file of any format and a folder alike.
    """

    __str__ = CheckpointError.__str__  # the message as written: KeyError's own __str__ would quote it


class DownloadError(RuntimeError):
    """A file could not be downloaded or verified; the message says what was tried and what to do."""


class CacheFolderError(DownloadError, FileExistsError):
    """A file stands where the cache folder should be: the original's ``FileExistsError`` from ``os.makedirs``."""


def format_keys(keys: Iterable[Any], limit: int = 20) -> str:
    """``"a, b, c ..."``: the first ``limit`` keys for a message (``"none"`` when there are none).

    Keys that are not strings (from a damaged file) are shown by a depth- and length-bounded ``repr``.
    """
    keys = list(keys)
    shown = ", ".join(k if isinstance(k, str) else reprlib.repr(k) for k in keys[:limit])
    return (shown or "none") + (" ..." if len(keys) > limit else "")
