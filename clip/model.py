"""The CLIP modules, ``build_model`` and ``convert_weights``. Attribute names are the release checkpoints' keys, and
must never change: hooks, fine-tuning code and saved checkpoints rely on them.
"""
import dataclasses
import math
import re
from collections import OrderedDict
from typing import Dict, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import _text_trim
from ._errors import StateDictError, format_keys

__all__ = ["AttentionPool2d", "Bottleneck", "CLIP", "LayerNorm", "ModifiedResNet", "QuickGELU",
           "ResidualAttentionBlock", "Transformer", "VisionTransformer", "build_model", "convert_weights"]

# Integer scalars that release archives carry beside the weights; a model has no such attributes.
ARCHIVE_SCALAR_KEYS = ("input_resolution", "context_length", "vocab_size")
# CLIP's transformers split their width into attention heads of this many dimensions (heads = width // 64).
HEAD_WIDTH = 64
# CLIP's MLPs are this many times as wide as the residual stream.
MLP_RATIO = 4


class Bottleneck(nn.Module):
    """ResNet bottleneck whose strided variants pool before convolving (anti-aliasing) instead of striding."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu3 = nn.ReLU(inplace=True)
        self.downsample = None
        self.stride = stride
        if stride > 1 or inplanes != planes * Bottleneck.expansion:
            # The release names these submodules "-1", "0" and "1": the keys are downsample.0.weight, downsample.1.*.
            self.downsample = nn.Sequential(OrderedDict([
                ("-1", nn.AvgPool2d(stride)),
                ("0", nn.Conv2d(inplanes, planes * self.expansion, 1, stride=1, bias=False)),
                ("1", nn.BatchNorm2d(planes * self.expansion)),
            ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.avgpool(out)
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu3(out)


class AttentionPool2d(nn.Module):
    """Attention pooling over the final feature map, queried by the mean of its tokens."""

    def __init__(self, spacial_dim: int, embed_dim: int, num_heads: int, output_dim: Optional[int] = None):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(spacial_dim ** 2 + 1, embed_dim) / embed_dim ** 0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim or embed_dim)
        self.num_heads = num_heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(start_dim=2).permute(2, 0, 1)  # NCHW -> (HW)NC
        x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)  # (HW+1)NC: the mean token leads
        x = x + self.positional_embedding[:, None, :].to(x.dtype)  # (HW+1)NC
        x, _ = F.multi_head_attention_forward(
            query=x[:1], key=x, value=x, embed_dim_to_check=x.shape[-1], num_heads=self.num_heads,
            q_proj_weight=self.q_proj.weight, k_proj_weight=self.k_proj.weight, v_proj_weight=self.v_proj.weight,
            in_proj_weight=None, in_proj_bias=torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]),
            bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0, out_proj_weight=self.c_proj.weight,
            out_proj_bias=self.c_proj.bias, use_separate_proj_weight=True, training=self.training, need_weights=False)
        return x.squeeze(0)  # 1NC -> NC


class ModifiedResNet(nn.Module):
    """ResNet with a three-convolution stem, anti-aliased strided blocks and attention pooling."""

    def __init__(self, layers: Tuple[int, int, int, int], output_dim: int, heads: int,
                 input_resolution: int = 224, width: int = 64):
        super().__init__()
        self.output_dim = output_dim
        self.input_resolution = input_resolution

        # The stem: three 3x3 convolutions (the first strided) and an average pool, 4x downsampling in all.
        self.conv1 = nn.Conv2d(3, width // 2, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width // 2, width // 2, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width // 2, width, kernel_size=3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)

        self._inplanes = width  # mutated by _make_layer as the stages are built
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=2)

        embed_dim = width * 32  # the ResNet feature dimension: width * 8 planes * 4 expansion
        self.attnpool = AttentionPool2d(input_resolution // 32, embed_dim, heads, output_dim)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        layers = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * Bottleneck.expansion
        layers.extend(Bottleneck(self._inplanes, planes) for _ in range(1, blocks))
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.type(self.conv1.weight.dtype)
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(self.bn3(self.conv3(x)))
        x = self.avgpool(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        return self.attnpool(x)


class LayerNorm(nn.LayerNorm):
    """LayerNorm that computes in float32 and returns the input's dtype (float16 activations stay float16)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        orig_type = x.dtype
        ret = super().forward(x.type(torch.float32))
        return ret.type(orig_type)


