"""Tasks on a shared backbone: their targets, heads, masked losses, loss weighting and
per-task metrics.

A config's `tasks` dict lists heads by name; the first is the primary task (the dataset's
label). One classification task on the label keeps the plain model (`head/...`); anything
else replaces the head with one head per task (`head/<task>/...`), so one forward pass gives
every task's outputs as a dict. Missing labels (-1 for classes, NaN for numbers) weigh zero
in that task's loss and metrics only.
"""
from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ftlab import metrics
from ftlab.models.heads import ClassifierHead
from ftlab.schema import Config, ConfigError, GroupRule, TaskConfig

log = logging.getLogger(__name__)

LOSSES = {"classification": ("xent",), "regression": ("mse", "huber", "l1"),
          "multi_label": ("bce",)}
METRICS = {"classification": ("accuracy", "macro_f1", "loss"),
           "regression": ("mae", "rmse", "r2", "loss"),
           "multi_label": ("micro_f1", "macro_f1", "subset_accuracy", "loss")}
SCHEMES = ("static", "uncertainty", "dwa")
WEIGHTS_GROUP = "loss_weights"


@dataclasses.dataclass(frozen=True)
class Task:
    """A resolved task: what its head outputs and how its loss reads the batch."""
    name: str
    type: str
    key: str  # batch key of its targets
    classes: tuple[str, ...] | None  # classification / multi_label output names
    loss: str
    weight: float = 1.0
    smoothing: float = 0.0
    hidden: tuple[int, ...] | None = None
    mean: float = 0.0  # regression: targets standardised with the train split's mean / std
    std: float = 1.0
    class_weights: tuple[float, ...] | None = None

    @property
    def outputs(self) -> int:
        return 1 if self.type == "regression" else len(self.classes)


def validate(cfg: Config) -> None:
    """Checks of `tasks` and `weighting` that need no data."""
    if not cfg.tasks:
        raise ConfigError("tasks", "no tasks; pick a tasks config (e.g. tasks=classify)")
    for i, (name, t) in enumerate(cfg.tasks.items()):
        key = f"tasks.{name}"
        if t.type not in LOSSES:
            raise ConfigError(f"{key}.type", f"'{t.type}' is not one of: {', '.join(LOSSES)}")
        if t.loss is not None and t.loss not in LOSSES[t.type]:
            raise ConfigError(f"{key}.loss", f"'{t.loss}' is not a {t.type} loss; use one "
                                             f"of: {', '.join(LOSSES[t.type])}")
        if t.weight < 0:
            raise ConfigError(f"{key}.weight", "must be >= 0")
        if t.type == "multi_label" and not t.columns:
            raise ConfigError(f"{key}.columns", "a multi_label task needs its 0/1 columns")
        if i == 0 and (t.type != "classification" or t.label not in ("label", cfg.dataset.label)):
            raise ConfigError(f"{key}.label", "the first task is the primary one: a "
                                              "classification of the dataset's label; put "
                                              "it first or set dataset.label to its column")
    w = cfg.weighting
    if w.scheme not in SCHEMES:
        raise ConfigError("weighting.scheme", f"'{w.scheme}' is not one of: {', '.join(SCHEMES)}")
    if w.temperature <= 0:
        raise ConfigError("weighting.temperature", "must be > 0")


def monitor_keys(cfg: Config) -> set[str]:
    """Every val metric key a run logs each evaluation (for trainer.monitor)."""
    keys = {f"val/{m}" for m in ("accuracy", "macro_f1", "loss")}
    if not is_single(cfg):
        keys |= {f"val/{n}/{m}" for n, t in cfg.tasks.items() for m in METRICS[t.type]}
    if cfg.trainer.monitor_weights:
        keys.add("val/combined")
    return keys


def is_single(cfg: Config) -> bool:
    """One classification task on the dataset's label with the model's own head."""
    (t, *more) = cfg.tasks.values()
    return not more and t.hidden is None and cfg.weighting.scheme == "static"


