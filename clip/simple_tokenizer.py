"""CLIP's byte-level BPE tokenizer: the original's exact ids, built on first use, and fast.

The pipeline is the one OpenAI's CLIP runs, step for step: ``ftfy.fix_text``, HTML-unescape twice, strip, collapse
whitespace runs (``regex``'s ``\\s``) to one space, lower-case; split with the original pattern; map each word's
UTF-8 bytes to printable characters; merge byte pairs by rank; look the symbols up. What differs changes no id:

- text that ``ftfy`` and ``html.unescape`` provably leave unchanged skips them: printable ASCII without ``&``
  (tabs, newlines and form feeds allowed), and one line of other text that holds no character any of ftfy 6's fixes
  rewrites, is in NFC and does not look like mojibake to ftfy (``tests/test_tokenizer.py`` pins both down);
- the cleaned text is cut at its spaces first (the pattern never matches a space), and the ids of each piece and of
  each word are cached, in bounded caches;
- the merge loop scans a list instead of rebuilding sets, and a batch's tensor is filled from one int32 buffer.

Nothing happens at import: the vocabulary (shipped inside the package, see :func:`default_bpe`) is parsed when the
first tokenizer is built.
"""
from __future__ import annotations

import array
import functools
import gzip
import html
import operator
import os
import re
import threading
import unicodedata
import zlib
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple, Union

import regex
import torch

VOCAB_NAME = "bpe_simple_vocab_16e6.txt.gz"
# The vocabulary ships inside the package, as the original ships it; its hash is pinned by the tests.
VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"

START_OF_TEXT = "<|startoftext|>"
END_OF_TEXT = "<|endoftext|>"
# The original keeps merges[1:49152-256-2+1]: the header line is skipped, then 49,152 - 256 - 2 = 48,894 merges are
# kept (a 49,152-entry budget less the 256 byte symbols and the 2 specials). The 256 end-of-word byte symbols come on
# top, so the ids are 256 + 256 + 48,894 = 49,406 symbols, then <|startoftext|> = 49406 and <|endoftext|> = 49407.
_N_MERGES = 49152 - 256 - 2
_END_OF_WORD = "</w>"
_PATTERN = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
# Above any merge rank: the rank of a pair that is not a merge.
_NO_MERGE = 1 << 62
# Bound on the caches (a few hundred bytes an entry): enough for the distinct words of a large caption set to stay
# cached a long while, small enough that tokenizing millions of unique captions keeps memory flat.
_CACHE_LIMIT = 1 << 16
# Longer pieces are not cached (they are rare, and would make the bound on entries no bound on memory).
_CACHED_LENGTH = 64
# Text made only of printable ASCII and these whitespace characters (and no "&") is left unchanged by ftfy.fix_text
# and html.unescape; mapping them to spaces lets one `isprintable()` call check the rest.
_PLAIN_WHITESPACE = str.maketrans("\t\n\f", "   ")

TextInput = Union[str, Sequence[str]]


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


def get_pairs(word: Sequence[str]) -> Set[Tuple[str, str]]:
    """Return the set of adjacent symbol pairs of ``word`` (a sequence of at least one symbol)."""
    return set(zip(word[:-1], word[1:]))


def basic_clean(text: str) -> str:
    """Fix mojibake and glitches with ``ftfy``, unescape HTML twice, and strip, as the original does."""
    import ftfy  # imported on first need: plain ASCII text never needs it

    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


@functools.lru_cache()
def _whitespace_runs() -> "regex.Pattern":
    # The `regex` module's \s, as the original uses: unlike str.split() it does not count U+001C..U+001F as space.
    return regex.compile(r"\s+")


def whitespace_clean(text: str) -> str:
    """Replace every run of whitespace (as ``regex`` defines it) by one space, and strip."""
    return _whitespace_runs().sub(" ", text).strip()


