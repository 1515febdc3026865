"""Pure jitted train and eval steps over (trainable, rest) halves of an nnx model.

Only the trainable half is differentiated, so XLA never builds the frozen params'
backward pass, and only it is passed to the optimizer.
"""
from __future__ import annotations

import hashlib
import os
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ftlab.data.cache import array_digest
from ftlab.schema import TaskConfig
from ftlab.tasks import Task, task_loss, total_loss


def trainable_filter(paths: set[str]):
    """nnx filter selecting the Params whose '/'-joined path is in `paths`."""
    paths = frozenset(paths)
    return lambda path, x: isinstance(x, nnx.Param) and "/".join(map(str, path)) in paths


def set_modes(model: nnx.Module, trainable: set[str] | None) -> None:
    """Training behaviour only inside modules that hold trainable params: dropout on, batch
    statistics used and updated. `None` puts the whole model in inference mode.

    A frozen block is then a fixed feature extractor (its normalisation statistics stay put),
    its output a pure function of the input, which lets a phase cache it
    (see `first_trainable_stage`).
    """
    def frozen(prefix: str) -> bool:
        return trainable is None or not any(p.startswith(prefix) for p in trainable)

    for path, m in nnx.iter_modules(model):
        if isinstance(m, nnx.Dropout):  # judged by the module it sits in
            m.deterministic = frozen("".join(f"{p}/" for p in path[:-1]))
        elif isinstance(m, nnx.BatchNorm):  # judged by its own scale / bias
            m.use_running_average = frozen("".join(f"{p}/" for p in path))


def first_trainable_stage(model: nnx.Module, trainable: set[str]) -> int:
    """Index of the first forward stage with a trainable param (0 if the model has none)."""
    prefixes = getattr(model, "stage_prefixes", lambda: [])()
    for i, prefix in enumerate(prefixes):
        if any(p.startswith(prefix) for p in trainable):
            return i
    return 0


def stages_key(model: nnx.Module, start: int, stop: int) -> dict:
    """What stages [start, stop) of `model` compute in inference mode depends on, for caching
    their output across runs: those stages' variables, the model's structure and static
    settings (the graphdef: dtypes, modes), the model code, jax's version and XLA's flags."""
    prefixes = tuple(model.stage_prefixes()[start:stop])
    h = hashlib.sha256()
    for path, v in sorted(nnx.to_flat_state(nnx.state(model)),
                          key=lambda item: "/".join(map(str, item[0]))):
        name = "/".join(map(str, path))
        if name.startswith(prefixes):
            h.update(f"{name}:{array_digest(np.asarray(v.get_raw_value()))}".encode())
    code = hashlib.sha256()
    for f in sorted((Path(__file__).parent / "models").glob("*.py")):
        code.update(f.read_bytes())
    return {"stages": [start, stop], "variables": h.hexdigest(), "code": code.hexdigest(),
            "graph": hashlib.sha256(repr(nnx.graphdef(model)).encode()).hexdigest(),
            "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", "")}


def _task_list(tasks, class_weights) -> list[Task]:
    if isinstance(tasks, TaskConfig):  # the plain single task on `label`
        cw = None if class_weights is None else tuple(float(w) for w in class_weights)
        return [Task("main", "classification", "label", None, "xent", tasks.weight,
                     tasks.label_smoothing, class_weights=cw)]
    return list(tasks)


def make_train_step(graphdef, tx: optax.GradientTransformation, tasks, start: int = 0,
                    class_weights=None, augment=None, scheme: str = "static",
                    compiler_options: dict | None = None):
    """(trainable, opt_state, stats, rest, batch, key[, dyn]) -> (trainable, opt_state, stats,
    metrics).

    `tasks`: the resolved tasks (`ftlab.tasks.resolve`), or one TaskConfig for the plain
    single task on `label`. Only `trainable` is differentiated. `stats` are the BatchNorm
    statistics (updated in trainable modules, fixed in frozen ones); `rest` is everything
    else, read only. `start` > 0 runs the model from that stage on cached inputs
    (`batch["hidden"]`). `augment`, if given, maps (key, batch) -> batch before the forward
    pass. `dyn`: per-task loss weights from the host (DWA), ones if omitted.
    `compiler_options`: XLA's, for this step's compile (model.xla_options).
    """
    tasks = _task_list(tasks, class_weights)
    first = tasks[0]

    def loss_fn(trainable, stats, rest, batch, key, dyn):
        # copy=True: fresh Variables in this trace, so BatchNorm may update its statistics.
        model = nnx.merge(graphdef, trainable, stats, rest, copy=True)
        # Modules with their own dropout stream (LoRA adapters) get a fresh key each step.
        nnx.reseed(model, dropout=jax.random.fold_in(key, 2**31 - 1))
        if augment is not None:
            key, aug_key = jax.random.split(key)
            batch = augment(aug_key, batch)
        outs = model.forward(batch, start, rngs=nnx.Rngs(dropout=key))
        if not isinstance(outs, dict):
            outs = {first.name: outs}
        losses, counts = zip(*(task_loss(t, outs[t.name], batch[t.key], batch["weight"])
                               for t in tasks))
        log_var = model.loss_weights.log_var[...] if scheme == "uncertainty" else None
        loss = total_loss(tasks, scheme, losses, counts, dyn, log_var)
        return loss, (outs[first.name], losses, nnx.state(model, nnx.BatchStat))

    @partial(jax.jit, donate_argnums=(0, 1, 2), compiler_options=compiler_options or None)
    def train_step(trainable, opt_state, stats, rest, batch, key, dyn=None):
        dyn = jnp.ones(len(tasks), jnp.float32) if dyn is None else dyn
        (loss, (logits, losses, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            trainable, stats, rest, batch, key, dyn)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        y = batch[first.key]
        seen = batch["weight"] * (y >= 0)
        m = {"loss": loss, "correct": ((logits.argmax(-1) == y) * seen).sum(),
             "count": seen.sum()}
        if len(tasks) > 1 or scheme != "static":
            m.update({f"loss/{t.name}": l for t, l in zip(tasks, losses)})
        return trainable, opt_state, stats, m

    return train_step


def split_for_training(model: nnx.Module, trainable: set[str]):
    """(graphdef, trainable params, batch stats, rest) with training modes set for `trainable`;
    the model itself is left in inference mode."""
    set_modes(model, trainable)
    parts = nnx.split(model, trainable_filter(trainable), nnx.BatchStat, ...)
    set_modes(model, None)
    return parts


def make_eval_step(graphdef, start: int = 0, stop: int | None = None):
    """(state, batch) -> outputs of stages [start, stop); build `graphdef` in eval mode."""

    @jax.jit
    def eval_step(state, batch):
        return nnx.merge(graphdef, state).forward(batch, start, stop)

    return eval_step
