"""Tokenizer throughput: ours against open_clip's tokenizer and a plain restatement of the original, in one run.

    python benchmarks/tokenizer.py [--repeat 3]

Needs ``open_clip_torch`` (``pip install open_clip_torch``: its tokenizer is OpenAI's code with the same vocabulary,
and it supplies the 80 prompt templates and the class names) and ``hypothesis`` and ``pytest`` (the restatement of
the original, ``ReferenceTokenizer``, lives in ``tests/test_tokenizer.py``, where it is the tests' oracle). The
vocabulary is found as ``benchmarks/_common.vocabulary_path`` says (``CLIP_BPE_PATH`` wins); nothing is downloaded.

Every figure comes from a fresh process per tokenizer and workload, so each starts with empty caches:

- ``prompts``: prompt ensembling as zero-shot classifiers are built: 80 templates x 400 class names = 32,000 prompts,
  tokenized in batches of 256;
- ``captions``: 10,000 captions, a third of them messy (mojibake, HTML entities, emoji, other scripts, odd
  whitespace, some too long), in batches of 256 with ``truncate=True`` (open_clip always truncates);
- ``messy``: the same with messy captions only: ``ftfy`` must run on most of them, in all three tokenizers, and
  takes most of the time, so this is the floor of the speed-up;
- ``single``: one short text: the first call after the tokenizer is built, then the median of 2,000 calls;
- ``build``: building the tokenizer (parsing the vocabulary).

Only the tokenizing is timed (imports, ``ftfy``'s included, come before). The best of ``--repeat`` runs is kept. Each child also returns a digest of every id it produced: ours must equal the
reference's (the script says so, and fails otherwise); open_clip's equals them on these texts too.
"""
import argparse
import hashlib
import importlib.util
import json
import random
import sys
import time
from typing import Callable, Dict, List

from _common import REPO, child_env, median, print_machine, run_child, table

IMPLEMENTATIONS = ("ours", "open_clip", "reference")
WORKLOADS = ("prompts", "captions", "messy", "single", "build")
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


def tokenizer_factory(implementation: str, vocab: str) -> Callable[[], Callable]:
    """Import one implementation; return what builds it, and the built thing is ``tokenize(texts, truncate)``."""
    if implementation == "ours":
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


def child(implementation: str, workload: str, vocab: str) -> Dict[str, float]:
    import ftfy  # noqa: F401  (the others import it with themselves, ours on first need: keep it out of every timing)
    import torch

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


def measure(implementation: str, workload: str, repeat: int) -> dict:
    runs = [run_child([__file__, "--child", implementation, workload], child_env()) for _ in range(repeat)]
    key = "per_call" if workload == "single" else "seconds"
    return min(runs, key=lambda run: run[key])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="fresh-process runs per figure; the best is kept")
    parser.add_argument("--child", nargs=2, metavar=("IMPLEMENTATION", "WORKLOAD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import os

        print(json.dumps(child(*args.child, os.environ["CLIP_BPE_PATH"])))
        return

    print_machine()
    results = {(i, w): measure(i, w, args.repeat) for w in WORKLOADS for i in IMPLEMENTATIONS}
    checked = [w for w in WORKLOADS if w != "build"]
    for workload in checked:
        if results[("ours", workload)]["digest"] != results[("reference", workload)]["digest"]:
            sys.exit(f"ours and the reference gave different ids on {workload}: a bug, not a speed-up")
    same_as_open_clip = all(results[("open_clip", w)]["digest"] == results[("ours", w)]["digest"] for w in checked)

    def rate(i: str, w: str) -> float:
        return results[(i, w)]["items"] / results[(i, w)]["seconds"]

    rows = []
    for workload, unit in (("prompts", "prompts/s"), ("captions", "texts/s"), ("messy", "texts/s")):
        ours, theirs, ref = rate("ours", workload), rate("open_clip", workload), rate("reference", workload)
        rows.append([f"{workload} ({unit})", f"{ours:,.0f}", f"{theirs:,.0f}", f"{ref:,.0f}",
                     f"{ours / theirs:.1f}x", f"{ours / ref:.1f}x"])
    for label, key in (("single, first call (us)", "first_call"), ("single, per call (us)", "per_call")):
        values = [results[(i, "single")][key] * 1e6 for i in IMPLEMENTATIONS]
        rows.append([label] + [f"{v:,.0f}" for v in values] + [f"{values[1] / values[0]:.1f}x",
                                                                f"{values[2] / values[0]:.1f}x"])
    values = [results[(i, "build")]["seconds"] * 1e3 for i in IMPLEMENTATIONS]
    rows.append(["build the tokenizer (ms)"] + [f"{v:,.0f}" for v in values]
                + [f"{values[1] / values[0]:.1f}x", f"{values[2] / values[0]:.1f}x"])
    print()
    print(table(["workload", "ours", "open_clip", "reference", "speed-up vs open_clip", "vs reference"], rows))
    print(f"\nids: ours == reference on every workload; open_clip gives {'the same' if same_as_open_clip else 'other'}"
          f" ids. Best of {args.repeat} fresh processes per figure.")


if __name__ == "__main__":
    main()
