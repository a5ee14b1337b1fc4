"""The original's text cleaning (ftfy, HTML unescaping twice, whitespace, lower case), skipping ftfy and unescaping
where they provably change nothing. It must never give a cleaned text other than the original's.
"""
import functools
import html
import re
import unicodedata
from typing import Callable, Iterable, List, Optional, Tuple

import regex

# Text made only of printable ASCII and these whitespace characters (and no "&") is left unchanged by ftfy.fix_text
# and html.unescape; mapping them to spaces lets one `isprintable()` call check the rest.
_PLAIN_WHITESPACE = str.maketrans("\t\n\f", "   ")

# The fixes of ftfy 6 (the fields of its TextFixerConfig). ftfy_identity() reasons about exactly these: an ftfy
# with another list is not the one it was written for.
_FTFY_6_FIELDS = frozenset({
    "unescape_html", "remove_terminal_escapes", "fix_encoding", "restore_byte_a0", "replace_lossy_sequences",
    "decode_inconsistent_utf8", "fix_c1_controls", "fix_latin_ligatures", "fix_character_width", "uncurl_quotes",
    "fix_line_breaks", "fix_surrogates", "remove_control_chars", "normalization", "max_decode_length", "explain",
})


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


def chunks(text: str) -> List[str]:
    """The space-separated pieces of the original's cleaned text, ``whitespace_clean(basic_clean(text)).lower()``.

    The word pattern never matches a space, so splitting the cleaned text on its spaces first and running the pattern
    on each piece finds the same words; pieces repeat far more than texts do, which makes them worth caching.
    """
    if is_plain(text):
        # Only space, tab, newline and form feed can be whitespace here, where `regex`'s \s and str.split() agree;
        # and ASCII lower-casing maps no character to or from whitespace.
        return text.lower().split()
    unchanged = ftfy_identity()
    if unchanged is not None and unchanged(text):
        cleaned = whitespace_clean(text.strip()).lower()  # what basic_clean() gives for such text
    else:
        cleaned = whitespace_clean(basic_clean(text)).lower()
    return cleaned.split(" ") if cleaned else []


def is_plain(text: str) -> bool:
    """Whether ``ftfy.fix_text`` and ``html.unescape`` provably leave ``text`` unchanged.

    True for printable ASCII with no ``&``, plus tab, newline and form feed. On ASCII, ftfy's fixes reduce to: HTML
    entities (need ``&``), terminal escapes (need ESC), line breaks (``\\r``) and control characters (U+0000..U+0008,
    U+000B, U+000E..U+001F, U+007F); mojibake, quotes, widths, ligatures and NFC only touch non-ASCII text.
    ``html.unescape`` returns text without ``&`` as it is.
    """
    if not text.isascii() or "&" in text:
        return False
    return text.isprintable() or text.translate(_PLAIN_WHITESPACE).isprintable()


@functools.lru_cache()
def ftfy_identity() -> Optional[Callable[[str], bool]]:
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
    from packaging.version import InvalidVersion, Version

    try:
        import ftfy
        from ftfy import badness, chardata, fixes

        fields, defaults = ftfy.TextFixerConfig._fields, ftfy.TextFixerConfig._field_defaults
        tables = (chardata.LIGATURES, chardata.WIDTH_MAP, chardata.CONTROL_CHARS)
        classes = (chardata.C1_CONTROL_RE, chardata.SINGLE_QUOTE_RE, chardata.DOUBLE_QUOTE_RE, fixes.SURROGATE_RE)
        is_bad = badness.is_bad
        major = Version(ftfy.__version__).major
    except (ImportError, AttributeError, InvalidVersion):
        return None
    if major != 6 or set(fields) != _FTFY_6_FIELDS:
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