def _codes(values: np.ndarray, classes: list[str] | None) -> tuple[np.ndarray, list[str]]:
    """Class ids of a column (-1 where missing) and the class names."""
    v = np.asarray(values)
    if v.dtype.kind in "iub" and classes is not None:
        return v.astype(np.int32), list(classes)
    if v.dtype.kind in "iu":
        classes = classes or [str(x) for x in np.unique(v[v >= 0])]
        v = v.astype(np.float64)
        v[v < 0] = np.nan
    if v.dtype.kind == "f":
        missing = np.isnan(v)
        v = np.where(missing, -1, v).astype(np.int64).astype(str)
    else:
        v = v.astype(str)
        missing = np.isin(v, ("", "nan", "None"))
    names = classes or sorted({str(x) for x in v[~missing]})
    index = {n: i for i, n in enumerate(names)}
    return np.asarray([-1 if m else index.get(str(x), -2) for x, m in zip(v, missing)],
                      np.int32), names


def _column(ex, name: str, key: str) -> np.ndarray:
    if name not in ex.columns:
        raise ConfigError(key, f"the dataset has no column '{name}'; columns: "
                               f"{', '.join(ex.columns) or 'none'}")
    return np.asarray(ex.columns[name])


def _targets(ex, name: str, t: TaskConfig, first: bool, classes=None):
    """(targets over all examples, class names or None) of one task."""
    if first:
        return ex.labels.astype(np.int32), list(ex.class_names)
    if t.type == "classification":
        y, classes = _codes(_column(ex, t.label, f"tasks.{name}.label"),
                            classes or ex.column_classes.get(t.label))
        if (y == -2).any():
            raise ConfigError(f"tasks.{name}.label", f"column '{t.label}' has values "
                                                     f"outside its classes {classes}")
        return y, classes
    if t.type == "regression":
        return _column(ex, t.label, f"tasks.{name}.label").astype(np.float32), None
    y = np.stack([_column(ex, c, f"tasks.{name}.columns").astype(np.float32)
                  for c in t.columns], 1)
    return np.where(np.isnan(y), -1.0, y), list(t.columns)


def resolve(cfg: Config, ex, parts: dict[str, np.ndarray],
            fitted: list[Task] | None = None) -> tuple[list[Task], dict]:
    """Task specs and their targets over all examples (batch key -> array). Statistics
    (regression mean / std, class weights, class lists) come from the train split, or from
    `fitted`: the specs a run was trained with (`tasks.json`), for evaluating it later."""
    from ftlab.data.balance import class_weights
    specs, targets = [], {}
    for i, (name, t) in enumerate(cfg.tasks.items()):
        old = fitted[i] if fitted else None
        y, classes = _targets(ex, name, t, i == 0, old.classes if old else None)
        if old is not None:
            specs.append(old)
            targets[old.key] = y
            continue
        train = parts["train"]
        extra = {}
        if t.type == "regression":
            seen = y[train][np.isfinite(y[train])]
            if len(seen) < 2:
                raise ConfigError(f"tasks.{name}.label", "fewer than 2 labeled train rows")
            extra = {"mean": float(seen.mean()), "std": float(seen.std() or 1.0)}
        if t.type == "classification" and cfg.dataset.class_weights != "none":
            seen = y[train][y[train] >= 0]
            extra["class_weights"] = tuple(class_weights(seen, len(classes),
                                                         cfg.dataset.class_weights).tolist())
        key = "label" if i == 0 else f"task/{name}"
        specs.append(Task(name, t.type, key, None if classes is None else tuple(classes),
                          t.loss or LOSSES[t.type][0], t.weight, t.label_smoothing,
                          None if t.hidden is None else tuple(t.hidden), **extra))
        targets[key] = y
    return specs, targets


def save(specs: list[Task], path) -> None:
    import json
    from pathlib import Path
    Path(path).write_text(json.dumps([dataclasses.asdict(t) for t in specs], indent=2))


def load(path) -> list[Task] | None:
    """A run's fitted task specs (None for runs made before tasks.json existed)."""
    import json
    from pathlib import Path
    if not Path(path).exists():
        return None
    tup = lambda v: tuple(v) if isinstance(v, list) else v
    return [Task(**{k: tup(v) for k, v in d.items()}) for d in json.loads(Path(path).read_text())]


