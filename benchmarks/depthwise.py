"""EfficientNet-Lite0's depthwise convs: the hand-written gradient vs autodiff of the same
forward (shifted views), same run.

Per depthwise layer shape of Lite0 at the given resolution (forward + backward of one layer),
then ftlab's whole train step: full fine-tuning from pixels, and the late stages (blocks
11-15, top, head) on cached block-10 features as the `lite_progressive` schedule trains them.
Each figure is autodiff's time / the hand-written one's (> 1: faster).

Run: python benchmarks/depthwise.py [--batch 32 --size 128]
"""
from __future__ import annotations

import argparse
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from common import emit, ftlab_step, image_batch, lite0, time_steps
from ftlab.models import efficientnet as E
from ftlab.models.loading import param_paths
from ftlab.step import first_trainable_stage

HAND = E.depthwise_conv


def autodiff(x, kernel, stride: int):
    """The same forward through strided slices, differentiated by JAX."""
    k = kernel.shape[0]
    h, w = x.shape[1:3]
    xp = jnp.pad(x, ((0, 0), E.same_pad(h, k, stride), E.same_pad(w, k, stride), (0, 0)))
    ho, wo = -(-h // stride), -(-w // stride)
    views = [xp[:, i:i + (ho - 1) * stride + 1:stride, j:j + (wo - 1) * stride + 1:stride]
             for i in range(k) for j in range(k)]
    return E._shifted_sum(views, kernel.reshape(k * k, -1))


def layer_shapes(size: int) -> list[tuple[int, int, int, int]]:
    """(input side, channels, kernel, stride) of each distinct Lite0 depthwise layer."""
    out, side, cin = [], -(-size // 2), 32
    for st in E.B0_STAGES:
        for r in range(st.repeats):
            s = st.stride if r == 0 else 1
            shape = (side, cin * st.expand, st.kernel, s)
            if shape not in out:
                out.append(shape)
            side, cin = -(-side // s), st.channels
    return out


def time_fn(fn, *args, repeats: int = 5) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def step_time(impl, model, paths, batch) -> float:
    E.depthwise_conv = impl
    try:
        start = first_trainable_stage(model, paths) if "hidden" in batch else 0
        return time_steps(*ftlab_step(model, paths, start), batch)
    finally:
        E.depthwise_conv = HAND


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=128)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    for side, c, k, s in layer_shapes(args.size):
        x = jnp.asarray(rng.normal(size=(args.batch, side, side, c)), jnp.float32)
        kernel = jnp.asarray(rng.normal(size=(k, k, c)), jnp.float32)
        g = jnp.ones((args.batch, -(-side // s), -(-side // s), c), jnp.float32)
        t = {}
        for name, impl in (("autodiff", autodiff), ("hand", HAND)):
            fn = jax.jit(lambda x, kn, impl=impl: jax.vjp(lambda a, b: impl(a, b, s), x, kn)[1](g))
            t[name] = time_fn(fn, x, kernel)
        emit(f"depthwise/layer/{side}px_{c}ch_k{k}_s{s}", t["autodiff"] / t["hand"], "x",
             "autodiff", autodiff_ms=round(1e3 * t["autodiff"], 2),
             hand_ms=round(1e3 * t["hand"], 2))
    model = lite0()
    paths = set(param_paths(model))
    late = {p for p in paths if re.fullmatch(r"(head|top|blocks/1[1-5])/.*", p)}
    side = -(-args.size // 16)  # block 10's output: stride 16
    cases = {"full_step": (paths, image_batch(args.batch, args.size)),
             "late_step": (late, {"hidden": rng.normal(size=(args.batch, side, side, 112))
                                  .astype(np.float32), **{k: v for k, v in image_batch(
                                      args.batch, 8).items() if k != "image"}})}
    for name, (trainable, batch) in cases.items():
        ref = step_time(autodiff, model, trainable, batch)
        hand = step_time(HAND, model, trainable, batch)
        emit(f"depthwise/{name}", ref / hand, "x", "autodiff", autodiff_s=round(ref, 4),
             hand_s=round(hand, 4), batch=args.batch, size=args.size)


if __name__ == "__main__":
    from common import run
    run(main)
