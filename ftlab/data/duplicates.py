"""Duplicates and leakage: keys per sample, duplicate clusters, the cross-split check.

`dataset.duplicates`: `fail` (default) stops a run whose splits share exact or near
duplicates; `warn` only reports; `group` keeps each duplicate cluster inside one split.
The report (`leakage.csv`) always lands in the run dir.
"""
from __future__ import annotations

import numpy as np

from ftlab.data.leakage import LeakReport, content_hash, find_leaks, image_phash, near_pairs, text_key
from ftlab.data.examples import Examples

MODES = ("fail", "warn", "group")


def sample_keys(ex: Examples) -> tuple[list[str], list[int] | None]:
    """Exact keys (normalised text, or content hash) and, for images, perceptual hashes."""
    if ex.texts is not None:
        return [text_key(t) for t in ex.texts], None
    if "image" in ex.arrays:
        images = ex.arrays["image"]
        return [content_hash(im) for im in images], [image_phash(im) for im in images]
    rows = ex.arrays["input_ids"]
    return [content_hash(r) for r in rows], None


def clusters(n: int, links) -> np.ndarray:
    """Connected components (union-find) of n items under (i, j) links: a group id each."""
    parent = np.arange(n)

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in links:
        a, b = root(i), root(j)
        if a != b:
            parent[max(a, b)] = min(a, b)
    return np.asarray([root(i) for i in range(n)])


def duplicate_groups(exact: list[str], near: list[int] | None, max_distance: int,
                     base: np.ndarray | None = None) -> np.ndarray:
    """Group ids that join exact duplicates, near duplicates and members of one `base` group."""
    links = _same_value_links(exact)
    if near is not None and max_distance >= 0:
        links += [(i, j) for i, j, _ in near_pairs(near, max_distance)]
    if base is not None:
        links += _same_value_links(base)
    return clusters(len(exact), links)


def _same_value_links(values) -> list[tuple[int, int]]:
    """(first index with this value, i) for every i: joins items that share a value."""
    first = {}
    return [(first.setdefault(v, i), i) for i, v in enumerate(values)]


def leak_report(ex: Examples, parts: dict[str, np.ndarray], exact: list[str],
                near: list[int] | None, max_distance: int) -> LeakReport:
    by = lambda seq: {s: [seq[i] for i in idx] for s, idx in parts.items()}
    return find_leaks(by(exact), by(list(ex.ids)), by(near) if near is not None else None,
                      max_distance=max_distance)