class QuickGELU(nn.Module):
    """The sigmoid approximation of GELU that CLIP was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # 1.702 makes x * sigmoid(a x) closest to x * Phi(x); the weights were trained with this exact form.
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x)); input is (L, N, D)."""

    def __init__(self, d_model: int, n_head: int, attn_mask: Optional[torch.Tensor] = None):
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, n_head)
        self.ln_1 = LayerNorm(d_model)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(d_model, d_model * MLP_RATIO)),
            ("gelu", QuickGELU()),
            ("c_proj", nn.Linear(d_model * MLP_RATIO, d_model)),
        ]))
        self.ln_2 = LayerNorm(d_model)
        self.attn_mask = attn_mask

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.attn_mask
        if mask is not None:
            mask = _text_trim.attention_mask(mask, x)
        return self.attn(x, x, x, need_weights=False, attn_mask=mask)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class Transformer(nn.Module):
    """A stack of ``layers`` residual attention blocks over sequence-first input (L, N, D)."""

    def __init__(self, width: int, layers: int, heads: int, attn_mask: Optional[torch.Tensor] = None):
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads, attn_mask) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resblocks(x)


class VisionTransformer(nn.Module):
    """ViT image encoder: patch embedding, class token, transformer, ln_post of the class token, projection."""

    def __init__(self, input_resolution: int, patch_size: int, width: int, layers: int, heads: int,
                 output_dim: int):
        super().__init__()
        self.input_resolution = input_resolution
        self.output_dim = output_dim
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)

        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((input_resolution // patch_size) ** 2 + 1, width))
        self.ln_pre = LayerNorm(width)

        self.transformer = Transformer(width, layers, heads)

        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)  # [N, width, grid, grid]
        x = x.reshape(x.shape[0], x.shape[1], -1)  # [N, width, grid ** 2]
        x = x.permute(0, 2, 1)  # [N, grid ** 2, width]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # [N, 1, width]
        x = torch.cat([cls, x], dim=1)  # [N, grid ** 2 + 1, width]
        x = x + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x)

        x = x.permute(1, 0, 2)  # NLD -> LND
        x = self.transformer(x)
        x = x.permute(1, 0, 2)  # LND -> NLD

        x = self.ln_post(x[:, 0, :])
        if self.proj is not None:
            x = x @ self.proj
        return x


