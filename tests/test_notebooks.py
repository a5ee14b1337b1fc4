"""Run both notebooks top to bottom on a tiny synthetic checkpoint, in a kernel that is this interpreter.

The kernel is declared here, in a temporary Jupyter data folder, with this interpreter's absolute path: whatever
kernels the machine has registered, the notebook runs on the Python (and the packages) that runs the tests. The
kernel imports ``clip`` from this checkout, whose package holds the tokenizer's vocabulary; it needs no network.
"""
import json
import os
import pathlib
import sys

import pytest

pytest.importorskip("matplotlib")
nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from checkpoints import TINY_VIT, random_state_dict, save_state_dict  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
KERNEL = "clip-tests-python"


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
    """Environment variables for the kernel: our kernelspec, this checkout first on the path, a tiny model."""
    data = tmp_path_factory.mktemp("jupyter")
    spec = data / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "clip tests (this interpreter)",
        "language": "python",
    }))
    model = save_state_dict(tmp_path_factory.mktemp("model") / "tiny.pt", random_state_dict(TINY_VIT))
    return {
        "JUPYTER_PATH": str(data),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "CLIP_NOTEBOOK_MODEL": model,
        "CLIP_OFFLINE": "1",  # the vocabulary is in the test cache: nothing may be fetched
    }


def test_there_are_two_notebooks():
    assert [p.name for p in NOTEBOOKS] == ["clip-api-tour.ipynb", "zero-shot-prompt-ensembling.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, kernel_env, monkeypatch, tmp_path):
    for name, value in kernel_env.items():
        monkeypatch.setenv(name, value)
    notebook = nbformat.read(path, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), \
        "commit notebooks without outputs"
    # One more cell, run last: which interpreter and which clip the kernel used.
    notebook.cells.append(nbformat.v4.new_code_cell(
        "import sys, clip, json; print(json.dumps([sys.executable, clip.__file__]))"))

    client = nbclient.NotebookClient(notebook, kernel_name=KERNEL, timeout=120,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails

    executable, clip_file = json.loads(notebook.cells[-1].outputs[0]["text"])
    assert os.path.samefile(executable, sys.executable)
    assert pathlib.Path(clip_file).resolve() == REPO / "clip" / "__init__.py"
    model_line = notebook.cells[1].outputs[0]["text"]
    assert model_line.startswith(f"model: {kernel_env['CLIP_NOTEBOOK_MODEL']}")
    # The pictures: the drawn images, and the matplotlib figures (heatmap, bars).
    pictures = [cell for cell in notebook.cells if cell.cell_type == "code"
                and any("image/png" in output.get("data", {}) for output in cell.outputs)]
    figures = [cell for cell in pictures if "plt.show()" in cell.source]
    assert len(figures) >= 2, "the notebook shows its results as figures"


def test_make_figure_saves_the_notebooks_heatmap(kernel_env, monkeypatch, tmp_path):
    """The README's picture comes from the notebook's own heatmap cell."""
    import subprocess

    for name, value in kernel_env.items():
        monkeypatch.setenv(name, value)
    target = tmp_path / "similarity.png"
    done = subprocess.run([sys.executable, str(REPO / "notebooks" / "make_figure.py"), "-o", str(target)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    from PIL import Image

    with Image.open(target) as picture:
        assert picture.format == "PNG" and picture.width > 300 and picture.height > 300
    with Image.open(REPO / "assets" / "similarity.png") as shipped:
        assert shipped.format == "PNG"
