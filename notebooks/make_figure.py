"""Make the README's picture: run ``clip-api-tour.ipynb`` up to its similarity heatmap and save that figure.

    python notebooks/make_figure.py [-o assets/similarity.png]

The notebook's own code draws it, so the picture is what the notebook shows. The model is the notebook's:
``ViT-B/32`` (downloaded once), or the one named by ``CLIP_NOTEBOOK_MODEL``. Needs matplotlib
(``pip install 'clip-dropin[notebooks]'``).
"""
import argparse
import json
import os
from pathlib import Path

HERE = Path(__file__).resolve().parent
NOTEBOOK = HERE / "clip-api-tour.ipynb"
# The heatmap cell is the one that sets this title; the figure it leaves in ``figure`` is saved.
MARKER = "Cosine similarity between image and text features"


def heatmap_figure(notebook: Path = NOTEBOOK):
    """Run the notebook's code cells up to the heatmap's; return that cell's ``figure``."""
    os.environ.setdefault("MPLBACKEND", "Agg")  # no window: plt.show() does nothing
    cells = [cell for cell in json.loads(notebook.read_text(encoding="utf-8"))["cells"] if cell["cell_type"] == "code"]
    namespace = {"__name__": "__notebook__"}
    for number, cell in enumerate(cells):
        source = "".join(cell["source"])
        exec(compile(source, f"{notebook.name}[code cell {number}]", "exec"), namespace)
        if MARKER in source:
            return namespace["figure"]
    raise SystemExit(f"no cell of {notebook} draws the heatmap ({MARKER!r})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--output", default=str(HERE.parent / "assets" / "similarity.png"))
    args = parser.parse_args()
    heatmap_figure().savefig(args.output, dpi=72, bbox_inches="tight")
    print(args.output)


if __name__ == "__main__":
    main()
