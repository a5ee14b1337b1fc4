"""The original's tokenizer module: ``SimpleTokenizer`` and ``tokenize``, built on ``_cleaning``, ``_bpe`` and
``_vocab``, with caches of pieces and words. It must never give other ids than the original's, and never does work
at import.
"""
from __future__ import annotations

import array
import operator
import threading
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import regex
import torch

from ._bpe import merge
from ._cleaning import chunks
from ._vocab import (END_OF_TEXT, END_OF_WORD, START_OF_TEXT, PathLike, bytes_to_unicode, default_bpe, read_merges,
                     symbols_in_id_order)

# The rest of the original's module map, where clients import it from.
from ._bpe import get_pairs  # noqa: F401
from ._cleaning import basic_clean, whitespace_clean  # noqa: F401
from ._vocab import VOCAB_NAME, VOCAB_SHA256  # noqa: F401

_PATTERN = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
# Bound on the caches (a few hundred bytes an entry): enough for the distinct words of a large caption set to stay
# cached a long while, small enough that tokenizing millions of unique captions keeps memory flat.
_CACHE_LIMIT = 1 << 16
# Longer pieces are not cached (they are rare, and would make the bound on entries no bound on memory).
_CACHED_LENGTH = 64

TextInput = Union[str, Sequence[str]]