def _is_plain(text: str) -> bool:
    """Whether ``ftfy.fix_text`` and ``html.unescape`` provably leave ``text`` unchanged.

    True for printable ASCII with no ``&``, plus tab, newline and form feed. On ASCII, ftfy's fixes reduce to: HTML
    entities (need ``&``), terminal escapes (need ESC), line breaks (``\\r``) and control characters (U+0000..U+0008,
    U+000B, U+000E..U+001F, U+007F); mojibake, quotes, widths, ligatures and NFC only touch non-ASCII text.
    ``html.unescape`` returns text without ``&`` as it is.
    """
    if not text.isascii() or "&" in text:
        return False
    return text.isprintable() or text.translate(_PLAIN_WHITESPACE).isprintable()


# The fixes of ftfy 6 (the fields of its TextFixerConfig). _ftfy_identity() reasons about exactly these: an ftfy
# with another list is not the one it was written for.
_FTFY_6_FIELDS = frozenset({
    "unescape_html", "remove_terminal_escapes", "fix_encoding", "restore_byte_a0", "replace_lossy_sequences",
    "decode_inconsistent_utf8", "fix_c1_controls", "fix_latin_ligatures", "fix_character_width", "uncurl_quotes",
    "fix_line_breaks", "fix_surrogates", "remove_control_chars", "normalization", "max_decode_length", "explain",
})


@functools.lru_cache()
def _ftfy_identity() -> Optional[Callable[[str], bool]]:
    """Return a test for text that ``ftfy.fix_text`` and ``html.unescape`` provably leave unchanged.

    ``None`` where the installed ftfy is not ftfy 6, whose ``fix_text`` this follows: it fixes each line as one segment
    (lines are cut at "\\n", and at ``max_decode_length`` characters), passing it through ``unescape_html`` (entities
    need "&"), ``fix_encoding`` (which returns text unchanged unless ``ftfy.badness.is_bad``), then fixers that each
    rewrite only the characters of one table or character class (C1 controls, ligatures, character widths, curly
    quotes, line breaks, surrogates, terminal escapes, which need ESC, and control characters), then NFC; and it stops
    after a pass that changed nothing. So a single line holding none of those characters, in NFC and not ``is_bad``,
    comes out as it went in. The character sets are read from ftfy itself; ``tests/test_tokenizer.py`` checks the
    claim on arbitrary text.
    """
    try:
        import ftfy
        from ftfy import badness, chardata, fixes

        fields, defaults = ftfy.TextFixerConfig._fields, ftfy.TextFixerConfig._field_defaults
        tables = (chardata.LIGATURES, chardata.WIDTH_MAP, chardata.CONTROL_CHARS)
        classes = (chardata.C1_CONTROL_RE, chardata.SINGLE_QUOTE_RE, chardata.DOUBLE_QUOTE_RE, fixes.SURROGATE_RE)
        is_bad = badness.is_bad
    except (ImportError, AttributeError):
        return None
    if not ftfy.__version__.startswith("6.") or set(fields) != _FTFY_6_FIELDS:
        return None
    if defaults["normalization"] not in ("NFC", None):
        return None
    touched = {ord(c) for c in "&\n\r\x1b\x85\u2028\u2029"}  # entities, segments, line breaks, terminal escapes
    for table in tables:
        touched.update(table)
    basic_plane = "".join(map(chr, range(0x10000)))  # where those classes lie; the whole range would take 0.1 s
    for character_class in classes:
        touched.update(map(ord, character_class.findall(basic_plane)))
    pattern = "[" + "".join(f"\\U{start:08x}-\\U{end:08x}" for start, end in _ranges(touched)) + "]"
    search = re.compile(pattern).search
    limit = defaults["max_decode_length"]

    def unchanged(text: str) -> bool:
        return (
            len(text) <= limit
            and search(text) is None
            and unicodedata.is_normalized("NFC", text)
            and not is_bad(text)
        )

    return unchanged


def _ranges(code_points: Iterable[int]) -> List[Tuple[int, int]]:
    """Sorted code points as (first, last) runs of consecutive ones."""
    runs: List[Tuple[int, int]] = []
    for point in sorted(code_points):
        if runs and runs[-1][1] == point - 1:
            runs[-1] = (runs[-1][0], point)
        else:
            runs.append((point, point))
    return runs


