"""Framework overhead: ftlab's epoch loop (its batching, per-step keys, metric summing and
jitted step with per-group optimizer) against a bare jitted step written here, on the same
model, batch size and optimizer (AdamW + global-norm clipping), full fine-tuning.

The two run in turns (twice `--steps` steps of one, then of the other, `--repeats` times
after a warm-up turn that compiles; medians), so a shared machine's drifting load falls on
both; the first `--steps` of each turn are not timed (the steady state: see common.in_turns).

Run: python benchmarks/overhead.py [--steps 3 --repeats 5 --models minilm,lite0]
"""
from __future__ import annotations

import argparse
from functools import partial

import jax
import numpy as np
import optax
from flax import nnx

from common import (conf_xla_options, emit, ftlab_step, in_turns, image_batch, lite0, minilm,
                    token_batch)
from ftlab.data.batches import ArrayData, batches
from ftlab.loop import train_epoch
from ftlab.models.loading import param_paths
from ftlab.step import set_modes
from ftlab.resume import RunState


def bare_step(model, paths: set[str] | None = None):
    """The step a JAX user writes by hand: dropout on, BatchNorm on batch statistics (updating
    its running averages), AdamW after global-norm clipping. `paths` (default: every param)
    are differentiated; the other params enter as a separate, undifferentiated argument
    (the pruned backward of freezing written by hand), and the blocks holding only them run
    in inference mode, as ftlab runs frozen blocks. Compiled with the XLA options ftlab's
    config gives the model, so a ratio to ftlab's step is the loop's, not XLA's. Returns
    (step(params, opt_state, stats, batch, key), params, opt_state, stats)."""
    set_modes(model, set(param_paths(model)) if paths is None else paths)
    trains = (lambda path, v: isinstance(v, nnx.Param) and (
        paths is None or "/".join(map(str, path)) in paths))
    graphdef, params, frozen, stats, rest = nnx.split(model, trains, nnx.Param, nnx.BatchStat,
                                                      ...)
    params, stats = jax.tree.map(jax.numpy.copy, (params, stats))
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-4, weight_decay=0.01))

    @partial(jax.jit, donate_argnums=(0, 1, 2), compiler_options=conf_xla_options(model) or None)
    def step(params, opt_state, stats, frozen, batch, key):
        def loss_fn(p):
            m = nnx.merge(graphdef, p, frozen, stats, rest, copy=True)
            logits = m.forward(batch, rngs=nnx.Rngs(dropout=key))
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
            return loss.mean(), nnx.state(m, nnx.BatchStat)
        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, stats, loss

    set_modes(model, None)
    return (lambda p, o, s, batch, key: step(p, o, s, frozen, batch, key),
            params, tx.init(params), stats)


def bare_runner(model, data: ArrayData, batch_size: int, steps: int):
    """A callable of the turn index that runs `steps` bare steps (batches 1..steps)."""
    step, params, opt, stats = bare_step(model)
    state, key = [params, opt, stats], jax.random.key(0)
    rows = [{k: v[i * batch_size:(i + 1) * batch_size] for k, v in data.arrays.items()}
            for i in range(steps + 1)]

    def run(turn: int) -> None:
        for i in range(1, steps + 1):
            *state[:], loss = step(*state, rows[i], jax.random.fold_in(key, turn * steps + i))
        loss.block_until_ready()
    return run


def ftlab_runner(model, data: ArrayData, batch_size: int, steps: int):
    """A callable of the turn index that runs ftlab's epoch loop over the same batches."""
    step, carry, rest = ftlab_step(model, set(param_paths(model)))
    state, key, idx = [carry], jax.random.key(0), np.arange(len(data))

    def run(turn: int) -> None:
        state[0], _, _ = train_epoch(step, state[0], rest, batches(
            data, batch_size, idx, start=1, limit=steps + 1), jax.random.fold_in(key, turn),
            RunState(), steps, None, "timed", progress=False)
        jax.block_until_ready(state[0])
    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3, help="steps per turn")
    ap.add_argument("--repeats", type=int, default=5, help="timed turns of each")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--models", default="minilm,lite0")
    args = ap.parse_args()
    n = args.batch * (args.steps + 1)
    cases = []
    if "minilm" in args.models:
        cases.append((f"minilm_b{args.batch}_s128", minilm, token_batch(n, 128)))
    if "lite0" in args.models:
        cases.append((f"lite0_b{args.batch}_128px", lite0, image_batch(n, 128)))
    for name, build, arrays in cases:
        data = ArrayData({k: v for k, v in arrays.items() if k != "weight"})
        t = in_turns({"bare": bare_runner(build(), data, args.batch, args.steps),
                      "ftlab": ftlab_runner(build(), data, args.batch, args.steps)},
                     args.repeats, warmup=1, block=2)
        bare, ours = t["bare"] / args.steps, t["ftlab"] / args.steps
        emit(f"overhead/{name}/bare", bare, "s/step")
        emit(f"overhead/{name}/ftlab", ours, "s/step")
        emit(f"overhead/{name}/throughput_ratio", bare / ours, "x bare throughput",
             f"overhead/{name}/bare", goal=">= 0.95")


if __name__ == "__main__":
    from common import run
    run(main)
