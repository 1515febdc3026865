"""Grouped, stratified train/val/test splits: a group (patient, source, ...) never spans splits.

One StratifiedGroupKFold pass cuts the data into k near-equal, class-balanced folds of whole
groups; whole folds are then dealt to train / val / test in proportion to `fracs`. With
k = 20 the fractions land on multiples of 5% (0.7 / 0.15 / 0.15 exactly); with fewer groups,
k = number of groups and the fractions are as close as whole groups allow.

sklearn's fold search is Python loops over groups (~2 s for BBC's 2100 duplicate groups, paid
by every run), so the folds are kept in the data cache (ftlab/data/cache.py), keyed by what
decides them: the labels, the group partition, k, the seed and sklearn's version.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import warnings

import numpy as np

from ftlab.data.cache import cached
from ftlab.data.splits import check_fractions
from ftlab.schema import ConfigError

SPLITS = ("train", "val", "test")
MAX_FOLDS = 20


def fold_counts(fracs: tuple[float, float, float], k: int) -> np.ndarray:
    """How many of k folds each split gets: proportional to fracs, at least one each."""
    raw = np.asarray(fracs, float) * k
    counts = np.maximum(1, np.floor(raw)).astype(int)
    while counts.sum() < k:
        counts[np.argmax(raw - counts)] += 1
    while counts.sum() > k:
        counts[np.argmax(np.where(counts > 1, counts - raw, -np.inf))] -= 1
    return counts


def _fold_of(labels: np.ndarray, codes: np.ndarray, k: int, seed: int) -> np.ndarray:
    """The fold of each sample under k stratified group folds (sklearn warns on rare classes)."""
    from sklearn.model_selection import StratifiedGroupKFold
    cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    fold = np.empty(len(labels), np.int32)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class")
        for f, (_, test) in enumerate(cv.split(np.zeros(len(labels)), labels, codes)):
            fold[test] = f
    return fold


def _folds(labels: np.ndarray, groups: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """Test indices of each of k stratified group folds, from the data cache when known."""
    # sklearn reads labels and groups only through np.unique's inverse: these codes decide.
    labels, codes = (np.unique(a, return_inverse=True)[1].reshape(-1).astype(np.int64)
                     for a in (labels, groups))
    key = {"labels": hashlib.sha256(labels.tobytes()).hexdigest(),
           "groups": hashlib.sha256(codes.tobytes()).hexdigest(), "k": k, "seed": seed,
           "sklearn": importlib.metadata.version("scikit-learn")}
    fold = cached("group-folds", key, lambda: _fold_of(labels, codes, k, seed))
    return [np.flatnonzero(fold == f) for f in range(k)]


def grouped_split(labels: np.ndarray, groups: np.ndarray,
                  fracs: tuple[float, float, float] = (0.7, 0.15, 0.15), *,
                  seed: int) -> dict[str, np.ndarray]:
    """Sorted index arrays for train / val / test; every group lies in exactly one split.

    Args:
      labels: int class per sample, shape (n,).
      groups: group key per sample (any hashable dtype), shape (n,).
      fracs: target sample fractions of train, val, test.
      seed: the same seed gives the same split.
    """
    labels, groups = np.asarray(labels), np.asarray(groups)
    check_fractions(fracs)
    if labels.shape != groups.shape or labels.ndim != 1:
        raise ValueError(f"labels {labels.shape} and groups {groups.shape} must be equal 1-D")
    n_groups = len(np.unique(groups))
    if n_groups < len(SPLITS):
        raise ConfigError("dataset.split", f"only {n_groups} distinct group(s); a grouped split "
                                           "needs at least 3; use a finer group key or no groups")
    # sklearn refuses more folds than the largest class has samples.
    k = min(MAX_FOLDS, n_groups, int(np.bincount(np.unique(labels, return_inverse=True)[1]).max()))
    folds = _folds(labels, groups, k, seed)
    deal = np.random.default_rng(seed).permutation(k)
    bounds = np.cumsum(fold_counts(fracs, k))[:-1]
    out = {}
    for name, take in zip(SPLITS, np.split(deal, bounds)):
        out[name] = np.sort(np.concatenate([folds[f] for f in take]))
        if len(out[name]) == 0:
            raise ConfigError("dataset.split", f"split '{name}' came out empty with {n_groups} "
                                               "groups; use more groups or larger fractions")
    return out
