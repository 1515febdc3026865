"""Freezing must save compute on a CNN too: EfficientNet-Lite0, batch 32, 128 px.

Step time of each trainable set as a ratio to full fine-tuning (same run), and the
head-only epoch with frozen-feature caching vs without (the cache is built once; later
epochs only run the head).

Run: python benchmarks/freeze_vision.py [--batch 32 --size 128 --batches 8]
"""
from __future__ import annotations

import argparse
import re
import time

import jax
from flax import nnx

from common import emit, ftlab_step, image_batch, lite0, time_steps
from ftlab.models.loading import param_paths
from ftlab.step import make_eval_step, set_modes

SETS = {"late": r"(head|top|blocks/1[1-5])/.*", "head_only": r"head/.*"}
HEAD_STAGE = 18  # stem, 16 blocks, top, then the head


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batches", type=int, default=8, help="batches per simulated epoch")
    args = ap.parse_args()
    batch = image_batch(args.batch, args.size)
    model = lite0()
    paths = set(param_paths(model))
    sets = {"full": paths, **{k: {p for p in paths if re.fullmatch(v, p)}
                              for k, v in SETS.items()}}
    times = {name: time_steps(*ftlab_step(model, s), batch) for name, s in sets.items()}
    emit("freeze_vision/full_step", times["full"], "s/step", None, batch=args.batch,
         size=args.size)
    for name in SETS:
        emit(f"freeze_vision/{name}", times[name] / times["full"], "x full step time",
             "freeze_vision/full_step", seconds=round(times[name], 4))
    # A head-only epoch of `batches` steps: without caching every step runs the backbone;
    # with caching the backbone runs once per sample (the first epoch), then never again.
    set_modes(model, None)
    prefix = make_eval_step(nnx.graphdef(model), 0, HEAD_STAGE)
    state = nnx.state(model)
    jax.block_until_ready(prefix(state, batch))
    t0 = time.perf_counter()
    feats = jax.block_until_ready(prefix(state, batch))
    cache_build = time.perf_counter() - t0
    cached = time_steps(*ftlab_step(model, sets["head_only"], HEAD_STAGE),
                        {**batch, "hidden": feats})
    epoch_plain = times["head_only"] * args.batches
    emit("freeze_vision/head_epoch", epoch_plain, "s per head-only epoch, uncached", None,
         batches=args.batches)
    emit("freeze_vision/head_epoch_cached", cached * args.batches / epoch_plain,
         "x uncached head-only epoch", "freeze_vision/head_epoch",
         epoch_after_first_s=round(cached * args.batches, 4),
         first_epoch_ratio=round((cache_build + cached) * args.batches / epoch_plain, 4))


if __name__ == "__main__":
    from common import run
    run(main)