class SimpleTokenizer:
    """CLIP's byte-level BPE tokenizer, with the original's attributes and exact ids.

    Parameters
    ----------
    bpe_path : str or os.PathLike, optional
        The gzipped vocabulary (``bpe_simple_vocab_16e6.txt.gz``); by default the copy :func:`default_bpe` finds.

    Attributes
    ----------
    encoder : dict
        Symbol (a BPE string) to id, 49,408 entries.
    decoder : dict
        Id to symbol.
    bpe_ranks : dict
        Merge pair to its rank (lower merges first).
    byte_encoder, byte_decoder : dict
        Byte to printable character, and back (see :func:`bytes_to_unicode`).
    cache : dict
        Results of :meth:`bpe`, seeded with the two special tokens, which map to themselves (bounded).
    pat : regex.Pattern
        The original's word-splitting pattern.
    """

    def __init__(self, bpe_path: Optional[PathLike] = None) -> None:
        if bpe_path is None:
            bpe_path = default_bpe()
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {char: byte for byte, char in self.byte_encoder.items()}
        merges = read_merges(bpe_path)
        vocab = symbols_in_id_order(merges)
        # dict(zip(...)) as the original: were a symbol listed twice, its last id wins, and the same for ranks.
        self.encoder: Dict[str, int] = dict(zip(vocab, range(len(vocab))))
        self.decoder: Dict[int, str] = dict(zip(self.encoder.values(), self.encoder.keys()))
        self.bpe_ranks: Dict[Tuple[str, ...], int] = dict(zip(merges, range(len(merges))))
        self.cache: Dict[str, str] = {}
        self.pat = regex.compile(_PATTERN, regex.IGNORECASE)
        # Bytes that are not their own printable stand-in, for str.translate on latin-1-decoded UTF-8.
        self._byte_table = {b: c for b, c in self.byte_encoder.items() if chr(b) != c}
        # Text piece (a space-separated chunk of cleaned text, or one word the pattern cut) -> its ids. Never mutated.
        self._ids_cache: Dict[str, "array.array[int]"] = {}
        self._id_bytes: Optional[Dict[int, bytes]] = None
        self._reset_bpe_cache()
        self._reset_ids_cache()

    # A full cache is replaced by a new dict, never cleared in place: a thread that reads or writes the old one
    # meanwhile still finds the special tokens there, so it can neither miss them nor store a wrong entry for them.
    def _reset_bpe_cache(self) -> None:
        # The original seeds its cache so that the special tokens, written in a text, encode to their own ids.
        self.cache = {special: special for special in (START_OF_TEXT, END_OF_TEXT)}

    def _reset_ids_cache(self) -> None:
        self._ids_cache = {s: array.array("i", [self.encoder[s]]) for s in (START_OF_TEXT, END_OF_TEXT)}

    def bpe(self, token: str) -> str:
        """Merge one byte-mapped word, returning its symbols joined by spaces, the last ending in ``</w>``.

        Parameters
        ----------
        token : str
            A word already mapped through :attr:`byte_encoder` (as the original's ``bpe`` takes it).
        """
        word = self.cache.get(token)
        if word is None:
            symbols = list(token)
            symbols[-1] += END_OF_WORD
            word = " ".join(merge(symbols, self.bpe_ranks))
            if len(token) <= _CACHED_LENGTH:
                if len(self.cache) >= _CACHE_LIMIT:
                    self._reset_bpe_cache()
                self.cache[token] = word
        return word

    def _remember(self, key: str, ids: "array.array[int]") -> None:
        if len(key) <= _CACHED_LENGTH:
            if len(self._ids_cache) >= _CACHE_LIMIT:
                self._reset_ids_cache()
            self._ids_cache[key] = ids

    def _chunk_ids(self, chunk: str) -> "array.array[int]":
        """The ids of one space-free piece of cleaned text that is not in the cache (``_ids`` looks first)."""
        found = array.array("i")
        for word in self.pat.findall(chunk):
            word_ids = self._ids_cache.get(word)
            if word_ids is None:
                # UTF-8 bytes -> one latin-1 character each -> each byte's printable stand-in.
                symbols = list(word.encode("utf-8").decode("latin-1").translate(self._byte_table))
                symbols[-1] += END_OF_WORD
                encoder = self.encoder
                word_ids = array.array("i", [encoder[s] for s in merge(symbols, self.bpe_ranks)])
                self._remember(word, word_ids)
            found += word_ids
        # A piece that is one word equals that word's entry: the pattern cuts a word alone as it cut it in context.
        self._remember(chunk, found)
        return found

    def _ids(self, text: str) -> "array.array[int]":
        """The ids of ``text``, as encode() gives them, in an int32 array."""
        ids = array.array("i")
        cached = self._ids_cache.get
        for chunk in chunks(text):
            chunk_ids = cached(chunk)
            ids += chunk_ids if chunk_ids is not None else self._chunk_ids(chunk)
        return ids

    def _ids_through_bpe(self, text: str) -> "array.array[int]":
        """The ids of ``text`` through :meth:`bpe`, word by word as the original's encode: for a subclass that
        overrides ``bpe`` (the fast path in ``_ids`` merges without calling it, and caches ids it never sees)."""
        ids = array.array("i")
        byte_encoder, encoder = self.byte_encoder, self.encoder
        for chunk in chunks(text):
            for word in self.pat.findall(chunk):
                ids.extend(encoder[symbol] for symbol in
                           self.bpe("".join(byte_encoder[b] for b in word.encode("utf-8"))).split(" "))
        return ids

    def _ids_function(self) -> Callable[[str], "array.array[int]"]:
        """``_ids``, or ``_ids_through_bpe`` when a subclass overrides :meth:`bpe`."""
        return self._ids if type(self).bpe is SimpleTokenizer.bpe else self._ids_through_bpe

    def encode(self, text: str) -> List[int]:
        """Clean ``text`` as the original does, split it into words, and return the BPE ids.

        Parameters
        ----------
        text : str
            Any text. ``<|startoftext|>`` and ``<|endoftext|>`` written in it encode to their ids, as in the
            original.

        Returns
        -------
        list of int
            The ids, without the start and end tokens.
        """
        if isinstance(text, bytes):  # the original's ftfy raised UnicodeError for bytes
            raise UnicodeError("encode() takes a str, not bytes: decode it first (text.decode('utf-8'))")
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, not {type(text).__name__}")
        return self._ids_function()(text).tolist()

    def decode(self, tokens: Iterable[int]) -> str:
        """Turn ids back into text: symbols joined, bytes decoded as UTF-8 (errors replaced), ``</w>`` as a space.

        Parameters
        ----------
        tokens : iterable of int
            Ids (a list, or a 1-D tensor).
        """
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.tolist()
        if self._id_bytes is None:
            byte_of = self.byte_decoder
            self._id_bytes = {i: bytes([byte_of[c] for c in s]) for i, s in self.decoder.items()}
        id_bytes = self._id_bytes
        return b"".join([id_bytes[t] for t in tokens]).decode("utf-8", errors="replace").replace(END_OF_WORD, " ")

    def _tokenize(self, texts: TextInput, context_length: int, truncate: bool) -> torch.IntTensor:
        """The rows of :func:`tokenize` for this tokenizer."""
        return _rows(texts, context_length, truncate, self._ids_function(), self.encoder[START_OF_TEXT],
                     self.encoder[END_OF_TEXT])


