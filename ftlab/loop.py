"""The inner loops: one training epoch, one evaluation pass, and a best-value monitor."""
from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from tqdm.auto import tqdm

from ftlab import metrics
from ftlab.data.batches import ArrayData, batches
from ftlab.data.cache import array_digest, cached
from ftlab.tasks import Task, primary, task_metrics


@dataclasses.dataclass
class Monitor:
    """Best value seen and evaluations since it improved (early stopping, LR on plateau)."""
    mode: str
    min_delta: float = 0.0
    best: float | None = None
    bad: int = 0

    def update(self, value: float) -> bool:
        better = self.best is None or (
            value > self.best + self.min_delta if self.mode == "max"
            else value < self.best - self.min_delta)
        if better:
            self.best, self.bad = value, 0
        else:
            self.bad += 1
        return better

    def state(self) -> dict:
        return {"best": self.best, "bad": self.bad}


def train_epoch(step_fn, carry: tuple, rest, it, key, rs, total: int,
                halt_after: int | None, desc: str, progress: bool, stop=None):
    """Run the batches of `it` on carry = (trainable, opt_state, stats), advancing rs.step /
    rs.batch; returns the new carry, the epoch's means and whether it halted (at step
    `halt_after`, or when `stop()` turns true: checked after every step)."""
    sums, halted = [], False
    bar = tqdm(total=total, initial=rs.batch, desc=desc, disable=not progress, leave=False)
    for batch in it:
        *carry, m = step_fn(*carry, rest, batch, jax.random.fold_in(key, rs.step))
        rs.step, rs.batch = rs.step + 1, rs.batch + 1
        sums.append(m)
        bar.update()
        if progress and rs.batch % 10 == 0:
            bar.set_postfix(loss=f"{float(m['loss']):.4f}")
        if (halt_after is not None and rs.step >= halt_after) or (stop is not None and stop()):
            halted = True
            break
    bar.close()
    out = {}
    if sums:
        tot = jax.device_get(jax.tree.map(lambda *xs: sum(xs), *sums))
        count = max(float(tot["count"]), 1.0)
        out = {"loss": float(tot["loss"]) / len(sums), "accuracy": float(tot["correct"]) / count}
        out.update({f"{k.split('/', 1)[1]}/loss": float(v) / len(sums) for k, v in tot.items()
                    if k.startswith("loss/")})  # per task
        if not math.isfinite(out["loss"]):
            raise FloatingPointError(f"training loss is {out['loss']} at step {rs.step}; "
                                     "lower the learning rate or enable optimizer.clip_norm")
    return tuple(carry), out, halted


def predict(eval_fn, state, data: ArrayData, batch_size: int, limit: int | None = None):
    """Outputs (an array, or a dict by task) and labels of the real (unpadded) rows, in
    order: rows 0..n-1 of `data`."""
    outs, labels = [], []
    for b in batches(data, batch_size, np.arange(len(data)), limit=limit):
        keep = b["weight"] > 0
        outs.append(jax.tree.map(lambda o: np.asarray(o)[keep], eval_fn(state, b)))
        labels.append(b["label"][keep])
    return jax.tree.map(lambda *o: np.concatenate(o), *outs), np.concatenate(labels)


def cache_prefix(prefix_fn, state, data: ArrayData, batch_size: int,
                 limit: int | None = None, key: dict | None = None) -> ArrayData:
    """The frozen stages' output for every row (up to `limit` batches), as new inputs.

    With `key` (what the stages compute depends on: `step.stages_key`) the output is also
    kept in the data cache, keyed by it and by the inputs, so the runs of a sweep that share
    a frozen backbone and data compute it once.
    """
    def build():
        return predict(prefix_fn, state, data, batch_size, limit)[0]

    if key is None:
        hidden = build()
    else:
        inputs = {k: array_digest(v) for k, v in sorted(data.arrays.items())}
        hidden = cached("frozen", {**key, "inputs": inputs, "batch_size": batch_size,
                                   "limit": limit}, build)
    rows = len(hidden)
    keep = {k: v[:rows] for k, v in data.arrays.items() if k != "input_ids"}
    return ArrayData({**keep, "hidden": hidden})


def evaluate(eval_fn, state, data: ArrayData, batch_size: int, tasks: list[Task],
             limit: int | None = None) -> dict[str, float]:
    """The primary task's metrics (unprefixed) and, with several tasks, every task's under
    `<task>/`, plus `loss`: the static-weighted sum of task losses."""
    outs, labels = predict(eval_fn, state, data, batch_size, limit)
    first = tasks[0]
    out = metrics.classification(primary(outs, tasks), labels, list(first.classes))
    if isinstance(outs, dict):
        total = 0.0
        for t in tasks:
            m = task_metrics(t, outs[t.name], data.arrays[t.key][:len(labels)])
            out.update({f"{t.name}/{k}": v for k, v in m.items()})
            total += t.weight * m.get("loss", 0.0)
        out["loss"] = total
    return out