@_text_trim.trims(Transformer, ResidualAttentionBlock, LayerNorm, QuickGELU)
class CLIP(nn.Module):
    """Contrastive image-text model: an image encoder, a causal text transformer and a learned temperature.

    Attributes
    ----------
    trim_text : bool
        ``True`` (the default) lets ``encode_text`` run each row only up to its end-of-text token where
        ``clip._text_trim`` proves that this computes the same features. ``False`` always runs all
        ``context_length`` positions, as the original: for code that patches other torch functions than those the
        check knows, and that must see the full shapes.
    """

    trim_text: bool = True

    def __init__(self, embed_dim: int,
                 # vision
                 image_resolution: int, vision_layers: Union[Tuple[int, int, int, int], int], vision_width: int,
                 vision_patch_size: Optional[int],
                 # text
                 context_length: int, vocab_size: int, transformer_width: int, transformer_heads: int,
                 transformer_layers: int):
        super().__init__()
        self.context_length = context_length

        if isinstance(vision_layers, (tuple, list)):
            vision_heads = vision_width * 32 // HEAD_WIDTH  # attention pooling over width * 32 features
            self.visual = ModifiedResNet(layers=tuple(vision_layers), output_dim=embed_dim, heads=vision_heads,
                                         input_resolution=image_resolution, width=vision_width)
        else:
            self.visual = VisionTransformer(input_resolution=image_resolution, patch_size=vision_patch_size,
                                            width=vision_width, layers=vision_layers,
                                            heads=vision_width // HEAD_WIDTH, output_dim=embed_dim)

        self.transformer = Transformer(width=transformer_width, layers=transformer_layers, heads=transformer_heads,
                                       attn_mask=self.build_attention_mask())

        self.vocab_size = vocab_size
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(self.context_length, transformer_width))
        self.ln_final = LayerNorm(transformer_width)

        self.text_projection = nn.Parameter(torch.empty(transformer_width, embed_dim))
        # log(1 / 0.07): the temperature CLIP's training started from.
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))

        self.initialize_parameters()

    def initialize_parameters(self) -> None:
        """The original's random initialisation, for training from scratch (loading skips it: see build_model)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)

        if isinstance(self.visual, ModifiedResNet):
            if self.visual.attnpool is not None:
                std = self.visual.attnpool.c_proj.in_features ** -0.5
                nn.init.normal_(self.visual.attnpool.q_proj.weight, std=std)
                nn.init.normal_(self.visual.attnpool.k_proj.weight, std=std)
                nn.init.normal_(self.visual.attnpool.v_proj.weight, std=std)
                nn.init.normal_(self.visual.attnpool.c_proj.weight, std=std)

            for resnet_block in [self.visual.layer1, self.visual.layer2, self.visual.layer3, self.visual.layer4]:
                for name, param in resnet_block.named_parameters():
                    if name.endswith("bn3.weight"):
                        nn.init.zeros_(param)

        proj_std = (self.transformer.width ** -0.5) * ((2 * self.transformer.layers) ** -0.5)
        attn_std = self.transformer.width ** -0.5
        fc_std = (2 * self.transformer.width) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)

        if self.text_projection is not None:
            nn.init.normal_(self.text_projection, std=self.transformer.width ** -0.5)

    def build_attention_mask(self) -> torch.Tensor:
        """The causal additive mask: -inf above the diagonal, so a position never attends to later ones."""
        # Always a real CPU tensor, also while the model is being built on the meta device: every text block holds
        # it as ``attn_mask``, and a CPU mask can be checked for causality without a device sync. The blocks run
        # with a copy on the activations' device and dtype, made once (_text_trim.attention_mask).
        mask = torch.full((self.context_length, self.context_length), float("-inf"), device="cpu")
        return mask.triu_(1)

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return self.visual(image.type(self.dtype))

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        """Text features: the transformer output at each row's end-of-text token, projected.

        Parameters
        ----------
        text : torch.Tensor
            Token ids ``[N, context_length]`` (``clip.tokenize``); the highest id of a row marks its end of text.

        Returns
        -------
        torch.Tensor
            The features ``[N, embed_dim]``, in the model's dtype.

        Notes
        -----
        Rows run only up to their end of text where ``clip._text_trim`` proves it computes the same features (the
        README's "The text fast path"); otherwise, or with ``trim_text = False``, all positions run.

        Raises
        ------
        RuntimeError
            When ``text`` has more positions than the model's context length (the original's error type), whatever
            the texts and ``trim_text``.
        """
        context_length = self.positional_embedding.shape[0]
        if text.dim() and text.shape[-1] > context_length:
            raise RuntimeError(f"text has {text.shape[-1]} positions, more than this model's context length "
                               f"{context_length}; tokenize with context_length={context_length} (clip.tokenize's "
                               f"default)")
        x = self.token_embedding(text).type(self.dtype)  # [N, n_ctx, d_model]
        eot = text.argmax(dim=-1)  # [N]: the end-of-text token has the highest id in each row
        x = _text_trim.text_tower(self, x, eot)  # [N, d_model]
        return x @ self.text_projection  # [N, embed_dim]

    def _text_tower(self, x: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
        """The ``ln_final`` output at each row's end of text: token embeddings ``[N, L, d_model]`` -> ``[N, d_model]``.

        ``L`` is ``context_length``, or fewer when every row's end of text (``eot``, ``[N]``) is below it.
        """
        length = x.shape[1]
        x = x + self.positional_embedding[:length].type(self.dtype)  # [N, L, d_model]
        x = x.permute(1, 0, 2)  # NLD -> LND
        x = self.transformer(x)
        x = x.permute(1, 0, 2)  # LND -> NLD
        x = self.ln_final(x).type(self.dtype)
        return x[torch.arange(x.shape[0], device=x.device), eot]  # [N, d_model]

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        image_features = self.encode_image(image)
        text_features = self.encode_text(text)

        image_features = image_features / image_features.norm(dim=1, keepdim=True)
        text_features = text_features / text_features.norm(dim=1, keepdim=True)

        logit_scale = self.logit_scale.exp()
        logits_per_image = logit_scale * image_features @ text_features.t()  # [N_image, N_text]
        logits_per_text = logits_per_image.t()  # [N_text, N_image]
        return logits_per_image, logits_per_text


def convert_weights(model: nn.Module) -> None:
    """Cast the weights that the release stores in float16 to float16, in place.

    These are the weights and biases of every convolution and linear layer, the packed attention projections,
    and the ``text_projection`` and ``proj`` matrices; LayerNorm, BatchNorm, embeddings and ``logit_scale``
    stay float32.
    """

    def _convert(module: nn.Module) -> None:
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            module.weight.data = module.weight.data.half()
            if module.bias is not None:
                module.bias.data = module.bias.data.half()

        if isinstance(module, nn.MultiheadAttention):
            for name in ["in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight",
                         "in_proj_bias", "bias_k", "bias_v"]:
                tensor = getattr(module, name)
                if tensor is not None:
                    tensor.data = tensor.data.half()

        for name in ["text_projection", "proj"]:
            attr = getattr(module, name, None)
            if attr is not None:
                attr.data = attr.data.half()

    model.apply(_convert)


@dataclasses.dataclass(frozen=True)
class ModelDims:
    """The hyper-parameters of a CLIP model, in the order of ``CLIP.__init__``'s arguments."""

    embed_dim: int
    image_resolution: int
    vision_layers: Union[Tuple[int, int, int, int], int]
    vision_width: int
    vision_patch_size: Optional[int]
    context_length: int
    vocab_size: int
    transformer_width: int
    transformer_heads: int
    transformer_layers: int


