"""EfficientNet-Lite (Tan & Le; the TF-Lite variants: no squeeze-excite, ReLU6, fixed stem
and head) in Flax nnx, with TF "SAME" padding and BatchNorm eps 1e-3 like the original.

XLA's CPU convolutions are slow, so this writes 1x1 convs as matmuls, depthwise convs as
shifted multiply-adds (with a hand-written gradient) and the stem conv as patches @ kernel;
on GPU the same code runs through cuBLAS matmuls and fused elementwise kernels.
"""
from __future__ import annotations

import dataclasses
import math
from functools import partial

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
    """The k*k views of x (NHWC) that a stride-s k x k window reads under SAME padding,
    row-major in (i, j). With s > 1 they are stride-1 slices of the s*s phase images of the
    padded input (rows and columns split by their index mod s), which XLA's CPU loops read
    faster than strided slices."""
    n, h, w, c = x.shape
    (pt, _), (pl, _) = same_pad(h, k, s), same_pad(w, k, s)
    ho, wo = -(-h // s), -(-w // s)
    hn, wn = ho + (k - 1) // s, wo + (k - 1) // s  # rows / columns of each phase image
    xp = jnp.pad(x, ((0, 0), (pt, hn * s - h - pt), (pl, wn * s - w - pl), (0, 0)))
    xr = xp.reshape(n, hn, s, wn, s, c)
    return [xr[:, i // s:i // s + ho, i % s, j // s:j // s + wo, j % s, :]
            for i in range(k) for j in range(k)]


def _shifted_sum(views, weights):
    out = views[0] * weights[0]
    for v, wt in zip(views[1:], weights[1:]):
        out = out + v * wt
    return out


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def depthwise_conv(x, kernel, stride: int):
    """Depthwise k x k conv (kernel (k, k, C)), TF SAME padding, as a sum of k*k shifted,
    per-channel-scaled views.

    Its gradient is written out: autodiff of the shifted views gives a padded copy per view
    and a reduction over batch and space per kernel tap, which took ~40% of a training step
    of the late EfficientNet-Lite0 stages on this CPU. Here the input's gradient is one fused
    sum of shifted views of the output's gradient per output phase, and the kernel's
    gradient one multi-output reduction (kept per example, which XLA splits across threads).
    Measured against autodiff of the same forward in benchmarks/depthwise.py.
    """
    k = kernel.shape[0]
    return _shifted_sum(_windows(x, k, stride), kernel.reshape(k * k, -1))


def _depthwise_fwd(x, kernel, stride):
    return depthwise_conv(x, kernel, stride), (x, kernel)


def _depthwise_bwd(s, res, g):
    x, kernel = res
    k, (n, h, w, c), (_, ho, wo, _) = kernel.shape[0], x.shape, g.shape
    # Input gradient, phase by phase of the padded input: padded row y = s * Y + a gets the
    # output rows Y - t through kernel row a + s * t (and likewise for columns).
    (pt, _), (pl, _) = same_pad(h, k, s), same_pad(w, k, s)
    taps = -(-k // s)
    hn, wn = -(-(pt + h) // s), -(-(pl + w) // s)
    gp = jnp.pad(g, ((0, 0), (taps - 1, hn - ho), (taps - 1, wn - wo), (0, 0)))
    phases = []
    for a in range(s):
        for b in range(s):
            ts = [(t, u) for t in range(-(-(k - a) // s)) for u in range(-(-(k - b) // s))]
            views = [gp[:, taps - 1 - t:taps - 1 - t + hn, taps - 1 - u:taps - 1 - u + wn]
                     for t, u in ts]
            phases.append(_shifted_sum(views, [kernel[a + s * t, b + s * u] for t, u in ts]))
    dxp = jnp.stack(phases, axis=3).reshape(n, hn, wn, s, s, c).transpose(0, 1, 3, 2, 4, 5)
    dx = dxp.reshape(n, hn * s, wn * s, c)[:, pt:pt + h, pl:pl + w]
    # Kernel gradient: every tap's sum over space in one reduction, then over the batch.
    prods = tuple(v * g for v in _windows(x, k, s))
    zeros = tuple(jnp.zeros((), p.dtype) for p in prods)
    per_example = jax.lax.reduce(prods, zeros,
                                 lambda u, v: tuple(p + q for p, q in zip(u, v)), (1, 2))
    dk = jnp.stack(per_example).sum(1).reshape(kernel.shape).astype(kernel.dtype)
    return dx.astype(x.dtype), dk


depthwise_conv.defvjp(_depthwise_fwd, _depthwise_bwd)


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
        return depthwise_conv(x, self.kernel[...], self.stride)


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
