"""What bfloat16 costs in accuracy: ``encode_image`` / ``encode_text`` under ``torch.autocast("cpu",
dtype=torch.bfloat16)`` against float32, per architecture.

    python benchmarks/precision.py [--models ViT-B/32 RN50 ...] [--images N] [--labels 100]   # default: all nine
    python benchmarks/precision.py --models ViT-B/32 --load [--folder PHOTOS] [--labels-file LABELS]

- Models: by default random weights in each release architecture (shapes from ``tests/data/state-dicts``),
  rounded to float16 as the release files are, run in float32 as ``clip.load`` runs them on the CPU. ``--load``
  loads each name with ``clip.load`` instead (a release name or a checkpoint path): your own weights.
- Images: ``--images`` per model (defaults below: fewer for the big ones), generated at the model's resolution
  (smooth random fields with noise), or the images of ``--folder`` through the model's ``preprocess``.
- Labels: ``--labels`` prompts ``"a photo of a {noun}."``, or the lines of ``--labels-file``.

For each model it prints, bfloat16 against float32: the smallest and median cosine similarity per row (images,
and label prompts), the top-1 agreement of zero-shot classification (each image against all labels, image and
text features both in the same precision; among all labels and among the first 10), and the overlap of the
top-10 neighbours of ``--queries`` query images (default: every image) among all images (self excluded). Also the
mean cosine between different images' float32 rows, which says how crowded the space is: the more crowded, the
more a small error reorders neighbours. Random ResNets get their BatchNorms set up first (``random_model``).

On a CPU without native bfloat16 (no ``avx512_bf16``/``amx_bf16``/``bf16`` flag; ``clip._embed.cpu_flags``),
torch's bfloat16 matrix products are several times slower than float32. There the script keeps autocast (every
cast, every other operation is the real one) but computes each bfloat16 matrix product and convolution in float32
on the bfloat16 inputs, then rounds the result to bfloat16: what a native kernel computes (bfloat16 inputs,
float32 accumulation, a bfloat16 result), up to the order of the additions. ``--check-real N`` runs N images
through torch's real bfloat16 kernels too and prints how far the two are apart (``--exact`` uses the real kernels
for everything). The emulation uses ``torch.utils._python_dispatch.TorchDispatchMode``, a private torch API: it
lives in this script only, never in the package.
"""
import argparse
import contextlib
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import print_machine, table  # noqa: E402

# Release name -> file stem of its shapes table in tests/data/state-dicts.
ARCHITECTURES = {"RN50": "RN50", "RN101": "RN101", "RN50x4": "RN50x4", "RN50x16": "RN50x16", "RN50x64": "RN50x64",
                 "ViT-B/32": "ViT-B-32", "ViT-B/16": "ViT-B-16", "ViT-L/14": "ViT-L-14",
                 "ViT-L/14@336px": "ViT-L-14-336px"}
# Images per model: float32 and bfloat16 of all nine took about an hour and a half on 2 AVX2 cores (the stand-in
# kernels); the big ones get fewer.
DEFAULT_IMAGES = {"ViT-B/32": 2000, "RN50": 500, "ViT-B/16": 300, "RN101": 300, "RN50x4": 200, "ViT-L/14": 100,
                  "RN50x16": 48, "ViT-L/14@336px": 24, "RN50x64": 16}
NOUNS = ("dog cat car tree house person bicycle boat bird horse sheep cow elephant bear zebra giraffe backpack "
         "umbrella handbag tie suitcase frisbee skis snowboard ball kite bat glove skateboard surfboard racket "
         "bottle glass cup fork knife spoon bowl banana apple sandwich orange broccoli carrot pizza donut cake chair "
         "couch plant bed table toilet television laptop mouse remote keyboard phone microwave oven toaster sink "
         "refrigerator book clock vase scissors teddy-bear hair-drier toothbrush mountain beach street forest river "
         "bridge castle church tower lighthouse desert glacier waterfall volcano island meadow field garden "
         "kitchen bedroom office classroom library museum stadium airport station market harbour").split()
TOP_K = 10  # neighbours compared in the retrieval
FEW_LABELS = 10  # zero-shot agreement is also given among the first 10 labels: fewer candidates, farther apart
CALIBRATION_IMAGES = 32  # generated images that set a random ResNet's BatchNorm statistics


