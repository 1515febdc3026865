"""Int8 layers for deployment, and their fake-quant twins for calibration, the per-layer
sensitivity report and quantization-aware training.

- `Int8Dense` replaces a dense layer (`nnx.Linear`, EfficientNet's `Pointwise` 1x1 conv and
  `PatchConv` stem): int8 kernel with one f32 scale per output channel. `w8a8` quantizes its
  input too (per row at run time, or one calibrated scale per tensor) and runs an
  int8 x int8 -> int32 dot; `w8` dequantizes the kernel to f32 first (weight-only: 4x smaller,
  not faster on CPU). Weights that are looked up or multiplied elementwise, not in a dot
  (embedding tables, EfficientNet's depthwise kernels), are stored int8 and dequantized on
  use: `Int8Embed`, `Int8Depthwise` (one scale per row / channel).
- `FakeQuantDense` wraps a dense layer and keeps its `kernel` / `bias` Params under the same
  names (so checkpoints, param groups and the train step see the same paths); its forward
  pass quantizes and dequantizes weights and activations like `Int8Dense` (straight-through
  gradient), switched on and off by a `Switch` variable so one compiled program serves every
  layer of the sensitivity report.

Scales are symmetric absmax ones (int8 in [-127, 127]); arrays are qwix `QArray`s and the
dot is `qwix.dot_general`: for two QArrays an s8 x s8 -> s32 dot followed by the scale
products. qwix's model-level providers are not used: they intercept
`jax.lax.dot_general` by patching it during the call and missed the 1x1 convs written as
`x @ w` here, so EfficientNet-Lite came out with only its head quantized.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import qwix
from flax import nnx

from ftlab.models.efficientnet import Depthwise, PatchConv, Pointwise, _windows

MODES = ("w8a8", "w8", "fp32")  # fp32: excluded, left as it is
ACTIVATIONS = ("dynamic", "static")
DENSE = (nnx.Linear, Pointwise, PatchConv)
QMAX = 127.0


class Int8Weight(nnx.Variable):
    """An int8 weight tensor of a deployed model (never trained)."""


class QuantScale(nnx.Variable):
    """f32 scales of int8 weights, or a calibrated static activation scale."""


class ActStat(nnx.Variable):
    """max |input| seen in the last calibration batch (see `ftlab.quantize.calibrate`)."""


class Switch(nnx.Variable):
    """1.0: a fake-quant layer quantizes; 0.0: it computes in float (sensitivity report)."""


def quantize(x: jax.Array, scale: jax.Array) -> qwix.QArray:
    """Symmetric int8 in [-127, 127] with `scale` broadcast over `x`. (qwix's own
    `quantize` rounds against 127.5, so quantizing a dequantized array moves it; this one
    leaves it in place, which keeps fake-quant and int8 models in step.)"""
    scale = jnp.maximum(scale, 1e-12).astype(x.dtype)
    q = jnp.clip(jnp.round(x / scale), -QMAX, QMAX).astype(jnp.int8)
    return qwix.QArray(q, scale.reshape((1,) * (x.ndim - scale.ndim) + scale.shape))


def quantize_weight(w: jax.Array, axis: int) -> qwix.QArray:
    """One absmax scale per index along `axis` (output channel / table row)."""
    axis = axis % w.ndim
    reduce = tuple(a for a in range(w.ndim) if a != axis)
    return quantize(w, jnp.abs(w).max(axis=reduce, keepdims=True) / QMAX)


def quantize_input(x: jax.Array, static_scale: jax.Array | None) -> qwix.QArray:
    """Int8 activations: one scale per row (all axes but the last) computed at run time, or
    the calibrated per-tensor `static_scale`."""
    if static_scale is None:
        return quantize(x, jnp.abs(x).max(axis=-1, keepdims=True) / QMAX)
    return quantize(x, static_scale)


def fake_quant(x: jax.Array, q: qwix.QArray) -> jax.Array:
    """`dequantize(q)` forward (exactly), identity gradient to `x` (straight-through)."""
    return jax.lax.stop_gradient(qwix.dequantize(q)) + (x - jax.lax.stop_gradient(x))


def weight_only(module: nnx.Module) -> str | None:
    """The weight attribute of a module whose int8 form is weight-only (tables, depthwise
    kernels: no dot to run in int8), else None."""
    if isinstance(module, nnx.Embed):
        return "embedding"
    return "kernel" if isinstance(module, Depthwise) else None


def round_trip(module: nnx.Module) -> jax.Array:
    """A weight-only module's weight as its int8 twin holds it: quantized, dequantized."""
    name = weight_only(module)
    w = getattr(module, name)[...]
    return qwix.dequantize(quantize_weight(w, 0 if name == "embedding" else -1))


def _patches(x, patch):
    return x if patch is None else jnp.concatenate(_windows(x, *patch), axis=-1)


