"""ResNet v1.5 (He et al. 2016, with the stride of a bottleneck in its 3x3 conv, as
torchvision, timm and HF `ResNetModel` have it) in Flax nnx: BatchNorm eps 1e-5, torch
padding (k // 2 on every side).

Speed on the 2-core CPU (batch 16, jit; measured for this file on a shared machine, so
rough): 1x1 convs are matmuls (`efficientnet.Pointwise`: about 2x faster than `lax.conv`
forward and backward, and LoRA / int8 see them as dense layers). Dense 3x3 convs and the 7x7
stem stay `lax.conv`: unlike depthwise convs, XLA's dense conv with 64+ channels was as fast
per layer as im2col or nine shifted matmuls, and on the whole of ResNet-18 at 128 px im2col
halved inference (21.9 vs 46.7 img/s) with the same training speed (6.3 vs 6.2 img/s). Max
pooling is the max of nine strided views (backward 4.5x faster than `reduce_window`'s
select-and-scatter).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from ftlab.models.efficientnet import Pointwise, normalize
from ftlab.models.batchnorm import batch_norm
from ftlab.models.heads import ClassifierHead


@dataclasses.dataclass(frozen=True)
class ResNetSize:
    depths: tuple[int, ...]  # blocks per stage
    widths: tuple[int, ...]  # output channels of each stage's blocks (HF hidden_sizes)
    bottleneck: bool  # 1x1 -> 3x3 -> 1x1 (width / 4 inside), else two 3x3 convs
    stem: int = 64
    stride_in_1x1: bool = False  # HF downsample_in_bottleneck (v1 rather than v1.5)
    first_stride: int = 1  # HF downsample_in_first_stage -> 2
    bn_eps: float = 1e-5


_BASIC, _WIDE = (64, 128, 256, 512), (256, 512, 1024, 2048)
VARIANTS = {
    "resnet18": ResNetSize((2, 2, 2, 2), _BASIC, bottleneck=False),
    "resnet34": ResNetSize((3, 4, 6, 3), _BASIC, bottleneck=False),
    "resnet50": ResNetSize((3, 4, 6, 3), _WIDE, bottleneck=True),
    "resnet101": ResNetSize((3, 4, 23, 3), _WIDE, bottleneck=True),
    "tiny": ResNetSize((1, 2), (16, 32), bottleneck=True, stem=8),
    "tiny-basic": ResNetSize((1, 2), (8, 16), bottleneck=False, stem=8),
}


def from_hf(config: dict) -> ResNetSize:
    """Sizes from an HF `ResNetModel` config.json, or a timm one (`architecture`)."""
    if "architecture" in config:  # timm hub config: the name is the variant
        name = config["architecture"]
        if name not in VARIANTS:
            raise ValueError(f"timm architecture '{name}' is not one of: {', '.join(VARIANTS)}")
        return VARIANTS[name]
    if config.get("model_type") != "resnet":
        raise ValueError(f"config.json has model_type '{config.get('model_type')}', "
                         "not 'resnet'")
    if config.get("hidden_act", "relu") != "relu":
        raise ValueError(f"hidden_act '{config['hidden_act']}' is not supported (relu only)")
    return ResNetSize(tuple(config["depths"]), tuple(config["hidden_sizes"]),
                      bottleneck=config.get("layer_type", "bottleneck") == "bottleneck",
                      stem=config.get("embedding_size", 64),
                      stride_in_1x1=bool(config.get("downsample_in_bottleneck", False)),
                      first_stride=2 if config.get("downsample_in_first_stage") else 1)


_INIT = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


class Conv(nnx.Module):
    """Dense k x k conv, no bias, torch padding k // 2, through `lax.conv` (see module doc)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, rngs: nnx.Rngs):
        self.kernel = nnx.Param(_INIT(rngs.params(), (k, k, cin, cout)))
        self.stride = stride
        self.compute_dtype = "float32"  # see ftlab.models.precision

    def __call__(self, x):
        w = self.kernel[...]
        p = w.shape[0] // 2
        kw = {}
        if self.compute_dtype != "float32":
            x, w, kw = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), {
                "preferred_element_type": jnp.float32}
        return jax.lax.conv_general_dilated(x, w, (self.stride,) * 2, [(p, p), (p, p)],
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"), **kw)


def max_pool(x, k: int = 3, s: int = 2):
    """torch MaxPool2d(k, s, padding k // 2) as the max of k*k strided views."""
    p = k // 2
    xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)), constant_values=-jnp.inf)
    ho, wo = (x.shape[1] + 2 * p - k) // s + 1, (x.shape[2] + 2 * p - k) // s + 1
    out = None
    for i in range(k):
        for j in range(k):
            v = xp[:, i:i + (ho - 1) * s + 1:s, j:j + (wo - 1) * s + 1:s]
            out = v if out is None else jnp.maximum(out, v)
    return out