def random_model(name: str, seed: int = 0):
    """A model of the release architecture ``name`` with random weights, as ``clip.load`` gives it on the CPU.

    ResNets get two changes, or their rows would say nothing: the init zeroes the last BatchNorm of each residual
    branch (so the branches add nothing, and no error made in them could show), and BatchNorm's statistics are
    the init's (mean 0, variance 1), far from what the layers put out. Here those BatchNorms get weight 1, and
    every BatchNorm's statistics are measured on generated images, as training would set them.
    """
    from clip.model import CLIP, ModifiedResNet, convert_weights, infer_dims
    from tests.checkpoints import release_table

    shapes = release_table(ARCHITECTURES[name])
    dims = infer_dims({key: torch.empty(shape, device="meta") for key, (shape, _) in shapes.items()})
    torch.manual_seed(seed)
    model = CLIP(**dataclasses.asdict(dims))
    convert_weights(model)  # the release files hold float16 weights; clip.load turns them into float32 on the CPU
    model = model.float().eval()
    if isinstance(model.visual, ModifiedResNet):
        calibrate_batch_norm(model.visual, generated_images(CALIBRATION_IMAGES, dims.image_resolution, seed=seed + 1))
    return model, dims.image_resolution


def calibrate_batch_norm(visual: torch.nn.Module, images: torch.Tensor) -> None:
    """Give each residual branch's last BatchNorm weight 1, then set every BatchNorm's statistics to those of its
    input on ``images`` (one batch, in training mode: each layer sees the ones before it normalised)."""
    norms = {name: module for name, module in visual.named_modules() if isinstance(module, torch.nn.BatchNorm2d)}
    with torch.no_grad():
        for name, norm in norms.items():
            if name.endswith("bn3"):
                norm.weight.fill_(1.0)
            norm.reset_running_stats()
            norm.momentum = None  # running statistics = this batch's
            norm.train()
        visual(images)
    for norm in norms.values():
        norm.eval()


def generated_images(count: int, size: int, seed: int = 0) -> torch.Tensor:
    """[count, 3, size, size] normalised like CLIP's preprocess: smooth random colour fields plus noise."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, size // 16, size // 16, generator=generator)
    smooth = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    pixels = (smooth + 0.05 * torch.randn(count, 3, size, size, generator=generator)).clamp(0, 1)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)  # CLIP's Normalize
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    return (pixels - mean) / std


def folder_images(folder: Path, preprocess, count: int) -> torch.Tensor:
    from PIL import Image

    from clip._inputs import list_images

    names = list_images(str(folder))[:count]
    tensors = []
    for name in names:
        with Image.open(folder / name) as image:
            tensors.append(preprocess(image))
    return torch.stack(tensors)


def emulated_kernels():
    """The context that stands in for native bfloat16 kernels (see the module docstring)."""
    from torch.utils._python_dispatch import TorchDispatchMode  # private: only this benchmark uses it

    aten = torch.ops.aten
    # Under inference_mode the mode sees the composite ops (linear, conv2d); elsewhere what they decompose into.
    products = {aten.linear.default, aten.matmul.default, aten.conv2d.default, aten.mm.default, aten.addmm.default,
                aten.bmm.default, aten.baddbmm.default, aten.convolution.default}

    def widen(value):
        return value.float() if isinstance(value, torch.Tensor) and value.dtype == torch.bfloat16 else value

    class Float32Products(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in products and any(isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 for a in args):
                return func(*map(widen, args), **{k: widen(v) for k, v in kwargs.items()}).bfloat16()
            return func(*args, **kwargs)

    return Float32Products()


def encode(model, images: torch.Tensor, tokens: torch.Tensor, mode: str, batch: int = 32):
    """(image rows, text rows), L2-normalised float32, in ``mode``: fp32, bf16 (real kernels) or bf16-emulated."""
    def run(function, inputs):
        rows = []
        for start in range(0, len(inputs), batch):
            cast = torch.autocast("cpu", dtype=torch.bfloat16) if mode != "fp32" else contextlib.nullcontext()
            kernels = emulated_kernels() if mode == "bf16-emulated" else contextlib.nullcontext()
            with torch.inference_mode(), cast, kernels:
                out = function(inputs[start:start + batch])
            rows.append(torch.nn.functional.normalize(out.float(), dim=-1))
        return torch.cat(rows).numpy()

    return run(model.encode_image, images), run(model.encode_text, tokens)


def cosine_stats(a: np.ndarray, b: np.ndarray) -> tuple:
    cosines = np.sum(a * b, axis=1)  # both sides are unit rows
    return float(cosines.min()), float(np.median(cosines))


def neighbours(features: np.ndarray, queries: int) -> np.ndarray:
    """[queries, TOP_K] indices of each query's nearest rows, itself excluded."""
    similarity = features[:queries] @ features.T  # [queries, rows]
    similarity[np.arange(queries), np.arange(queries)] = -np.inf
    return np.argsort(-similarity, axis=1, kind="stable")[:, :TOP_K]


