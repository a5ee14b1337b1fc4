"""The tokenizer's vocabulary: the file shipped in the package (or ``CLIP_BPE_PATH``), its merges and its symbols in
id order. It must never read the file at import: the first tokenizer built reads it.
"""
import functools
import gzip
import os
from typing import Dict, List, Tuple, Union

VOCAB_NAME = "bpe_simple_vocab_16e6.txt.gz"
# The vocabulary ships inside the package, as the original ships it; its hash is pinned by the tests.
VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"

START_OF_TEXT = "<|startoftext|>"
END_OF_TEXT = "<|endoftext|>"
END_OF_WORD = "</w>"
# The original keeps merges[1:49152-256-2+1]: the header line is skipped, then 49,152 - 256 - 2 = 48,894 merges are
# kept (a 49,152-entry budget less the 256 byte symbols and the 2 specials). The 256 end-of-word byte symbols come on
# top, so the ids are 256 + 256 + 48,894 = 49,406 symbols, then <|startoftext|> = 49406 and <|endoftext|> = 49407.
N_MERGES = 49152 - 256 - 2

PathLike = Union[str, "os.PathLike[str]"]


@functools.lru_cache()
def bytes_to_unicode() -> Dict[int, str]:
    """Map each byte 0..255 to a printable character, as the original does.

    Bytes that are already printable and not whitespace (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) map to
    themselves; the other 68 map, in byte order, to ``chr(256)``, ``chr(257)``, ...

    Returns
    -------
    dict
        ``{byte: character}`` for the 256 bytes, in the original's order (the printable ones first). The same
        dictionary object is returned on every call.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in mapping]
    mapping.update((b, chr(256 + n)) for n, b in enumerate(others))
    return mapping


def default_bpe() -> str:
    """The path of CLIP's vocabulary: the copy inside the package, or the file ``CLIP_BPE_PATH`` names.

    Returns
    -------
    str
        The path of the gzipped vocabulary.

    Raises
    ------
    FileNotFoundError
        ``CLIP_BPE_PATH`` names no file.
    """
    explicit = os.environ.get("CLIP_BPE_PATH")
    if not explicit:
        return os.path.join(os.path.dirname(os.path.abspath(__file__)), VOCAB_NAME)
    path = os.path.expanduser(explicit)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"CLIP_BPE_PATH is set to {explicit!r}, which is not a file: point it at a copy of {VOCAB_NAME} "
            f"(SHA-256 {VOCAB_SHA256}), or unset it to use the copy inside the package"
        )
    return path


def read_merges(bpe_path: PathLike) -> List[Tuple[str, ...]]:
    """Read the merges of a gzipped vocabulary file: lines 2 .. 1 + N_MERGES, each split on whitespace."""
    with open(bpe_path, "rb") as f:
        text = gzip.decompress(f.read()).decode("utf-8")
    lines = text.split("\n", N_MERGES + 1)  # the rest of the file is not split: the merges are all we read
    return list(map(tuple, map(str.split, lines[1 : N_MERGES + 1])))


def symbols_in_id_order(merges: List[Tuple[str, ...]]) -> List[str]:
    """The vocabulary's symbols, each at its id: the 256 byte symbols, the same with ``</w>``, one per merge, then
    ``<|startoftext|>`` and ``<|endoftext|>``."""
    byte_symbols = list(bytes_to_unicode().values())
    return [*byte_symbols, *(s + END_OF_WORD for s in byte_symbols), *map("".join, merges), START_OF_TEXT,
            END_OF_TEXT]
