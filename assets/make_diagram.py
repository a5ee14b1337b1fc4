"""Draw ``assets/diagram.png``, the image the README's first command classifies: a boxes-and-arrows diagram of
contrastive pre-training, drawn with Pillow (as the original ships its own ``CLIP.png``).

    python assets/make_diagram.py
"""
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

CELL = 44  # side of one similarity cell, in pixels
N = 5  # texts and images in the batch the diagram shows


def draw() -> Image.Image:
    image = Image.new("RGB", (720, 420), "white")
    pen = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=16)
    small = ImageFont.load_default(size=13)
    # The two encoders, each with an arrow to its row (texts) or column (images) of features.
    pen.rounded_rectangle((20, 30, 180, 80), radius=8, fill="#cfe3f7", outline="#3b6ea5", width=2)
    pen.text((100, 55), "Text Encoder", font=font, fill="black", anchor="mm")
    pen.rounded_rectangle((20, 150, 180, 200), radius=8, fill="#f7dccf", outline="#a5573b", width=2)
    pen.text((100, 175), "Image Encoder", font=font, fill="black", anchor="mm")
    left, top = 300, 120
    pen.line((180, 55, left - 10, 55), fill="black", width=2)
    pen.polygon([(left - 10, 49), (left, 55), (left - 10, 61)], fill="black")
    pen.line((180, 175, left - 70, 175), fill="black", width=2)
    pen.polygon([(left - 70, 169), (left - 60, 175), (left - 70, 181)], fill="black")
    for k in range(N):
        x0, y0 = left + k * CELL, 35
        pen.rectangle((x0, y0, x0 + CELL - 4, y0 + 40), fill="#cfe3f7", outline="#3b6ea5")
        pen.text((x0 + CELL / 2 - 2, y0 + 20), f"T{k + 1}", font=small, fill="black", anchor="mm")
        x0, y0 = left - 58, top + k * CELL
        pen.rectangle((x0, y0, x0 + 48, y0 + CELL - 4), fill="#f7dccf", outline="#a5573b")
        pen.text((x0 + 24, y0 + CELL / 2 - 2), f"I{k + 1}", font=small, fill="black", anchor="mm")
    # The similarity matrix: matching pairs on the diagonal.
    for i in range(N):
        for j in range(N):
            x0, y0 = left + j * CELL, top + i * CELL
            pen.rectangle((x0, y0, x0 + CELL - 4, y0 + CELL - 4), fill="#7fb77e" if i == j else "#e8e8e8",
                          outline="#888888")
            pen.text((x0 + CELL / 2 - 2, y0 + CELL / 2 - 2), f"I{i + 1}·T{j + 1}", font=ImageFont.load_default(9),
                     fill="black", anchor="mm")
    pen.text((360, 400), "Contrastive pre-training", font=font, fill="black", anchor="mm")
    return image


if __name__ == "__main__":
    target = Path(__file__).resolve().parent / "diagram.png"
    draw().save(target, optimize=True)
    print(target)
