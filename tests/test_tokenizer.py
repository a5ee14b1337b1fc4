"""The tokenizer: exact ids against golden rows and a plain restatement of the original, its fast paths (the heap
that merges long words in O(n log n) among them), its errors, its bounded caches, nothing at import, and how the
vocabulary is found and verified.

``ReferenceTokenizer`` below restates OpenAI's algorithm as plainly as possible (no caches beyond the original's, no
shortcuts); hypothesis then compares ``clip.simple_tokenizer`` with it on arbitrary and adversarial text.
``benchmarks/tokenizer.py`` uses the same class as its stand-in for the original.
"""
import gzip
import hashlib
import html
import json
import math
import os
import pathlib
import random
import string
import subprocess
import sys
import textwrap
import threading

import ftfy
import pytest
import regex
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from clip import _bpe, _cleaning
from clip import simple_tokenizer as tk

REPO = pathlib.Path(__file__).resolve().parents[1]
SOT, EOT = 49406, 49407  # the ids of <|startoftext|> and <|endoftext|>, the last two of the 49,408


class ReferenceTokenizer:
    """OpenAI's tokenizer restated step by step: the oracle for the fast implementation.

    Everything follows the original's order: ftfy, HTML-unescape twice, strip, collapse ``regex`` whitespace, strip,
    lower-case; split with the original pattern; map UTF-8 bytes to printable characters; repeatedly merge the
    lowest-ranked adjacent pair (all its occurrences, left to right) until no pair is a merge.
    """

    PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

    def __init__(self, bpe_path):
        printable = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
        others = [b for b in range(256) if b not in printable]
        chars = [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]
        self.byte_encoder = dict(zip(printable + others, chars))
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
        vocab = list(self.byte_encoder.values())
        vocab += [v + "</w>" for v in vocab]
        vocab += ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = {s: i for i, s in enumerate(vocab)}
        self.decoder = {i: s for s, i in self.encoder.items()}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.memo = {"<|startoftext|>": "<|startoftext|>", "<|endoftext|>": "<|endoftext|>"}
        self.pattern = regex.compile(self.PATTERN, regex.IGNORECASE)

    @staticmethod
    def clean(text):
        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        return regex.sub(r"\s+", " ", text).strip().lower()

    def bpe(self, token):
        if token in self.memo:
            return self.memo[token]
        self.memo[token] = " ".join(reference_merge(list(token[:-1]) + [token[-1] + "</w>"], self.ranks))
        return self.memo[token]

    def words(self, text):
        return self.pattern.findall(self.clean(text))

    def encode(self, text):
        ids = []
        for word in self.words(text):
            mapped = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            ids.extend(self.encoder[s] for s in self.bpe(mapped).split(" "))
        return ids

    def decode(self, ids):
        text = "".join(self.decoder[i] for i in ids)
        return bytearray(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace").replace("</w>", " ")

    def tokenize(self, texts, context_length=77, truncate=False):
        texts = [texts] if isinstance(texts, str) else texts
        rows = []
        for text in texts:
            ids = self.encode(text)
            if len(ids) + 2 > context_length and not truncate:
                raise RuntimeError(f"Input {text} is too long for context length {context_length}")
            rows.append(token_row(ids, context_length))
        return torch.tensor(rows, dtype=torch.int32).reshape(len(texts), context_length)  # [] gives [0, length]


def reference_merge(word, ranks):
    """The original's merge loop on a list of symbols and any rank table: repeatedly take the lowest-ranked adjacent
    pair and merge all its occurrences, left to right, until no adjacent pair is a merge."""
    while len(word) > 1:
        pair = min(set(zip(word, word[1:])), key=lambda p: ranks.get(p, math.inf))
        if pair not in ranks:
            break
        merged, i = [], 0
        while i < len(word):
            if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
                merged.append(word[i] + word[i + 1])
                i += 2
            else:
                merged.append(word[i])
                i += 1
        word = merged
    return word


def token_row(ids, context_length=77):
    """The original's row for a text's ids: <|startoftext|>, the ids, <|endoftext|>, zeros to ``context_length``;
    cut to ``context_length`` ending with <|endoftext|> where the ids do not fit (``truncate=True``)."""
    row = [SOT, *ids[: context_length - 2], EOT]
    return row + [0] * (context_length - len(row))


@pytest.fixture(scope="session")
def ftfy_unchanged():
    unchanged = _cleaning.ftfy_identity()
    if unchanged is None:  # then every text takes the full path, which the other tests cover
        pytest.skip(f"the non-ASCII shortcut is only for ftfy 6; this is ftfy {ftfy.__version__}")
    return unchanged


@pytest.fixture(scope="session")
def reference(vocab_path):
    return ReferenceTokenizer(vocab_path)


@pytest.fixture(scope="session")
def tokenizer(vocab_path):
    return tk.SimpleTokenizer(str(vocab_path))


# ----------------------------------------------------------------------------------------------------------------
# Text strategies: arbitrary unicode, and pieces chosen to hit every step of the cleaning and splitting.

PIECES = [
    # HTML entities ftfy and html.unescape treat differently, nested, without semicolons, in capitals
    "&amp;", "&amp;amp;", "&amp;lt;", "&lt;b&gt;", "&#39;", "&#x27;", "&#0;", "&#28;", "&#11;", "&#133;", "&nbsp;",
    "&copy", "&eacute;", "&EACUTE;", "&notit;", "&#128512;", "&#xD800;", "&", "#", ";", "<", ">",
    # whitespace and control characters: ftfy removes some, regex's \s and str.split() disagree on U+001C..U+001F
    " ", "  ", "\t", "\n", "\r\n", "\r", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x1f", "\x85", "\xa0", "\u2028",
    "\u2029", "\u3000", "\u200b", "\ufeff", "\x00", "\x07", "\x1b[31m", "\x1b", "\x7f", "\x80", "\x9d", "\ud800",
    # lower-casing that changes length or meets the pattern's IGNORECASE; ligatures; widths; combining marks
    "İ", "ẞ", "ß", "ſ", "K", "Å", "ǅ", "ŉ", "ΐ", "ﬁ", "ﬀ", "ＡＢＣ１２３", "e\u0301", "\u0301", "Σ", "ΣΑΣ",
    # the special tokens and near misses, contractions
    "<|startoftext|>", "<|endoftext|>", "<|ENDOFTEXT|>", "<|ſtartoftext|>", "<|endoftext", "a<|endoftext|>b",
    "'s", "'S", "'t", "'re", "'ve", "'m", "'ll", "'LL", "'d", "''s", "’s", "don't", "I'M",
    # mojibake, curly quotes, emoji sequences, scripts, digits
    "cafÃ©", "Ã¢â‚¬â„¢", "â€œquotedâ€\x9d", "ÃƒÂ©", "“quoted”", "‘single’", "👍🏽", "🇫🇷", "👨‍👩‍👧", "😀",
    "日本語", "中文", "한국어", "مرحبا", "עברית", "ไทย", "१२३", "½", "²", "1,234.56", "...", "!!!", "--", "—",
    "a", "photo", "of", "the", "dog", "Running", "PHOTO", "Zürich", "naïve",
]
pieces = st.sampled_from(PIECES)
any_char = st.characters(blacklist_categories=())  # every code point, surrogates included
messy_text = st.lists(st.one_of(pieces, pieces, st.text(max_size=4), any_char), max_size=24).map("".join)
ascii_text = st.lists(
    st.one_of(st.sampled_from([p for p in PIECES if p.isascii()]), st.characters(max_codepoint=127)), max_size=30
).map("".join)
unicode_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)  # no lone surrogates
texts = st.one_of(st.text(), messy_text, ascii_text, unicode_text)
PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _encodable(text):
    """Whether the original can encode ``text`` at all (a lone surrogate that survives cleaning makes it raise)."""
    try:
        ReferenceTokenizer.clean(text).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# ----------------------------------------------------------------------------------------------------------------