def _bn(size: ResNetSize, n: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
    return batch_norm(n, epsilon=size.bn_eps, momentum=0.9, use_running_average=True,
                      rngs=rngs)


def _sub(x, stride: int):
    """A strided 1x1 conv's input: every `stride`-th pixel (torch's padding 0)."""
    return x if stride == 1 else x[:, ::stride, ::stride]


class Shortcut(nnx.Module):
    """Projection of the residual when a block changes width or resolution."""

    def __init__(self, size: ResNetSize, cin: int, cout: int, stride: int, rngs: nnx.Rngs):
        self.conv, self.bn, self.stride = Pointwise(cin, cout, rngs), _bn(size, cout, rngs), stride

    def __call__(self, x):
        return self.bn(self.conv(_sub(x, self.stride)))


class Block(nnx.Module):
    """Basic (3x3, 3x3) or bottleneck (1x1, 3x3, 1x1) residual block; ReLU after the add."""

    def __init__(self, size: ResNetSize, cin: int, cout: int, stride: int, rngs: nnx.Rngs):
        self.stride = stride
        if size.bottleneck:
            mid = cout // 4
            self.s1 = stride if size.stride_in_1x1 else 1
            self.conv1, self.bn1 = Pointwise(cin, mid, rngs), _bn(size, mid, rngs)
            self.conv2 = Conv(mid, mid, 3, 1 if size.stride_in_1x1 else stride, rngs)
            self.bn2 = _bn(size, mid, rngs)
            self.conv3, self.bn3 = Pointwise(mid, cout, rngs), _bn(size, cout, rngs)
        else:
            self.s1 = 1
            self.conv1, self.bn1 = Conv(cin, cout, 3, stride, rngs), _bn(size, cout, rngs)
            self.conv2, self.bn2 = Conv(cout, cout, 3, 1, rngs), _bn(size, cout, rngs)
            self.conv3 = self.bn3 = None
        self.shortcut = Shortcut(size, cin, cout, stride, rngs) \
            if stride != 1 or cin != cout else None

    def __call__(self, x):
        h = jax.nn.relu(self.bn1(self.conv1(_sub(x, self.s1))))
        h = self.bn2(self.conv2(h))
        if self.conv3 is not None:
            h = self.bn3(self.conv3(jax.nn.relu(h)))
        return jax.nn.relu(h + (x if self.shortcut is None else self.shortcut(x)))


class Stem(nnx.Module):
    """7x7 stride-2 conv, BN, ReLU, 3x3 stride-2 max pool."""

    def __init__(self, size: ResNetSize, rngs: nnx.Rngs):
        self.conv, self.bn = Conv(3, size.stem, 7, 2, rngs), _bn(size, size.stem, rngs)

    def __call__(self, x):
        return max_pool(jax.nn.relu(self.bn(self.conv(x))))


class ResNet(nnx.Module):
    """Stages (stem, each block, head; the last block ends with global average pooling).
    `batch["image"]` is NHWC 0-255, normalised here by the model's mean / std (0-255 scale,
    one value or one per channel). Blocks live at `stages/<stage>/<block>/`.
    """

    def __init__(self, size: ResNetSize, num_classes: int, *, mean=127.5, std=127.5,
                 head_hidden=(), head_activation: str = "relu", head_dropout: float = 0.0,
                 rngs: nnx.Rngs):
        self.mean, self.std = mean, std
        self.stem = Stem(size, rngs)
        stages, cin = [], size.stem
        for i, (depth, width) in enumerate(zip(size.depths, size.widths)):
            stride = size.first_stride if i == 0 else 2
            stages.append(nnx.List([Block(size, cin if j == 0 else width, width,
                                          stride if j == 0 else 1, rngs)
                                    for j in range(depth)]))
            cin = width
        self.stages = nnx.List(stages)
        self.head = ClassifierHead(cin, num_classes, hidden=head_hidden,
                                   activation=head_activation, dropout=head_dropout, rngs=rngs)

    def _blocks(self) -> list[tuple[str, Block]]:
        return [(f"stages/{i}/{j}/", b) for i, st in enumerate(self.stages)
                for j, b in enumerate(st)]

    def stage_prefixes(self) -> list[str]:
        return ["stem/", *[p for p, _ in self._blocks()], "head/"]

    def forward(self, batch, start: int = 0, stop: int | None = None, *, rngs=None):
        """Run stages [start, stop); stage s > 0 reads `batch["hidden"]`."""
        blocks = [b for _, b in self._blocks()]
        n = len(blocks)
        stop = n + 2 if stop is None else stop
        x = batch["hidden"] if start else normalize(batch["image"], self.mean, self.std)
        for s in range(start, stop):
            if s == 0:
                x = self.stem(x)
            elif s <= n:
                x = blocks[s - 1](x)
                if s == n:
                    x = x.mean(axis=(1, 2))
            else:
                x = self.head(x, rngs=rngs)
        return x

    def __call__(self, batch, *, rngs=None):
        return self.forward(batch, rngs=rngs)

