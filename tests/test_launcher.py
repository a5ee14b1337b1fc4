"""The ``clip`` command beside clip-anytorch and openai-clip: the check of ``clip/`` against this distribution's
RECORD, the message naming who replaced or removed which files, and the repair command for each kind of install.

Each test lays out a site folder as pip leaves it: a copy of this distribution's files with a dist-info (RECORD with
hashes, INSTALLER, the PEP 610 ``direct_url.json`` of a git, folder, archive or index install), and the other
distribution's files and dist-info written over it. The command is then run as its console script runs it (the
entry point setup.py names), in a fresh interpreter with that site first on ``sys.path``.
"""
import base64
import hashlib
import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import venv
from importlib import metadata
from typing import Dict, List, Optional

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SETUP = (REPO / "setup.py").read_text(encoding="utf-8")
VERSION = re.search(r'^__version__ = "([^"]+)"', (REPO / "clip" / "__init__.py").read_text(encoding="utf-8"),
                    re.M).group(1)
COMMIT = "5c3b7a1e9d0f2468ace13579bdf02468ace13579"
README = "(see \"Libraries that depend on clip-anytorch or OpenAI's package\" in the README)"
# The interpreter the repair names: the one the command runs on, not whichever pip is first on PATH.
PYTHON = shlex.quote(sys.executable)

# What clip-anytorch 2.6.0 installs (its clip.py imports pkg_resources, which setuptools 81 and later no longer
# ship); the vocabulary is the same file as ours.
ANYTORCH_FILES = {
    "clip/__init__.py": "from .clip import *\n",
    "clip/clip.py": "import torch\nfrom pkg_resources import packaging\n\n__all__ = ['available_models', 'load']\n",
    "clip/model.py": "from collections import OrderedDict\n\nimport torch\n",
    "clip/simple_tokenizer.py": "import gzip\nimport html\n\nimport ftfy\n",
}
# Stands for current setuptools in the site: no pkg_resources, even where the test's environment has an old one.
NO_PKG_RESOURCES = "raise ModuleNotFoundError(\"No module named 'pkg_resources'\", name='pkg_resources')\n"


def _hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _write_dist_info(site: pathlib.Path, name: str, version: str, files: List[str], *, record_hashes: bool = True,
                     extra: Optional[Dict[str, str]] = None) -> pathlib.Path:
    """A dist-info in ``site`` whose RECORD lists ``files`` (paths relative to ``site``) as they are now."""
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    for file_name, text in (extra or {}).items():
        (info / file_name).write_text(text)
    rows = []
    for path in files + [str(p.relative_to(site)) for p in sorted(info.iterdir())]:
        data = (site / path).read_bytes()
        rows.append(f"{path},{_hash(data)},{len(data)}" if record_hashes or path.startswith(info.name) else f"{path},,")
    rows.append(f"{info.name}/RECORD,,")
    (info / "RECORD").write_text("\n".join(rows) + "\n")
    return info


def _py_modules() -> List[str]:
    """The top-level modules setup.py installs beside the package."""
    match = re.search(r"py_modules=\[([^\]]*)\]", SETUP)
    return re.findall(r'"(\w+)"', match.group(1)) if match else []


def _copy_ours(folder: pathlib.Path) -> List[str]:
    """Our package and top-level modules copied into ``folder``; the paths written, relative to it."""
    shutil.copytree(REPO / "clip", folder / "clip", ignore=shutil.ignore_patterns("__pycache__"))
    for module in _py_modules():
        shutil.copy(REPO / f"{module}.py", folder / f"{module}.py")
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def _direct_url(kind: str, tmp_path: pathlib.Path) -> Optional[dict]:
    if kind == "git":
        return {"url": "https://example.invalid/team/clip-dropin.git",
                "vcs_info": {"vcs": "git", "commit_id": COMMIT, "requested_revision": "main"}}
    if kind == "folder":
        return {"url": (tmp_path / "my checkout").as_uri(), "dir_info": {}}
    if kind == "editable":
        return {"url": (tmp_path / "my checkout").as_uri(), "dir_info": {"editable": True}}
    if kind == "archive":
        return {"url": (tmp_path / f"clip_dropin-{VERSION}-py3-none-any.whl").as_uri(),
                "archive_info": {"hashes": {"sha256": "0" * 64}}}
    return None  # "index": pip writes no direct_url.json


