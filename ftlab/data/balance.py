"""Class imbalance: per-class loss weights and an oversampled epoch order.

Use one or the other: oversampling and "balanced" weights together correct twice.
"""
from __future__ import annotations

import numpy as np

from ftlab.schema import ConfigError

WEIGHT_MODES = ("none", "balanced", "sqrt")


def _train_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Samples per class; every class must have at least one, or its weight is undefined."""
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}); got {labels.min()}..{labels.max()}")
    counts = np.bincount(labels, minlength=num_classes)
    if (counts == 0).any():
        missing = np.flatnonzero(counts == 0).tolist()
        raise ConfigError("dataset.class_weights", f"class(es) {missing} have no samples in "
                                                   "train; use class_weights=none or fix the split")
    return counts


def class_weights(labels: np.ndarray, num_classes: int, mode: str) -> np.ndarray:
    """float32 (num_classes,) loss weight per class, computed from the train labels.

    "none": all 1. "balanced": n / (num_classes * count), as sklearn's compute_class_weight,
    so every class carries equal total weight. "sqrt": the square root of that, a milder
    correction, rescaled so the mean weight over train samples is 1 (as "balanced" already is).
    """
    if mode not in WEIGHT_MODES:
        raise ConfigError("dataset.class_weights", f"unknown mode '{mode}'; use one of "
                                                   f"{', '.join(WEIGHT_MODES)}")
    if mode == "none":
        return np.ones(num_classes, np.float32)
    counts = _train_counts(labels, num_classes)
    w = counts.sum() / (num_classes * counts)
    if mode == "sqrt":
        w = np.sqrt(w)
        w = w * counts.sum() / (w * counts).sum()
    return w.astype(np.float32)


def oversample_order(labels: np.ndarray, seed: int, phase: int, epoch: int) -> np.ndarray:
    """Index order for one epoch in which every present class has the majority's count.

    Each class keeps all its samples and draws the shortfall with replacement; the whole is
    then shuffled. A pure function of (seed, phase, epoch), like `batches.order`, so a resumed
    run replays the same order. The epoch is num_present_classes * majority_count long.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng([seed, phase, epoch])
    classes, counts = np.unique(labels, return_counts=True)
    top = counts.max(initial=0)
    parts = []
    for c, n in zip(classes, counts):
        idx = np.flatnonzero(labels == c)
        parts += [idx, rng.choice(idx, top - n, replace=True)]
    return rng.permutation(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
