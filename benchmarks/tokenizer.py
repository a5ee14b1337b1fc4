"""Tokenizer throughput: ours against open_clip's tokenizer and a plain restatement of the original, in one run.

    python benchmarks/tokenizer.py [--repeat 3] [--long-word 10000] [--candidate DIR]

Needs ``open_clip_torch`` (``pip install open_clip_torch``: its tokenizer is OpenAI's code with the same vocabulary,
and it supplies the 80 prompt templates and the class names) and ``hypothesis`` and ``pytest`` (the restatement of
the original, ``ReferenceTokenizer``, lives in ``tests/test_tokenizer.py``, where it is the tests' oracle). The
vocabulary is the copy inside the package (``benchmarks/_common.vocabulary_path``), for all three; nothing is
downloaded.

Every figure comes from a fresh process per tokenizer and workload, so each starts with empty caches:

- ``prompts``: prompt ensembling as zero-shot classifiers are built: 80 templates x 400 class names = 32,000 prompts,
  tokenized in batches of 256;
- ``captions``: 10,000 captions, a third of them messy (mojibake, HTML entities, emoji, other scripts, odd
  whitespace, some too long), in batches of 256 with ``truncate=True`` (open_clip always truncates);
- ``messy``: the same with messy captions only: ``ftfy`` must run on most of them, in all three tokenizers, and
  takes most of the time, so this is the floor of the speed-up;
- ``single``: one short text: the first call after the tokenizer is built, then the median of 2,000 calls;
- ``long``: one word of ``--long-word`` random lower-case letters (10,000 by default), the case where the
  original's merge loop is quadratic (a 100,000-letter word takes it minutes: raise the length with care);
- ``build``: building the tokenizer (parsing the vocabulary).

With ``--candidate DIR`` (repeatable), a scratch copy of the package in DIR (``DIR/clip``) is measured beside ours
under the name ``cand:<DIR name>``: a change to try, or the code before one (``git archive <commit> clip | tar -x
-C DIR``).

Only the tokenizing is timed (imports, ``ftfy``'s included, come before). The best of ``--repeat`` runs is kept;
the implementations take turns. Each child also returns a digest of every id it produced: ours must equal the
reference's (the script says so, and fails otherwise); open_clip's equals them on these texts too.
"""
import argparse
import hashlib
import importlib.util
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

from _common import REPO, child_env, median, print_machine, run_child, table, vocabulary_path

IMPLEMENTATIONS = ("ours", "open_clip", "reference")
WORKLOADS = ("prompts", "captions", "messy", "single", "long", "build")
BATCH = 256
SHORT_TEXT = "a photo of a dog."


# ----------------------------------------------------------------------------------------------------------------
# Workloads


