"""Dropout whose mask costs a few integer ops per element, not a threefry draw.

`nnx.Dropout` draws a 32-bit threefry word per element: ~20 rounds of 32-bit arithmetic per
pair of words. On a MiniLM train step on this CPU (batch 32, seq 128) that generator took
~600 ms of the step's CPU time, and drawing half as many words (two 16-bit draws each) still
left dropout at ~10% of a bf16 step's wall time: XLA runs it on the same two cores as the
dots. Here the step's key gives two 32-bit words (one small threefry draw per call), and each
element's 16-bit draw is a keyed hash of its index: two rounds of murmur3's 32-bit
finalizer (a bijection with full avalanche), keyed by xor with those words, one 32-bit hash
per two elements. It fuses into the elementwise op that applies the mask. The drop rate is
exact to 2**-16 (the draw compared as an integer); masks under different keys are
independent to the precision tests can measure (tests/test_precision.py). Same class
otherwise (a subclass of nnx.Dropout), so mode switching by isinstance still applies.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


def _fmix32(h):
    """murmur3's 32-bit finalizer."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def keep_mask(key, shape: tuple[int, ...], rate: float):
    """Boolean mask of `shape` (last axis even, fewer than 2**33 elements), each element
    kept with probability 1 - rate (to 2**-16), from `key`."""
    k = jax.random.bits(key, (2,), jnp.uint32)
    half = (*shape[:-1], shape[-1] // 2)
    index = jax.lax.iota(jnp.uint32, math.prod(half)).reshape(half)
    bits = _fmix32(_fmix32(index ^ k[0]) ^ k[1])
    draws = jax.lax.bitcast_convert_type(bits, jnp.uint16).reshape(shape)
    return draws >= round(rate * 65536)


class Dropout(nnx.Dropout):
    def __call__(self, inputs, *, deterministic: bool | None = None, rngs=None):
        off = self.deterministic if deterministic is None else deterministic
        rngs = self.rngs if rngs is None else rngs
        if off or self.rate == 0.0 or self.rate == 1.0 or rngs is None or \
                self.broadcast_dims or inputs.shape[-1] % 2 or inputs.size >= 2 ** 33:
            return super().__call__(inputs, deterministic=deterministic, rngs=rngs)
        if isinstance(rngs, nnx.Rngs):
            key = rngs[self.rng_collection]()
        elif isinstance(rngs, nnx.RngStream):
            key = rngs()
        else:
            key = rngs
        keep = keep_mask(key, inputs.shape, self.rate)
        return jnp.where(keep, inputs / (1.0 - self.rate), jnp.zeros_like(inputs))