# Golden rows


def _golden_rows(data_dir):
    with open(data_dir / "tokenizer.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_golden_rows_match_exactly(data_dir, tokenizer):
    rows = _golden_rows(data_dir)
    assert len(rows) > 400
    failures = []
    for number, row in enumerate(rows, 1):
        text, length = row["text"], row.get("context_length", 77)
        if "encode" in row and tokenizer.encode(text) != row["encode"]:
            failures.append((number, "encode", text))
        if "tokenize" in row and tk.tokenize(text, length).tolist() != [row["tokenize"]]:
            failures.append((number, "tokenize", text))
        if "tokenize_truncate" in row:
            if tk.tokenize(text, length, truncate=True).tolist() != [row["tokenize_truncate"]]:
                failures.append((number, "tokenize_truncate", text))
        if "decode" in row and tokenizer.decode(row["encode"]) != row["decode"]:
            failures.append((number, "decode", text))
    assert not failures, failures[:10]


def test_golden_rows_in_one_batch(data_dir):
    rows = [row for row in _golden_rows(data_dir) if "tokenize" in row and "context_length" not in row]
    assert tk.tokenize([row["text"] for row in rows]).tolist() == [row["tokenize"] for row in rows]


# ----------------------------------------------------------------------------------------------------------------
# The same ids as the original, on anything


@PROPERTY
@given(texts)
@example("")
@example("   \t\n ")
@example("&amp;lt;b&amp;gt; &#28;x\x1cy\x1fz")
@example("İstanbul ẞ ß ſ K <|ſtartoftext|>")
@example("<|startoftext|>a photo<|endoftext|> of <|ENDOFTEXT|>")
@example("Ã¢â‚¬â„¢ cafÃ© \x1b[31mred\x1b[0m \r\n\x85\u2028")
def test_encode_equals_the_original(tokenizer, reference, text):
    if not _encodable(text):
        with pytest.raises(UnicodeEncodeError):
            tokenizer.encode(text)
        return
    assert tokenizer.encode(text) == reference.encode(text)


@PROPERTY
@given(st.lists(texts, max_size=8), st.integers(min_value=2, max_value=80))
def test_truncated_batches_equal_the_original(reference, batch, context_length):
    batch = [text for text in batch if _encodable(text)]
    ours = tk.tokenize(batch, context_length=context_length, truncate=True)
    assert ours.dtype == torch.int32 and ours.shape == (len(batch), context_length)
    assert torch.equal(ours, reference.tokenize(batch, context_length, truncate=True))


def test_long_and_repeated_text_equals_the_original(tokenizer, reference):
    pieces = " ".join(PIECES)
    texts = [pieces * 4, pieces.replace(" ", "") * 3, "a" * 3000, "ab" * 700 + "!" * 500, "😀" * 400, "\u0301" * 90]
    for text in texts:
        assert tokenizer.encode(text) == reference.encode(text)
    assert torch.equal(tk.tokenize(texts, truncate=True), reference.tokenize(texts, truncate=True))


def test_bpe_and_tables_are_the_originals(tokenizer, reference):
    assert tokenizer.encoder == reference.encoder and tokenizer.decoder == reference.decoder
    assert tokenizer.byte_encoder == reference.byte_encoder and tokenizer.byte_decoder == reference.byte_decoder
    assert tokenizer.bpe_ranks == reference.ranks
    assert len(tokenizer.encoder) == 49408
    assert tokenizer.encoder["<|startoftext|>"] == SOT and tokenizer.encoder["<|endoftext|>"] == EOT
    for token in ["hello", "a", "photo", "ĠĠĠ", "Ã©", "<|endoftext|>", "!!!!!!!!", "zzzzzzzzzzzzzz"]:
        assert tokenizer.bpe(token) == reference.bpe(token)
    assert tokenizer.cache["<|startoftext|>"] == "<|startoftext|>"


# ----------------------------------------------------------------------------------------------------------------
# Byte-pair merging: the list scan for short words, the heap for long ones, both exactly the original's loop

LONG_WORD = 100_000  # characters: the word that took 51 s with the quadratic loop
small_alphabets = st.sampled_from(["a", "e", "ab", "aa!", "th", "aeiou", "xyzq", "abcdefghijklmnopqrstuvwxyz",
                                   "é", "éa", "日本", "абвгд", "😀a", "ﬁ1"])


def _byte_symbols(tokenizer, word):
    """A cleaned word as the merge step gets it: its UTF-8 bytes' stand-ins, ``</w>`` on the last."""
    symbols = [tokenizer.byte_encoder[b] for b in word.encode("utf-8")]
    symbols[-1] += "</w>"
    return symbols


@st.composite
def words_from(draw, alphabet, max_size):
    return draw(st.text(st.sampled_from(alphabet), min_size=1, max_size=max_size))


@st.composite
def repetitive_words(draw, max_size):
    """Long runs of one or two characters, and random words from a small alphabet."""
    alphabet = draw(small_alphabets)
    if draw(st.booleans()):
        return draw(words_from(alphabet, max_size))
    runs = draw(st.lists(st.tuples(st.sampled_from(alphabet), st.integers(1, max_size // 4)), min_size=1, max_size=4))
    return "".join(c * n for c, n in runs)


@st.composite
def toy_merges(draw):
    """A small rank table over "abc" (a pair is a split of a string of 2 to 5 letters), and a word of its letters.

    Unlike CLIP's vocabulary, a symbol may come from several merges, and a pair may rank below a merge that makes
    one of its symbols: the cases where the heap must hold back the pairs a round creates.
    """
    strings = draw(st.lists(st.text("abc", min_size=2, max_size=5), min_size=1, max_size=30))
    pairs = [(s[:k], s[k:]) for s in strings for k in [draw(st.integers(1, len(s) - 1))]]
    ranks = {}
    for pair in pairs:
        ranks.setdefault(pair, len(ranks))
    word = list(draw(st.text("abc", min_size=1, max_size=40)))
    return word, ranks


@settings(max_examples=1000, deadline=None)
@given(toy_merges())
@example((list("aaaa"), {("a", "a"): 0}))
@example((list("aaaaa"), {("a", "a"): 0, ("aa", "a"): 1, ("aa", "aa"): 2}))
def test_heap_merges_as_the_original_on_any_rank_table(case):
    word, ranks = case
    expected = reference_merge(word, ranks)
    assert _bpe.merge_by_heap(word, ranks) == expected
    assert _bpe.merge_by_scan(word, ranks) == expected


def test_overlapping_occurrences_merge_left_to_right():
    ranks = {("a", "a"): 0}
    for n in range(1, 12):
        assert _bpe.merge_by_heap(["a"] * n, ranks) == ["aa"] * (n // 2) + ["a"] * (n % 2), n
    ranks = {("a", "a"): 0, ("aa", "a"): 1}  # "aaa": (a, a) first, so "aa a" and then "aaa"
    assert _bpe.merge_by_heap(list("aaa"), ranks) == ["aaa"] == reference_merge(list("aaa"), ranks)
    assert _bpe.merge_by_heap(list("aaaaa"), ranks) == ["aa", "aaa"] == reference_merge(list("aaaaa"), ranks)


def test_a_pair_a_round_creates_waits_for_the_next_round():
    """(abc, a) ranks below (a, bc), which makes it: the original merges every (a, bc) first."""
    ranks = {("abc", "a"): 0, ("a", "bc"): 1}
    word = ["a", "bc", "a", "bc"]
    assert reference_merge(word, ranks) == ["abc", "abc"]
    assert _bpe.merge_by_heap(word, ranks) == ["abc", "abc"]  # not ["abca", "bc"]


@PROPERTY
@given(repetitive_words(max_size=400))
@example("a" * 300)
@example("ab" * 150)
@example("é" * 200)
def test_heap_and_scan_merge_as_the_original_on_the_vocabulary(tokenizer, reference, word):
    symbols = _byte_symbols(tokenizer, word)
    expected = reference_merge(symbols, reference.ranks)
    assert _bpe.merge_by_heap(symbols, tokenizer.bpe_ranks) == expected
    assert _bpe.merge_by_scan(symbols, tokenizer.bpe_ranks) == expected
    assert symbols == _byte_symbols(tokenizer, word)  # the caller's list is left alone


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(repetitive_words(max_size=3000), min_size=1, max_size=3).map(" ".join))
@example("a" * 3000 + " " + "ab" * 1500)
def test_long_repetitive_words_encode_as_the_original(tokenizer, reference, text):
    if not _encodable(text):
        return
    assert tokenizer.encode(text) == reference.encode(text)


def _long_words():
    rnd = random.Random(11)
    # Lower-case letters of Latin-1, Greek, Cyrillic and CJK, which cleaning leaves alone: 2 or 3 bytes each
    non_ascii_letters = [chr(c) for c in [*range(0xE0, 0x100), *range(0x3B1, 0x3CA), *range(0x430, 0x450),
                                          *range(0x4E00, 0x4E80)] if chr(c).isalpha()]
    return {
        "one letter": "a" * LONG_WORD,
        "two letters": "".join(rnd.choice("ab") for _ in range(LONG_WORD)),
        "random letters": "".join(rnd.choice(string.ascii_lowercase) for _ in range(LONG_WORD)),
        "random non-ASCII letters": "".join(rnd.choice(non_ascii_letters) for _ in range(LONG_WORD)),
        "one non-ASCII letter": "é" * LONG_WORD,
    }


class _CountingRanks(dict):
    """Merge ranks that count their look-ups: the work a merge does, measured without a clock."""

    lookups = 0

    def get(self, pair, default=None):
        self.lookups += 1
        return super().get(pair, default)


@pytest.mark.parametrize("kind", list(_long_words()))
def test_a_100000_character_word_merges_in_linear_look_ups(tokenizer, reference, kind):
    """The quadratic loop took 51 s to 3 minutes on the random words (measured once): it looks up every pair of
    the word in each round. The heap looks up each pair once when it forms, and a merge forms at most two."""
    word = _long_words()[kind]
    assert len(word) == LONG_WORD and reference.words(word) == [word]  # one word, as cleaning leaves it
    symbols = [tokenizer.byte_encoder[b] for b in word.encode("utf-8")]
    symbols[-1] += "</w>"
    ranks = _CountingRanks(tokenizer.bpe_ranks)
    merged = _bpe.merge(symbols, ranks)
    assert ranks.lookups <= 3 * len(symbols), f"{kind}: {ranks.lookups} look-ups for {len(symbols)} symbols"
    assert "".join(merged) == "".join(symbols) and all(symbol in tokenizer.encoder for symbol in merged)
    assert tokenizer.decode(tokenizer.encode(word)) == word + " "


def test_one_letter_100000_times_gives_the_list_scans_ids(tokenizer, monkeypatch):
    """A long word where the list scan is quick too (each round halves the word): both paths give the same ids."""
    word = "a" * LONG_WORD
    by_heap = tokenizer.encode(word)
    monkeypatch.setattr(_bpe, "SCAN_LIMIT", math.inf)
    assert tokenizer.encode(word) == by_heap


def test_long_words_take_the_heap_and_short_ones_the_scan(vocab_path, monkeypatch):
    calls = []
    for name in ("merge_by_heap", "merge_by_scan"):
        original = getattr(_bpe, name)
        monkeypatch.setattr(_bpe, name, lambda symbols, ranks, f=original, n=name: calls.append(n) or f(symbols, ranks))
    tokenizer = tk.SimpleTokenizer(str(vocab_path))
    tokenizer.encode("a dog")
    assert calls == ["merge_by_scan", "merge_by_scan"]
    calls.clear()
    tokenizer.encode("pneumonoultramicroscopicsilicovolcanoconiosis")
    assert calls == ["merge_by_heap"]
    calls.clear()
    tokenizer.bpe("x" * (_bpe.SCAN_LIMIT + 1))
    tokenizer.bpe("x" * _bpe.SCAN_LIMIT)
    assert calls == ["merge_by_heap", "merge_by_scan"]


# ----------------------------------------------------------------------------------------------------------------
# Properties the issue names


@PROPERTY
@given(texts)
def test_tokenize_is_start_encode_end_padded(tokenizer, text):
    if not _encodable(text):
        return
    ids = [SOT] + tokenizer.encode(text) + [EOT]
    if len(ids) <= 77:
        assert tk.tokenize(text).tolist() == [ids + [0] * (77 - len(ids))]
    else:
        with pytest.raises(RuntimeError, match="truncate=True"):
            tk.tokenize(text)
        assert tk.tokenize(text, truncate=True).tolist() == [ids[:76] + [EOT]]


@PROPERTY
@given(texts)
def test_decode_gives_the_cleaned_words_each_but_special_ones_followed_by_a_space(tokenizer, reference, text):
    if not _encodable(text):
        return
    specials = ("<|startoftext|>", "<|endoftext|>")  # whole symbols, without the end-of-word marker
    expected = "".join(word if word in specials else word + " " for word in reference.words(text))
    assert tokenizer.decode(tokenizer.encode(text)) == expected


@PROPERTY
@given(st.lists(texts, max_size=12))
def test_a_batch_equals_its_items_one_by_one(batch):
    batch = [text for text in batch if _encodable(text)]
    together = tk.tokenize(batch, truncate=True)
    one_by_one = [tk.tokenize(text, truncate=True)[0] for text in batch]
    assert together.shape == (len(batch), 77)
    assert all(torch.equal(row, single) for row, single in zip(together, one_by_one))


@PROPERTY
@given(st.lists(st.sampled_from(PIECES), min_size=40, max_size=120).map(" ".join))
def test_truncation_keeps_the_first_76_ids_and_ends_with_eot(tokenizer, text):
    ids = tokenizer.encode(text)
    row = tk.tokenize(text, truncate=True)[0].tolist()
    if len(ids) + 2 > 77:
        assert row[:76] == [SOT] + ids[:75] and row[76] == EOT
    else:
        assert row == [SOT] + ids + [EOT] + [0] * (75 - len(ids))


# ----------------------------------------------------------------------------------------------------------------
# The fast path skips ftfy and html.unescape only where they change nothing


@settings(max_examples=1000, deadline=None)
@given(st.one_of(ascii_text, st.text(st.characters(max_codepoint=127)), messy_text, unicode_text))
@example("a&b")
@example("tab\there\nnew line\x0cform feed")
@example("carriage\r\nreturn")
@example("\x1b[31mred")
def test_plain_text_is_left_unchanged_by_ftfy_and_unescape(text):
    if _cleaning.is_plain(text):
        assert ftfy.fix_text(text) == text
        assert html.unescape(text) == text
    assert _cleaning.chunks(text) == [c for c in ReferenceTokenizer.clean(text).split(" ") if c]


@settings(max_examples=1500, deadline=None)
@given(st.one_of(unicode_text, messy_text, st.text()))
@example("café Zürich 😀 日本語")
@example("a\u0301")
@example("Ã©")
@example("\u00a0x")
def test_ftfy_is_skipped_only_where_it_changes_nothing(ftfy_unchanged, text):
    if ftfy_unchanged(text):
        assert ftfy.fix_text(text) == text
        assert html.unescape(html.unescape(text)) == text


def test_ftfy_is_skipped_only_where_it_changes_nothing_for_single_characters(ftfy_unchanged):
    points = [*range(0x80, 0x600), *range(0x2000, 0x2070), *range(0xFB00, 0xFB10), *range(0xFF00, 0x10000),
              *range(0, 0x110000, 97)]
    for point in points:
        for text in (chr(point), "a" + chr(point) + "b", "\u00e9" + chr(point)):
            if ftfy_unchanged(text):
                assert ftfy.fix_text(text) == text, repr(text)


def test_fast_paths_are_taken_where_they_should_be(ftfy_unchanged):
    for text in ["café", "Zürich 😀", "日本語 テキスト", "Москва", "naïve", "\u00a0non-breaking"]:
        assert ftfy_unchanged(text), text
    for text in ["Ã©tÃ©", "“quoted”", "ﬁne", "ＦＵＬＬ", "e\u0301", "a&amp;b", "two\nlines", "\x85", "bell\x07"]:
        assert not ftfy_unchanged(text), text


def test_fast_path_is_taken_for_plain_text_only():
    assert _cleaning.is_plain("a photo of a dog.\tWith a tab\nand lines")
    for text in ["a&b", "caf\u00e9", "\r\n", "bell\x07", "\x1b[0m", "del\x7f", "vt\x0b", "fs\x1c"]:
        assert not _cleaning.is_plain(text), repr(text)


# ----------------------------------------------------------------------------------------------------------------
# Edge cases and errors


def test_edges():
    assert tk.tokenize("").tolist() == [[SOT, EOT] + [0] * 75]
    assert tk.tokenize(" \t\n&nbsp; ").tolist() == [[SOT, EOT] + [0] * 75]
    assert tk.tokenize([]).shape == (0, 77) and tk.tokenize([]).dtype == torch.int32
    assert tk.tokenize(("a", "b")).shape == (2, 77)
    assert tk.tokenize(text for text in ["a", "b", "c"]).shape == (3, 77)
    assert tk.tokenize("a dog", context_length=2, truncate=True).tolist() == [[SOT, EOT]]
    assert tk.tokenize("a dog", context_length=10).shape == (1, 10)
    literal = tk.tokenize("<|startoftext|>x<|endoftext|>")[0, :5].tolist()
    assert literal == [SOT, SOT, tk._default_tokenizer().encode("x")[0], EOT, EOT]


def test_rows_of_exactly_the_context_length(tokenizer):
    fits = " ".join(["a"] * 75)
    assert len(tokenizer.encode(fits)) == 75
    row = tk.tokenize(fits)[0].tolist()
    assert row == [SOT] + [320] * 75 + [EOT]  # 320: "a</w>"
    assert tk.tokenize(fits, truncate=True)[0].tolist() == row
    with pytest.raises(RuntimeError):
        tk.tokenize(fits + " a")
    assert tk.tokenize(fits + " a", truncate=True)[0].tolist() == row
    assert tk.tokenize(fits, context_length=78)[0].tolist() == row + [0]


def test_too_long_text_raises_runtimeerror_with_a_helpful_message():
    text = "A very long caption about a dog " * 20
    with pytest.raises(RuntimeError) as raised:
        tk.tokenize(["short", text])
    message = str(raised.value)
    assert text[:30] in message  # the start of the text
    assert "item 1" in message and "context length 77" in message and "truncate=True" in message
    assert str(1 + len(tk._default_tokenizer().encode(text)) + 1) in message  # its token count
    with pytest.raises(RuntimeError, match="context length 8"):
        tk.tokenize("one two three four five six seven", context_length=8)


def test_bad_arguments():
    with pytest.raises(TypeError, match=r"item 1 is a bytes"):
        tk.tokenize(["fine", b"bytes"])
    with pytest.raises(TypeError, match=r"item 0 is a NoneType"):
        tk.tokenize([None])
    with pytest.raises(TypeError):
        tk._default_tokenizer().encode(3)
    for bad in (1, 0):  # no room for the start and end tokens: too long, as in the original
        with pytest.raises(RuntimeError, match=f"too long for context length {bad}"):
            tk.tokenize("a", context_length=bad)
    # torch's own error, as in the original; its wording changed after torch 2.4
    with pytest.raises(RuntimeError, match="non-negative|negative dimension"):
        tk.tokenize("a", context_length=-5)
    with pytest.raises(TypeError):
        tk.tokenize("a", context_length=7.0)


def test_decode(tokenizer):
    ids = tokenizer.encode("A photo of a café! 😀")
    assert tokenizer.decode(ids) == "a photo of a café ! 😀 "
    assert tokenizer.decode(torch.tensor(ids)) == tokenizer.decode(ids)
    assert tokenizer.decode([SOT, EOT]) == "<|startoftext|><|endoftext|>"
    assert tokenizer.decode([tokenizer.encoder["Ã"]]) == "\ufffd"  # a lone byte of a multi-byte character
    with pytest.raises(KeyError):
        tokenizer.decode([49408])


def test_helpers():
    table = tk.bytes_to_unicode()
    assert len(table) == 256 and len(set(table.values())) == 256 and table is tk.bytes_to_unicode()
    assert all(c.isprintable() and not c.isspace() for c in table.values())
    assert table[ord("a")] == "a" and table[ord(" ")] == "Ġ"  # 32 is the 33rd non-printable byte: chr(256 + 32)
    assert tk.get_pairs(("a", "b", "c", "b", "c")) == {("a", "b"), ("b", "c"), ("c", "b")}
    assert tk.basic_clean("  &amp;lt; cafÃ©  ") == "< café"
    assert tk.whitespace_clean(" a \t\n b\x1cc ") == "a b\x1cc"


def test_caches_are_bounded_and_stay_exact(monkeypatch, vocab_path, reference):
    monkeypatch.setattr(tk, "_CACHE_LIMIT", 50)
    tokenizer = tk.SimpleTokenizer(str(vocab_path))
    words = [f"word{n}x{n * 7}" for n in range(400)] + ["z" * 200]
    for word in words:
        assert tokenizer.encode(word) == reference.encode(word)
        tokenizer.bpe(word)
        assert len(tokenizer._ids_cache) <= 50 and len(tokenizer.cache) <= 50
    # the special tokens survive every reset
    assert tokenizer.encode("<|endoftext|>") == [EOT] and tokenizer.cache["<|endoftext|>"] == "<|endoftext|>"
    assert "z" * 200 not in tokenizer._ids_cache  # long pieces are not cached at all


def _new_words(count):
    """``count`` random lower-case words: new to any cache, so the caches keep filling and being replaced."""
    rng = random.Random(20)
    return ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 9))) for _ in range(count)]


def _thread_texts(count):
    """Texts of new words around literal special tokens."""
    words = _new_words(4 * count)
    return [f"{words[4 * i]}<|endoftext|>{words[4 * i + 1]} <|startoftext|> {words[4 * i + 2]} "
            f"x<|endoftext|>{words[4 * i + 3]}" for i in range(count)]


def _in_threads(work, items, threads=8):
    """``work(item)`` for every item in each of ``threads`` threads at once, switching threads every microsecond so
    that one thread's cache replacement interleaves with the others' lookups; each thread's results, in order."""
    barrier = threading.Barrier(threads)
    results = [None] * threads

    def run(index):
        barrier.wait()
        results[index] = [work(item) for item in items]

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        pool = [threading.Thread(target=run, args=(index,)) for index in range(threads)]
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    return results


def test_threads_tokenize_exactly_while_the_caches_are_replaced(monkeypatch, vocab_path):
    """8 threads share one tokenizer whose caches fill and are replaced every few texts: each row equals the row
    one thread alone gives (a cache cleared in place let a thread miss the special tokens and cache wrong ids)."""
    monkeypatch.setattr(tk, "_CACHE_LIMIT", 4)  # two special entries and two others: replaced all the time
    texts = _thread_texts(1500)
    expected = tk.SimpleTokenizer(str(vocab_path))._tokenize(texts, 77, False).tolist()
    assert all(row.count(EOT) == 3 and row.count(SOT) == 2 for row in expected)  # the literal ones, and the end
    shared = tk.SimpleTokenizer(str(vocab_path))
    for rows in _in_threads(lambda text: shared._tokenize([text], 77, False)[0].tolist(), texts):
        wrong = [i for i, (row, want) in enumerate(zip(rows, expected)) if row != want]
        assert not wrong, f"{len(wrong)} wrong rows of {len(texts)}, e.g. {texts[wrong[0]]!r}: {rows[wrong[0]]}"


def test_threads_get_the_original_bpe_while_its_cache_is_replaced(monkeypatch, vocab_path):
    monkeypatch.setattr(tk, "_CACHE_LIMIT", 4)  # two special entries and two others: replaced all the time
    words = _new_words(6000)  # ASCII: bpe() takes them as they are
    specials = ["<|endoftext|>", "<|startoftext|>"]
    tokens = [token for n, word in enumerate(words) for token in (word, specials[n % 2])]  # every other one special
    single = tk.SimpleTokenizer(str(vocab_path))
    expected = [single.bpe(token) for token in tokens]
    assert set(expected[1::2]) == set(specials)
    shared = tk.SimpleTokenizer(str(vocab_path))
    for found in _in_threads(shared.bpe, tokens):
        wrong = [i for i, (got, want) in enumerate(zip(found, expected)) if got != want]
        assert not wrong, f"{len(wrong)} wrong of {len(tokens)}, e.g. {tokens[wrong[0]]!r}: {found[wrong[0]]!r}"


def test_a_subclass_that_overrides_bpe_is_called_by_encode_and_tokenize(vocab_path, tokenizer):
    """The original's encode calls self.bpe for every word; ours merges without it unless bpe is overridden."""
    class Counting(tk.SimpleTokenizer):
        def bpe(self, token):
            self.calls.append(token)
            return super().bpe(token)

    class Letters(tk.SimpleTokenizer):
        def bpe(self, token):  # no merges at all: each byte's symbol, the last with the end-of-word marker
            return " ".join(list(token[:-1]) + [token[-1] + "</w>"])

    text = "a photo of a Dog<|endoftext|>!"
    counting = Counting(str(vocab_path))
    counting.calls = []
    assert counting.encode(text) == tokenizer.encode(text)
    assert counting.calls == ["a", "photo", "of", "a", "dog", "<|endoftext|>", "!"]
    counting.calls = []
    assert torch.equal(tk.tokenize(text, tokenizer=counting), tk.tokenize(text)) and len(counting.calls) == 7
    letters = Letters(str(vocab_path))
    want = [letters.encoder[s] for s in ["a</w>", "p", "h", "o", "t", "o</w>", "o", "f</w>"]]
    assert letters.encode("a photo of") == want
    assert tk.tokenize("a photo of", tokenizer=letters)[0, 1:9].tolist() == want
    assert tk.SimpleTokenizer._ids_function(tokenizer) == tokenizer._ids  # the base class keeps its fast path


def test_default_tokenizer_is_shared_and_lazy():
    first = tk._default_tokenizer()
    assert first is tk._default_tokenizer() and isinstance(first, tk.SimpleTokenizer)


def test_clip_package_exposes_the_tokenizer():
    import clip
    import clip.clip

    assert clip.tokenize is clip.clip.tokenize
    assert torch.equal(clip.tokenize(["a dog", "a cat"]), tk.tokenize(["a dog", "a cat"]))
    assert clip.clip._tokenizer is tk._default_tokenizer()


@pytest.fixture
def assigned_tokenizer():
    """Assign to clip.clip._tokenizer as clients do; afterwards the attribute is gone again (not reset to a value)."""
    import clip.clip

    yield lambda tokenizer: setattr(clip.clip, "_tokenizer", tokenizer)
    clip.clip.__dict__.pop("_tokenizer", None)


def test_a_tokenizer_assigned_to_clip_clip_is_used(assigned_tokenizer):
    """Clients replace the original's module-level tokenizer; clip.tokenize then uses theirs."""
    import clip.clip

    class Shouting:
        encoder = {"<|startoftext|>": 1, "<|endoftext|>": 2}

        def encode(self, text):
            return [ord(c) for c in text.upper()]

    assigned_tokenizer(Shouting())
    rows = clip.clip.tokenize(["ab", "c"], context_length=5)
    assert rows.tolist() == [[1, 65, 66, 2, 0], [1, 67, 2, 0, 0]]
    assert clip.clip.tokenize("abcd", context_length=5, truncate=True).tolist() == [[1, 65, 66, 67, 2]]
    with pytest.raises(RuntimeError, match="too long"):
        clip.clip.tokenize("abcd", context_length=5)

    class Subclass(tk.SimpleTokenizer):
        pass

    assigned_tokenizer(Subclass())
    assert torch.equal(clip.clip.tokenize("a photo of a dog"), tk.tokenize("a photo of a dog"))


# ----------------------------------------------------------------------------------------------------------------
# Nothing at import


def _python(code, env_changes, cwd=REPO):
    env = {k: v for k, v in os.environ.items() if k not in ("CLIP_BPE_PATH",)}
    env.update(env_changes)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_import_does_not_open_the_vocabulary(vocab_path, tmp_path):
    # An audit hook sees every open(); the vocabulary is where CLIP_BPE_PATH points, so any read of it shows.
    code = """
        import sys
        opened = []
        sys.addaudithook(lambda event, args: opened.append(str(args[0])) if event == "open" else None)
        import clip, clip.simple_tokenizer, clip.clip
        at_import = [p for p in opened if "bpe_simple_vocab" in p]
        clip.tokenize("a dog")
        on_use = [p for p in opened if "bpe_simple_vocab" in p]
        print(len(at_import), len(on_use))
    """
    result = _python(code, {"CLIP_CACHE_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0", "1"]


def test_an_offline_machine_with_an_empty_cache_tokenizes_exactly(tmp_path, data_dir):
    """The vocabulary ships inside the package: no cache, no network, no CLIP_BPE_PATH needed."""
    rows = [row for row in _golden_rows(data_dir) if "tokenize" in row and "context_length" not in row][:50]
    code = f"""
        import json, sys
        import clip, clip.clip
        print(hasattr(clip.clip, "_tokenizer"))
        texts = json.loads(sys.stdin.readline())
        print(json.dumps(clip.tokenize(texts).tolist()))
    """
    env = {"CLIP_CACHE_DIR": str(tmp_path / "empty"), "CLIP_OFFLINE": "1", "HTTP_PROXY": "http://127.0.0.1:9",
           "HTTPS_PROXY": "http://127.0.0.1:9"}  # any request would fail
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300, input=json.dumps([row["text"] for row in rows]) + "\n",
                            env={**{k: v for k, v in os.environ.items() if not k.startswith("CLIP_")}, **env})
    assert result.returncode == 0, result.stderr
    has_tokenizer, ids = result.stdout.splitlines()
    assert has_tokenizer == "True"
    assert json.loads(ids) == [row["tokenize"] for row in rows]
    assert not (tmp_path / "empty").exists()  # nothing was cached or fetched


# ----------------------------------------------------------------------------------------------------------------
# The vocabulary inside the package


def test_the_packaged_vocabulary_is_the_original(vocab_path):
    assert tk.default_bpe() == str(vocab_path)
    assert hashlib.sha256(vocab_path.read_bytes()).hexdigest() == tk.VOCAB_SHA256


def test_clip_bpe_path_wins(vocab_path, tmp_path, monkeypatch):
    copy = tmp_path / "vocab.txt.gz"
    copy.write_bytes(vocab_path.read_bytes())
    monkeypatch.setenv("CLIP_BPE_PATH", str(copy))
    assert tk.default_bpe() == str(copy)
    monkeypatch.setenv("CLIP_BPE_PATH", str(tmp_path / "nowhere.txt.gz"))
    with pytest.raises(FileNotFoundError, match="CLIP_BPE_PATH"):
        tk.default_bpe()


@pytest.mark.parametrize("kind", ["wheel", "sdist"])
def test_the_distributions_contain_the_vocabulary(tmp_path, vocab_path, kind):
    """Build the wheel (and the sdist) from this checkout: the vocabulary is in both, byte for byte."""
    import tarfile
    import zipfile

    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(REPO)]
        if kind == "wheel" else
        [sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    if kind == "wheel":
        (wheel,) = tmp_path.glob("*.whl")
        with zipfile.ZipFile(wheel) as archive:
            packaged = archive.read("clip/" + tk.VOCAB_NAME)
    else:
        (sdist,) = tmp_path.glob("*.tar.gz")
        with tarfile.open(sdist) as archive:
            (member,) = [m for m in archive.getnames() if m.endswith("/clip/" + tk.VOCAB_NAME)]
            packaged = archive.extractfile(member).read()
    assert packaged == vocab_path.read_bytes()


def test_a_huge_context_allocates_only_the_result(tmp_path):
    """Nothing but the int32 result grows with context_length (the original allocates just its result too): under
    an address-space limit of the result plus 256 MB, a 400 MB result fits, where assembling full-width rows
    beside it would not."""
    script = (
        "import resource, clip, torch\n"
        "clip.tokenize(['warm up'])\n"
        "used = int(open('/proc/self/statm').read().split()[0]) * resource.getpagesize()\n"
        "resource.setrlimit(resource.RLIMIT_AS, (used + 4 * 10**8 + 2**28, resource.RLIM_INFINITY))\n"
        "rows = clip.tokenize(['a photo of a cat'], context_length=10**8)\n"
        "print(rows.shape[1], rows.dtype, int(rows[0, :7].sum()))\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["100000000", "torch.int32", str(49406 + 320 + 1125 + 539 + 320 + 2368 + 49407)]
