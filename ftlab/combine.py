"""Ensembles and routing by environment over finished runs.

`mean` averages the class probabilities of several runs on the same rows; `route` scores
each row with the run registered for its environment value (`dataset.env`). The combined
predictions are assessed and reported like any model's (`ftlab.evaluate`), next to each
member's on the same rows.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from flax import nnx

from ftlab import analysis, evaluate
from ftlab.app_schema import CombineAppConfig
from ftlab.schema import ConfigError
from ftlab.step import make_eval_step, set_modes

MODES = ("mean", "route")


def mean_probs(probs: Sequence[np.ndarray]) -> np.ndarray:
    """The average of the members' class probabilities, each (N, C) on the same rows."""
    return np.mean(np.stack(probs), axis=0)


def route_probs(probs: Mapping[str, np.ndarray], env: np.ndarray,
                route: Mapping[str, str], column: str = "env") -> np.ndarray:
    """Row i takes probs[route[env[i]]][i]. An environment value with no run is an error
    naming it (and how many rows have it)."""
    env = np.asarray(env).astype(str)
    values, counts = np.unique(env, return_counts=True)
    missing = [(v, int(c)) for v, c in zip(values, counts) if v not in route]
    if missing:
        names = ", ".join(f"'{v}' ({c} rows)" for v, c in missing)
        raise ConfigError("route", f"no run for {column} {names}; add "
                                   f"route.{missing[0][0]}=<run dir> (routed: "
                                   f"{', '.join(route) or 'none'})")
    out = np.zeros_like(next(iter(probs.values())))
    for v in values:
        rows = env == v
        out[rows] = probs[route[v]][rows]
    return out


def same_rows(runs: Sequence[str], split: str) -> list[str]:
    """The sample ids of `split` in the runs' manifest.csv, which must all agree."""
    from ftlab.runs import manifest

    def ids(run: str) -> list[str]:
        if not (Path(run) / "manifest.csv").exists():
            raise ConfigError("runs", f"{run} has no manifest.csv; give run dirs that "
                                      "ftlab-train wrote")
        return manifest(run).get(split, [])

    first = ids(runs[0])
    if not first:
        raise ConfigError("split", f"{runs[0]}/manifest.csv has no '{split}' rows")
    for run in runs[1:]:
        other = ids(run)
        if other != first:
            at = next((i for i, (a, b) in enumerate(zip(first, other)) if a != b),
                      min(len(first), len(other)))
            raise ConfigError("runs", f"{run} has a different {split} split from {runs[0]} "
                                      f"(manifest.csv: {len(other)} vs {len(first)} rows, "
                                      f"first difference at row {at}); combine runs "
                                      "trained on the same data and split, or pass "
                                      "dataset=... to score them all on one dataset")
    return first


def members(app: CombineAppConfig) -> list[str]:
    """Every run to score (mean: `runs`; route: the routed runs, then any extra `runs`)."""
    if app.mode not in MODES:
        raise ConfigError("mode", f"'{app.mode}' is not one of: {', '.join(MODES)}")
    if app.checkpoint not in ("best", "latest"):
        raise ConfigError("checkpoint", f"'{app.checkpoint}' is not one of: best, latest")
    if app.mode == "mean" and len(set(map(_norm, app.runs))) < 2:
        raise ConfigError("runs", "mode=mean needs at least two run dirs: runs=[dir1,dir2]")
    if app.mode == "mean" and app.route:
        raise ConfigError("route", "is for mode=route; drop it or set mode=route")
    if app.mode == "route" and not app.route:
        raise ConfigError("route", "mode=route needs environment value -> run dir: "
                                   "route={mono: runs/a/default, poly: runs/b/default}")
    order = ([*app.route.values()] if app.mode == "route" else []) + list(app.runs)
    return list(dict.fromkeys(map(_norm, order)))


def _norm(run: str) -> str:
    return os.path.normpath(run)


def _labels(runs: Sequence[str]) -> dict[str, str]:
    """Short names for the table: the last two path parts, when those are unique."""
    short = {r: "/".join(Path(r).parts[-2:]) for r in runs}
    return short if len(set(short.values())) == len(runs) else {r: r for r in runs}


