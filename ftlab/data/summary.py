"""Class counts per split (and per environment) written next to the manifest, and a check
that every class reaches every split."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from ftlab.schema import ConfigError

log = logging.getLogger(__name__)


def _counts(labels: np.ndarray, class_names: list[str]) -> dict[str, int]:
    """Samples per class name, zeros included."""
    n = np.bincount(np.asarray(labels, np.int64), minlength=len(class_names))
    return {name: int(c) for name, c in zip(class_names, n)}


def data_summary(labels: np.ndarray, class_names: list[str], parts: dict[str, np.ndarray],
                 env: np.ndarray | None = None, env_name: str | None = None) -> dict:
    """JSON-ready class counts per split, and per (split, environment) when `env` is given.

    Args:
      labels: int class per sample over the whole dataset.
      parts: split name -> indices into labels (as from `splits.split`).
      env: per-sample environment (site, scanner, year, ...) over the whole dataset.
      env_name: what the environment is, for the reader.
    """
    labels = np.asarray(labels)
    out = {"num_samples": int(len(labels)), "classes": list(class_names),
           "splits": {s: {"n": int(len(idx)), "counts": _counts(labels[idx], class_names)}
                      for s, idx in parts.items()}}
    if env is not None:
        env = np.asarray(env)
        out["environment"] = {"name": env_name, "counts": {
            s: {str(e): _counts(labels[idx][env[idx] == e], class_names)
                for e in np.unique(env[idx])}
            for s, idx in parts.items()}}
    return out


def write_summary(path: str | Path, summary: dict) -> None:
    """Write a `data_summary` dict as indented JSON."""
    Path(path).write_text(json.dumps(summary, indent=2) + "\n")


def check_classes_present(labels: np.ndarray, class_names: list[str],
                          parts: dict[str, np.ndarray]) -> None:
    """Raise ConfigError for the first class with no samples in some split: its metrics
    there would be undefined."""
    labels = np.asarray(labels)
    for split, idx in parts.items():
        for name, count in _counts(labels[idx], class_names).items():
            if count == 0:
                raise ConfigError("dataset.split", f"class '{name}' has no samples in split "
                                                   f"'{split}'; use more data (dataset.subset), "
                                                   "another dataset.split.seed or larger "
                                                   "split fractions")


def write_data_report(d, split, run_dir: Path) -> None:
    """Write the data summary and leakage report of `split` (dataset config `d`) into
    `run_dir`; fail on leakage unless dataset.duplicates says otherwise."""
    ex = split.examples
    env = None if d.env is None else ex.columns[d.env]
    write_summary(run_dir / "data_summary.json",
                  data_summary(ex.labels, ex.class_names, split.parts, env, d.env))
    split.leaks.to_csv(run_dir / "leakage.csv")
    if split.leaks.ok:
        return
    msg = (f"{split.leaks.summary()} (see {run_dir / 'leakage.csv'}); set "
           "dataset.duplicates=group to keep duplicates inside one split, or =warn to go on")
    if d.duplicates == "fail":
        raise ConfigError("dataset.duplicates", msg)
    log.warning("leakage: %s", msg)