def _layer_indices(state_dict: Mapping[str, torch.Tensor], prefix: str) -> set:
    """The distinct integer indices that follow ``prefix`` in the keys (``prefix`` ends with a dot)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return {int(m.group(1)) for m in map(pattern.match, state_dict) if m}


def _shape(state_dict: Mapping[str, torch.Tensor], key: str, dims: int) -> Tuple[int, ...]:
    """The shape of ``state_dict[key]``, which must have ``dims`` dimensions, none of them empty."""
    try:
        shape = tuple(state_dict[key].shape)
    except KeyError:
        raise StateDictError(f"not a CLIP state dict: the key {key!r} is missing") from None
    if len(shape) != dims or 0 in shape:
        raise StateDictError(f"{key} has shape {shape}; a CLIP model's has {dims} non-empty dimensions")
    return shape


def _grid(state_dict: Mapping[str, torch.Tensor], key: str) -> int:
    """The side of the square grid of positions that ``key`` embeds: its rows are grid ** 2 + 1 (one class or mean
    token before the grid)."""
    positions = _shape(state_dict, key, 2)[0]
    grid = math.isqrt(positions - 1)
    if grid == 0 or grid * grid + 1 != positions:
        raise StateDictError(f"{key} has {positions} rows; expected grid ** 2 + 1 for a square grid")
    return grid


def _multiple_of_head_width(width: int, key: str) -> int:
    # width // HEAD_WIDTH heads, at least one, dividing the width.
    if width % HEAD_WIDTH:
        raise StateDictError(f"{key} gives the width {width}, which is not a multiple of {HEAD_WIDTH} (CLIP's "
                             f"transformers use {HEAD_WIDTH}-dimensional attention heads)")
    return width


def infer_dims(state_dict: Mapping[str, torch.Tensor]) -> ModelDims:
    """Read the architecture off the tensor shapes of a CLIP state dict (a pure function).

    Raises
    ------
    StateDictError
        When a key the architecture is read from is missing or the shapes do not fit together.
    """
    if "visual.proj" in state_dict:
        vision_width, _, vision_patch_size, _ = _shape(state_dict, "visual.conv1.weight", 4)
        _multiple_of_head_width(vision_width, "visual.conv1.weight")
        vision_layers = sum(1 for k in state_dict if k.startswith("visual.") and k.endswith(".attn.in_proj_weight"))
        image_resolution = vision_patch_size * _grid(state_dict, "visual.positional_embedding")
    else:
        stages = [_layer_indices(state_dict, f"visual.layer{i}.") for i in (1, 2, 3, 4)]
        if not all(stages):
            raise StateDictError("not a CLIP state dict: neither 'visual.proj' (ViT) nor visual.layer1-4 (ResNet) "
                                 "found")
        vision_layers = tuple(len(s) for s in stages)
        vision_width = _shape(state_dict, "visual.layer1.0.conv1.weight", 4)[0]
        if vision_width % 2:  # the stem halves the width, and the attention pool has width * 32 / 64 heads
            raise StateDictError(f"visual.layer1.0.conv1.weight gives the odd ResNet width {vision_width}; "
                                 f"expected an even width")
        vision_patch_size = None
        image_resolution = _grid(state_dict, "visual.attnpool.positional_embedding") * 32  # downsampled 32x

    transformer_width = _multiple_of_head_width(_shape(state_dict, "ln_final.weight", 1)[0], "ln_final.weight")
    return ModelDims(
        embed_dim=_shape(state_dict, "text_projection", 2)[1], image_resolution=image_resolution,
        vision_layers=vision_layers, vision_width=vision_width, vision_patch_size=vision_patch_size,
        context_length=_shape(state_dict, "positional_embedding", 2)[0],
        vocab_size=_shape(state_dict, "token_embedding.weight", 2)[0], transformer_width=transformer_width,
        transformer_heads=transformer_width // HEAD_WIDTH,
        transformer_layers=len(_layer_indices(state_dict, "transformer.resblocks.")))


# The top-level names of a CLIP state dict, and keys the architecture cannot be read without.
_CLIP_PREFIXES = ("visual.", "transformer.", "token_embedding.", "ln_final.", "positional_embedding",
                  "text_projection", "logit_scale")
_REQUIRED_KEYS = ("visual.conv1.weight", "token_embedding.weight", "positional_embedding", "ln_final.weight",
                  "text_projection", "logit_scale")


def _empty_model(dims: ModelDims, *, half: bool) -> CLIP:
    """A CLIP with parameters on the meta device (no memory, no random numbers), in the dtypes to load into."""
    with torch.device("meta"):
        model = CLIP(**dataclasses.asdict(dims))
    if half:
        convert_weights(model)
    return model


def _not_clip(reason: str, source: Optional[str]) -> StateDictError:
    """The error for a state dict that is not CLIP's, for every format: ``"<source> is not a CLIP checkpoint: "``
    before ``reason`` when the dict was read from ``source`` (a file or folder)."""
    return StateDictError(f"{source} is not a CLIP checkpoint: {reason}" if source else reason)


def checked_dims(state_dict: Mapping[str, torch.Tensor], source: Optional[str] = None) -> ModelDims:
    """``infer_dims``, whose error also names the required keys the dict lacks and the keys no CLIP model has."""
    try:
        return infer_dims(state_dict)
    except StateDictError as e:
        missing = [k for k in _REQUIRED_KEYS if k not in state_dict]
        unexpected = [k for k in state_dict if not k.startswith(_CLIP_PREFIXES)]
        reason = (f"{e}; missing keys ({len(missing)}): {format_keys(missing)}; "
                  f"unexpected keys ({len(unexpected)}): {format_keys(unexpected)}")
    raise _not_clip(reason, source) from None


def _check_keys(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor],
                source: Optional[str]) -> None:
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(given) if expected[k].shape != given[k].shape)
    if not (missing or unexpected or wrong_shape):
        return
    lines = ["the state dict does not fit a CLIP model"]
    if missing:
        lines.append(f"missing keys ({len(missing)}): {format_keys(missing)}")
    if unexpected:
        lines.append(f"unexpected keys ({len(unexpected)}): {format_keys(unexpected)}")
    for k in wrong_shape[:20]:
        lines.append(f"shape of {k}: expected {tuple(expected[k].shape)}, got {tuple(given[k].shape)}")
    raise _not_clip("; ".join(lines), source)


def model_from_state_dict(state_dict: Dict[str, torch.Tensor], *, device: Union[str, torch.device, None] = None,
                          half: bool = True, consume: bool = False, source: Optional[str] = None) -> CLIP:
    """Build a CLIP whose parameters are the given tensors, converted once to their final device and dtype.

    ``device`` defaults to the CPU, as the original's ``build_model``; a dict of ``meta`` tensors (shapes only)
    gives a ``meta`` model, which checks an architecture without memory.

    ``half`` selects the release dtypes (the ``convert_weights`` set in float16, the rest float32); otherwise every
    floating tensor is float32. With ``consume``, tensors are popped from ``state_dict`` as they are converted, so a
    loader that owns the dict never holds the file's copy and the converted copy of every tensor at once.

    Every shape is checked against the architecture the shapes give before any tensor is converted; a
    ``StateDictError`` names ``source``, the file or folder the dict was read from.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"a state dict is a mapping of keys to tensors, not a {type(state_dict).__name__}")
    weights = state_dict if consume else dict(state_dict)
    for key in ARCHIVE_SCALAR_KEYS:
        weights.pop(key, None)
    model = _empty_model(checked_dims(weights, source), half=half)
    targets = model.state_dict()
    _check_keys(targets, weights, source)

    converted = {}
    for key, target in targets.items():
        tensor = weights.pop(key)
        dtype = target.dtype if (half or not target.dtype.is_floating_point) else torch.float32
        to = device or ("meta" if tensor.is_meta else "cpu")
        # copy=True: the result owns its memory even when the input is a memory-mapped view of a file that may be
        # rewritten later; a float16 -> float32 conversion copies anyway.
        converted[key] = tensor.to(device=to, dtype=dtype, copy=True)
    model.load_state_dict(converted, strict=True, assign=True)
    return model.eval()


def build_model(state_dict: dict) -> CLIP:
    """Build a CLIP model from a release or compatible state dict, in the release dtypes and eval mode.

    The architecture is inferred from the tensor shapes, so the nine release models and any consistent smaller or
    larger variant work. The caller's dict is not modified. The model is built without a random initialisation:
    its parameters are copies of the given tensors, on the CPU as the original's are, wherever the tensors are (a
    dict of ``meta`` tensors gives a ``meta`` model, which checks an architecture without memory).

    Parameters
    ----------
    state_dict : dict
        A mapping of CLIP state-dict keys to tensors. The three integer scalars of release archives
        (``input_resolution``, ``context_length``, ``vocab_size``) are ignored.

    Returns
    -------
    CLIP
        The model in eval mode, with the weights of convolutions, linear layers and projections in float16 and
        the rest in float32, as the release checkpoints store them.

    Raises
    ------
    StateDictError
        When the dict is not a CLIP state dict; the message lists the missing and unexpected keys and the wrong
        shapes. It is a ``KeyError`` and a ``RuntimeError``, so the ``except`` clauses written for the original's
        errors catch it.
    TypeError
        When ``state_dict`` is not a mapping.
    """
    return model_from_state_dict(state_dict, half=True)