class TaskHeads(nnx.Dict):
    """One head per task on the pooled features: `head/<task>/...`; returns a dict."""

    def __call__(self, x, *, rngs=None):
        return {name: head(x, rngs=rngs) for name, head in self.items()}


class LossWeights(nnx.Module):
    """Kendall et al.'s learned log-variances s = log sigma^2, one per task."""

    def __init__(self, n: int):
        self.log_var = nnx.Param(jnp.zeros((n,), jnp.float32))


def attach(model: nnx.Module, cfg: Config, tasks: list[Task] | None, seed: int) -> None:
    """Give a freshly built model its task heads (and loss weights); a single plain task
    keeps the model's own head."""
    if is_single(cfg) or tasks is None:
        if not is_single(cfg):
            raise ValueError("a multi-task model needs its resolved tasks (tasks.resolve)")
        return
    first = model.head.layers[0]
    h = cfg.model.head
    rngs = nnx.Rngs(params=jax.random.fold_in(jax.random.key(seed), 7))
    model.head = TaskHeads({t.name: ClassifierHead(
        first.in_features, t.outputs, hidden=t.hidden if t.hidden is not None else h.hidden,
        activation=h.activation, dropout=h.dropout, rngs=rngs) for t in tasks})
    if cfg.weighting.scheme == "uncertainty":
        model.loss_weights = LossWeights(len(tasks))


def groups(cfg: Config) -> dict[str, GroupRule]:
    """schedule.groups plus, for uncertainty weighting, the log-variances' own group (no
    weight decay, trained from the first phase) unless the schedule names it."""
    rules = dict(cfg.schedule.groups)
    if cfg.weighting.scheme == "uncertainty" and WEIGHTS_GROUP not in rules:
        rules[WEIGHTS_GROUP] = GroupRule(pattern=f"{WEIGHTS_GROUP}/.*",
                                         lr_mult=cfg.weighting.lr_mult, wd_mult=0.0,
                                         train_from=next(iter(cfg.schedule.phases), None))
    return rules


# ---- losses (traced inside the jitted step) ----

def task_loss(task: Task, out, y, weight):
    """(mean loss over this task's labeled rows, number of them); unlabeled rows weigh 0
    and, through jnp.where before any arithmetic, pass no NaN into the gradient."""
    if task.type == "classification":
        valid = y >= 0
        yy = jnp.where(valid, y, 0)
        target = jax.nn.one_hot(yy, out.shape[-1])
        if task.smoothing:
            target = optax.smooth_labels(target, task.smoothing)
        per = optax.softmax_cross_entropy(out, target)
        m = weight * valid
        if task.class_weights is not None:
            m = m * jnp.asarray(task.class_weights)[yy]
    elif task.type == "regression":
        valid = jnp.isfinite(y)
        z = (jnp.where(valid, y, task.mean) - task.mean) / task.std
        d = out[:, 0] - z
        per = {"mse": d ** 2, "huber": optax.huber_loss(d, delta=1.0),
               "l1": jnp.abs(d)}[task.loss]
        m = weight * valid
    else:
        valid = y >= 0
        per = optax.sigmoid_binary_cross_entropy(out, jnp.where(valid, y, 0.0))
        m = weight[:, None] * valid
    return (per * m).sum() / jnp.maximum(m.sum(), 1e-12), (weight[:, None] * valid
                                                           if valid.ndim > 1 else weight * valid).sum()


def total_loss(tasks: list[Task], scheme: str, losses: list, counts: list, dyn, log_var):
    """Weighted sum of task losses: static / dwa (`dyn` per-task weights from the host) or
    uncertainty (Kendall: c exp(-s) L + s/2, c = 1/2 for regression, 1 otherwise; a task
    with no labeled row in the batch adds nothing)."""
    total = 0.0
    for i, (t, loss, n) in enumerate(zip(tasks, losses, counts)):
        if scheme == "uncertainty":
            s = log_var[i]
            c = 0.5 if t.type == "regression" else 1.0
            total = total + t.weight * c * jnp.exp(-s) * loss + jnp.where(n > 0, 0.5 * s, 0.0)
        else:
            total = total + t.weight * dyn[i] * loss
    return total


