"""Optimizers from optax pieces: per-group LR and weight-decay multipliers, per-phase LR
schedules, and an injected `lr_scale` that reduce-on-plateau sets from the host.

Built over the trainable params only, so frozen params hold no optimizer state.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ftlab.schema import ConfigError, OptimizerConfig, PhaseConfig


def path_str(keypath) -> str:
    """'/'-joined nnx param path from a jax key path (drops the Variable's `.value`)."""
    parts = []
    for k in keypath:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
    return "/".join(parts)


def tree_of(params, values: dict[str, float]):
    """A tree shaped like `params` holding values[path] at each leaf."""
    return jax.tree_util.tree_map_with_path(lambda kp, _: values[path_str(kp)], params)


class EmptyState(NamedTuple):
    pass


def scale_by_tree(mults) -> optax.GradientTransformation:
    """Multiply each update by its leaf's constant (per-group LR multipliers)."""
    def update(updates, state, params=None):
        return jax.tree.map(lambda u, m: u * m, updates, mults), state
    return optax.GradientTransformation(lambda _: EmptyState(), update)


def add_decayed_weights_tree(decay) -> optax.GradientTransformation:
    """Decoupled weight decay with a per-leaf coefficient (per-group wd multipliers)."""
    def update(updates, state, params):
        return jax.tree.map(lambda u, p, d: u + d * p, updates, params, decay), state
    return optax.GradientTransformation(lambda _: EmptyState(), update)


SCHEDULES = ("cosine", "linear", "constant", "stlr", "step")
STLR_RATIO = 32  # ULMFiT's slanted triangular LR: lowest LR = lr / 32
STEP_AT = (0.3, 0.6, 0.9)  # BiT-HyperRule: LR x 0.1 at 30%, 60% and 90% of the phase


def lr_schedule(phase: PhaseConfig, steps: int) -> optax.Schedule:
    """The phase's LR per step: `warmup` (a fraction of its steps) rises linearly, then
    cosine / linear decay to 0, constant, `stlr` (Howard & Ruder 2018: rises from lr/32 over
    the warmup fraction, their cut_frac, then falls linearly back to lr/32) or `step`
    (Kolesnikov et al. 2020: x0.1 at 30%, 60% and 90% of the steps)."""
    warmup = int(round(phase.warmup * steps))
    decay_steps = max(steps - warmup, 1)
    low = phase.lr / STLR_RATIO
    if phase.schedule == "stlr":
        up = max(warmup, 1)
        return optax.join_schedules([optax.linear_schedule(low, phase.lr, up),
                                     optax.linear_schedule(phase.lr, low, max(steps - up, 1))],
                                    [up])
    main = {"cosine": lambda: optax.cosine_decay_schedule(phase.lr, decay_steps),
            "linear": lambda: optax.linear_schedule(phase.lr, 0.0, decay_steps),
            "constant": lambda: optax.constant_schedule(phase.lr),
            "step": lambda: optax.piecewise_constant_schedule(
                phase.lr, {max(int(round(f * steps)) - warmup, 1): 0.1 for f in STEP_AT})
            }[phase.schedule]()
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, phase.lr, warmup), main], [warmup])


def validate(cfg: OptimizerConfig) -> None:
    if cfg.name not in ("adamw", "adam", "sgd"):
        raise ConfigError("optimizer.name", f"'{cfg.name}' is not one of: adamw, adam, sgd")
    if cfg.clip_norm is not None and cfg.clip_norm <= 0:
        raise ConfigError("optimizer.clip_norm", "must be > 0, or null to disable clipping")


def build(cfg: OptimizerConfig, phase: PhaseConfig, steps: int, params: Any,
          lr_mult: dict[str, float], wd_mult: dict[str, float]) -> optax.GradientTransformation:
    """The optimizer for one phase over `params` (the trainable tree)."""
    validate(cfg)
    schedule = lr_schedule(phase, steps)

    def make(lr_scale):
        parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm else []
        if cfg.name == "sgd":
            parts.append(optax.trace(decay=cfg.momentum))
        else:
            parts.append(optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps))
        # A multiplier tree only where groups differ: a uniform one would cost a pass over
        # every trainable param per step for nothing.
        wd = {cfg.weight_decay * m for m in wd_mult.values()}
        if cfg.name != "adam" and cfg.weight_decay and len(wd) == 1:
            parts.append(optax.add_decayed_weights(wd.pop()))
        elif cfg.name != "adam" and cfg.weight_decay:
            parts.append(add_decayed_weights_tree(
                tree_of(params, {p: cfg.weight_decay * m for p, m in wd_mult.items()})))
        lr = set(lr_mult.values())
        uniform = lr.pop() if len(lr) == 1 else None
        scale = uniform if uniform is not None else 1.0
        parts.append(optax.scale_by_schedule(lambda n: -schedule(n) * lr_scale * scale))
        if uniform is None:
            parts.append(scale_by_tree(tree_of(params, lr_mult)))
        return optax.chain(*parts)

    return optax.inject_hyperparams(make)(lr_scale=jnp.float32(1.0))


def set_lr_scale(opt_state, scale: float):
    opt_state.hyperparams["lr_scale"] = jnp.asarray(scale, jnp.float32)
    return opt_state

