"""From a dataset config to tokenized train/val/test arrays and a split manifest."""
from __future__ import annotations

import dataclasses
import numpy as np

from ftlab.data import duplicates, sources, splits
from ftlab.data.examples import Examples
from ftlab.data.grouped import grouped_split
from ftlab.data.leakage import LeakReport
from ftlab.data.summary import check_classes_present
from ftlab.data.batches import ArrayData
from ftlab.data.tokenize import encode, load_tokenizer
from ftlab.schema import ConfigError, DatasetConfig, ModelConfig


@dataclasses.dataclass
class Prepared:
    parts: dict[str, ArrayData]
    ids: dict[str, np.ndarray]
    class_names: list[str]
    special_tokens: dict | None = None  # text: mask / pad / keep ids of the tokenizer

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclasses.dataclass
class Split:
    examples: Examples
    parts: dict[str, np.ndarray]  # split name -> sorted sample indices
    leaks: LeakReport


def column(ex: Examples, name: str, key: str) -> np.ndarray:
    if name not in ex.columns:
        raise ConfigError(key, f"dataset '{ex.ids[0].split('/')[0]}' has no column '{name}'; "
                               f"columns: {', '.join(ex.columns) or 'none'}")
    return ex.columns[name]


def load_split(cfg: DatasetConfig) -> Split:
    """The (optionally subset) examples, their split and the cross-split duplicate report."""
    if cfg.duplicates not in duplicates.MODES:
        raise ConfigError("dataset.duplicates", f"'{cfg.duplicates}' is not one of: "
                                                f"{', '.join(duplicates.MODES)}")
    ex = sources.load(cfg)
    if cfg.subset is not None:
        if cfg.subset < 10:
            raise ConfigError("dataset.subset", "keep at least 10 samples, or null for all")
        ex = ex.take(splits.stratified_subset(ex.labels, cfg.subset, cfg.split.seed))
    if cfg.env is not None:
        column(ex, cfg.env, "dataset.env")
    counts = np.bincount(ex.labels, minlength=len(ex.class_names))
    for name, n in zip(ex.class_names, counts):
        if n < 3:
            raise ConfigError("dataset.split", f"class '{name}' has no samples in split "
                                               f"train/val/test: it has {n} in all (needs 3+); "
                                               "add data or drop the class")
    exact, near = duplicates.sample_keys(ex)
    groups = None if cfg.group is None else column(ex, cfg.group, "dataset.group")
    if cfg.duplicates == "group":
        groups = duplicates.duplicate_groups(exact, near, cfg.near_distance, groups)
    if groups is None:
        parts = splits.split(ex.labels, cfg.split)
    else:
        s = cfg.split
        parts = grouped_split(ex.labels, groups, (s.train, s.val, s.test), seed=s.seed)
    check_classes_present(ex.labels, ex.class_names, parts)
    return Split(ex, parts, duplicates.leak_report(ex, parts, exact, near, cfg.near_distance))


def inputs(ex: Examples, dcfg: DatasetConfig,
           mcfg: ModelConfig) -> tuple[dict[str, np.ndarray], dict | None]:
    """Model inputs per sample, and the tokenizer's special ids for text."""
    if ex.arrays is not None:
        return {k: v[:, :dcfg.max_length] if k in ("input_ids", "attention_mask") else v
                for k, v in ex.arrays.items()}, None
    if mcfg.tokenizer is None:
        raise ConfigError("model.tokenizer", f"dataset '{dcfg.name}' is text; give the "
                                             "model a tokenizer.json path")
    tok = load_tokenizer(mcfg.tokenizer, dcfg.max_length)
    return encode(tok, ex.texts), special_tokens(tok)


def special_tokens(tok) -> dict:
    """Ids token dropout needs: what to write ([MASK], else [UNK]) and what never to touch."""
    ids = {t: tok.token_to_id(t) for t in ("[MASK]", "[UNK]", "[CLS]", "[SEP]", "[PAD]")}
    mask = ids["[MASK]"] if ids["[MASK]"] is not None else ids["[UNK]"]
    keep = tuple(i for t, i in ids.items() if t in ("[CLS]", "[SEP]") and i is not None)
    return {"mask": mask, "keep": keep, "pad": ids["[PAD]"] or 0}


def prepare(ex: Examples, parts: dict[str, np.ndarray], dcfg: DatasetConfig,
            mcfg: ModelConfig) -> Prepared:
    arrays, special = inputs(ex, dcfg, mcfg)
    arrays["label"] = ex.labels.astype(np.int32)
    return Prepared({k: ArrayData({n: a[idx] for n, a in arrays.items()}) for k, idx in parts.items()},
                    {k: ex.ids[idx] for k, idx in parts.items()}, ex.class_names, special)