def compare(fp32: tuple, bf16: tuple, queries: int) -> dict:
    (image32, text32), (image16, text16) = fp32, bf16
    scores32, scores16 = image32 @ text32.T, image16 @ text16.T  # zero-shot: [images, labels]
    few = min(FEW_LABELS, scores32.shape[1])
    near32, near16 = neighbours(image32, queries), neighbours(image16, queries)
    overlap = [len(set(a) & set(b)) / TOP_K for a, b in zip(near32, near16)]
    pairs = image32 @ image32.T  # [rows, rows]
    return {
        "image_cosine": cosine_stats(image32, image16),
        "text_cosine": cosine_stats(text32, text16),
        "top1_agreement": float(np.mean(scores32.argmax(axis=1) == scores16.argmax(axis=1))),
        "top1_agreement_few": float(np.mean(scores32[:, :few].argmax(axis=1) == scores16[:, :few].argmax(axis=1))),
        "top10_overlap": float(np.mean(overlap)),
        "spread": float((pairs.sum() - np.trace(pairs)) / (len(pairs) * (len(pairs) - 1))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_IMAGES))
    parser.add_argument("--load", action="store_true", help="load each model with clip.load (your weights)")
    parser.add_argument("--images", type=int, default=None, help="images per model (default: per model)")
    parser.add_argument("--folder", type=Path, help="use these images (through preprocess) instead")
    parser.add_argument("--queries", type=int, help="query images of the retrieval (default: every image)")
    parser.add_argument("--labels", type=int, default=100)
    parser.add_argument("--labels-file", type=Path)
    parser.add_argument("--check-real", type=int, default=8, help="images also run on torch's bfloat16 kernels")
    parser.add_argument("--exact", action="store_true", help="torch's bfloat16 kernels for everything")
    args = parser.parse_args()

    import clip
    from clip._embed import NATIVE_BF16_FLAGS, cpu_flags

    flags = cpu_flags()
    native = bool(flags and flags & NATIVE_BF16_FLAGS)
    mode = "bf16" if native or args.exact else "bf16-emulated"
    print_machine()
    print(f"native bfloat16: {'yes' if native else 'no'}; bfloat16 runs as: {mode}")
    if args.labels_file:
        labels = [line.strip() for line in args.labels_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        labels = [f"a photo of a {noun.replace('-', ' ')}." for noun in NOUNS[:args.labels]]
    tokens = clip.tokenize(labels, truncate=True)

    rows = []
    for name in args.models:
        start = time.perf_counter()
        if args.load:
            model, preprocess = clip.load(name, device="cpu")
            resolution = model.visual.input_resolution
        else:
            (model, resolution), preprocess = random_model(name), None
        count = args.images or DEFAULT_IMAGES.get(name, 100)
        if args.folder:
            preprocess = preprocess or clip.clip._transform(resolution)
            images = folder_images(args.folder, preprocess, count)
        else:
            images = generated_images(count, resolution)
        queries = min(args.queries or len(images), len(images))
        fp32 = encode(model, images, tokens, "fp32")
        bf16 = encode(model, images, tokens, mode)
        result = compare(fp32, bf16, queries)
        check = ""
        if mode == "bf16-emulated" and args.check_real:
            real, _ = encode(model, images[:args.check_real], tokens[:2], "bf16")
            apart = np.sum(real * bf16[0][:args.check_real], axis=1)
            real_vs_fp32 = cosine_stats(fp32[0][:args.check_real], real)
            check = (f"; real kernels on {len(real)} images: cosine to emulated >= {apart.min():.6f}, to float32 "
                     f"min {real_vs_fp32[0]:.6f} (emulated on the same: "
                     f"{cosine_stats(fp32[0][:args.check_real], bf16[0][:args.check_real])[0]:.6f})")
        print(f"{name}: {len(images)} images, {len(labels)} labels, {queries} queries, "
              f"{time.perf_counter() - start:.0f} s{check}", flush=True)
        rows.append([name, len(images), f"{result['image_cosine'][0]:.5f}", f"{result['image_cosine'][1]:.6f}",
                     f"{result['text_cosine'][0]:.5f}", f"{result['text_cosine'][1]:.6f}",
                     f"{100 * result['top1_agreement_few']:.1f}%", f"{100 * result['top1_agreement']:.1f}%",
                     f"{100 * result['top10_overlap']:.1f}%",
                     f"{result['spread']:.3f}"])
        del model
    print()
    print(table(["model", "images", "image cos min", "image cos median", "text cos min", "text cos median",
                 f"top-1 agreement ({min(FEW_LABELS, len(labels))} labels)",
                 f"top-1 agreement ({len(labels)} labels)", f"top-{TOP_K} overlap", "mean cos between images"],
                rows))


if __name__ == "__main__":
    main()
