"""Mixed precision for matmuls: bf16 inputs, f32 accumulation and output, f32 params.

`model.compute_dtype=bfloat16` routes every dense matmul (nnx.Linear, 1x1 convs, the stem's
patch matmul, LoRA) through `matmul`, whose forward and both backward products take bf16
operands with `preferred_element_type=float32`: the form that runs on AMX tiles on this CPU
(and tensor cores on GPUs). A plain bf16 dot that outputs bf16 does not, and autodiff of a
mixed dot would run its backward in f32, so the VJP is written out. Everything else (layer
norms, softmax, the loss, optimizer, params) stays f32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ftlab.schema import ConfigError

DTYPES = ("float32", "bfloat16")


@jax.custom_vjp
def _mixed(x, w):
    return jnp.dot(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16),
                   preferred_element_type=jnp.float32)


def _mixed_fwd(x, w):
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    # Empty arrays carry the primal dtypes (residuals must be arrays).
    return jnp.dot(xb, wb, preferred_element_type=jnp.float32), (
        xb, wb, jnp.zeros(0, x.dtype), jnp.zeros(0, w.dtype))


def _mixed_bwd(res, g):
    xb, wb, xt, wt = res
    gb = g.astype(jnp.bfloat16)
    dx = jnp.dot(gb, wb.T, preferred_element_type=jnp.float32)
    dw = jax.lax.dot_general(xb.reshape(-1, xb.shape[-1]), gb.reshape(-1, gb.shape[-1]),
                             (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return dx.astype(xt.dtype), dw.astype(wt.dtype)


_mixed.defvjp(_mixed_fwd, _mixed_bwd)


def matmul(x, w, dtype: str = "float32"):
    """x (..., in) @ w (in, out) in the given compute dtype."""
    return x @ w if dtype == "float32" else _mixed(x, w)


def _linear_dot(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                **_):
    """nnx.Linear's `dot_general` (contract lhs's last axis with rhs's first) in bf16."""
    (lc, rc), (lb, rb) = dimension_numbers
    assert tuple(lc) == (lhs.ndim - 1,) and tuple(rc) == (0,) and not lb and not rb
    return _mixed(lhs, rhs)


def validate(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ConfigError("model.compute_dtype", f"'{dtype}' is not one of: "
                                                 f"{', '.join(DTYPES)}")


def set_compute_dtype(model: nnx.Module, dtype: str) -> None:
    """Route the model's dense matmuls through `matmul` in `dtype` (no-op for float32)."""
    validate(dtype)
    if dtype == "float32":
        return
    for _, m in nnx.iter_modules(model):
        if isinstance(m, nnx.Linear):
            m.dot_general = _linear_dot
        elif hasattr(m, "compute_dtype"):
            m.compute_dtype = dtype
