"""Tries, for real, the recipes that keep a library depending on clip-anytorch or openai-clip installed beside this
package with ``import clip`` ours; the README's section "Libraries that depend on clip-anytorch or OpenAI's package"
quotes what it prints.

    python benchmarks/coexist.py [--clients all-clip pyiqa] [--recipes pip uv] [--source wheel|folder] [--keep]

Needs the registry (PyPI, through pip and uv) and this environment's torch (to write the checkpoint). For each client
and recipe, in a fresh virtual environment under ``benchmarks/_work/coexist/`` (removed afterwards unless ``--keep``):

- base: ``python -m venv``, with the packages of a template environment hard-linked in (made once, kept under
  ``_work/coexist/torch-template``, 5.3 GB): current pip and setuptools (setuptools 81 and later ship no
  ``pkg_resources``, as in a new environment today), torch and torchvision from this machine's pip (not counted in
  the recipe's time; the links cost no disk).
- recipe ``pip``: install ours, install the client (which pulls the other ``clip`` distribution over ours), show
  what ``import clip`` and ``clip --version`` say then, and run the repair command that ``clip --version`` printed
  (``pip install --no-deps --force-reinstall <ours>``), last.
- recipe ``uv``: one ``uv pip install <ours> <client> --override FILE``, where FILE maps clip-anytorch and
  openai-clip to a marker that is never true, so neither is installed.

Then: ``clip --version`` (which checks our files against our RECORD), the client's own code run on a synthetic
checkpoint (random weights: no release can be fetched here) and compared with ``clip.load`` on the same file,
``pip check``, and the time each step took. Times are wall-clock on whatever machine runs it, downloads included
(pip runs with ``--no-cache-dir``, uv with ``--no-cache``).
"""
import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence, Tuple

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORK = HERE / "_work" / "coexist"

# Where pip finds them on this machine (local files): installed once into the template, linked into each environment.
TORCH = ["torch==2.14.1", "torchvision==0.29.1"]
OTHER_CLIPS = ["clip-anytorch", "openai-clip"]
# Every recipe downloads what it installs (no cache), so the times of pip and uv compare.
PIP_OPTIONS = ["-q", "--no-cache-dir"]
CLIENT_MODULES = {"all-clip": "all_clip", "pyiqa": "pyiqa.archs.clipscore_arch"}  # pyiqa imports its models lazily

