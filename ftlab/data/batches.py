"""Fixed-shape batches whose order is a pure function of (seed, phase, epoch).

The last partial batch is padded to full size with weight 0, so one compiled step serves
every batch, and a resumed run skips to the same position.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np


@dataclasses.dataclass
class ArrayData:
    arrays: dict[str, np.ndarray]  # input_ids, attention_mask, label, ...

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))


def num_batches(n: int, batch_size: int, limit: int | None = None) -> int:
    k = -(-n // batch_size)
    return k if limit is None else min(k, limit)


def order(n: int, seed: int, phase: int, epoch: int) -> np.ndarray:
    rng = np.random.default_rng([seed, phase, epoch])
    return rng.permutation(n)


def batches(data: ArrayData, batch_size: int, idx: np.ndarray, start: int = 0,
            limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Batches of `idx` in order, from batch number `start`; each has a `weight` column."""
    for b in range(start, num_batches(len(idx), batch_size, limit)):
        take = idx[b * batch_size:(b + 1) * batch_size]
        pad = batch_size - len(take)
        weight = np.ones(batch_size, np.float32)
        if pad:
            weight[-pad:] = 0.0
            take = np.concatenate([take, np.repeat(take[:1], pad)])
        out = {k: v[take] for k, v in data.arrays.items()}
        out["weight"] = weight
        yield out
