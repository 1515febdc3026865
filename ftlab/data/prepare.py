"""From a dataset config to tokenized train/val/test arrays and a split manifest."""
from __future__ import annotations

import dataclasses
import numpy as np

from ftlab.data import sources, splits
from ftlab.data.batches import ArrayData
from ftlab.data.tokenize import encode, load_tokenizer
from ftlab.schema import ConfigError, DatasetConfig, ModelConfig


@dataclasses.dataclass
class Prepared:
    parts: dict[str, ArrayData]
    ids: dict[str, np.ndarray]
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def load_split(cfg: DatasetConfig) -> tuple[sources.Examples, dict[str, np.ndarray]]:
    """The (optionally subset) examples and their stratified split indices."""
    ex = sources.load(cfg.name)
    if cfg.subset is not None:
        if cfg.subset < 10:
            raise ConfigError("dataset.subset", "keep at least 10 samples, or null for all")
        ex = ex.take(splits.stratified_subset(ex.labels, cfg.subset, cfg.split.seed))
    return ex, splits.split(ex.labels, cfg.split)


def tokens(ex: sources.Examples, dcfg: DatasetConfig, mcfg: ModelConfig) -> dict[str, np.ndarray]:
    if ex.tokens is not None:
        return {k: v[:, :dcfg.max_length] for k, v in ex.tokens.items()}
    if mcfg.tokenizer is None:
        raise ConfigError("model.tokenizer", f"dataset '{dcfg.name}' is text; give the "
                                             "model a tokenizer.json path")
    return encode(load_tokenizer(mcfg.tokenizer, dcfg.max_length), ex.texts)


def prepare(ex: sources.Examples, parts: dict[str, np.ndarray], dcfg: DatasetConfig,
            mcfg: ModelConfig) -> Prepared:
    arrays = {**tokens(ex, dcfg, mcfg), "label": ex.labels.astype(np.int32)}
    return Prepared({k: ArrayData({n: a[idx] for n, a in arrays.items()}) for k, idx in parts.items()},
                    {k: ex.ids[idx] for k, idx in parts.items()}, ex.class_names)
