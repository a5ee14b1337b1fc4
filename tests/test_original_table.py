"""The original's behaviour table, replayed on this package.

``tests/data/original-behaviour.json`` holds, recorded from the original by ``tests/data/record_original.py``,
every name of its four modules with its kind and signature, and the outcome of each edge and misuse case of
``tests/original_cases.py``. Here every name must exist with a compatible signature (ours may add parameters with
defaults, never drop or reorder one; a name both take from the standard library or a dependency must be the same
object), every error must be an instance of the original's class, and every result
must have the original's type, shape and dtype. A case or name written in the README's "Differences from the
original" section may differ (and must: a listed case that no longer differs is stale); nothing else may.
"""
import importlib
import inspect
import re
from typing import Any, Dict, List, Optional

import pytest
import torch

import original_cases
from conftest import REPO

TABLE = original_cases.load_table()
CASES = {case["id"]: case for case in TABLE["cases"]}


def _listed_differences() -> set:
    """The case ids and names in the last column of the README's "Differences from the original" table."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Differences from the original", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|") and not line.startswith("|---")][1:]
    listed = {word for row in rows for word in re.findall(r"`([^`]+)`", row.rstrip().rstrip("|").rsplit("|", 1)[1])}
    unknown = listed - set(CASES) - set(TABLE["names"])
    assert not unknown, f"the README lists differences the table does not hold: {sorted(unknown)}"
    return listed


LISTED = _listed_differences()


def test_table_is_the_original_s():
    assert TABLE["original"] == "clip-anytorch 2.6.0"
    assert len(CASES) >= 60 and len(CASES) == len(TABLE["cases"])
    assert [case["id"] for case in original_cases.CASES] == list(CASES), "the table is stale: rerun the recorder"


# ----------------------------------------------------------------------------------------------------------------
# Names and signatures

def _resolve(dotted: str, *, static: bool = True) -> Any:
    """The object at a dotted name, through modules and then attributes (``clip.model.CLIP.encode_text``); a class's
    attributes as its ``__dict__`` holds them (a staticmethod as such) unless not ``static``."""
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            value = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for part in parts[split:]:
            owner = value
            value = inspect.getattr_static(owner, part) if static and inspect.isclass(owner) else getattr(owner, part)
        return value
    raise ImportError(dotted)


def _signature_problem(original: List[list], ours: Optional[List[list]]) -> Optional[str]:
    """Why ``ours`` cannot stand in for ``original`` (lists of ``[name, kind, has default]``), or None."""
    if ours is None:
        return "ours has no signature"
    for i, (name, kind, has_default) in enumerate(original):
        if i >= len(ours):
            return f"parameter {name!r} is missing"
        our_name, our_kind, our_default = ours[i]
        if (our_name, our_kind) != (name, kind):
            return f"parameter {i} is {our_name!r} ({our_kind}), the original's is {name!r} ({kind})"
        if has_default and not our_default:
            return f"parameter {name!r} lost its default"
    for name, kind, has_default in ours[len(original):]:
        if not has_default and kind not in ("VAR_POSITIONAL", "VAR_KEYWORD"):
            return f"added parameter {name!r} has no default"
    return None


# The names the original's modules import from the standard library and its dependencies (clip-anytorch 2.6.0's
# import lines) and ours has too: for these the same object is the check, not the kind and signature recorded on
# Python 3.11, which are the other library's and change with it (typing.Union is a class from Python 3.14 on, and
# InterpolationMode's signature changed with its enum base). The package's own names stay compared with the table.
IMPORTED = {
    "clip.clip.Any": "typing.Any",
    "clip.clip.List": "typing.List",
    "clip.clip.Union": "typing.Union",
    "clip.clip.os": "os",
    "clip.clip.torch": "torch",
    "clip.clip.Image": "PIL.Image",
    "clip.clip.Compose": "torchvision.transforms.Compose",
    "clip.clip.Resize": "torchvision.transforms.Resize",
    "clip.clip.CenterCrop": "torchvision.transforms.CenterCrop",
    "clip.clip.ToTensor": "torchvision.transforms.ToTensor",
    "clip.clip.Normalize": "torchvision.transforms.Normalize",
    "clip.clip.InterpolationMode": "torchvision.transforms.InterpolationMode",
    "clip.clip.BICUBIC": "torchvision.transforms.InterpolationMode.BICUBIC",
    "clip.model.OrderedDict": "collections.OrderedDict",
    "clip.model.Tuple": "typing.Tuple",
    "clip.model.Union": "typing.Union",
    "clip.model.torch": "torch",
    "clip.model.nn": "torch.nn",
    "clip.model.F": "torch.nn.functional",
}


def _defined_outside_the_package(value: Any) -> bool:
    """A module, or an object whose ``__module__`` is not ``clip``'s (plain values such as dicts have none)."""
    home = value.__name__ if inspect.ismodule(value) else getattr(value, "__module__", None)
    return home is not None and home != "clip" and not home.startswith("clip.")