def _expected_source(kind: str, tmp_path: pathlib.Path) -> str:
    return {"git": f"git+https://example.invalid/team/clip-dropin.git@{COMMIT}",
            "folder": f"'{tmp_path / 'my checkout'}'",
            "editable": f"-e '{tmp_path / 'my checkout'}'",
            "archive": str(tmp_path / f"clip_dropin-{VERSION}-py3-none-any.whl"),
            "index": f"clip-dropin=={VERSION}"}[kind]


def _install_ours(site: pathlib.Path, kind: str, tmp_path: pathlib.Path, installer: str = "pip") -> pathlib.Path:
    site.mkdir(parents=True, exist_ok=True)
    files = _copy_ours(site)
    extra = {"INSTALLER": f"{installer}\n"}
    direct_url = _direct_url(kind, tmp_path)
    if direct_url is not None:
        extra["direct_url.json"] = json.dumps(direct_url)
    (site / "pkg_resources.py").write_text(NO_PKG_RESOURCES)
    return _write_dist_info(site, "clip-dropin", VERSION, files, extra=extra)


def _install_foreign(site: pathlib.Path, name: str, version: str, files: Dict[str, str]) -> None:
    """Another distribution installed over ours, as pip does it: its files written, its dist-info beside ours."""
    for path, text in files.items():
        (site / path).write_text(text)
    shutil.copy(REPO / "clip" / "bpe_simple_vocab_16e6.txt.gz", site / "clip" / "bpe_simple_vocab_16e6.txt.gz")
    _write_dist_info(site, name, version, sorted(files) + ["clip/bpe_simple_vocab_16e6.txt.gz"])


def _uninstall_foreign(site: pathlib.Path, name: str) -> None:
    """``pip uninstall``: every file its RECORD lists is deleted, ours among them where the two shared a path."""
    info = next(site.glob(f"{name.replace('-', '_')}-*.dist-info"))
    for row in (info / "RECORD").read_text().splitlines():
        (site / row.split(",")[0]).unlink(missing_ok=True)
    shutil.rmtree(info)


def _clip(tmp_path: pathlib.Path, *args: str, path: List[pathlib.Path], module: bool = False):
    """The ``clip`` console script as pip writes it (the entry point in setup.py), or ``python -m clip``, in a fresh
    interpreter whose ``sys.path`` starts with ``path``."""
    if module:
        command = [sys.executable, "-m", "clip", *args]
    else:
        target, function = re.search(r'"clip=([\w.]+):(\w+)"', SETUP).groups()
        command = [sys.executable, "-c", f"import sys; from {target} import {function}; sys.exit({function}())", *args]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(map(str, path)))
    run = tmp_path / "cwd"
    run.mkdir(exist_ok=True)
    return subprocess.run(command, capture_output=True, text=True, cwd=run, env=env, timeout=120)


def _message(site: pathlib.Path, what: str, repair: str, after: str) -> str:
    """The launcher's message; a ``pip ...`` repair is run by this interpreter, as ``<python> -m pip ...``."""
    repair = f"{PYTHON} -m {repair}" if repair.startswith("pip ") else repair
    return (f"clip: error: the clip package in {site / 'clip'} is not the one clip-dropin {VERSION} installed: "
            f"{what}. 'import clip' would run a mix of two packages, or fail. Repair it with:\n"
            f"  {repair}\n"
            f"and again after {after} {README}\n")