def dwa_weights(history: list[list[float]], temperature: float, n: int) -> np.ndarray:
    """Liu et al. 2019: K softmax(r / T), r = L(e-1) / L(e-2) per task; ones until two
    epochs of losses exist."""
    if len(history) < 2:
        return np.ones(n, np.float32)
    r = np.asarray(history[-1]) / np.maximum(np.asarray(history[-2]), 1e-12)
    e = np.exp((r - r.max()) / temperature)
    return (n * e / e.sum()).astype(np.float32)


def effective_weights(tasks: list[Task], scheme: str, dyn, log_var) -> dict[str, float]:
    """The multiplier each task's loss gets now (logged per evaluation)."""
    out = {}
    for i, t in enumerate(tasks):
        if scheme == "uncertainty":
            c = 0.5 if t.type == "regression" else 1.0
            out[t.name] = float(t.weight * c * np.exp(-np.asarray(log_var)[i]))
        else:
            out[t.name] = float(t.weight * np.asarray(dyn)[i])
    return out


# ---- metrics (host) ----

def task_metrics(task: Task, out: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """This task's metric set over its labeled rows."""
    if task.type == "classification":
        m = y >= 0
        return metrics.classification(out[m], y[m], list(task.classes)) if m.any() else {}
    if task.type == "regression":
        m = np.isfinite(y)
        if not m.any():
            return {}
        pred = out[m, 0] * task.std + task.mean
        err = pred - y[m]
        var = float(np.var(y[m]))
        return {"mae": float(np.abs(err).mean()), "rmse": float(np.sqrt((err ** 2).mean())),
                "r2": float(1.0 - (err ** 2).mean() / var) if var > 0 else 0.0,
                "loss": float((((y[m] - task.mean) / task.std - out[m, 0]) ** 2).mean())}
    from sklearn.metrics import f1_score
    valid = y >= 0
    pred = (out > 0).astype(np.float32)
    rows = valid.all(1)
    p = 1.0 / (1.0 + np.exp(-out))
    bce = -(y * np.log(p + 1e-12) + (1 - y) * np.log(1 - p + 1e-12))
    yt, pt = np.where(valid, y, 0).astype(int), np.where(valid, pred, 0).astype(int)
    return {"micro_f1": float(f1_score(yt[rows], pt[rows], average="micro", zero_division=0))
            if rows.any() else 0.0,
            "macro_f1": float(f1_score(yt[rows], pt[rows], average="macro", zero_division=0))
            if rows.any() else 0.0,
            "subset_accuracy": float((pred[rows] == y[rows]).all(1).mean()) if rows.any() else 0.0,
            "loss": float(bce[valid].mean()) if valid.any() else 0.0}


def slice_metrics(task: Task, out: np.ndarray, y: np.ndarray,
                  columns: dict[str, np.ndarray]) -> dict[str, dict[str, dict]]:
    """column -> value -> this task's metrics on that value's labeled rows (classification:
    accuracy / balanced accuracy / macro-F1 over the classes present, as the primary task's
    slices in `analysis.slice_metrics`)."""
    if task.type == "classification":
        from ftlab import analysis
        m = y >= 0
        return analysis.slice_metrics(metrics.softmax(out[m]), y[m],
                                      {k: np.asarray(v)[m] for k, v in columns.items()})
    res = {}
    for name, col in columns.items():
        col = np.asarray(col).astype(str)
        res[name] = {}
        for value in sorted(set(col)):
            m = col == value
            scores = task_metrics(task, out[m], y[m])
            res[name][value] = {"n": int(m.sum()), **{k: v for k, v in scores.items()
                                                      if "/" not in k}}
    return res


def primary(outputs, tasks: list[Task] | None = None):
    """The primary task's outputs from a model's forward (an array, or a dict by task)."""
    if isinstance(outputs, dict):
        return outputs[tasks[0].name] if tasks else next(iter(outputs.values()))
    return outputs
