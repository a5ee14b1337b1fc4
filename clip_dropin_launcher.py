"""The start of the ``clip`` command (and of ``python -m clip``): check that the ``clip`` package is the one this
distribution installed, then run it.

Other distributions (clip-anytorch, openai-clip) install a package named ``clip`` into the same folder as ours.
Installing one of them after this one replaces some of our files; uninstalling it afterwards deletes the files the
two share. Either way ``import clip`` runs a mix of two packages, or fails, before any check inside the package could
speak. So the command starts here, beside ``clip/`` rather than in it: the files of ``clip/`` are compared with the
hashes in this distribution's ``RECORD``, nothing of ``clip/`` is imported until they match, and otherwise one
message says which distribution replaced or removed which files and the command that reinstalls ours from where it
came (``repair_command``). Standard library only; see the README's section "Libraries that depend on clip-anytorch
or OpenAI's package".
"""
import base64
import csv
import hashlib
import json
import os
import re
import shlex
import site
import sys
import sysconfig
from importlib import metadata, util
from typing import Dict, List, Optional, Sequence
from urllib.parse import urlsplit
from urllib.request import url2pathname

__all__ = ["main", "installation_problem", "repair_command"]

DISTRIBUTION = "clip-dropin"
PACKAGE = "clip"
README_SECTION = "Libraries that depend on clip-anytorch or OpenAI's package"
# The files of the original's package, which clip-anytorch and openai-clip install too: uninstalling one of them
# deletes these, and only these, of ours.
SHARED_FILES = frozenset(f"{PACKAGE}/{name}" for name in ("__init__.py", "clip.py", "model.py", "simple_tokenizer.py",
                                                          "bpe_simple_vocab_16e6.txt.gz"))

