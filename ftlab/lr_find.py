"""LR range test per param group (Smith 2017; fastai's lr_find): the training loss while
the LR grows geometrically, and the LR where it falls fastest.

Each group trainable in the chosen phase is tested alone, from the same initial weights, with
the phase's optimizer; frozen leading stages run once, as in training. The LR recorded is the
group's own (its lr_mult is not applied), so a group's lr_mult ~ its suggestion / phase lr.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ftlab import models, optim, param_groups, plots, tasks
from ftlab.data.batches import ArrayData, batches
from ftlab.data.prepare import load_split, prepare
from ftlab.loop import cache_prefix
from ftlab.schema import Config, ConfigError, LrFindConfig
from ftlab.step import (first_trainable_stage, make_eval_step, make_train_step, set_modes,
                        split_for_training)
from ftlab.data.augment import augment_fn
from ftlab.train import build_model, check_config, epoch_order

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Curve:
    lr: list[float]
    loss: list[float]
    smoothed: list[float]  # EMA of the loss, bias-corrected
    suggested: float | None


def validate(cfg: LrFindConfig) -> None:
    if not cfg.min_lr > 0:
        raise ConfigError("lr_find.min_lr", f"must be > 0, got {cfg.min_lr:g}")
    if not cfg.max_lr > cfg.min_lr:
        raise ConfigError("lr_find.max_lr", f"must be > lr_find.min_lr ({cfg.min_lr:g}), "
                                            f"got {cfg.max_lr:g}")
    if cfg.steps < 5:
        raise ConfigError("lr_find.steps", f"must be >= 5, got {cfg.steps}")
    if not 0 <= cfg.smooth < 1:
        raise ConfigError("lr_find.smooth", f"must be in [0, 1), got {cfg.smooth:g}")
    if not cfg.diverge > 1:
        raise ConfigError("lr_find.diverge", f"must be > 1, got {cfg.diverge:g}")


def pick_phase(cfg: Config) -> tuple[int, str]:
    """(index, name) of lr_find.phase, or of the first phase when it is None."""
    names = list(cfg.schedule.phases)
    if not names:
        raise ConfigError("schedule.phases", "no phases; add at least one")
    name = names[0] if cfg.lr_find.phase is None else cfg.lr_find.phase
    if name not in names:
        raise ConfigError("lr_find.phase", f"no phase '{name}'; known phases: {', '.join(names)}")
    return names.index(name), name


def group_paths(groups: param_groups.Groups, phase: int) -> dict[str, set[str]]:
    """Param paths of each group trainable in phase number `phase`, in rule order."""
    out: dict[str, set[str]] = {}
    for path in groups.trainable(phase):
        out.setdefault(groups.assignment[path], set()).add(path)
    return {g: out[g] for g in groups.rules if g in out}


def suggest(lr, smoothed, skip: int = 1, min_points: int = 3) -> float | None:
    """LR at the steepest negative slope of the smoothed loss vs log(lr), between the first
    `skip` points (the EMA's warm-up; np.gradient is one-sided at the edge) and the minimum.

    None when fewer than `min_points` lie there or the loss does not fall.
    """
    s = np.asarray(smoothed, np.float64)
    lowest = int(np.argmin(s)) if len(s) else -1
    if lowest + 1 - skip < min_points:
        return None
    slope = np.gradient(s, np.log(np.asarray(lr, np.float64)))[skip:lowest + 1]
    i = int(np.argmin(slope))
    return float(lr[skip + i]) if slope[i] < 0 else None


def summary(name: str, curve: Curve) -> str:
    """One line: "head: suggested lr 3.2e-03 (min loss 0.41 at 1.0e-02)"."""
    if not curve.lr:
        return f"{name}: no finite loss, even at the first lr; lower lr_find.min_lr"
    i = int(np.argmin(curve.smoothed))
    best = f"min loss {curve.smoothed[i]:.2f} at {curve.lr[i]:.1e}"
    if curve.suggested is None:
        return f"{name}: no suggestion, the loss barely falls before its minimum ({best}); " \
               "lower lr_find.min_lr or raise lr_find.steps"
    return f"{name}: suggested lr {curve.suggested:.1e} ({best})"


def sweep(step_fn, carry: tuple, rest, stream, lrs: np.ndarray, cfg: LrFindConfig, key):
    """Train carry = (trainable, opt_state, stats) one batch of `stream` per LR of `lrs`
    until the smoothed loss exceeds cfg.diverge x its minimum or a loss is non-finite;
    returns the curve and the final carry."""
    trainable, opt_state, stats = carry
    out, avg, best = Curve([], [], [], None), 0.0, math.inf
    for i, (lr, batch) in enumerate(zip(lrs, stream)):
        opt_state = optim.set_lr_scale(opt_state, float(lr))
        trainable, opt_state, stats, m = step_fn(trainable, opt_state, stats, rest, batch,
                                                 jax.random.fold_in(key, i))
        loss = float(m["loss"])
        if not math.isfinite(loss):
            break
        avg = cfg.smooth * avg + (1 - cfg.smooth) * loss
        smoothed = avg / (1 - cfg.smooth ** (i + 1))
        out.lr.append(float(lr))
        out.loss.append(loss)
        out.smoothed.append(smoothed)
        best = min(best, smoothed)
        if smoothed > cfg.diverge * best:
            break
    out.suggested = suggest(out.lr, out.smoothed, skip=max(1, len(lrs) // 10))
    return out, (trainable, opt_state, stats)


def prefix_inputs(model, data: ArrayData, start: int, stop: int, batch_size: int) -> ArrayData:
    """`data` run once through the frozen stages [start, stop) in eval mode (as is if empty)."""
    if stop <= start:
        return data
    set_modes(model, None)
    fn = make_eval_step(nnx.graphdef(model), start, stop)
    return cache_prefix(fn, nnx.state(model), data, batch_size)


def _stream(cfg: Config, train: ArrayData, phase: int):
    """Train batches in the trainer's order for this phase, epoch after epoch."""
    t = cfg.trainer
    for epoch in itertools.count():
        yield from batches(train, t.batch_size, epoch_order(cfg, train, phase, epoch),
                           limit=t.limit_train_batches)


def range_test(cfg: Config, task, model, paths: set[str], wd_mult: dict[str, float],
               train: ArrayData, start: int, phase: int, special_tokens=None, weights=None):
    """The range test of the params `paths` alone on `train` (inputs of stage `start`), with
    phase number `phase`'s optimizer and batch order; returns the curve and all the model's
    params after it. `model` itself keeps its weights. `task`: the resolved tasks (or one
    TaskConfig, whose class weights are then `weights`)."""
    graphdef, trainable, stats, rest = split_for_training(model, paths)
    # The step donates these: train copies, so the model keeps its initial weights.
    trainable, stats = jax.tree.map(jnp.copy, (trainable, stats))
    lf, phase_cfg = cfg.lr_find, list(cfg.schedule.phases.values())[phase]
    constant = dataclasses.replace(phase_cfg, lr=1.0, schedule="constant", warmup=0.0)
    tx = optim.build(cfg.optimizer, constant, lf.steps, trainable, dict.fromkeys(paths, 1.0),
                     wd_mult)  # the LR itself comes in as lr_scale, step by step
    step_fn = make_train_step(graphdef, tx, task, start, weights,
                              augment_fn(cfg.dataset.augment, special_tokens),
                              scheme=cfg.weighting.scheme,
                              compiler_options=dict(cfg.model.xla_options))
    curve, (trainable, _, stats) = sweep(
        step_fn, (trainable, tx.init(trainable), stats), rest, _stream(cfg, train, phase),
        np.geomspace(lf.min_lr, lf.max_lr, lf.steps), lf, jax.random.key(cfg.trainer.seed))
    return curve, nnx.state(nnx.merge(graphdef, trainable, stats, rest), nnx.Param)


def run(cfg: Config, out_dir: Path) -> dict:
    """Range-test every group trainable in lr_find.phase; writes lr_find.json and
    lr_find.png into `out_dir` and returns what the json holds."""
    out_dir = Path(out_dir)
    validate(cfg.lr_find)
    check_config(cfg)
    phase, phase_name = pick_phase(cfg)
    split = load_split(cfg.dataset)
    if not split.leaks.ok:
        log.warning("leakage: %s (no matter for the LR range test, which uses train only)",
                    split.leaks.summary())
    specs, _ = tasks.resolve(cfg, split.examples, split.parts)
    abstract = build_model(cfg, len(split.examples.class_names), abstract=True,
                           task_specs=specs)
    groups = param_groups.assign(models.loading.param_paths(abstract), tasks.groups(cfg),
                                 cfg.schedule.phases)
    log.info("param groups:\n%s", groups.table())
    data = prepare(split.examples, split.parts, cfg.dataset, cfg.model, cfg)
    model = build_model(cfg, data.num_classes, task_specs=data.tasks)
    t, train = cfg.trainer, data.parts["train"]
    tested = group_paths(groups, phase)
    cache = t.cache_frozen and not cfg.dataset.augment.active  # inputs must be fixed
    starts = {g: first_trainable_stage(model, p) if cache else 0 for g, p in tested.items()}
    base = min(starts.values())  # frozen for every group: run once for all of them
    shared = prefix_inputs(model, train, 0, base, t.eval_batch_size)
    curves = {}
    for g, paths in tested.items():
        log.info("lr_find %s: %d tensors, from stage %d", g, len(paths), starts[g])
        inputs = prefix_inputs(model, shared, base, starts[g], t.eval_batch_size)
        curves[g], _ = range_test(cfg, data.tasks, model, paths,
                                  groups.multipliers(paths, "wd_mult"), inputs, starts[g], phase,
                                  data.special_tokens)
        log.info("%s", summary(g, curves[g]))
    out = {"phase": phase_name, "groups": {g: dataclasses.asdict(c) for g, c in curves.items()}}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "lr_find.json").write_text(json.dumps(out, indent=2))
    plots.lr_find({g: {"lr": c.lr, "loss": c.smoothed, "suggested": c.suggested}
                   for g, c in curves.items()}, out_dir / "lr_find.png")
    return out