KINDS = ["git", "folder", "archive", "index"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("command", [["--version"], ["models"], ["embed", "in", "-o", "x.npy"]])
def test_clip_anytorch_over_ours_names_it_and_the_repair_for_this_install(tmp_path, kind, command):
    site = tmp_path / "site"
    _install_ours(site, kind, tmp_path)
    _install_foreign(site, "clip-anytorch", "2.6.0", ANYTORCH_FILES)
    result = _clip(tmp_path, *command, path=[site])
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == _message(
        site, "clip-anytorch 2.6.0 replaced __init__.py, clip.py, model.py and simple_tokenizer.py",
        f"pip install --no-deps --force-reinstall {_expected_source(kind, tmp_path)}",
        "any later install of clip-anytorch")


@pytest.mark.parametrize("module", [False, True], ids=["clip", "python -m clip"])
def test_only_model_py_replaced_is_found(tmp_path, module):
    """openai-clip writes only model.py over ours: our __init__ still imports, and would load the wrong model."""
    site = tmp_path / "site"
    _install_ours(site, "folder", tmp_path)
    _install_foreign(site, "openai-clip", "1.0.1", {"clip/model.py": "import torch\n"})
    result = _clip(tmp_path, "models", path=[site], module=module)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr == _message(site, "openai-clip 1.0.1 replaced model.py",
                                     f"pip install --no-deps --force-reinstall {_expected_source('folder', tmp_path)}",
                                     "any later install of openai-clip")


@pytest.mark.parametrize("module", [False, True], ids=["clip", "python -m clip"])
@pytest.mark.parametrize("kind", KINDS)
def test_uninstalling_the_other_distribution_leaves_a_namespace_package_and_says_so(tmp_path, module, kind):
    """``pip uninstall clip-anytorch`` after it was installed over ours deletes the files the two shared:
    ``clip/__init__.py`` is gone, ``clip`` is a namespace package, ``clip.__file__`` is None.

    The deleted files are found from RECORD itself (from Python 3.12 on, ``Distribution.files`` leaves out files
    that no longer exist), and before the question of which ``clip`` Python imports: a whole ``clip`` package
    later on the path (here ``elsewhere``; in a test environment, the one ``pip install ".[test]"`` put in
    site-packages) takes ``import clip`` from a namespace portion, but the broken install is still this one."""
    site, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    _install_ours(site, kind, tmp_path)
    _install_foreign(site, "clip-anytorch", "2.6.0", ANYTORCH_FILES)
    _uninstall_foreign(site, "clip-anytorch")
    assert not (site / "clip" / "__init__.py").exists() and (site / "clip" / "__main__.py").exists()
    elsewhere.mkdir()
    _copy_ours(elsewhere)
    result = _clip(tmp_path, "--version", path=[site, elsewhere], module=module)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr == _message(
        site, "__init__.py, bpe_simple_vocab_16e6.txt.gz, clip.py, model.py and simple_tokenizer.py were removed "
              "(uninstalling a distribution that installed the same files, such as clip-anytorch, deletes them)",
        f"pip install --no-deps --force-reinstall {_expected_source(kind, tmp_path)}",
        "any later install or uninstall of another distribution of a clip package")


def test_an_install_by_uv_is_repaired_by_uv(tmp_path):
    site = tmp_path / "site"
    _install_ours(site, "index", tmp_path, installer="uv")
    _install_foreign(site, "clip-anytorch", "2.6.0", ANYTORCH_FILES)
    result = _clip(tmp_path, "--version", path=[site])
    assert result.returncode == 1
    assert (f"Repair it with:\n  uv pip install --python {PYTHON} --no-deps --reinstall clip-dropin=={VERSION}\n"
            in result.stderr)


@pytest.mark.parametrize("module", [False, True], ids=["clip", "python -m clip"])
def test_our_files_back_over_the_other_distribution_run(tmp_path, module):
    """The repaired state: the other distribution's RECORD still lists clip/ files, but their content is ours."""
    site = tmp_path / "site"
    _install_ours(site, "git", tmp_path)
    _install_foreign(site, "clip-anytorch", "2.6.0", ANYTORCH_FILES)
    for path in ANYTORCH_FILES:
        shutil.copy(REPO / path, site / path)
    result = _clip(tmp_path, "--version", path=[site], module=module)
    assert (result.returncode, result.stdout, result.stderr) == (0, f"clip {VERSION}\n", "")
    result = _clip(tmp_path, "models", "--download-root", str(tmp_path / "cache"), path=[site], module=module)
    assert result.returncode == 0 and result.stderr == "" and "ViT-B/32" in result.stdout


def test_an_editable_install_records_no_hashes_and_raises_no_alarm(tmp_path):
    """An editable install: the dist-info in site-packages lists no file of clip/, which stays in the checkout."""
    site, checkout = tmp_path / "site", tmp_path / "my checkout"
    site.mkdir()
    checkout.mkdir()
    _copy_ours(checkout)
    (site / "__editable__.clip_dropin.pth").write_text(f"{checkout}\n")
    _write_dist_info(site, "clip-dropin", VERSION, ["__editable__.clip_dropin.pth"],
                     extra={"INSTALLER": "pip\n", "direct_url.json": json.dumps(_direct_url("editable", tmp_path))})
    for module in (False, True):
        result = _clip(tmp_path, "--version", path=[site, checkout], module=module)
        assert (result.returncode, result.stdout, result.stderr) == (0, f"clip {VERSION}\n", "")


def test_a_clip_package_earlier_on_the_path_is_named(tmp_path):
    """Ours installed editable, clip-anytorch in a folder Python searches first: its clip/ hides ours."""
    other, checkout = tmp_path / "other", tmp_path / "my checkout"
    checkout.mkdir()
    _copy_ours(checkout)
    (other / "clip").mkdir(parents=True)
    (other / "pkg_resources.py").write_text(NO_PKG_RESOURCES)
    _install_foreign(other, "clip-anytorch", "2.6.0", ANYTORCH_FILES)
    result = _clip(tmp_path, "models", path=[other, checkout])
    assert result.returncode == 1
    # pip would refuse to uninstall it ("outside environment"): the advice is the PYTHONPATH entry that finds it.
    assert result.stderr == (f"clip: error: 'import clip' finds the package in {other / 'clip'} (installed by "
                             f"clip-anytorch 2.6.0), not this distribution's in {checkout / 'clip'}, which it hides: "
                             f"remove {other} from PYTHONPATH (it is outside this environment, where pip cannot "
                             "uninstall anything)\n")


def test_a_plain_clone_of_the_original_on_the_path_or_in_the_working_directory_is_named_by_its_path(tmp_path):
    """A checkout of OpenAI's repository (no dist-info): PYTHONPATH names it, or the working directory holds it."""
    clone, checkout = tmp_path / "CLIP", tmp_path / "my checkout"
    checkout.mkdir()
    _copy_ours(checkout)
    (clone / "clip").mkdir(parents=True)
    for path, text in ANYTORCH_FILES.items():
        (clone / path).write_text(text)
    result = _clip(tmp_path, "models", path=[clone, checkout])
    assert result.returncode == 1 and result.stderr.endswith(
        f"which it hides: remove {clone} from PYTHONPATH (it is outside this environment, where pip cannot "
        "uninstall anything)\n")
    shutil.copytree(clone / "clip", tmp_path / "cwd" / "clip")
    result = _clip(tmp_path, "models", path=["", checkout])  # an empty PYTHONPATH entry: the working directory
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.endswith(f"which it hides: it is in the working directory, which PYTHONPATH "
                                  f"({os.pathsep + str(checkout)!r}) puts on the path: run from another directory, "
                                  "or take that entry out of PYTHONPATH\n")


def test_a_removed_file_no_other_distribution_ships_is_not_blamed_on_one(tmp_path):
    site = tmp_path / "site"
    _install_ours(site, "index", tmp_path)
    (site / "clip" / "_cache.py").unlink()
    result = _clip(tmp_path, "--version", path=[site])
    assert result.returncode == 1
    assert ("_cache.py was removed (no other distribution installs it: deleted by hand or by another program)"
            in result.stderr)
    assert "clip-anytorch" not in result.stderr.split("Repair it with")[0]


def test_an_unreadable_file_is_reported_as_unreadable_not_replaced(tmp_path):
    import clip_dropin_launcher

    info = _write_dist_info(tmp_path, "clip-dropin", VERSION, [], extra={"INSTALLER": "pip\n"})
    message = clip_dropin_launcher._changed_message(metadata.PathDistribution(info), str(tmp_path / "clip"),
                                                    {"clip/model.py": "unreadable (Permission denied)"})
    assert "model.py cannot be read (Permission denied)" in message and "replaced" not in message


def test_the_repair_line_run_with_another_pip_first_on_path_repairs_this_environment(tmp_path):
    """A real environment with our wheel, clip-anytorch's model.py written over ours, and another environment's
    pip first on PATH (no venv activated, pipx, a linked ~/bin/clip): the printed line, run by a shell, repairs
    the environment the command runs in."""
    # No PYTHONPATH (a checkout on it would count as clip-dropin installed already) and no activated venv.
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    wheels = tmp_path / "wheels"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "-q", "-w", str(wheels), str(REPO)], capture_output=True, text=True, cwd=REPO, env=env,
                           timeout=300)
    if built.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {built.stderr.strip()[-200:]}")
    ours = tmp_path / "ours"
    venv.create(ours, with_pip=True, system_site_packages=False)
    python = ours / "bin" / "python"
    installed = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q",
                                str(next(wheels.glob("*.whl")))], capture_output=True, text=True, env=env,
                               timeout=300)
    assert installed.returncode == 0, installed.stderr
    site = next((ours / "lib").glob("python*/site-packages"))
    (site / "clip" / "model.py").write_text("import torch\n")  # another distribution's file over ours
    other = tmp_path / "other" / "bin"
    other.mkdir(parents=True)
    (other / "pip").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'wrong pip was run'}\n")
    (other / "pip").chmod(0o755)
    env["PATH"] = os.pathsep.join([str(other), env.get("PATH", "")])
    run = tmp_path / "cwd"
    run.mkdir()
    result = subprocess.run([str(python), "-m", "clip", "--version"], capture_output=True, text=True, cwd=run,
                            env=env, timeout=120)
    assert result.returncode == 1 and "replaced model.py" in result.stderr
    repair = result.stderr.split("Repair it with:\n  ", 1)[1].split("\n", 1)[0]
    assert repair.startswith(f"{shlex.quote(str(python))} -m pip install --no-deps --force-reinstall ")
    repaired = subprocess.run(["sh", "-c", repair + " --no-index -q"], capture_output=True, text=True, cwd=run,
                              env=env, timeout=300)
    assert repaired.returncode == 0, repaired.stderr
    assert not (tmp_path / "wrong pip was run").exists()
    assert (site / "clip" / "model.py").read_bytes() == (REPO / "clip" / "model.py").read_bytes()
    # The check passes now (the command itself would go on to need the dependencies this bare environment lacks).
    result = subprocess.run([str(python), "-c", "import clip_dropin_launcher as l; print(l.installation_problem())"],
                            capture_output=True, text=True, cwd=run, env=env, timeout=120)
    assert (result.returncode, result.stdout) == (0, "None\n"), result.stderr