def predict_run(run: str, app: CombineAppConfig, ecfg, env: str | None):
    """(class names, Predictions) of a run's model on `app.split`."""
    from ftlab.runs import load_config, load_model, open_split
    cfg = load_config(Path(run))
    src = open_split(cfg, Path(run), app.dataset, app.split, keep=[app.split])
    slices = evaluate.slice_columns(ecfg, env, src.columns)
    model, _ = load_model(cfg, Path(run), src.data.num_classes, app.checkpoint,
                          src.data.tasks)
    set_modes(model, None)  # predictions keep the primary task's outputs (tasks.primary)
    t = cfg.trainer
    pred = evaluate.predictions(make_eval_step(nnx.graphdef(model)), nnx.state(model), src,
                                app.split, slices, t.eval_batch_size, t.limit_eval_batches)
    return src.data.class_names, pred


def _aligned(preds: dict, classes: dict, split: str) -> tuple[list[str], dict]:
    """Check every member scored the same classes and rows; truncate to the shortest
    (`trainer.limit_eval_batches` may differ between runs)."""
    first = next(iter(preds))
    for run in preds:
        if classes[run] != classes[first]:
            raise ConfigError("runs", f"{run} predicts classes {classes[run]}, {first} "
                                      f"{classes[first]}; combine runs with the same classes")
    n = min(len(p.labels) for p in preds.values())
    for run, p in preds.items():
        if list(p.ids[:n]) != list(preds[first].ids[:n]):
            raise ConfigError("runs", f"{run} scores other {split} rows than {first}; "
                                      "combine runs on the same dataset and split")
    return classes[first], {r: _head(p, n) for r, p in preds.items()}


def _head(p: evaluate.Predictions, n: int) -> evaluate.Predictions:
    """The first n rows, primary task only (combinations are of the primary task)."""
    return evaluate.Predictions(
        p.ids[:n], p.labels[:n], p.probs[:n], {c: v[:n] for c, v in p.columns.items()},
        None if p.texts is None else p.texts[:n], None if p.images is None else p.images[:n])


def combine_runs(app: CombineAppConfig) -> dict:
    """Score every member on `app.split`, combine them (`mean` or `route`), assess and
    write the report to `app.out`. Returns {"eval", "out", "table", "members"}."""
    from ftlab.runs import load_config
    runs = members(app)
    if app.dataset is None and app.split != "all":
        same_rows(runs, app.split)
    first = load_config(Path(runs[0]))
    dcfg = app.dataset or first.dataset
    ecfg = app.eval or first.eval
    env = dcfg.env
    if app.mode == "route" and env is None:
        raise ConfigError("route", f"dataset '{dcfg.name}' has no dataset.env column to "
                                   "route by; set dataset.env=<column>")
    scored = {r: predict_run(r, app, ecfg, env) for r in runs}
    class_names, preds = _aligned({r: p for r, (_, p) in scored.items()},
                                  {r: c for r, (c, _) in scored.items()}, app.split)
    base = preds[runs[0]]
    if app.mode == "mean":
        probs = mean_probs([preds[_norm(r)].probs for r in dict.fromkeys(app.runs)])
    else:
        probs = route_probs({r: p.probs for r, p in preds.items()}, base.columns[env],
                            {str(k): _norm(v) for k, v in app.route.items()}, env)
    pred = dataclasses.replace(base, probs=probs)
    ev = {"split": app.split, "checkpoint": app.checkpoint, "mode": app.mode,
          "members": runs, "route": dict(app.route),
          **evaluate.assess(ecfg, pred, class_names)}
    labels = _labels(runs)
    compare = {labels[r]: evaluate.assess(ecfg, preds[r], class_names) for r in runs}
    compare[app.mode] = ev
    ev["compare"] = {name: {"n": e["n"], "metrics": e["metrics"], "slices": e["slices"]}
                     for name, e in compare.items()}
    out = Path(app.out)
    title = (f"{app.mode} of {len(runs)} runs on the {app.split} split of {dcfg.name}: "
             + ", ".join(labels.values()))
    evaluate.write(out, ev, pred, ecfg, None, [], title)
    table = analysis.compare_table(compare, env)
    with open(out / "report.md", "a") as f:
        f.write(f"\n## Members vs {app.mode} (accuracy / macro-F1)\n\n```\n{table}\n```\n")
    return {"eval": ev, "out": str(out), "table": table, "members": runs}
