"""Freezing must save compute: MiniLM train-step time per trainable set, as ratios to full
fine-tuning in the same run (batch 32, seq 128, AdamW, clipping over trainable params).

- full / last2 / head_only: ftlab's pruned backward (only trainable params differentiated);
- masked: every gradient computed and clipped, frozen ones zeroed (optax multi_transform
  with set_to_zero), the usual way freezing is done in JAX;
- bare_last2 / bare_head_only: the pruned step written by hand (overhead.bare_step with the
  same trainable set), the reference ftlab's pruned steps must be no worse than
  (`<set>_vs_bare`: ftlab's s/step / the bare one's, goal <= 1);
- last2_cached / head_only_cached: what an ftlab phase actually runs per step when the
  frozen leading stages are computed once (trainer.cache_frozen=true).

Run: python benchmarks/freeze.py [--batch 32 --seq 128 --repeats 5]
"""
from __future__ import annotations

import argparse
import re

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from common import (LAST2, conf_xla_options, emit, ftlab_step, interleaved, minilm, time_steps,
                    token_batch)
from overhead import bare_step
from ftlab.models.loading import param_paths
from ftlab.optim import path_str
from ftlab.schema import TaskConfig
from ftlab.step import make_train_step, set_modes, split_for_training

LAST1 = re.compile(r"(head|layers/5)/.*")
HEAD = re.compile(r"head/.*")


def masked_step(model, paths: set[str]):
    """All params differentiated; optax zeroes the frozen ones' updates."""
    graphdef, params, stats, rest = split_for_training(model, set(param_paths(model)))
    params, stats = jax.tree.map(jnp.copy, (params, stats))
    labels = jax.tree_util.tree_map_with_path(
        lambda kp, _: "train" if path_str(kp) in paths else "freeze", params)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.multi_transform(
        {"train": optax.adamw(1e-4), "freeze": optax.set_to_zero()}, labels))
    step = make_train_step(graphdef, tx, TaskConfig(), compiler_options=conf_xla_options(model))
    return step, (params, tx.init(params), stats), rest


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    batch = token_batch(args.batch, args.seq)
    model = minilm()
    all_paths = set(param_paths(model))
    sets = {"full": all_paths, "last2": {p for p in all_paths if LAST2.fullmatch(p)},
            "head_only": {p for p in all_paths if HEAD.fullmatch(p)}}
    times = {}
    for name, paths in sets.items():
        times[name] = time_steps(*ftlab_step(model, paths), batch, repeats=args.repeats)
    times["masked_last2"] = time_steps(*masked_step(model, sets["last2"]), batch,
                                       repeats=args.repeats)
    vs_bare = {}  # ftlab's pruned step and the bare one, timed in turns (the CPU drifts)
    for name in ("last2", "head_only"):
        bare, params, opt_state, stats = bare_step(model, sets[name])
        ours, carry, rest = ftlab_step(model, sets[name])
        pair = {"bare": (lambda p, o, s, _, b, k: bare(p, o, s, b, k),
                         [params, opt_state, stats], None),
                "ftlab": (ours, list(carry), rest)}
        vs_bare[name] = interleaved(pair, batch, args.repeats, block=2)
        times[f"bare_{name}"] = vs_bare[name]["bare"]
    # Cached variants: the step starts at the first trainable stage on precomputed inputs.
    for name, start in (("last2_cached", 5), ("head_only_cached", 7)):
        set_modes(model, None)
        prefix = nnx.jit(lambda m, b, stop=start: m.forward(b, 0, stop))(model, batch)
        cached = {**batch, "hidden": prefix}
        times[name] = time_steps(*ftlab_step(model, sets[name.split("_cached")[0]], start),
                                 cached, repeats=args.repeats)
    # Optimizer memory: AdamW state for the trainable params only (no timing involved).
    sizes = {}
    for name, rule in (("full", None), ("last2", LAST2), ("last1", LAST1), ("head_only", HEAD)):
        paths = {p for p in all_paths if rule is None or rule.fullmatch(p)}
        _, (trainable, opt_state, _), _ = ftlab_step(model, paths)
        n = sum(x.size for x in jax.tree.leaves(trainable))
        sizes[name] = (n, sum(x.nbytes for x in jax.tree.leaves(opt_state)))
    total = sizes["full"][0]
    for name, (n, nbytes) in sizes.items():
        emit(f"freeze/optimizer_state/{name}", nbytes / sizes["full"][1], "x full",
             "freeze/optimizer_state/full", bytes=nbytes, frozen_fraction=round(1 - n / total, 4),
             **({"goal": "<= 0.15 at >= 90% frozen"} if name == "last1" else {}))
    emit("freeze/full_step", times["full"], "s/step", None, batch=args.batch, seq=args.seq)
    for name, t in times.items():
        if name != "full":
            emit(f"freeze/{name}", t / times["full"], "x full step time", "freeze/full_step",
                 seconds=round(t, 4))
    for name, t in vs_bare.items():
        emit(f"freeze/{name}_vs_bare", t["ftlab"] / t["bare"], "x bare pruned step time",
             f"freeze/bare_{name}", goal="<= 1", ftlab_seconds=round(t["ftlab"], 4),
             bare_seconds=round(t["bare"], 4))


if __name__ == "__main__":
    from common import run
    run(main)