def test_the_imported_names_are_all_the_table_takes_from_outside():
    """Every name of the table ours takes from outside the package is in IMPORTED, and no name of ours is: the
    comparison with the recorded kind and signature cannot silently fall away from one of the package's names."""
    outside = set()
    for name in TABLE["names"]:
        try:
            value = _resolve(name)
        except (AttributeError, ImportError):
            continue  # missing: test_name and the README's differences table speak for it
        if _defined_outside_the_package(value):
            outside.add(name)
    assert set(IMPORTED) <= set(TABLE["names"])
    assert outside <= set(IMPORTED), f"names taken from outside the package: {sorted(outside - set(IMPORTED))}"
    for origin in IMPORTED.values():
        value = _resolve(origin, static=False)
        assert _defined_outside_the_package(value), origin


@pytest.mark.parametrize("name", sorted(TABLE["names"]))
def test_name(name):
    original = TABLE["names"][name]
    try:
        value = _resolve(name)
        ours = original_cases.describe_name(value)
    except (AttributeError, ImportError) as e:
        value, ours = None, {"kind": "missing", "error": repr(e)}
    problem = None
    if name in IMPORTED and ours["kind"] != "missing":
        if value is not _resolve(IMPORTED[name], static=False):
            problem = f"{name} is not {IMPORTED[name]}, which the original imports"
    elif ours["kind"] != original["kind"]:
        problem = f"{name} is a {ours['kind']}, the original's a {original['kind']}"
    elif original["kind"] == "value" and ours["type"] != original["type"]:
        problem = f"{name} is a {ours['type']}, the original's a {original['type']}"
    elif original.get("parameters") is not None:
        why = _signature_problem(original["parameters"], ours.get("parameters"))
        problem = why and f"{name}: {why}"
    if name in LISTED:
        assert problem, f"{name} is listed as a difference in the README but matches the original"
    else:
        assert problem is None, problem


# ----------------------------------------------------------------------------------------------------------------
# Cases

def _difference(original: Dict[str, Any], ours: Dict[str, Any]) -> Optional[str]:
    """How our outcome differs from the original's, or None."""
    if "raises" in original:
        if "raises" not in ours:
            return f"the original raised {original['raises']['class']}; ours returned {ours['returns']}"
        if original["raises"]["class"] not in ours["raises"]["mro"]:
            return f"the original raised {original['raises']['class']}; ours raised {ours['raises']['class']}, " \
                   f"not an instance of it"
    elif "raises" in ours:
        return f"the original returned {original['returns']}; ours raised {ours['raises']['class']}"
    elif ours["returns"] != original["returns"]:
        return f"the original returned {original['returns']}; ours {ours['returns']}"
    if "raises" in original:
        return None  # the error is the outcome: warnings on the way to it (the original's misleading
        # "not a JIT archive" before failing on a device) are not compared
    our_warnings = {original_cases._qualname(base) for category in ours.get("warning_classes", ())
                    for base in category.__mro__}
    missing = set(original.get("warns", ())) - our_warnings
    if missing:
        return f"the original warned {sorted(missing)}; ours did not"
    return None


@pytest.mark.parametrize("case_id", list(CASES))
def test_case(case_id, tmp_path, local_network):
    case = CASES[case_id]
    if case.get("needs") == "no-cuda" and torch.cuda.is_available():
        pytest.skip("recorded on a machine without CUDA")
    fixtures = original_cases.Fixtures(tmp_path)
    try:
        ours = original_cases.run(case, fixtures)
    finally:
        fixtures.close()
    difference = _difference(case, ours)
    if case_id in LISTED:
        assert difference, f"{case_id} is listed as a difference in the README but matches the original"
    else:
        assert difference is None, f"{case_id}: {difference}"
