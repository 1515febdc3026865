"""Inference cost for the reports: per-batch latency (one model, or several in turns), parameter
count, disk size."""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import numpy as np
from flax import nnx

from ftlab.step import make_eval_step, set_modes


def tile(example: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """A batch of exactly `rows` rows, cycling through the rows of `example`."""
    n = len(next(iter(example.values())))
    if n == 0:
        raise ValueError("measure: `example` has no rows")
    idx = np.arange(rows) % n
    return {k: np.asarray(v)[idx] for k, v in example.items()}


def _time_calls(eval_fn: Callable, state, batch, iters: int) -> np.ndarray:
    """Wall time (ms) of each of `iters` calls, waiting for the device to finish each."""
    times = np.empty(iters)
    for i in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(eval_fn(state, batch))
        times[i] = time.perf_counter() - t0
    return times * 1e3


def measure(eval_fn: Callable, state, example: dict[str, np.ndarray],
            batch_sizes: Sequence[int] = (1, 32), iters: int = 30, warmup: int = 3) -> dict:
    """Latency of `eval_fn(state, batch)` (jitted, returns logits) at each batch size.

    Inputs are placed on the device before timing, so the numbers are the model's compute
    (plus dispatch), not host-to-device copies; the warmup calls absorb compilation.
    Every key of `example` is passed through. Returns {str(b): {p50_ms, p95_ms, mean_ms,
    throughput (rows/s at the mean)}, "device": "platform/kind"}.
    """
    if iters < 1:
        raise ValueError(f"measure: iters must be >= 1, got {iters}")
    state = jax.device_put(state)
    out: dict = {}
    for b in batch_sizes:
        batch = jax.device_put(tile(example, int(b)))
        for _ in range(warmup):
            jax.block_until_ready(eval_fn(state, batch))
        ms = _time_calls(eval_fn, state, batch, iters)
        mean = float(ms.mean())
        out[str(b)] = {"p50_ms": float(np.percentile(ms, 50)),
                       "p95_ms": float(np.percentile(ms, 95)),
                       "mean_ms": mean, "throughput": int(b) / (mean / 1e3)}
    dev = jax.devices()[0]
    out["device"] = f"{dev.platform}/{dev.device_kind}"
    return out


def interleaved(models: dict, example: dict, batch_sizes, iters: int, warmup: int = 3) -> dict:
    """name -> batch size -> {p50_ms, p95_ms, throughput}, the calls alternating between the
    models (one call of each in turn), so a shared, noisy CPU slows all of them alike. An nnx
    model runs as its jitted eval step on the batch placed on the device; anything else (an
    ONNX Runtime model) as `m.logits(batch)` on the host batch."""
    fns = {}
    for name, m in models.items():
        if isinstance(m, nnx.Module):
            set_modes(m, None)
            fn, state = make_eval_step(nnx.graphdef(m)), jax.device_put(nnx.state(m))
            fns[name] = ((lambda b, fn=fn, state=state: fn(state, b)), True)
        else:
            fns[name] = (m.logits, False)
    out = {name: {} for name in models}
    for b in batch_sizes:
        host = tile(example, int(b))
        batch = {True: jax.device_put(host), False: host}
        times = {name: [] for name in models}
        for i in range(warmup + iters):
            for name, (fn, on_device) in fns.items():
                t0 = time.perf_counter()
                jax.block_until_ready(fn(batch[on_device]))
                if i >= warmup:
                    times[name].append((time.perf_counter() - t0) * 1e3)
        for name, ms in times.items():
            out[name][str(b)] = {"p50_ms": float(np.percentile(ms, 50)),
                                 "p95_ms": float(np.percentile(ms, 95)),
                                 "throughput": b / (float(np.mean(ms)) / 1e3)}
    return out


def param_count(state) -> int:
    """Number of parameters: the sizes of the nnx.Param leaves of an nnx model or state
    (batch statistics and other variables excluded), or of every array in a plain pytree."""
    if isinstance(state, nnx.Module):
        state = nnx.state(state, nnx.Param)
    leaves = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    if any(isinstance(x, nnx.Variable) for x in leaves):
        leaves = [x for x in leaves if isinstance(x, nnx.Param)]
    # .shape rather than the values: abstract states (jax.eval_shape) count too.
    return int(sum(math.prod(x.shape) if hasattr(x, "shape") else np.size(x) for x in leaves))


def disk_bytes(path: Path) -> int:
    """Size of a file, or the total size of the files under a directory (a checkpoint)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    if not path.is_dir():
        raise FileNotFoundError(f"disk_bytes: {path} does not exist")
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