def _dense_parts(base: nnx.Module):
    """(kernel as (in, out), bias Param or None, patch (k, stride) or None) of a dense layer."""
    kernel = base.kernel[...]
    patch = (kernel.shape[0], base.stride) if isinstance(base, PatchConv) else None
    return kernel.reshape(-1, kernel.shape[-1]), getattr(base, "bias", None), patch


class Int8Dense(nnx.Module):
    """A deployed dense layer: `qvalue` int8 (in, out), `scale` f32 (1, out), `bias` f32."""

    def __init__(self, kernel: jax.Array, bias, mode: str, act_scale=None,
                 patch: tuple[int, int] | None = None):
        q = quantize_weight(kernel, -1)
        self.qvalue, self.scale = Int8Weight(q.qvalue), QuantScale(q.scale)
        self.bias = None if bias is None else nnx.Param(jnp.asarray(bias[...]))
        self.act_scale = None if act_scale is None else \
            QuantScale(jnp.asarray(act_scale, jnp.float32).reshape(()))
        self.mode, self.patch = mode, patch

    def weight(self) -> qwix.QArray:
        return qwix.QArray(self.qvalue[...], self.scale[...])

    def __call__(self, x):
        x = _patches(x, self.patch)
        if self.mode == "w8a8":
            static = None if self.act_scale is None else self.act_scale[...]
            y = qwix.dot_general(quantize_input(x, static), self.weight(),
                                 (((x.ndim - 1,), (0,)), ((), ())))
        else:  # weight-only: XLA dequantizes the kernel and runs an f32 dot
            y = x @ qwix.dequantize(self.weight())
        return y if self.bias is None else y + self.bias[...]


class Int8Embed(nnx.Module):
    """A deployed embedding table: `qvalue` int8 (rows, features), `scale` f32 (rows, 1).
    `embedding` gives the dequantized table (models may read it directly)."""

    def __init__(self, table: jax.Array):
        q = quantize_weight(table, 0)
        self.qvalue, self.scale = Int8Weight(q.qvalue), QuantScale(q.scale)

    @property
    def embedding(self) -> jax.Array:
        return qwix.dequantize(qwix.QArray(self.qvalue[...], self.scale[...]))

    def __call__(self, ids):
        return self.qvalue[...][ids].astype(jnp.float32) * self.scale[...][ids]


class Int8Depthwise(Depthwise):
    """A deployed depthwise conv: `qvalue` int8 (k, k, channels), `scale` f32 (1, 1,
    channels); `kernel` is the dequantized kernel, so `Depthwise`'s forward runs as is."""

    def __init__(self, kernel: jax.Array, stride: int):
        q = quantize_weight(kernel, -1)
        self.qvalue, self.scale = Int8Weight(q.qvalue), QuantScale(q.scale)
        self.stride = stride

    @property
    def kernel(self) -> jax.Array:
        return qwix.dequantize(qwix.QArray(self.qvalue[...], self.scale[...]))


class FakeQuantDense(nnx.Module):
    """A dense layer computing in float what `Int8Dense` computes in int8, with the base
    layer's own `kernel` / `bias` Params (same paths, trainable: QAT)."""

    def __init__(self, base: nnx.Module, mode: str, static: bool):
        self.kernel = base.kernel
        self.bias = getattr(base, "bias", None)
        self.patch = (base.kernel.shape[0], base.stride) if isinstance(base, PatchConv) \
            else None
        self.mode = mode
        self.act_scale = QuantScale(jnp.float32(1.0)) if static and mode == "w8a8" else None
        self.act_stat = ActStat(jnp.float32(0.0))
        self.on = Switch(jnp.float32(1.0))
        self.observing = False  # calibration: record max |x|, compute in float

    def __call__(self, x):
        x = _patches(x, self.patch)
        w = self.kernel[...]
        w = w.reshape(-1, w.shape[-1])
        if self.observing:
            self.act_stat[...] = jnp.abs(x).max()
            y = x @ w
        else:
            on = self.on[...] > 0
            wq = jnp.where(on, fake_quant(w, quantize_weight(w, -1)), w)
            if self.mode == "w8a8":
                static = None if self.act_scale is None else self.act_scale[...]
                x = jnp.where(on, fake_quant(x, quantize_input(x, static)), x)
            y = x @ wq
        return y if self.bias is None else y + self.bias[...]

    def to_int8(self) -> Int8Dense:
        scale = None if self.act_scale is None else self.act_scale[...]
        w = self.kernel[...]
        return Int8Dense(w.reshape(-1, w.shape[-1]), self.bias, self.mode, scale, self.patch)


def to_int8(module: nnx.Module, mode: str, act_scale: float | None = None) -> nnx.Module:
    """The deployed int8 twin of a dense / fake-quant / embedding / depthwise module."""
    if isinstance(module, FakeQuantDense):
        return module.to_int8()
    if isinstance(module, nnx.Embed):
        return Int8Embed(module.embedding[...])
    if isinstance(module, Depthwise):
        return Int8Depthwise(module.kernel[...], module.stride)
    kernel, bias, patch = _dense_parts(module)
    return Int8Dense(kernel, bias, mode, act_scale if mode == "w8a8" else None, patch)
