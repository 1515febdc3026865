"""Newly labeled samples (an annotated `ftlab-select` queue) merged into the training split.

`dataset.extra_train` names a CSV with `sample_id` and `label` columns (a class name or its
index). Each listed sample of the dataset moves into `train` from whichever split held it
(usually the unlabeled `adapt` pool) and takes the annotator's label. A test sample is
refused: the test set never enters training, whatever the CSV says.
"""
from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np

from ftlab.data.examples import Examples
from ftlab.schema import ConfigError

KEY = "dataset.extra_train"


def read(path: str | Path, class_names: list[str]) -> tuple[list[str], np.ndarray]:
    """(sample ids, label ids) of an annotated CSV; every row must carry a known label."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(KEY, f"{path} does not exist; give the annotated CSV (ftlab-select's "
                               "queue with its label column filled)")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    cols = set(rows[0]) if rows else set()
    if not rows or not {"sample_id", "label"} <= cols:
        raise ConfigError(KEY, f"{path} needs rows with 'sample_id' and 'label' columns "
                               f"(has: {', '.join(sorted(cols)) or 'no rows'})")
    index = {name: i for i, name in enumerate(class_names)}
    index.update({str(i): i for i in range(len(class_names))})
    ids, labels, bad = [], [], []
    for n, row in enumerate(rows, start=2):
        value = (row["label"] or "").strip()
        if value not in index:
            bad.append(f"line {n} '{value}'")
            continue
        ids.append(row["sample_id"])
        labels.append(index[value])
    if bad:
        raise ConfigError(KEY, f"{len(bad)} rows of {path} have no known label ({', '.join(bad[:3])}"
                               f"); use one of: {', '.join(class_names)} (or its index)")
    if len(set(ids)) != len(ids):
        raise ConfigError(KEY, f"{path} lists a sample twice; keep one label per sample_id")
    return ids, np.asarray(labels, np.int64)


def merge(ex: Examples, parts: dict[str, np.ndarray], path: str | Path
          ) -> tuple[Examples, dict[str, np.ndarray]]:
    """`ex` with the annotated labels and `parts` with those samples moved into train."""
    ids, labels = read(path, list(ex.class_names))
    where = {s: i for i, s in enumerate(ex.ids)}
    unknown = [s for s in ids if s not in where]
    if unknown:
        raise ConfigError(KEY, f"{len(unknown)} sample ids are not in this dataset (e.g. "
                               f"{', '.join(unknown[:3])}); label samples of the same dataset "
                               "config (and dataset.subset, if set)")
    rows = np.asarray([where[s] for s in ids], np.int64)
    test = np.intersect1d(rows, parts.get("test", []))
    if len(test):
        raise ConfigError(KEY, f"{len(test)} of its samples are in the test split (e.g. "
                               f"{', '.join(ex.ids[test[:3]])}); the test set never enters "
                               "training: drop them from the CSV")
    out = {s: np.setdiff1d(idx, rows) for s, idx in parts.items()}
    out["train"] = np.union1d(out["train"], rows)
    out = {s: idx for s, idx in out.items() if len(idx) or s in ("train", "val", "test")}
    new = ex.labels.copy()
    new[rows] = labels
    return dataclasses.replace(ex, labels=new), out