def test_the_installed_command_runs_here(tmp_path):
    """The clip command of the environment running the tests (editable, or a wheel install with RECORD hashes)."""
    target, function = re.search(r'"clip=([\w.]+):(\w+)"', SETUP).groups()
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", f"import sys; from {target} import {function}; "
                             f"sys.exit({function}(['--version']))"],
                            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert (result.returncode, result.stdout, result.stderr) == (0, f"clip {VERSION}\n", "")


# ----------------------------------------------------------------------------------------------------------------
# The repair command, from the metadata alone


@pytest.mark.parametrize("kind", KINDS + ["editable"])
def test_repair_command_reinstalls_from_where_it_came(tmp_path, kind):
    import clip_dropin_launcher

    info = _write_dist_info(tmp_path, "clip-dropin", VERSION, [], extra=dict(
        {"INSTALLER": "pip\n"}, **({"direct_url.json": json.dumps(_direct_url(kind, tmp_path))}
                                   if kind != "index" else {})))
    assert clip_dropin_launcher.repair_command(metadata.PathDistribution(info)) == \
        f"{PYTHON} -m pip install --no-deps --force-reinstall {_expected_source(kind, tmp_path)}"


@pytest.mark.parametrize("direct_url, source", [
    ({"url": "https://example.invalid/a/b.git", "subdirectory": "py",
      "vcs_info": {"vcs": "git", "commit_id": COMMIT}}, f"'git+https://example.invalid/a/b.git@{COMMIT}#subdirectory=py'"),
    ({"url": "https://files.example.invalid/clip_dropin-1.0.0.tar.gz", "archive_info": {}},
     "https://files.example.invalid/clip_dropin-1.0.0.tar.gz"),
    ({"url": "file:///src/clip%20dropin", "dir_info": {}}, "'/src/clip dropin'"),
    ({"vcs_info": {"vcs": "git"}}, f"clip-dropin=={VERSION}"),  # not what PEP 610 writes: the index it is
    ([], f"clip-dropin=={VERSION}"),
])
def test_repair_command_reads_each_field(tmp_path, direct_url, source):
    import clip_dropin_launcher

    info = _write_dist_info(tmp_path, "clip-dropin", VERSION, [], extra={"direct_url.json": json.dumps(direct_url)})
    assert clip_dropin_launcher.repair_command(metadata.PathDistribution(info)) == \
        f"{PYTHON} -m pip install --no-deps --force-reinstall {source}"


def test_the_launcher_imports_nothing_of_clip_until_the_check_passed():
    code = ("import sys, clip_dropin_launcher; assert clip_dropin_launcher.installation_problem() is None; "
            "print(sorted(m for m in sys.modules if m == 'clip' or m.startswith('clip.')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert (result.returncode, result.stdout, result.stderr) == (0, "[]\n", "")


def test_the_readme_shows_the_message_as_printed(tmp_path):
    site = tmp_path / "site"
    _install_ours(site, "archive", tmp_path)
    _install_foreign(site, "clip-anytorch", "2.6.0", ANYTORCH_FILES)
    result = _clip(tmp_path, "--version", path=[site])
    printed = (result.stderr.replace(PYTHON, "/venv/bin/python")
               .replace(str(site), "/venv/lib/python3.11/site-packages")
               .replace(str(tmp_path), "/work/dist").replace(VERSION, "1.0.0"))
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    shown = re.search(r"\$ clip --version\n(clip: error: .*?\n)```", readme, re.S).group(1)
    assert printed == shown