# Each client's own code on our package, given the checkpoint path; prints one line, exits non-zero on a mismatch.
CLIENT_RUNS = {
    "all-clip": """
import sys, torch, clip
from all_clip import load_clip
path = sys.argv[1]
model, preprocess, tokenizer = load_clip(path, use_jit=False, device="cpu")  # all_clip's loader, its warm-up
reference, _ = clip.load(path, device="cpu", jit=False)
tokens = tokenizer(["a photo of a dog", "a diagram"])
image = torch.rand(1, 3, model.visual.input_resolution, model.visual.input_resolution)
with torch.no_grad():
    ours = (model.encode_text(tokens), model.encode_image(image))
    expected = (reference.encode_text(clip.tokenize(["a photo of a dog", "a diagram"], truncate=True)),
                reference.encode_image(image))
same = all(torch.equal(a, b) for a, b in zip(ours, expected))
print(f"all_clip.load_clip -> {type(model).__module__}.{type(model).__name__}; encode_text {tuple(ours[0].shape)}, "
      f"encode_image {tuple(ours[1].shape)}; identical to clip.load: {same}")
sys.exit(0 if same else 1)
""",
    "pyiqa": """
import sys, torch, clip
from pyiqa.archs.clipscore_arch import CLIPScore
path = sys.argv[1]
metric = CLIPScore(backbone=path).eval()  # pyiqa's CLIPScore: clip.load, clip.tokenize, encode_image/_text
torch.manual_seed(0)
images, captions = torch.rand(2, 3, 64, 64), ["a dog on grass", "a city street"]
with torch.no_grad():
    scores = metric(images, captions)
    reference, _ = clip.load(path, device=next(metric.parameters()).device, jit=False)
    from pyiqa.archs.arch_util import clip_preprocess_tensor
    image_features = reference.encode_image(clip_preprocess_tensor(images, reference))
    text_features = reference.encode_text(clip.tokenize(["A photo depicts " + c for c in captions], truncate=True))
    cosine = torch.nn.functional.cosine_similarity(image_features, text_features, dim=-1)
    expected = 2.5 * torch.relu(cosine)
same = torch.allclose(scores, expected, rtol=0, atol=1e-6)
print(f"pyiqa CLIPScore -> {type(metric.clip_model).__module__}.{type(metric.clip_model).__name__}; scores "
      f"{[round(float(s), 4) for s in scores]}; same as clip.load by hand: {same}")
sys.exit(0 if same else 1)
""",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", nargs="+", default=["all-clip", "pyiqa"], choices=sorted(CLIENT_RUNS))
    parser.add_argument("--recipes", nargs="+", default=["pip", "uv"], choices=["pip", "uv"])
    parser.add_argument("--source", default="wheel", choices=["wheel", "folder"],
                        help="install ours from a wheel built from this checkout, or from the folder itself")
    parser.add_argument("--keep", action="store_true", help="keep the virtual environments")
    args = parser.parse_args()

    WORK.mkdir(parents=True, exist_ok=True)
    ours = _our_source(args.source)
    checkpoint = _checkpoint()
    uv = _uv() if "uv" in args.recipes else ""
    print(f"ours: {ours}\ncheckpoint: {checkpoint} (random weights)\n")
    rows = []
    for client in args.clients:
        for recipe in args.recipes:
            rows.append(_try(client, recipe, ours, checkpoint, uv, keep=args.keep))
    print("\n| client | recipe | recipe time | `clip --version` | client on our package | `pip check` |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def _try(client: str, recipe: str, ours: str, checkpoint: Path, uv: str, *, keep: bool) -> Tuple[str, ...]:
    venv = WORK / f"{client}-{recipe}"
    shutil.rmtree(venv, ignore_errors=True)
    print(f"=== {client}, recipe {recipe} ({venv})")
    python = str(venv / "bin" / "python")
    _step("venv", [sys.executable, "-m", "venv", "--without-pip", str(venv)])
    _step("pip, setuptools, torch, torchvision linked from the template",
          ["cp", "-al", f"{_site_packages(_template())}/.", _site_packages(venv)])
    print("  " + _output([python, "-m", "pip", "--version"]).split(" from ")[0] + "; " + _output(
        [python, "-c", "import importlib.metadata as m; print('; '.join(n + ' ' + m.version(n) for n in "
                       "('setuptools', 'torch', 'torchvision')))"]))

    if recipe == "pip":
        seconds = _step(f"pip install {_short(ours)}", [python, "-m", "pip", "install", *PIP_OPTIONS, ours])
        seconds += _step(f"pip install {client}", [python, "-m", "pip", "install", *PIP_OPTIONS, client])
        print(f"  then 'import clip': {_last_line(_run([python, '-c', 'import clip']))}")
        print(f"  then 'import {CLIENT_MODULES[client]}': "
              f"{_last_line(_run([python, '-c', 'import ' + CLIENT_MODULES[client]]))}")
        broken = _run([str(venv / "bin" / "clip"), "--version"])
        print("  then 'clip --version':\n" + _indent(broken.stderr or broken.stdout, "    "))
        repair = _repair_line(broken.stderr)
        seconds += _step(f"the repair it printed: {_short(repair)}",
                         [python, "-m", *shlex.split(repair)[:2], *PIP_OPTIONS, *shlex.split(repair)[2:]])
    else:
        with tempfile.NamedTemporaryFile("w", suffix=".txt", dir=WORK, delete=False) as overrides:
            overrides.write("".join(f'{name} ; sys_platform == "never"\n' for name in OTHER_CLIPS))
        print("  overrides.txt: " + "; ".join(f'{name} ; sys_platform == "never"' for name in OTHER_CLIPS))
        try:
            seconds = _step(f"uv pip install {_short(ours)} {client} --override overrides.txt",
                            [uv, "pip", "install", "--no-cache", "--python", python, ours, client,
                             "--override", overrides.name])
        finally:
            os.unlink(overrides.name)

    installed = _output([python, "-m", "pip", "list", "--format", "freeze"]).splitlines()
    clips = [line for line in installed if line.split("==")[0].lower() in ["clip-dropin", *OTHER_CLIPS]]
    print(f"  clip distributions installed: {', '.join(clips)}")
    version = _run([str(venv / "bin" / "clip"), "--version"])
    print(f"  clip --version: {(version.stdout or version.stderr).strip()}")
    run = _run([python, "-c", CLIENT_RUNS[client], str(checkpoint)])
    print(f"  {client} on our package: {_last_line(run)}")
    check = _run([python, "-m", "pip", "check"])
    print("  pip check:\n" + _indent(check.stdout + check.stderr, "    "))
    # du counts a hard-linked file once, under the first folder named: the second line is what the recipe added.
    added = _output(["du", "-sh", str(_template()), str(venv)]).splitlines()[1].split()[0]
    print(f"  recipe time {seconds:.0f} s; environment: the template's files plus {added} of its own\n")
    if not keep:
        shutil.rmtree(venv)
    return (client, recipe, f"{seconds:.0f} s", (version.stdout or version.stderr).strip().splitlines()[0],
            ("ran, identical" if run.returncode == 0 else "FAILED: " + _last_line(run)),
            "; ".join((check.stdout + check.stderr).strip().splitlines()))


def _our_source(kind: str) -> str:
    if kind == "folder":
        return str(REPO)
    dist = WORK / "dist"
    shutil.rmtree(dist, ignore_errors=True)
    _step("build our wheel", [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(REPO)])
    return str(next(dist.glob("clip_dropin-*.whl")))


def _checkpoint() -> Path:
    """A release-layout state dict of a small ViT with random weights (what tests/checkpoints.py writes)."""
    path = WORK / "tiny-vit.pt"
    code = ("import sys; sys.path.insert(0, sys.argv[2]); from tests.checkpoints import random_state_dict, "
            "save_state_dict; save_state_dict(sys.argv[1], random_state_dict())")
    subprocess.run([sys.executable, "-c", code, str(path), str(REPO)], check=True, cwd=REPO)
    return path


def _template() -> Path:
    """A virtual environment with current pip and setuptools, torch and torchvision: made once, then linked."""
    template = WORK / "torch-template"
    python = str(template / "bin" / "python")
    if not (template / "done").exists():
        shutil.rmtree(template, ignore_errors=True)
        _step("template environment: venv", [sys.executable, "-m", "venv", str(template)])
        _step("template: current pip and setuptools",
              [python, "-m", "pip", "install", "-q", "--upgrade", "pip", "setuptools"])
        _step(f"template: {' '.join(TORCH)}", [python, "-m", "pip", "install", "-q", *TORCH])
        (template / "done").write_text("")
    return template


def _site_packages(venv: Path) -> str:
    return str(venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages")


def _uv() -> str:
    """uv from PyPI, in a tools environment of its own."""
    tools = WORK / "tools"
    if not (tools / "bin" / "uv").exists():
        _step("pip install uv (tools environment)", [sys.executable, "-m", "venv", str(tools)])
        _step("", [str(tools / "bin" / "python"), "-m", "pip", "install", "-q", "uv"], show=False)
    uv = str(tools / "bin" / "uv")
    print("  " + _output([uv, "--version"]))
    return uv


def _step(label: str, command: Sequence[str], show: bool = True) -> float:
    start = time.perf_counter()
    result = _run(command)
    seconds = time.perf_counter() - start
    if result.returncode:
        raise SystemExit(f"failed ({result.returncode}): {' '.join(command)}\n{result.stdout}{result.stderr}")
    if show and label:
        print(f"  {label}: {seconds:.1f} s")
    return seconds


def _run(command: Sequence[str]) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(list(command), capture_output=True, text=True, cwd=WORK, env=env, timeout=3600)


def _output(command: Sequence[str]) -> str:
    return _run(command).stdout.strip()


def _last_line(result: subprocess.CompletedProcess) -> str:
    lines = (result.stdout + result.stderr).strip().splitlines()
    return (lines[-1] if lines else "") if result.returncode else ("ok" if not lines else lines[-1])


def _repair_line(message: str) -> str:
    """The command on the line after 'Repair it with:' in the clip command's message."""
    lines = message.splitlines()
    for index, line in enumerate(lines[:-1]):
        if line.endswith("Repair it with:"):
            return lines[index + 1].strip()
    raise SystemExit(f"the clip command printed no repair:\n{message}")


def _short(text: str) -> str:
    return text.replace(str(WORK) + os.sep, "").replace(str(REPO), ".")


def _indent(text: str, prefix: str) -> str:
    return "\n".join(prefix + line for line in text.strip().splitlines())


if __name__ == "__main__":
    main()
