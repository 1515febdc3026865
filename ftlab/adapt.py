"""Test-time adaptation on unlabeled target inputs: TENT and BatchNorm re-estimation.

`tent` (Wang et al. 2021, "Tent: Fully test-time adaptation by entropy minimization")
minimises the mean prediction entropy over target batches. Only the params matched by
`adapt.params` (normalisation scale and bias) are differentiated, and every BatchNorm
normalises with the current batch's statistics, as in the paper. `norm` (the paper's "BN
adapt" baseline) takes no gradient step: it re-estimates BatchNorm statistics on the target.
Both end by re-estimating the statistics over the whole target pool under the final params,
so the adapted model is an ordinary model in inference mode, evaluated by `ftlab.evaluate`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
from functools import partial
from pathlib import Path
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ftlab import analysis, evaluate, param_groups
from ftlab.data.batches import ArrayData, batches
from ftlab.models.loading import WEIGHTS, LoadError, param_paths, read_tensors
from ftlab.app_schema import AdaptAppConfig
from ftlab.schema import AdaptConfig, Config, ConfigError, EvalConfig
from ftlab.step import set_modes, trainable_filter
from ftlab.tasks import primary

log = logging.getLogger(__name__)

METHODS = ("none", "norm", "tent")
ADAPTED_FILE = "adapted.safetensors"


def check(cfg: AdaptConfig) -> None:
    """Config checks that need no model or data."""
    if cfg.method not in METHODS:
        raise ConfigError("adapt.method", f"'{cfg.method}' is not one of: {', '.join(METHODS)}")
    if cfg.optimizer not in ("adam", "sgd"):
        raise ConfigError("adapt.optimizer", f"'{cfg.optimizer}' is not one of: adam, sgd")
    if cfg.lr <= 0:
        raise ConfigError("adapt.lr", "must be > 0 (the paper: adam 1e-3, or sgd 2.5e-4 "
                                      "with momentum 0.9)")
    if cfg.epochs < 1 or (cfg.steps is not None and cfg.steps < 1):
        raise ConfigError("adapt.steps", "epochs and steps must be >= 1 (steps: null runs "
                                         "`epochs` passes over the target pool)")
    if cfg.batch_size < 1:
        raise ConfigError("adapt.batch_size", "must be >= 1")


def selected(model: nnx.Module, cfg: AdaptConfig) -> set[str]:
    """The param paths TENT updates: those `adapt.params` fully matches (none: an error)."""
    return param_groups.select(param_paths(model), cfg.params, "adapt.params")


def optimizer(cfg: AdaptConfig) -> optax.GradientTransformation:
    if cfg.optimizer == "sgd":
        return optax.sgd(cfg.lr, momentum=cfg.momentum or None)
    return optax.adam(cfg.lr)


def entropy(logits):
    """Shannon entropy (nats) of softmax(logits), per row."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -(jnp.exp(logp) * logp).sum(-1)


