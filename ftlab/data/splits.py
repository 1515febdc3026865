"""Stratified, seeded train/val/test splits and the split manifest."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from ftlab.schema import ConfigError, SplitConfig


def stratified_subset(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indices of a class-stratified subset of size n (all indices if n >= len)."""
    idx = np.arange(len(labels))
    if n >= len(labels):
        return idx
    from sklearn.model_selection import train_test_split  # ~0.7 s: only where it is used
    keep, _ = train_test_split(idx, train_size=n, stratify=labels, random_state=seed)
    return np.sort(keep)


def check_fractions(fracs) -> None:
    if len(fracs) != 3 or min(fracs) <= 0 or abs(sum(fracs) - 1.0) > 1e-6:
        raise ConfigError("dataset.split", f"train/val/test = {tuple(fracs)}; give three "
                                           "fractions > 0 that sum to 1")


def split(labels: np.ndarray, cfg: SplitConfig) -> dict[str, np.ndarray]:
    """Sorted index arrays for train / val / test, stratified by label."""
    check_fractions((cfg.train, cfg.val, cfg.test))
    idx = np.arange(len(labels))
    from sklearn.model_selection import train_test_split
    train, rest = train_test_split(idx, train_size=cfg.train, stratify=labels,
                                   random_state=cfg.seed)
    val, test = train_test_split(rest, train_size=cfg.val / (cfg.val + cfg.test),
                                 stratify=labels[rest], random_state=cfg.seed + 1)
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def write_manifest(path: Path, ids: np.ndarray, labels: np.ndarray, class_names: list[str],
                   parts: dict[str, np.ndarray]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sample_id", "split", "label"])
        for name, idx in parts.items():
            for i in idx:
                w.writerow([ids[i], name, class_names[labels[i]]])
