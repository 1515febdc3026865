"""EfficientNet-Lite (Tan & Le; the TF-Lite variants: no squeeze-excite, ReLU6, fixed stem
and head) in Flax nnx, with TF "SAME" padding and BatchNorm eps 1e-3 like the original.

XLA's CPU convolutions are slow, so this writes 1x1 convs as matmuls, depthwise convs as
shifted multiply-adds and the stem conv as patches @ kernel; on GPU the same code runs
through cuBLAS matmuls and fused elementwise kernels.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from ftlab.models.batchnorm import batch_norm
from ftlab.models.heads import ClassifierHead
from ftlab.models.precision import matmul


@dataclasses.dataclass(frozen=True)
class Stage:
    kernel: int
    stride: int
    expand: int
    channels: int
    repeats: int


B0_STAGES = (Stage(3, 1, 1, 16, 1), Stage(3, 2, 6, 24, 2), Stage(5, 2, 6, 40, 2),
             Stage(3, 2, 6, 80, 3), Stage(5, 1, 6, 112, 3), Stage(5, 2, 6, 192, 4),
             Stage(3, 1, 6, 320, 1))


@dataclasses.dataclass(frozen=True)
class LiteSize:
    stages: tuple[Stage, ...] = B0_STAGES
    stem: int = 32
    top: int = 1280
    bn_eps: float = 1e-3
    bn_momentum: float = 0.99  # flax convention: 1 - torch's 0.01


def round_filters(channels: int, width: float, divisor: int = 8) -> int:
    """EfficientNet's channel scaling: nearest multiple of 8, never 10% below the target."""
    target = channels * width
    out = max(divisor, int(target + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * target else out


def scaled(width: float, depth: float) -> LiteSize:
    """A Lite variant: stem and top fixed, first and last stage repeats fixed (TF-Lite rule)."""
    last = len(B0_STAGES) - 1
    return LiteSize(stages=tuple(
        dataclasses.replace(st, channels=round_filters(st.channels, width),
                            repeats=st.repeats if i in (0, last) else math.ceil(st.repeats * depth))
        for i, st in enumerate(B0_STAGES)))


VARIANTS = {
    "lite0": LiteSize(),
    "lite1": scaled(1.0, 1.1),
    "lite2": scaled(1.1, 1.2),
    "tiny": LiteSize(stages=(Stage(3, 1, 1, 8, 1), Stage(3, 2, 4, 16, 2), Stage(5, 2, 4, 24, 1)),
                     stem=8, top=32),
}


def same_pad(size: int, k: int, s: int) -> tuple[int, int]:
    """TF 'SAME' padding: output ceil(size / s), extra pixel at the end."""
    total = max((-(-size // s) - 1) * s + k - size, 0)
    return total // 2, total - total // 2


def _windows(x, k: int, s: int):
    """The k*k strided shifted views of x (NHWC) under SAME padding, row-major in (i, j)."""
    h, w = x.shape[1:3]
    xp = jnp.pad(x, ((0, 0), same_pad(h, k, s), same_pad(w, k, s), (0, 0)))
    ho, wo = -(-h // s), -(-w // s)
    return [xp[:, i:i + (ho - 1) * s + 1:s, j:j + (wo - 1) * s + 1:s, :]
            for i in range(k) for j in range(k)]


class PatchConv(nnx.Module):
    """A dense k x k conv as im2col @ kernel: for few input channels (the stem)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, rngs: nnx.Rngs):
        init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
        self.kernel = nnx.Param(init(rngs.params(), (k, k, cin, cout)))
        self.stride = stride
        self.compute_dtype = "float32"  # see ftlab.models.precision

    def __call__(self, x):
        k, _, cin, cout = self.kernel.shape
        patches = jnp.concatenate(_windows(x, k, self.stride), axis=-1)
        return matmul(patches, self.kernel[...].reshape(k * k * cin, cout), self.compute_dtype)


class Pointwise(nnx.Module):
    """1x1 conv as a matmul over the channel axis."""

    def __init__(self, cin: int, cout: int, rngs: nnx.Rngs):
        init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
        self.kernel = nnx.Param(init(rngs.params(), (cin, cout)))
        self.compute_dtype = "float32"  # see ftlab.models.precision

    def __call__(self, x):
        return matmul(x, self.kernel[...], self.compute_dtype)


class Depthwise(nnx.Module):
    """Depthwise k x k conv as a sum of k*k shifted, per-channel-scaled views."""

    def __init__(self, channels: int, k: int, stride: int, rngs: nnx.Rngs):
        init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
        self.kernel = nnx.Param(init(rngs.params(), (k, k, channels)))
        self.stride = stride

    def __call__(self, x):
        k = self.kernel.shape[0]
        w = self.kernel[...].reshape(k * k, -1)
        views = _windows(x, k, self.stride)
        out = views[0] * w[0]
        for i in range(1, len(views)):
            out = out + views[i] * w[i]
        return out


def _bn(size: LiteSize, n: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
    return batch_norm(n, epsilon=size.bn_eps, momentum=size.bn_momentum,
                      use_running_average=True, rngs=rngs)


class Block(nnx.Module):
    """Inverted residual: [expand 1x1] -> depthwise -> project 1x1, skip when shapes match."""

    def __init__(self, size: LiteSize, cin: int, st: Stage, stride: int, rngs: nnx.Rngs):
        mid = cin * st.expand
        if st.expand != 1:
            self.expand, self.bn0 = Pointwise(cin, mid, rngs), _bn(size, mid, rngs)
        else:
            self.expand = self.bn0 = None
        self.depthwise = Depthwise(mid, st.kernel, stride, rngs)
        self.bn1 = _bn(size, mid, rngs)
        self.project, self.bn2 = Pointwise(mid, st.channels, rngs), _bn(size, st.channels, rngs)
        self.residual = stride == 1 and cin == st.channels

    def __call__(self, x):
        h = x if self.expand is None else jax.nn.relu6(self.bn0(self.expand(x)))
        h = self.bn2(self.project(jax.nn.relu6(self.bn1(self.depthwise(h)))))
        return x + h if self.residual else h


class Stem(nnx.Module):
    def __init__(self, size: LiteSize, rngs: nnx.Rngs):
        self.conv, self.bn = PatchConv(3, size.stem, 3, 2, rngs), _bn(size, size.stem, rngs)

    def __call__(self, x):
        return jax.nn.relu6(self.bn(self.conv(x)))


class Top(nnx.Module):
    """The last 1x1 conv to `size.top` channels, BN, ReLU6, global average pool."""

    def __init__(self, size: LiteSize, cin: int, rngs: nnx.Rngs):
        self.conv, self.bn = Pointwise(cin, size.top, rngs), _bn(size, size.top, rngs)

    def __call__(self, x):
        return jax.nn.relu6(self.bn(self.conv(x))).mean(axis=(1, 2))


class EfficientNetLite(nnx.Module):
    """Backbone stages (stem, each block, top + pool) then a new head. `batch["image"]` is
    NHWC in 0-255 (uint8 or float); it is normalised here with the model's own constants.
    """

    def __init__(self, size: LiteSize, num_classes: int, *, mean: float = 127.0,
                 std: float = 128.0, head_hidden=(), head_activation: str = "relu",
                 head_dropout: float = 0.2, rngs: nnx.Rngs):
        self.mean, self.std = mean, std
        self.stem = Stem(size, rngs)
        blocks, cin = [], size.stem
        for st in size.stages:
            for r in range(st.repeats):
                blocks.append(Block(size, cin, st, st.stride if r == 0 else 1, rngs))
                cin = st.channels
        self.blocks = nnx.List(blocks)
        self.top = Top(size, cin, rngs)
        self.head = ClassifierHead(size.top, num_classes, hidden=head_hidden,
                                   activation=head_activation, dropout=head_dropout, rngs=rngs)

    def stage_prefixes(self) -> list[str]:
        return ["stem/", *[f"blocks/{i}/" for i in range(len(self.blocks))], "top/", "head/"]

    def forward(self, batch, start: int = 0, stop: int | None = None, *, rngs=None):
        """Run stages [start, stop); stage s > 0 reads `batch["hidden"]`."""
        n = len(self.blocks)
        stop = n + 3 if stop is None else stop
        x = batch["hidden"] if start else normalize(batch["image"], self.mean, self.std)
        for s in range(start, stop):
            if s == 0:
                x = self.stem(x)
            elif s <= n:
                x = self.blocks[s - 1](x)
            elif s == n + 1:
                x = self.top(x)
            else:
                x = self.head(x, rngs=rngs)
        return x

    def __call__(self, batch, *, rngs=None):
        return self.forward(batch, rngs=rngs)


def normalize(image, mean, std):
    """NHWC 0-255 -> (x - mean) / std in f32; mean / std: a number or one per channel."""
    return (image.astype(jnp.float32) - jnp.asarray(mean, jnp.float32)) / jnp.asarray(
        std, jnp.float32)


def num_params(size: LiteSize) -> int:
    """Backbone parameter count (for docs and sanity checks)."""
    model = nnx.eval_shape(lambda: EfficientNetLite(size, 1, rngs=nnx.Rngs(0)))
    return sum(math.prod(v.shape) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