def _rows(texts: TextInput, context_length: int, truncate: bool, ids_of: Callable[[str], "array.array[int]"],
          sot: int, eot: int) -> torch.IntTensor:
    """Each text's ids (an int32 array from ``ids_of``) between ``sot`` and ``eot``, zero-padded to
    ``context_length``.

    In the original's order: every text is encoded, then the result is allocated (so a negative or huge
    ``context_length`` fails there, with torch's ``RuntimeError``), then each row is checked and filled. The rows
    are assembled only as wide as the longest row, so nothing but the result grows with ``context_length``.
    """
    texts = [texts] if isinstance(texts, str) else list(texts)
    all_ids = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"tokenize() takes a str or a list of str; item {i} is a {type(text).__name__}")
        all_ids.append(ids_of(text))
    result = torch.zeros(len(texts), context_length, dtype=torch.int32)
    room = context_length - 2  # the ids that fit between the start and end tokens
    for i, ids in enumerate(all_ids):
        if len(ids) > room:
            if not truncate:
                raise RuntimeError(_too_long_message(texts[i], i, len(ids) + 2, context_length))
            if context_length < 1:  # the original's tokens[-1] = eot on an empty row
                raise IndexError(f"context_length {context_length} leaves no room for the end-of-text token")
            all_ids[i] = ids[:max(room, 0)]
    width = min(context_length, max((len(ids) + 2 for ids in all_ids), default=0))
    if width == 0:
        return result
    # The used columns in one zeroed int32 buffer ("i" is 32-bit on every platform torch supports), each row's ids
    # copied in as a block: four times faster than filling a list and converting it.
    rows = array.array("i", bytes(4 * len(texts) * width))
    for start, ids in zip(range(0, len(rows), width), all_ids):
        n = len(ids)
        if width > 1:
            rows[start] = sot
            rows[start + 1 : start + 1 + n] = ids
        rows[start + min(n + 1, width - 1)] = eot  # a row of context_length 1 is the end-of-text token alone
    # [len(texts) * width] -> [len(texts), width], copied into the first columns of the result.
    result[:, :width] = torch.frombuffer(rows, dtype=torch.int32).view(len(texts), width)
    return result


def _too_long_message(text: str, index: int, n_tokens: int, context_length: int) -> str:
    start = text if len(text) <= 40 else text[:40] + "..."
    return (
        f"Input {start!r} (item {index}) is too long for context length {context_length}: it needs {n_tokens} "
        f"tokens, counting the start and end tokens. Pass truncate=True to cut it to {context_length} tokens, "
        f"ending with the end-of-text token."
    )


_default: Optional[SimpleTokenizer] = None
_default_lock = threading.Lock()


def _default_tokenizer() -> SimpleTokenizer:
    """The shared tokenizer behind :func:`tokenize` (and ``clip.clip._tokenizer``), built on first use."""
    global _default
    tokenizer = _default
    if tokenizer is None:
        with _default_lock:
            if _default is None:
                _default = SimpleTokenizer()
            tokenizer = _default
    return tokenizer


def tokenize(texts: TextInput, context_length: int = 77, truncate: bool = False, *,
             tokenizer: Optional[Any] = None) -> torch.IntTensor:
    """Tokenize text(s) into CLIP's input rows.

    Parameters
    ----------
    texts : str or sequence of str
        One text or several.
    context_length : int
        Length of each row; every CLIP model uses 77.
    truncate : bool
        Cut a text that does not fit, ending its row with the end-of-text token (49407), instead of raising.
    tokenizer : SimpleTokenizer or similar, optional
        The tokenizer to use (anything with ``encode`` and ``encoder``); default the shared one, built on first use.

    Returns
    -------
    torch.IntTensor
        int32, shape ``[number of texts, context_length]``: each row is 49406, the text's ids, 49407, then zeros.

    Raises
    ------
    RuntimeError
        A text does not fit and ``truncate`` is False (so any text when ``context_length`` is below 2), or
        ``context_length`` is negative or too large to allocate: the original's error type in each case.
    TypeError
        An item is not a str, or ``context_length`` is not an integer.
    """
    context_length = operator.index(context_length)  # an int, or an integer type such as numpy's
    if tokenizer is None:
        tokenizer = _default_tokenizer()
    if type(tokenizer).encode is SimpleTokenizer.encode:  # ours, or a subclass that keeps our encode
        return tokenizer._tokenize(texts, context_length, truncate)
    # Another tokenizer (a client's own, assigned to clip.clip._tokenizer): its encode and special ids, as the
    # original's tokenize used them.
    return _rows(texts, context_length, truncate, lambda text: array.array("i", tokenizer.encode(text)),
                 tokenizer.encoder[START_OF_TEXT], tokenizer.encoder[END_OF_TEXT])
