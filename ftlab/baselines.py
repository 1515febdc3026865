"""Baselines scored on the same test split as the fine-tuned model.

A linear probe on the pretrained backbone's pooled features says how much fine-tuning adds
over the frozen representation; TF-IDF and raw-pixel logistic regressions say how much the
deep model adds at all. Each returns test probabilities with a column for every class (the
metrics code turns them into scores) and the regularisation strength chosen on val.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from flax import nnx
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.preprocessing import StandardScaler

from ftlab.data.batches import ArrayData, batches
from ftlab.step import make_eval_step

C_GRID = (0.01, 0.1, 1.0, 10.0)
TEXT_C_GRID = (0.1, 1.0, 10.0, 100.0)  # tf-idf rows are unit-norm: weaker penalties help
MIN_DOCS_FOR_MIN_DF = 20  # below this, min_df=2 can leave too few (or no) terms


def features(model: nnx.Module, data: ArrayData, batch_size: int) -> np.ndarray:
    """Pooled backbone features (every stage but the head) of each row of `data`, in order.

    The model must be in inference mode (as built). Padded rows of the last batch are dropped.
    """
    if len(data) == 0:
        raise ValueError("features: `data` has no rows")
    graphdef, state = nnx.split(model)
    step = make_eval_step(graphdef, 0, len(model.stage_prefixes()) - 1)
    out = []
    for b in batches(data, batch_size, np.arange(len(data))):
        keep = b.pop("weight") > 0
        out.append(np.asarray(step(state, b), np.float32)[keep])
    feats = np.concatenate(out)
    if feats.ndim != 2:
        raise ValueError(f"features: expected (rows, dim) before the head, got {feats.shape}; "
                         "the model's last backbone stage must pool")
    return feats


def _select_logreg(train_x, train_y, val_x, val_y, test_x, num_classes: int, seed: int,
                   grid: Sequence[float] = C_GRID, scale: bool = True) -> tuple[np.ndarray, dict]:
    """Logistic regression (optionally on standardised inputs) with C picked by val macro-F1.

    Ties go to the smaller C (stronger regularisation). Returns test probabilities with
    columns for all `num_classes` classes (zero for a class absent from train) and the choice.
    """
    train_y, val_y = np.asarray(train_y), np.asarray(val_y)
    present = np.unique(train_y)
    if len(present) < 2:
        raise ValueError(f"baseline needs at least 2 classes in train, got {present.tolist()}")
    if present.min() < 0 or present.max() >= num_classes:
        raise ValueError(f"train labels {present.tolist()} fall outside 0..{num_classes - 1}; "
                         "pass the dataset's full num_classes")
    if len(val_y) == 0:
        raise ValueError("baseline needs a non-empty val split to choose C")
    if scale:
        scaler = StandardScaler().fit(train_x)
        train_x, val_x, test_x = (scaler.transform(x) for x in (train_x, val_x, test_x))
    best, scores = None, {}
    for c in grid:
        clf = LogisticRegression(C=c, max_iter=1000, random_state=seed).fit(train_x, train_y)
        scores[float(c)] = float(f1_score(val_y, clf.predict(val_x), average="macro",
                                          zero_division=0))
        if best is None or scores[float(c)] > scores[float(best.C)]:
            best = clf  # fitted on train with this C: the "refit" is this model itself
    probs = np.zeros((test_x.shape[0], num_classes), np.float64)
    probs[:, best.classes_] = best.predict_proba(test_x)
    return probs, {"C": float(best.C), "val_macro_f1": scores[float(best.C)],
                   "val_macro_f1_by_C": scores}


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray,
                 val_y: np.ndarray, test_x: np.ndarray, num_classes: int,
                 seed: int = 0) -> tuple[np.ndarray, dict]:
    """Logistic regression on frozen features (see `features`); C chosen on val."""
    return _select_logreg(train_x, train_y, val_x, val_y, test_x, num_classes, seed)


def tfidf_logreg(train_texts: Sequence[str], train_y: np.ndarray, val_texts: Sequence[str],
                 val_y: np.ndarray, test_texts: Sequence[str], num_classes: int,
                 seed: int = 0) -> tuple[np.ndarray, dict]:
    """Word 1-2 gram TF-IDF (sublinear tf) + logistic regression; C chosen on val.

    The vocabulary is fit on train only; terms seen in a single document are dropped when
    train has enough documents for that to be a typo filter rather than most of the vocabulary.
    """
    min_df = 2 if len(train_texts) >= MIN_DOCS_FOR_MIN_DF else 1
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=min_df)
    train_x = vec.fit_transform(train_texts)
    probs, info = _select_logreg(train_x, train_y, vec.transform(val_texts), val_y,
                                 vec.transform(test_texts), num_classes, seed,
                                 grid=TEXT_C_GRID, scale=False)
    return probs, {**info, "vocab_size": len(vec.vocabulary_), "min_df": min_df}


def pixels(images: np.ndarray, size: int = 32) -> np.ndarray:
    """uint8 (N, H, W[, C]) -> float32 (N, size*size) greyscale in [0, 1] (Pillow bilinear)."""
    from PIL import Image
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"pixels: expected uint8 images, got {images.dtype}")
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim not in (3, 4):
        raise ValueError(f"pixels: expected (N, H, W) or (N, H, W, C), got {images.shape}")
    out = np.empty((len(images), size * size), np.float32)
    for i, im in enumerate(images):
        grey = Image.fromarray(im).convert("L").resize((size, size), Image.BILINEAR)
        out[i] = np.asarray(grey, np.float32).reshape(-1) / 255.0
    return out


def pixel_logreg(train_images: np.ndarray, train_y: np.ndarray, val_images: np.ndarray,
                 val_y: np.ndarray, test_images: np.ndarray, num_classes: int, size: int = 32,
                 seed: int = 0) -> tuple[np.ndarray, dict]:
    """Logistic regression on standardised size x size greyscale pixels; C chosen on val."""
    return _select_logreg(pixels(train_images, size), train_y, pixels(val_images, size), val_y,
                          pixels(test_images, size), num_classes, seed)