def num_steps(cfg: AdaptConfig, n: int) -> int:
    return cfg.steps if cfg.steps is not None else cfg.epochs * -(-n // min(cfg.batch_size, n))


def target_order(n: int, batch_size: int, steps: int, seed: int) -> np.ndarray:
    """(steps, batch_size) row indices: shuffled passes over the pool, each a pure function
    of (seed, pass), cut into full batches (no padding rows, which would skew BatchNorm's
    batch statistics); a batch may span two passes."""
    passes = -(-steps * batch_size // n)
    idx = np.concatenate([np.random.default_rng([seed, p]).permutation(n)
                          for p in range(passes)])
    return idx[:steps * batch_size].reshape(steps, batch_size)


@contextlib.contextmanager
def batch_statistics(model: nnx.Module):
    """Inside: dropout off, every BatchNorm normalises with the batch's own statistics and
    stores exactly those (momentum 0). Yields whether the model has a BatchNorm; restores
    the momenta and inference mode on exit."""
    set_modes(model, None)
    bns = [m for _, m in nnx.iter_modules(model) if isinstance(m, nnx.BatchNorm)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.use_running_average, m.momentum = False, 0.0
    try:
        yield bool(bns)
    finally:
        for m, momentum in zip(bns, momenta):
            m.momentum = momentum
        set_modes(model, None)


def make_tent_step(graphdef, tx: optax.GradientTransformation):
    """(params, opt_state, rest, batch) -> (params, opt_state, mean entropy before the step).
    Only `params` (the selected tree) is differentiated; `rest` is read only."""

    def loss_fn(params, rest, batch):
        model = nnx.merge(graphdef, params, rest, copy=True)
        return entropy(primary(model.forward(batch))).mean()

    @jax.jit
    def step(params, opt_state, rest, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, rest, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


@partial(jax.jit, static_argnums=0)
def _outputs(graphdef, state, batch):
    """The model's outputs; jitted once per graph (source and adapted copies share it)."""
    return nnx.merge(graphdef, state).forward(batch)


@partial(jax.jit, static_argnums=0)
def _batch_stats(graphdef, state, batch):
    """The BatchNorm statistics of this batch (graph built inside `batch_statistics`)."""
    model = nnx.merge(graphdef, state, copy=True)
    model.forward(batch)
    return nnx.state(model, nnx.BatchStat)


def _flat(state) -> dict[str, object]:
    return {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(state)}


def reestimate(model: nnx.Module, data: ArrayData, batch_size: int) -> int:
    """Set every BatchNorm's mean and variance to its input's statistics over the whole
    pool `data` under the current params: E[x] and E[x^2] pooled over batches by row count
    (exact for the first BatchNorm; deeper ones see inputs normalised per batch, as in
    training: "precise BN"). Returns the number of BatchNorm layers (0: a LayerNorm model)."""
    with batch_statistics(model) as has_bn:
        if not has_bn:
            return 0
        graphdef, state = nnx.split(model)
        first, second, n = {}, {}, len(data)
        for lo in range(0, n, batch_size):
            batch = {k: v[lo:lo + batch_size] for k, v in data.arrays.items()}
            rows = min(batch_size, n - lo)
            stats = {k: np.asarray(v[...], np.float64) for k, v in
                     _flat(_batch_stats(graphdef, state, batch)).items()}
            for k, mean in stats.items():
                if k.endswith("/mean"):
                    var = stats[k[:-len("mean")] + "var"]
                    first[k] = first.get(k, 0.0) + rows * mean
                    second[k] = second.get(k, 0.0) + rows * (var + mean ** 2)
        target = nnx.state(model, nnx.BatchStat)
        variables = _flat(target)
        for k, mean_sum in first.items():
            mean = mean_sum / n
            var = np.maximum(second[k] / n - mean ** 2, 0.0)
            base = k[:-len("mean")]
            variables[k].set_value(jnp.asarray(mean, variables[k].dtype))
            variables[base + "var"].set_value(jnp.asarray(var, variables[base + "var"].dtype))
        nnx.update(model, target)
        return len(first)


def mean_entropy(model: nnx.Module, data: ArrayData, batch_size: int) -> float:
    """Mean prediction entropy over `data`, model in inference mode."""
    set_modes(model, None)
    graphdef, state = nnx.split(model)
    total = 0.0
    for b in batches(data, batch_size, np.arange(len(data))):
        keep = b.pop("weight") > 0
        total += float(np.asarray(entropy(primary(_outputs(graphdef, state, b))))[keep].sum())
    return total / len(data)


def _tent(model: nnx.Module, data: ArrayData, cfg: AdaptConfig, paths: set[str],
          batch_size: int) -> list[float]:
    """Entropy descent on `paths`, in place; returns each step's batch entropy."""
    tx = optimizer(cfg)
    with batch_statistics(model):
        graphdef, params, rest = nnx.split(model, trainable_filter(paths), ...)
        opt_state = tx.init(params)
        step = make_tent_step(graphdef, tx)
        losses = []
        for idx in target_order(len(data), batch_size, num_steps(cfg, len(data)), cfg.seed):
            params, opt_state, loss = step(params, opt_state, rest,
                                           {k: v[idx] for k, v in data.arrays.items()})
            losses.append(loss)
        nnx.update(model, params)
    losses = [float(x) for x in jax.device_get(losses)]
    bad = [i for i, x in enumerate(losses) if not math.isfinite(x)]
    if bad:
        raise FloatingPointError(f"adapt: entropy is {losses[bad[0]]} at step {bad[0]}; "
                                 "lower adapt.lr")
    return losses


def adapt(model: nnx.Module, data: ArrayData, cfg: AdaptConfig,
          eval_batch_size: int = 64) -> dict:
    """Adapt `model` in place by `cfg.method` on the inputs of `data` (labels never read).

    Returns what happened: rows, steps, the params updated, BatchNorm layers re-estimated,
    the mean entropy on the pool in inference mode before and after, each step's entropy."""
    check(cfg)
    n = len(data)
    if n == 0:
        raise ConfigError("adapt.split", "the target pool has no rows")
    paths = selected(model, cfg) if cfg.method == "tent" else set()
    out = {"method": cfg.method, "rows": n, "steps": 0, "params": sorted(paths),
           "batchnorm_layers": 0, "losses": [],
           "entropy_before": mean_entropy(model, data, eval_batch_size)}
    bs = min(cfg.batch_size, n)
    if cfg.method == "tent":
        out["losses"] = _tent(model, data, cfg, paths, bs)
        out["steps"] = len(out["losses"])
    if cfg.method != "none":
        out["batchnorm_layers"] = reestimate(model, data, bs)
    out["entropy_after"] = mean_entropy(model, data, eval_batch_size) \
        if cfg.method != "none" else out["entropy_before"]
    log.info("adapt %s: %d rows, %d steps on %d params, %d BatchNorm layers re-estimated; "
             "mean entropy %.4f -> %.4f", cfg.method, n, out["steps"], len(paths),
             out["batchnorm_layers"], out["entropy_before"], out["entropy_after"])
    return out


def inputs(data: ArrayData, tasks=()) -> ArrayData:
    """The model inputs of a split: its arrays without the label and task targets."""
    labels = {"label", "weight"} | {t.key for t in tasks}
    return ArrayData({k: v for k, v in data.arrays.items() if k not in labels})


def pool_split(cfg: AdaptConfig, parts: dict, split: str) -> str:
    """The split whose inputs adaptation uses: `adapt.split`, or the evaluated split when
    the default 'adapt' split does not exist (no `dataset.source_envs`: fully test-time)."""
    if cfg.split in parts:
        name = cfg.split
    elif cfg.split == "adapt" and split in parts:
        log.info("no 'adapt' split: adapting on the %s split's inputs (labels unused)", split)
        name = split
    else:
        raise ConfigError("adapt.split", f"no split '{cfg.split}'; splits: {', '.join(parts)}")
    if len(parts[name]) == 0:
        raise ConfigError("adapt.split", f"split '{name}' has no rows (with "
                                         "dataset.source_envs, list fewer environments)")
    return name


def save_adapted(model: nnx.Module, paths: Iterable[str], path: Path) -> list[str]:
    """Write what adaptation changes (the params in `paths` and every BatchNorm statistic)
    as safetensors under '/'-joined names; `load_adapted` puts them back."""
    from safetensors.numpy import save_file
    paths = set(paths)
    tensors = {k: np.asarray(v[...]) for k, v in _flat(nnx.state(model, WEIGHTS)).items()
               if k in paths or isinstance(v, nnx.BatchStat)}
    if tensors:
        save_file(tensors, str(path))
    return sorted(tensors)


def load_adapted(model: nnx.Module, path: Path | str) -> list[str]:
    """Load `adapted.safetensors` into the run's model (restored from its checkpoint);
    every tensor must name one of the model's weights with the same shape."""
    tensors = read_tensors(Path(path))
    state = nnx.state(model, WEIGHTS)
    variables = _flat(state)
    problems = [f"'{k}' is not in the model" for k in tensors if k not in variables]
    problems += [f"'{k}': shape {tuple(t.shape)} in the file, {tuple(variables[k].shape)} in "
                 "the model" for k, t in tensors.items()
                 if k in variables and tuple(t.shape) != tuple(variables[k].shape)]
    if problems:
        raise LoadError(f"{path}: {'; '.join(problems)}; build the model from the run's "
                        "config.yaml and checkpoint first")
    for k, t in tensors.items():
        variables[k].set_value(jnp.asarray(t, variables[k].dtype))
    nnx.update(model, state)
    return sorted(tensors)


def _assess(cfg: Config, model, src: evaluate.Source, split: str, slices: list[str],
            ecfg: EvalConfig) -> dict:
    """Metrics and slices of `model` on `split`, no report written."""
    set_modes(model, None)
    graphdef, state = nnx.split(model)
    pred = evaluate.predictions(partial(_outputs, graphdef), state, src,
                                split, slices, cfg.trainer.eval_batch_size,
                                cfg.trainer.limit_eval_batches)
    return evaluate.assess(ecfg, pred, src.data.class_names)


def _write(out: Path, ev: dict, compare: dict, done: dict, env: str | None):
    """Add what adaptation did and the comparison to eval.json and report.md."""
    summary = {name: {"n": e["n"], "metrics": e["metrics"], "slices": e["slices"]}
               for name, e in compare.items()}
    table = analysis.compare_table(compare, env)
    ev.update(adapt=done, compare=summary)
    (out / "eval.json").write_text(json.dumps(ev, indent=2))
    with open(out / "report.md", "a") as f:
        f.write(f"\n## Source vs test-time adaptation on '{done['pool']}' (accuracy / "
                f"macro-F1)\n\n```\n{table}\n```\n")
    return summary, table


def run(cfg: Config, model, src: evaluate.Source, out_dir: Path, *, split: str = "test",
        title: str = "") -> dict:
    """Adapt a copy of `model` by `cfg.adapt` on the target pool of `src` and evaluate it on
    `split` (per-environment slices by `cfg.dataset.env`) next to the source model and, for
    tent, BatchNorm re-estimation alone. `model` is left as it was.

    Writes `out_dir/<method>/`: eval.json (with "adapt" and "compare"), report.md and the
    rest of evaluate's report (report.md ends with the comparison table) and
    adapted.safetensors.
    Returns {"method", "split", "pool", "out", "adapt" (what each method did), "compare"
    (name -> n, metrics, slices), "table" (printable), "headline" (flat numbers)}.
    """
    a = cfg.adapt
    check(a)
    pool = pool_split(a, src.data.parts, split)
    data = inputs(src.data.parts[pool], src.data.tasks)
    env = cfg.dataset.env
    ecfg = dataclasses.replace(cfg.eval, baselines=False, latency=False)
    slices = evaluate.slice_columns(ecfg, env, src.columns)
    bs = cfg.trainer.eval_batch_size
    out = Path(out_dir) / a.method
    methods = {"none": ["none"], "norm": ["norm"], "tent": ["norm", "tent"]}[a.method]
    compare = {} if a.method == "none" else {"source": _assess(cfg, model, src, split, slices,
                                                               ecfg)}
    done, ev = {}, None
    for m in methods:
        adapted = model if m == "none" else nnx.clone(model)
        done[m] = adapt(adapted, data, dataclasses.replace(a, method=m), bs)
        if m != a.method:
            compare[m] = _assess(cfg, adapted, src, split, slices, ecfg)
            continue
        ev = evaluate.evaluate_model(
            cfg, adapted, src, split, out, ecfg=ecfg, env=env, checkpoint=f"adapted ({m})",
            title=title or f"{cfg.name}: {split} split after test-time adaptation ({m}) "
                           f"on the inputs of '{pool}'")
        compare["source" if m == "none" else m] = ev
        if m != "none":
            done[m]["saved"] = save_adapted(adapted, done[m]["params"], out / ADAPTED_FILE)
    summary, table = _write(out, ev, compare, {"pool": pool, **done}, env)
    headline = {f"adapt/{name}/{split}/{k}": e["metrics"][k] for name, e in compare.items()
                for k in ("accuracy", "macro_f1")}
    for name, e in compare.items():
        headline.update(evaluate.slice_headline(e, f"adapt/{name}/{split}"))
    headline.update({f"adapt/{a.method}/entropy_before": done[a.method]["entropy_before"],
                     f"adapt/{a.method}/entropy_after": done[a.method]["entropy_after"]})
    return {"method": a.method, "split": split, "pool": pool, "out": str(out), "adapt": done,
            "compare": summary, "table": table, "headline": headline}


def run_app(app: AdaptAppConfig) -> dict:
    """`ftlab-adapt`: adapt a finished run's checkpoint on its own data (the 'adapt' split,
    else the evaluated split) or on another dataset with the same classes."""
    from ftlab.runs import load_config, load_model, open_split
    run_dir = Path(app.run_dir)
    cfg = load_config(run_dir)
    check(app.adapt)
    if app.checkpoint not in ("best", "latest"):
        raise ConfigError("checkpoint", f"'{app.checkpoint}' is not one of: best, latest")
    own = app.dataset is None
    keep = {app.split, app.adapt.split, "val"}
    src = open_split(cfg, run_dir, app.dataset, app.split, keep)
    model, step = load_model(cfg, run_dir, src.data.num_classes, app.checkpoint,
                             src.data.tasks)
    target = dataclasses.replace(cfg, dataset=cfg.dataset if own else app.dataset,
                                 adapt=app.adapt, eval=app.eval or cfg.eval)
    evaluate.check(target.eval, src.data.class_names)
    out = Path(app.out) if app.out else \
        run_dir / ("adapt" if own else f"adapt-{target.dataset.name}")
    return run(target, model, src, out, split=app.split,
               title=f"{cfg.name}: {app.split} split of {target.dataset.name} after "
                     f"{app.adapt.method} ({app.checkpoint} checkpoint, step {step})")