def _chunks(text: str) -> List[str]:
    """The space-separated pieces of the original's cleaned text, ``whitespace_clean(basic_clean(text)).lower()``.

    The word pattern never matches a space, so splitting the cleaned text on its spaces first and running the pattern
    on each piece finds the same words; pieces repeat far more than texts do, which makes them worth caching.
    """
    if _is_plain(text):
        # Only space, tab, newline and form feed can be whitespace here, where `regex`'s \s and str.split() agree;
        # and ASCII lower-casing maps no character to or from whitespace.
        return text.lower().split()
    unchanged = _ftfy_identity()
    if unchanged is not None and unchanged(text):
        cleaned = whitespace_clean(text.strip()).lower()  # what basic_clean() gives for such text
    else:
        cleaned = whitespace_clean(basic_clean(text)).lower()
    return cleaned.split(" ") if cleaned else []


def _read_merges(bpe_path: Union[str, "os.PathLike[str]"]) -> List[Tuple[str, ...]]:
    """Read the merges of a gzipped vocabulary file: lines 2 .. 1 + _N_MERGES, each split on whitespace."""
    with open(bpe_path, "rb") as f:
        raw = f.read()
    lines = _decompress_head(raw).split("\n", _N_MERGES + 1)
    return list(map(tuple, map(str.split, lines[1 : _N_MERGES + 1])))


def _decompress_head(raw: bytes) -> str:
    """Decompress and decode the start of a gzipped vocabulary, up to the end of its last merge line.

    The merges are the first ~15% of the 3.2 MB text: stopping there saves most of the load time.
    """
    decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)  # 16 + : a gzip header and trailer
    chunks: List[bytes] = []
    newlines = 0
    pending = raw
    try:
        while newlines <= _N_MERGES and not decompressor.eof:
            chunk = decompressor.decompress(pending, 1 << 19)
            pending = decompressor.unconsumed_tail
            if not chunk and not pending:
                break
            chunks.append(chunk)
            newlines += chunk.count(b"\n")
    except zlib.error:
        newlines = 0
    if newlines > _N_MERGES:
        data = b"".join(chunks)
        return data[: data.rfind(b"\n") + 1].decode("utf-8")
    # A short file, several gzip members or a damaged one: read it whole, as gzip does (and fail as gzip fails).
    return gzip.decompress(raw).decode("utf-8")


class SimpleTokenizer:
    """CLIP's byte-level BPE tokenizer, with the original's attributes and exact ids.

    Parameters
    ----------
    bpe_path : str or os.PathLike, optional
        The gzipped vocabulary (``bpe_simple_vocab_16e6.txt.gz``); by default :func:`default_bpe` finds, or fetches,
        it.

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

    def __init__(self, bpe_path: Optional[Union[str, "os.PathLike[str]"]] = None) -> None:
        if bpe_path is None:
            bpe_path = default_bpe()
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {char: byte for byte, char in self.byte_encoder.items()}
        merges = _read_merges(bpe_path)
        symbols = list(self.byte_encoder.values())
        vocab = symbols + [s + _END_OF_WORD for s in symbols] + list(map("".join, merges))
        vocab += [START_OF_TEXT, END_OF_TEXT]
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

    def _reset_bpe_cache(self) -> None:
        # The original seeds its cache so that the special tokens, written in a text, encode to their own ids.
        self.cache.clear()
        self.cache.update((special, special) for special in (START_OF_TEXT, END_OF_TEXT))

    def _reset_ids_cache(self) -> None:
        self._ids_cache.clear()
        self._ids_cache.update((s, array.array("i", [self.encoder[s]])) for s in (START_OF_TEXT, END_OF_TEXT))

    def _merge(self, symbols: List[str]) -> List[str]:
        """Apply the merges to a word's symbols, lowest rank first, each pair left to right, until none applies."""
        rank_of = self.bpe_ranks.get
        while len(symbols) > 1:
            ranks = [rank_of(pair, _NO_MERGE) for pair in zip(symbols, symbols[1:])]
            best = min(ranks)
            if best == _NO_MERGE:
                break
            # Ranks are unique to a pair, so the first index with the best rank is the pair's first occurrence.
            i = ranks.index(best)
            first, second = symbols[i], symbols[i + 1]
            merged = symbols[:i]
            n = len(symbols)
            while i < n:
                if i + 1 < n and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols

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
            symbols[-1] += _END_OF_WORD
            word = " ".join(self._merge(symbols))
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
        """The ids of one space-free piece of cleaned text, through the cache."""
        ids = self._ids_cache.get(chunk)
        if ids is not None:
            return ids
        found = array.array("i")
        for word in self.pat.findall(chunk):
            word_ids = self._ids_cache.get(word)
            if word_ids is None:
                # UTF-8 bytes -> one latin-1 character each -> each byte's printable stand-in.
                symbols = list(word.encode("utf-8").decode("latin-1").translate(self._byte_table))
                symbols[-1] += _END_OF_WORD
                encoder = self.encoder
                word_ids = array.array("i", [encoder[s] for s in self._merge(symbols)])
                self._remember(word, word_ids)
            found += word_ids
        # A piece that is one word equals that word's entry: the pattern cuts a word alone as it cut it in context.
        self._remember(chunk, found)
        return found

    def _ids(self, text: str) -> "array.array[int]":
        """The ids of ``text``, as encode() gives them, in an int32 array."""
        ids = array.array("i")
        cached = self._ids_cache.get
        for chunk in _chunks(text):
            chunk_ids = cached(chunk)
            ids += chunk_ids if chunk_ids is not None else self._chunk_ids(chunk)
        return ids

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
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, not {type(text).__name__}")
        return self._ids(text).tolist()

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
        return b"".join([id_bytes[t] for t in tokens]).decode("utf-8", errors="replace").replace(_END_OF_WORD, " ")

    def _tokenize(self, texts: TextInput, context_length: int, truncate: bool) -> torch.IntTensor:
        """The rows of :func:`tokenize` for this tokenizer."""
        return _rows(texts, context_length, truncate, self._ids, self.encoder[START_OF_TEXT],
                     self.encoder[END_OF_TEXT])