# The one rule for what never reaches a terminal or a line-based file raw, here because this module must speak before
# any file of the package may be imported; clip._console reads it from here. C0 and C1 controls and DEL (escape
# sequences, carriage returns, the line breaks and separators that str.splitlines splits at), the Unicode line and
# paragraph separators, and the lone surrogates that stand for the undecodable bytes of a file name that is not
# UTF-8 (they cannot be encoded for output). Those JSON leaves raw are the ones past U+001F.
UNSAFE_PAST_C0 = "\x7f-\x9f\u2028\u2029\ud800-\udfff"
UNSAFE_CHARACTERS = "\x00-\x1f" + UNSAFE_PAST_C0
_UNSAFE = re.compile(f"[{UNSAFE_CHARACTERS}]")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``clip`` command line if the ``clip`` package is this distribution's; else explain and return 1.

    Parameters
    ----------
    argv : sequence of str, optional
        The arguments after the program name; default ``sys.argv[1:]``.

    Returns
    -------
    int
        The exit status (see ``clip._cli.main``); 1 when the package is not ours, with the reason on stderr.
    """
    problem = installation_problem()
    if problem is not None:
        print(f"clip: error: {printable(problem, keep_newlines=True)}", file=sys.stderr)
        return 1
    from clip._cli import main as run_command_line  # only now: these files are the ones we installed

    return run_command_line(argv)


def printable(text: str, *, keep_newlines: bool = False) -> str:
    r"""``text`` safe for a terminal: each control, separator or lone surrogate as a ``\xHH``/``\uHHHH`` escape.

    Ordinary text (any script, spaces, backslashes) is unchanged; a name can neither move the cursor nor start a
    new line. ``keep_newlines`` leaves ``\n`` alone, for a message of several lines built by us.
    """
    return _UNSAFE.sub(lambda match: match.group() if keep_newlines and match.group() == "\n"
                       else escape_character(match.group()), text)


def escape_character(char: str) -> str:
    r"""``\xHH`` for a character below U+0100, else ``\uHHHH`` (every character of ``UNSAFE_CHARACTERS`` fits)."""
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def installation_problem() -> Optional[str]:
    """What is wrong with the ``clip`` package Python would import, with the repair; None when it is ours.

    Ours means: every file of ``clip/`` that this distribution's ``RECORD`` lists with a hash has that hash, and
    ``import clip`` finds the folder beside this module. An editable install or a source tree records no hashes
    for the package's files, so only the second holds there.
    """
    here = os.path.dirname(os.path.abspath(__file__))
    ours = os.path.join(here, PACKAGE)
    installed = _installed_in(here)
    if installed is not None:
        changed = _changed_files(installed)
        if changed:
            return _changed_message(installed, ours, changed)
    imported = _imported_folder()
    if imported is None:
        return (f"Python finds no {PACKAGE} package: {ours} is missing. Reinstall it with: "
                f"{_repair_or_generic(installed)}")
    if os.path.realpath(imported) != os.path.realpath(ours):
        owners = _owners(os.path.dirname(imported), [f"{PACKAGE}/__init__.py"]).get(f"{PACKAGE}/__init__.py")
        return (f"'import {PACKAGE}' finds the package in {imported}"
                f"{' (installed by ' + _names(owners) + ')' if owners else ''}, not this distribution's in "
                f"{ours}, which it hides: {_unhide(os.path.dirname(imported), owners)}")
    return None


def _unhide(folder: str, owners: Optional[List[tuple]]) -> str:
    """How to stop the ``clip`` package in ``folder`` hiding ours: by where Python found it, not only by who
    installed it (pip uninstalls only what lies in this environment)."""
    where = os.path.realpath(folder)
    if owners and where in _environment_folders():
        return "uninstall it (" + "; ".join(f"{_python()} -m pip uninstall {name}" for name, _ in owners) + ")"
    for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if "PYTHONPATH" in os.environ else ():
        if os.path.realpath(entry or os.curdir) != where:
            continue
        if os.path.realpath(entry or os.curdir) == os.path.realpath(os.getcwd()):  # "", ".": wherever one runs it
            return (f"it is in the working directory, which PYTHONPATH ({os.environ['PYTHONPATH']!r}) puts on the "
                    f"path: run from another directory, or take that entry out of PYTHONPATH")
        return f"remove {entry} from PYTHONPATH (it is outside this environment, where pip cannot uninstall anything)"
    if where == os.path.realpath(os.getcwd()):
        return f"it is in the working directory: run from another directory, or rename {os.path.join(folder, PACKAGE)}"
    return f"remove or rename {os.path.join(folder, PACKAGE)}, or take {folder} off sys.path"


def _environment_folders() -> set:
    """The site-packages folders of this interpreter's environment (and the user's), where pip installs."""
    folders = set(site.getsitepackages()) if hasattr(site, "getsitepackages") else set()
    folders |= {sysconfig.get_paths()[key] for key in ("purelib", "platlib")}
    if site.ENABLE_USER_SITE:
        folders.add(site.getusersitepackages())
    return {os.path.realpath(folder) for folder in folders}


def _python() -> str:
    """This interpreter, as a shell word: the repair runs on the environment the command runs in, whatever
    ``pip`` comes first on ``PATH``."""
    return shlex.quote(sys.executable or "python3")


def _changed_files(distribution: metadata.Distribution) -> Dict[str, str]:
    """``{path: "replaced", "removed" or "unreadable (reason)"}`` for each file of ``clip/`` whose content no longer
    has (or cannot be read to show) the hash that ``distribution``'s ``RECORD`` gives it. Files recorded without a
    hash (``.pyc``, editable installs) are not checked, nor files that ``RECORD`` does not list."""
    changed = {}
    for path, recorded in _recorded(distribution).items():
        mode, _, value = (recorded or "").partition("=")
        if not path.startswith(PACKAGE + "/") or not value or mode not in hashlib.algorithms_available:
            continue
        try:
            with open(distribution.locate_file(path), "rb") as stream:
                digest = hashlib.new(mode, stream.read()).digest()
        except (FileNotFoundError, NotADirectoryError):
            changed[path] = "removed"
            continue
        except IsADirectoryError:  # a folder where the file was
            changed[path] = "replaced"
            continue
        except OSError as error:  # there, but this user cannot read it: nobody is known to have replaced it
            changed[path] = f"unreadable ({error.strerror or error})"
            continue
        # RECORD's hash encoding (the wheel format): URL-safe base64 without padding.
        if base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii") != value:
            changed[path] = "replaced"
    return changed


def _recorded(distribution: metadata.Distribution) -> Dict[str, Optional[str]]:
    """``{path: "sha256=..." or None}`` for every row of ``distribution``'s RECORD, present on disk or not.

    Read here rather than through ``Distribution.files``, which from Python 3.12 on leaves out the files that no
    longer exist: the very ones an uninstall of the other distribution deleted.
    """
    rows = csv.reader((distribution.read_text("RECORD") or "").splitlines())
    return {row[0]: (row[1] if len(row) > 1 and row[1] else None) for row in rows if row}


def repair_command(distribution: Optional[metadata.Distribution] = None) -> str:
    """The command that reinstalls ``distribution`` (default: this installed one) from where it came, alone.

    The source is read from the PEP 610 ``direct_url.json`` in its metadata folder: a version-control URL at the
    recorded commit, a local folder (``-e`` when it was editable) or an archive; without that file it came from an
    index, and the same version is named. The installer that wrote ``INSTALLER`` runs it, for this interpreter
    (``<python> -m pip``, ``uv pip --python <python>``), so it repairs this environment whatever ``pip`` comes first
    on ``PATH``. ``--no-deps`` leaves the other packages, the other ``clip`` distribution included, as they are.

    Parameters
    ----------
    distribution : importlib.metadata.Distribution, optional
        An installation of clip-dropin; default: the one beside this module, else the first on ``sys.path``.

    Returns
    -------
    str
        A shell command, e.g. ``/venv/bin/python -m pip install --no-deps --force-reinstall clip-dropin==1.0.0``.
    """
    if distribution is None:
        here = os.path.dirname(os.path.abspath(__file__))
        distribution = _installed_in(here) or metadata.distribution(DISTRIBUTION)
    source = _source(distribution)
    installer = (distribution.read_text("INSTALLER") or "").strip()
    if installer == "uv":
        return f"uv pip install --python {_python()} --no-deps --reinstall {source}"
    return f"{_python()} -m pip install --no-deps --force-reinstall {source}"


def _source(distribution: metadata.Distribution) -> str:
    """What to give pip to install ``distribution`` again: from ``direct_url.json``, else ``name==version``."""
    pinned = f"{DISTRIBUTION}=={distribution.version}"
    text = distribution.read_text("direct_url.json")
    if not text:
        return pinned
    try:
        record = json.loads(text)
        url = record["url"]
        subdirectory = record.get("subdirectory")
        if "vcs_info" in record:
            vcs = record["vcs_info"]
            source = f"{vcs['vcs']}+{url}@{vcs['commit_id']}"
            return shlex.quote(source + (f"#subdirectory={subdirectory}" if subdirectory else ""))
        if "dir_info" in record:
            folder = _local_path(url)
            if subdirectory:
                folder = os.path.join(folder, subdirectory)
            return ("-e " if record["dir_info"].get("editable") else "") + shlex.quote(folder)
        if "archive_info" in record:
            return shlex.quote(_local_path(url) if url.startswith("file:") else url)
    except (ValueError, KeyError, TypeError, AttributeError):  # not the format PEP 610 writes: the index it is
        return pinned
    return pinned


def _local_path(url: str) -> str:
    """The path of a ``file:`` URL (PEP 610 writes local folders and archives as such)."""
    parts = urlsplit(url)
    if parts.scheme != "file":
        return url
    return url2pathname(parts.path)


def _installed_in(folder: str) -> Optional[metadata.Distribution]:
    """This distribution's metadata in ``folder`` (where a wheel install puts it beside this module), if any."""
    for distribution in metadata.distributions(path=[folder]):
        if (_normalise(distribution.metadata["Name"] or "") == DISTRIBUTION
                and distribution.read_text("RECORD") is not None):
            return distribution
    return None


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503


