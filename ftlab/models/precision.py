"""Mixed precision for matmuls: bf16 inputs, f32 accumulation and output, f32 params.

`model.compute_dtype=bfloat16` routes every dense matmul (nnx.Linear, 1x1 convs, the stem's
patch matmul, LoRA) through `matmul`, and attention's two batched matmuls through
`batched_matmul`, whose forward and backward products take bf16 operands with
`preferred_element_type=float32`: the form that runs on AVX-512 BF16 dot instructions on
this CPU (AMX tiles on Intel CPUs that have them, tensor cores on GPUs), as torch.autocast's
bf16 does. A plain bf16 dot that outputs bf16 does not, and autodiff of a mixed dot would
run its backward in f32, so the VJPs are written out, each product in a layout XLA:CPU's
bf16 dot kernels take (it runs any other bf16 dot in f32; see `_fresh`). Everything else
(layer norms, softmax, the loss, optimizer, params) stays f32.
"""
from __future__ import annotations

import functools

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


def _fresh(view, shape):
    """`view` (a transposed view of an array) reshaped to `shape` as a new row-major array.

    XLA lays out a transpose as a view of its input where it can, and its CPU backend has no
    bf16 dot kernel for a transposed operand: it converts both operands to f32 and runs the
    f32 dot, at half bf16's speed on this CPU. A weight gradient x^T g or attention's g^T a,
    written as a dot over the operands' leading axis or through a transpose, hits this. A
    reshape to 1-D cannot be a view of a transposed layout, so XLA copies into row-major
    order there; the barrier keeps XLA from folding the reshape back (it would fold the
    two reshapes into a no-op), so the dot gets a row-major operand it runs in bf16.
    (Other ways around the barrier can compile a bf16 dot XLA:CPU then fails to run,
    "Unsupported element type for DotThunk": tests/test_precision.py runs the steps.)"""
    return jax.lax.optimization_barrier(view.reshape(-1)).reshape(shape)


def _mixed_bwd(res, g):
    xb, wb, xt, wt = res
    gb = g.astype(jnp.bfloat16)
    dx = jnp.dot(gb, wb.T, preferred_element_type=jnp.float32)
    dw = jnp.dot(_fresh(jnp.moveaxis(xb, -1, 0), (xb.shape[-1], -1)),
                 gb.reshape(-1, gb.shape[-1]), preferred_element_type=jnp.float32)
    return dx.astype(xt.dtype), dw.astype(wt.dtype)


_mixed.defvjp(_mixed_fwd, _mixed_bwd)


def _bdot(a, b, nt: bool, out=None):
    """a (n, m, k) times b (n, k, p), or with `nt` b (n, p, k) (a @ b^T), as dot_general
    (a transposed view of b would reach XLA as a column-major operand; see `_fresh`)."""
    return jax.lax.dot_general(a, b, (((2,), (2 if nt else 1,)), ((0,), (0,))),
                               preferred_element_type=out)


def _swapped(x):
    """(n, m, p) -> (n, p, m), a new array (see `_fresh`)."""
    return _fresh(jnp.swapaxes(x, 1, 2), (x.shape[0], x.shape[2], x.shape[1]))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _mixed_batched(a, b, nt):
    return _bdot(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), nt, jnp.float32)


def _mixed_batched_fwd(a, b, nt):
    ab, bb = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
    return _bdot(ab, bb, nt, jnp.float32), (ab, bb, jnp.zeros(0, a.dtype),
                                            jnp.zeros(0, b.dtype))


def _mixed_batched_bwd(nt, res, g):
    ab, bb, at, bt = res
    gb = g.astype(jnp.bfloat16)
    if nt:  # out = a b^T: da = g b, db = g^T a
        da, db = _bdot(gb, bb, False, jnp.float32), _bdot(_swapped(gb), ab, False, jnp.float32)
    else:  # out = a b: da = g b^T, db = a^T g
        da, db = _bdot(gb, bb, True, jnp.float32), _bdot(_swapped(ab), gb, False, jnp.float32)
    return da.astype(at.dtype), db.astype(bt.dtype)


_mixed_batched.defvjp(_mixed_batched_fwd, _mixed_batched_bwd)


def batched_matmul(a, b, dtype: str = "float32", *, nt: bool = False):
    """Batched a (n, m, k) @ b (n, k, p), or a @ b^T for b (n, p, k) with `nt` (attention's
    q k^T), in the given compute dtype. Operands fresh from a transpose should be made
    row-major by the caller (a reshape merging the batch axes does; see `_fresh`)."""
    return _bdot(a, b, nt) if dtype == "float32" else _mixed_batched(a, b, nt)


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
