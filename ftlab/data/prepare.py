"""From a dataset config to tokenized train/val/test arrays and a split manifest."""
from __future__ import annotations

import dataclasses
import numpy as np

from ftlab.data import duplicates, labeled, sources, splits
from ftlab.data.examples import Examples
from ftlab.data.grouped import grouped_split
from ftlab.data.leakage import LeakReport
from ftlab.data.summary import check_classes_present
from ftlab.data.batches import ArrayData
from ftlab.data.tokenize import tokenize
from ftlab.schema import Config, ConfigError, DatasetConfig, ModelConfig
from ftlab.tasks import Task, resolve


@dataclasses.dataclass
class Prepared:
    parts: dict[str, ArrayData]
    ids: dict[str, np.ndarray]
    class_names: list[str]
    special_tokens: dict | None = None  # text: mask / pad / keep ids of the tokenizer
    tasks: list[Task] = dataclasses.field(default_factory=list)  # tasks[0]: the label's

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
    leaks = duplicates.leak_report(ex, parts, exact, near, cfg.near_distance)
    if cfg.source_envs is not None:
        parts = source_split(ex, parts, cfg)
    if cfg.extra_train is not None:  # annotated samples join train; test ones are refused
        ex, parts = labeled.merge(ex, parts, cfg.extra_train)
        leaks = duplicates.leak_report(ex, {s: parts[s] for s in ("train", "val", "test")},
                                       exact, near, cfg.near_distance)
    elif cfg.balance_envs and cfg.env is None:
        raise ConfigError("dataset.balance_envs", "needs dataset.env (the environment column)")
    return Split(ex, parts, leaks)


def source_split(ex: Examples, parts: dict[str, np.ndarray], cfg: DatasetConfig) -> dict:
    """Train / val restricted to the source environments; test keeps them all; the other
    environments' train / val rows form the unlabeled `adapt` split (test-time adaptation
    never sees a test row)."""
    if cfg.env is None:
        raise ConfigError("dataset.source_envs", "needs dataset.env (the environment column)")
    env = np.asarray(ex.columns[cfg.env]).astype(str)
    known = sorted(set(env))
    unknown = [e for e in cfg.source_envs if e not in known]
    if unknown or not cfg.source_envs:
        raise ConfigError("dataset.source_envs", f"{unknown or 'empty list'}: not values of "
                                                 f"'{cfg.env}'; its values: {', '.join(known)}")
    src = np.isin(env, list(cfg.source_envs))
    out = {s: parts[s][src[parts[s]]] for s in ("train", "val")}
    check_classes_present(ex.labels, ex.class_names, out)
    out["test"] = parts["test"]
    rest = np.sort(np.concatenate([parts[s][~src[parts[s]]] for s in ("train", "val")]))
    if len(rest):
        out["adapt"] = rest
    return out


def inputs(ex: Examples, dcfg: DatasetConfig,
           mcfg: ModelConfig) -> tuple[dict[str, np.ndarray], dict | None]:
    """Model inputs per sample, and the tokenizer's special ids for text."""
    if ex.arrays is not None:
        return {k: v[:, :dcfg.max_length] if k in ("input_ids", "attention_mask") else v
                for k, v in ex.arrays.items()}, None
    from ftlab.models import tokenizer_of
    spec = tokenizer_of(mcfg)  # model.tokenizer, else the one published with the weights
    if spec is None:
        raise ConfigError("model.tokenizer", f"dataset '{dcfg.name}' is text; give the "
                                             "model a tokenizer.json path")
    arrays, tok = tokenize(spec, dcfg.max_length, ex.texts)
    return arrays, special_tokens(tok)


def special_tokens(tok) -> dict:
    """Ids token dropout needs: what to write ([MASK], else [UNK]) and what never to touch."""
    ids = {t: tok.token_to_id(t) for t in ("[MASK]", "[UNK]", "[CLS]", "[SEP]", "[PAD]")}
    mask = ids["[MASK]"] if ids["[MASK]"] is not None else ids["[UNK]"]
    keep = tuple(i for t, i in ids.items() if t in ("[CLS]", "[SEP]") and i is not None)
    return {"mask": mask, "keep": keep, "pad": ids["[PAD]"] or 0}


def prepare(ex: Examples, parts: dict[str, np.ndarray], dcfg: DatasetConfig,
            mcfg: ModelConfig, cfg: Config | None = None, fitted=None) -> Prepared:
    """Model inputs, `label` and every task's targets per split (`cfg`: the run's config,
    for its tasks; None: one classification task on the label; `fitted`: the task specs
    of a trained run, see tasks.resolve)."""
    arrays, special = inputs(ex, dcfg, mcfg)
    arrays["label"] = ex.labels.astype(np.int32)
    if cfg is None:
        tasks = [Task("main", "classification", "label", tuple(ex.class_names), "xent")]
    else:
        tasks, targets = resolve(cfg, ex, parts, fitted)
        arrays.update({k: v for k, v in targets.items() if k != "label"})
    if dcfg.balance_envs:
        arrays["env"] = np.unique(np.asarray(ex.columns[dcfg.env]).astype(str),
                                  return_inverse=True)[1].astype(np.int32)
    return Prepared({k: ArrayData({n: a[idx] for n, a in arrays.items()}) for k, idx in parts.items()},
                    {k: ex.ids[idx] for k, idx in parts.items()}, ex.class_names, special, tasks)