def prompts() -> List[str]:
    """80 templates x the first 400 ImageNet class names, class by class, as zero-shot classifiers are built."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    return [template(name) for name in IMAGENET_CLASSNAMES[:400] for template in OPENAI_IMAGENET_TEMPLATES]


def captions(n: int = 10_000, seed: int = 0, messy_only: bool = False) -> List[str]:
    """Caption-like texts, two thirds plain English and one third messy (or all messy), fixed by ``seed``."""
    rnd = random.Random(seed)
    people = "a man|a woman|two kids|an old lady|a surfer|the chef|my grandmother|a group of friends|a boy".split("|")
    animals = "dog|cat|horse|giraffe|zebra|elephant|bird|teddy bear|sheep|cow|pigeon|labrador|kitten".split("|")
    verbs = "riding|holding|eating|looking at|sitting on|standing next to|playing with|walking|carrying".split("|")
    things = ("a surfboard|a red umbrella|a slice of pizza|the frisbee|a bicycle|a laptop|an old truck|"
              "a plate of food|a kite|the tennis racket|a skateboard|a stop sign|a cup of coffee").split("|")
    places = ("on the beach|in a kitchen|at the park|on a busy street|in the snow|near a lake|in front of a "
              "building|at night|under a bridge|in a field of flowers").split("|")
    tails = ["", ".", "!", " #sunset", " #nofilter #travel", " (2019)", " - IMG_2034.JPG", " @john_doe", "..."]
    messy = ["café", "naïve", "Zürich", "São Paulo", "日本の寺", "北京烤鸭", "서울 야경", "Москва", "Αθήνα",
             "😀", "👍🏽", "🇫🇷", "❤️", "&amp;", "&quot;nice&quot;", "&#39;", "&lt;3", "Ã©tÃ©", "â€™s",
             "“quoted”", "‘single’", "ＦＵＬＬ", "ﬁne", "\u00a0", "\r\n", "\t", "  ", "\u200b", "—", "½", "№5"]

    def sentence() -> str:
        subject = rnd.choice(people + [f"a {rnd.choice(animals)}", f"the {rnd.choice(animals)}"])
        return f"{subject} {rnd.choice(verbs)} {rnd.choice(things)} {rnd.choice(places)}{rnd.choice(tails)}"

    texts = []
    for _ in range(n):
        kind = rnd.uniform(0.67 if messy_only else 0.0, 1.0)
        if kind < 0.62:
            text = sentence().capitalize()
        elif kind < 0.67:  # too long for 77 tokens: truncated
            text = " and ".join(sentence() for _ in range(rnd.randint(5, 9)))
        elif kind < 0.95:
            words = sentence().split()
            for _ in range(rnd.randint(1, 4)):
                words.insert(rnd.randrange(len(words) + 1), rnd.choice(messy))
            text = " ".join(words)
            if rnd.random() < 0.2:  # mojibake of the whole caption
                text = text.encode("utf-8").decode(rnd.choice(["latin-1", "cp1252"]), errors="replace")
        else:  # random code points
            text = "".join(chr(rnd.choice([rnd.randint(32, 0x2FF), rnd.randint(0x370, 0x9FFF),
                                           rnd.randint(0x1F300, 0x1FAFF)])) for _ in range(rnd.randint(1, 40)))
        texts.append(text)
    return texts


# ----------------------------------------------------------------------------------------------------------------
# Children: one tokenizer, one workload, a fresh process


def long_word(length: int, seed: int = 0) -> str:
    """``length`` random lower-case ASCII letters, fixed by ``seed``: one word, as the pattern cuts it."""
    rnd = random.Random(seed)
    return "".join(rnd.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(length))


def tokenizer_factory(implementation: str, vocab: str) -> Callable[[], Callable]:
    """Import one implementation; return what builds it, and the built thing is ``tokenize(texts, truncate)``."""
    if implementation == "ours" or implementation.startswith("cand:"):
        from clip import simple_tokenizer

        def build():
            simple_tokenizer._default_tokenizer()
            return lambda texts, truncate=False: simple_tokenizer.tokenize(texts, truncate=truncate)

        return build
    if implementation == "open_clip":
        from open_clip import tokenizer as open_clip_tokenizer

        def build():
            tokenizer = open_clip_tokenizer.SimpleTokenizer(vocab)
            return lambda texts, truncate=False: tokenizer(texts, 77)

        return build
    spec = importlib.util.spec_from_file_location("_tokenizer_tests", REPO / "tests" / "test_tokenizer.py")
    tests = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tests)

    def build():
        tokenizer = tests.ReferenceTokenizer(vocab)
        return lambda texts, truncate=False: tokenizer.tokenize(texts, truncate=truncate)

    return build


def child(implementation: str, workload: str, vocab: str, long_length: int) -> Dict[str, float]:
    import ftfy  # noqa: F401  (the others import it with themselves, ours on first need: keep it out of every timing)
    import torch

    if implementation.startswith("cand:"):
        sys.path.insert(0, os.environ["BENCH_CLIP_PATH"])  # the candidate's clip before ours
    build = tokenizer_factory(implementation, vocab)
    if workload == "build":
        start = time.perf_counter()
        build()
        return {"seconds": time.perf_counter() - start}
    texts = {"prompts": prompts, "captions": captions, "messy": lambda: captions(messy_only=True)}.get(
        workload, lambda: [SHORT_TEXT])()
    tokenize = build()
    digest = hashlib.sha256()
    if workload == "single":
        start = time.perf_counter()
        first = tokenize(SHORT_TEXT)
        first_call = time.perf_counter() - start
        calls = []
        for _ in range(2000):
            start = time.perf_counter()
            tokenize(SHORT_TEXT)
            calls.append(time.perf_counter() - start)
        digest.update(first.to(torch.int64).numpy().tobytes())
        return {"first_call": first_call, "per_call": median(calls), "digest": digest.hexdigest()}
    if workload == "long":
        word = long_word(long_length)
        start = time.perf_counter()
        row = tokenize(word, True)
        seconds = time.perf_counter() - start
        digest.update(row.to(torch.int64).numpy().tobytes())
        return {"seconds": seconds, "digest": digest.hexdigest()}
    truncate = workload != "prompts"
    outputs = []
    start = time.perf_counter()
    for i in range(0, len(texts), BATCH):
        outputs.append(tokenize(texts[i : i + BATCH], truncate))
    seconds = time.perf_counter() - start
    for output in outputs:
        digest.update(output.to(torch.int64).numpy().tobytes())
    return {"seconds": seconds, "items": len(texts), "digest": digest.hexdigest()}


# ----------------------------------------------------------------------------------------------------------------
# Parent


def measure(implementations: List[str], repeat: int, long_length: int, candidates: Dict[str, Path]) -> dict:
    """``{(implementation, workload): the best run}``; the implementations take turns, so that a change in the
    machine's load shows in all of them alike."""
    runs: Dict[tuple, List[dict]] = {}
    for _ in range(repeat):
        for workload in WORKLOADS:
            for implementation in implementations:
                args = [__file__, "--child", implementation, workload, "--long-word", str(long_length)]
                extra = {"BENCH_CLIP_PATH": str(candidates[implementation])} if implementation in candidates else {}
                runs.setdefault((implementation, workload), []).append(run_child(args, child_env(**extra)))
    return {key: min(found, key=lambda run: run["per_call" if key[1] == "single" else "seconds"])
            for key, found in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="fresh-process runs per figure; the best is kept")
    parser.add_argument("--long-word", type=int, default=10_000, metavar="LETTERS",
                        help="length of the long word (the quadratic loop's time grows with its square)")
    parser.add_argument("--candidate", type=Path, action="append", default=[],
                        help="a folder holding a copy of the package (DIR/clip), measured beside ours")
    parser.add_argument("--child", nargs=2, metavar=("IMPLEMENTATION", "WORKLOAD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, str(vocabulary_path()), args.long_word)))
        return

    print_machine()
    candidates = {f"cand:{c.resolve().name}": c.resolve() for c in args.candidate}
    for path in candidates.values():
        if not (path / "clip" / "simple_tokenizer.py").is_file():
            sys.exit(f"--candidate {path}: no clip/simple_tokenizer.py there; give the folder that holds clip/")
    implementations = [IMPLEMENTATIONS[0], *candidates, *IMPLEMENTATIONS[1:]]
    results = measure(implementations, args.repeat, args.long_word, candidates)
    checked = [w for w in WORKLOADS if w != "build"]
    for implementation in ("ours", *candidates):
        for workload in checked:
            if results[(implementation, workload)]["digest"] != results[("reference", workload)]["digest"]:
                sys.exit(f"{implementation} and the reference gave different ids on {workload}: a bug, not a speed-up")
    same_as_open_clip = all(results[("open_clip", w)]["digest"] == results[("ours", w)]["digest"] for w in checked)

    def rate(i: str, w: str) -> float:
        return results[(i, w)]["items"] / results[(i, w)]["seconds"]

    # (label, figure of an implementation, whether higher is better)
    figures = [
        ("prompts (prompts/s)", lambda i: rate(i, "prompts"), True),
        ("captions (texts/s)", lambda i: rate(i, "captions"), True),
        ("messy (texts/s)", lambda i: rate(i, "messy"), True),
        ("single, first call (us)", lambda i: results[(i, "single")]["first_call"] * 1e6, False),
        ("single, per call (us)", lambda i: results[(i, "single")]["per_call"] * 1e6, False),
        (f"one {args.long_word:,}-letter word (ms)", lambda i: results[(i, "long")]["seconds"] * 1e3, False),
        ("build the tokenizer (ms)", lambda i: results[(i, "build")]["seconds"] * 1e3, False),
    ]
    rows = []
    for label, figure, higher_is_better in figures:
        values = {i: figure(i) for i in implementations}

        def speed_up(other: str) -> str:
            ratio = values["ours"] / values[other] if higher_is_better else values[other] / values["ours"]
            return f"{ratio:.1f}x"

        rows.append([label] + [f"{values[i]:,.0f}" for i in implementations]
                    + [speed_up("open_clip"), speed_up("reference")])
    print()
    print(table(["workload", *implementations, "speed-up vs open_clip", "vs reference"], rows))
    print(f"\nids: ours == reference on every workload; open_clip gives {'the same' if same_as_open_clip else 'other'}"
          f" ids. Best of {args.repeat} fresh processes per figure.")


if __name__ == "__main__":
    main()