def _rows(texts: TextInput, context_length: int, truncate: bool, ids_of: Callable[[str], "array.array[int]"],
          sot: int, eot: int) -> torch.IntTensor:
    """Each text's ids (an int32 array from ``ids_of``) between ``sot`` and ``eot``, zero-padded to
    ``context_length``."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        return torch.zeros(0, context_length, dtype=torch.int32)
    room = context_length - 2  # the ids that fit between the start and end tokens
    # The whole batch in one zeroed int32 buffer ("i" is 32-bit on every platform torch supports), each row's ids
    # copied in as a block: four times faster than filling a list and converting it.
    rows = array.array("i", bytes(4 * len(texts) * context_length))
    start = 0
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"tokenize() takes a str or a list of str; item {i} is a {type(text).__name__}")
        ids = ids_of(text)
        n = len(ids)
        if n > room:
            if not truncate:
                raise RuntimeError(_too_long_message(text, i, n + 2, context_length))
            ids = ids[:room]
            n = room
        rows[start] = sot
        rows[start + 1 : start + 1 + n] = ids
        rows[start + 1 + n] = eot
        start += context_length
    # [len(texts) * context_length] -> [len(texts), context_length]; the clone owns its memory, as any tensor.
    return torch.frombuffer(rows, dtype=torch.int32).view(len(texts), context_length).clone()


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
        A text does not fit and ``truncate`` is False (the original's error type).
    TypeError
        An item is not a str.
    ValueError
        ``context_length`` is below 2 (no room for the start and end tokens).
    """
    context_length = operator.index(context_length)  # an int, or an integer type such as numpy's
    if context_length < 2:
        raise ValueError(f"context_length must be at least 2 (the start and end tokens), got {context_length}")
    if tokenizer is None:
        tokenizer = _default_tokenizer()
    if type(tokenizer).encode is SimpleTokenizer.encode:  # ours, or a subclass that keeps our encode
        return tokenizer._tokenize(texts, context_length, truncate)
    # Another tokenizer (a client's own, assigned to clip.clip._tokenizer): its encode and special ids, as the
    # original's tokenize used them.
    return _rows(texts, context_length, truncate, lambda text: array.array("i", tokenizer.encode(text)),
                 tokenizer.encoder[START_OF_TEXT], tokenizer.encoder[END_OF_TEXT])


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