def _imported_folder() -> Optional[str]:
    """The folder ``import clip`` takes (the first of a namespace package's), without importing anything."""
    spec = util.find_spec(PACKAGE)
    if spec is None:
        return None
    if spec.origin and os.path.basename(spec.origin).startswith("__init__."):
        return os.path.dirname(spec.origin)
    locations = list(spec.submodule_search_locations or ())
    return locations[0] if locations else spec.origin


def _owners(site: str, paths: Sequence[str]) -> Dict[str, List[tuple]]:
    """``{path: [(name, version), ...]}``: the other distributions in ``site`` whose RECORD lists each path."""
    wanted = set(paths)
    owners: Dict[str, List[tuple]] = {}
    for distribution in metadata.distributions(path=[site]):
        name = distribution.metadata["Name"] or "an unnamed distribution"
        if _normalise(name) == DISTRIBUTION:
            continue
        for path in wanted.intersection(_recorded(distribution)):
            owners.setdefault(path, []).append((name, distribution.version))
    return {path: sorted(set(found)) for path, found in owners.items()}


def _names(owners: Sequence[tuple]) -> str:
    return _join([f"{name} {version}" for name, version in owners])


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _changed_message(installed: metadata.Distribution, folder: str, changed: Dict[str, str]) -> str:
    """Which distribution replaced which files, which files are gone, and the repair."""
    owners = _owners(os.path.dirname(folder), [path for path, how in changed.items() if how == "replaced"])
    by_owner: Dict[str, List[str]] = {}
    for path in sorted(changed):
        if changed[path] == "replaced":
            by_owner.setdefault(_names(owners[path]) if path in owners else "another program", []).append(path)
    what = [f"{owner} replaced {_inside(paths)}" for owner, paths in by_owner.items()]
    removed = sorted(path for path, how in changed.items() if how == "removed")
    shared, own = [p for p in removed if p in SHARED_FILES], [p for p in removed if p not in SHARED_FILES]
    if shared:
        what.append(f"{_inside(shared)} {'was' if len(shared) == 1 else 'were'} removed (uninstalling a "
                    f"distribution that installed the same files, such as clip-anytorch, deletes them)")
    if own:
        what.append(f"{_inside(own)} {'was' if len(own) == 1 else 'were'} removed (no other distribution installs "
                    f"{'it' if len(own) == 1 else 'them'}: deleted by hand or by another program)")
    for path in sorted(path for path, how in changed.items() if how.startswith("unreadable")):
        what.append(f"{_inside([path])} cannot be read {changed[path][len('unreadable '):]}")
    culprits = sorted({name for path in changed for name, _ in owners.get(path, [])})
    after = (f"any later install of {_join(culprits)}" if culprits else
             "any later install or uninstall of another distribution of a clip package")
    return (f"the {PACKAGE} package in {folder} is not the one {DISTRIBUTION} {installed.version} installed: "
            f"{'; '.join(what)}. 'import {PACKAGE}' would run a mix of two packages, or fail. Repair it with:\n"
            f"  {repair_command(installed)}\n"
            f"and again after {after} (see \"{README_SECTION}\" in the README)")


def _inside(paths: Sequence[str]) -> str:
    """RECORD paths (``clip/model.py``) as names inside the package folder, joined for a sentence."""
    return _join([path.split("/", 1)[1] for path in paths])


def _repair_or_generic(installed: Optional[metadata.Distribution]) -> str:
    if installed is not None:
        return repair_command(installed)
    return f"{_python()} -m pip install --no-deps --force-reinstall {DISTRIBUTION}"
