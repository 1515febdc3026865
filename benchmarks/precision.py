"""bf16 compute (model.compute_dtype=bfloat16: bf16 matmul operands, f32 accumulation and
params) against fp32, through ftlab's own train step, with model FLOP utilisation.

MFU = model FLOPs per step (XLA's cost analysis of the compiled step) / step time / this
machine's peak matmul FLOP/s, measured here on a large square matmul in the same dtype.

Run: python benchmarks/precision.py [--batch 32 --seq 128 --size 128 --repeats 4]
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from common import LAST2, emit, ftlab_step, image_batch, lite0, minilm, time_steps, token_batch
from ftlab.models.loading import param_paths
from ftlab.models.precision import set_compute_dtype



def peak_flops(dtype: str, n: int = 4096, repeats: int = 3) -> float:
    """FLOP/s of an n x n x n matmul (bf16: bf16 operands, f32 accumulation)."""
    x = jnp.asarray(np.random.default_rng(0).random((n, n)), jnp.float32)
    if dtype == "bfloat16":
        x = x.astype(jnp.bfloat16)
        f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    else:
        f = jax.jit(lambda a, b: a @ b)
    f(x, x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(x, x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def step_flops(step_fn, carry, rest, batch) -> float:
    key = jax.random.key(0)
    cost = step_fn.lower(*carry, rest, batch, key).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--models", default="minilm,lite0")
    args = ap.parse_args()
    device = jax.devices()[0]
    emit("precision/device", 0, device.platform, None, kind=device.device_kind)
    peaks = {d: peak_flops(d) for d in ("float32", "bfloat16")}
    for d, p in peaks.items():
        emit(f"precision/peak_matmul_{d}", p / 1e9, "GFLOP/s")
    cases = []
    if "minilm" in args.models:
        tb = token_batch(args.batch, args.seq)
        cases += [("minilm_full", minilm, None, tb), ("minilm_last2", minilm, LAST2, tb)]
    if "lite0" in args.models:
        cases += [("lite0_full", lite0, None, image_batch(args.batch, args.size))]
    for name, build, rule, batch in cases:
        times = {}
        for dtype in ("float32", "bfloat16"):
            model = build()
            set_compute_dtype(model, dtype)
            paths = {p for p in param_paths(model) if rule is None or rule.fullmatch(p)}
            step, carry, rest = ftlab_step(model, paths)
            flops = step_flops(step, carry, rest, batch)
            times[dtype] = t = time_steps(step, carry, rest, batch, repeats=args.repeats)
            emit(f"precision/{name}/{dtype}", args.batch / t, "ex/s", None,
                 seconds_per_step=round(t, 4), gflops_per_step=round(flops / 1e9, 2),
                 mfu=round(flops / t / peaks[dtype], 4))
        emit(f"precision/{name}/speedup", times["float32"] / times["bfloat16"],
             "x fp32 throughput", f"precision/{name}/float32")


if __name__ == "__main__":
    from common import run
    run(main)
