"""Classification metrics on the host, from scikit-learn where it has them.

`classification` is the cheap per-epoch set; `full` is the evaluation report's set:
per-class scores, one-vs-rest ROC-AUC / PR-AUC, confusion matrix and calibration.
"""
from __future__ import annotations

import warnings

import numpy as np


class _Lazy:
    """`sklearn.metrics`, imported at first use: importing scikit-learn (scipy.stats with it)
    takes ~1 s, which every run would otherwise pay before its first training step."""

    def __getattr__(self, name: str):
        from sklearn import metrics
        return getattr(metrics, name)


skm = _Lazy()


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def classification(logits: np.ndarray, labels: np.ndarray,
                   class_names: list[str]) -> dict[str, float]:
    """Accuracy, macro-F1, loss and each class's recall (`recall/<class>`)."""
    return from_probs(softmax(logits), labels, class_names)


def from_probs(probs: np.ndarray, labels: np.ndarray,
               class_names: list[str]) -> dict[str, float]:
    """`classification` from class probabilities."""
    pred = probs.argmax(-1)
    ids = np.arange(len(class_names))
    loss = float(-np.log(probs[np.arange(len(labels)), labels] + 1e-30).mean())
    recall = skm.recall_score(labels, pred, labels=ids, average=None, zero_division=0)
    return {"accuracy": float(skm.accuracy_score(labels, pred)),
            "macro_f1": float(skm.f1_score(labels, pred, average="macro", labels=ids,
                                           zero_division=0)),
            "loss": loss,
            **{f"recall/{name}": float(r) for name, r in zip(class_names, recall)}}


def calibration(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> dict:
    """Top-label calibration: expected calibration error over equal-width confidence bins
    (Guo et al. 2017) and each bin's count, mean confidence and accuracy."""
    conf = probs.max(-1)
    correct = probs.argmax(-1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    out, ece = [], 0.0
    for b in range(bins):
        m = which == b
        n = int(m.sum())
        c = float(conf[m].mean()) if n else None
        a = float(correct[m].mean()) if n else None
        if n:
            ece += n / len(labels) * abs(a - c)
        out.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": n,
                    "confidence": c, "accuracy": a})
    return {"ece": float(ece), "bins": out}


def _one_vs_rest(probs: np.ndarray, labels: np.ndarray, c: int) -> tuple:
    """ROC-AUC and PR-AUC (average precision) of class c against the rest; None when the
    split lacks positives or negatives for it."""
    y = labels == c
    if y.all() or not y.any():
        return None, None
    return (float(skm.roc_auc_score(y, probs[:, c])),
            float(skm.average_precision_score(y, probs[:, c])))


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _balanced_accuracy(labels: np.ndarray, pred: np.ndarray) -> float:
    with warnings.catch_warnings():  # a predicted class absent from labels is fine here
        warnings.simplefilter("ignore", UserWarning)
        return float(skm.balanced_accuracy_score(labels, pred))


def full(probs: np.ndarray, labels: np.ndarray, class_names: list[str],
         bins: int = 15) -> dict:
    """The report's metrics for class probabilities `probs` (N, C) and int labels (N,)."""
    ids = np.arange(len(class_names))
    pred = probs.argmax(-1)
    p, r, f, s = skm.precision_recall_fscore_support(labels, pred, labels=ids, zero_division=0)
    auc = [_one_vs_rest(probs, labels, c) for c in ids]
    cal = calibration(probs, labels, bins)
    return {
        "metrics": {
            "accuracy": float(skm.accuracy_score(labels, pred)),
            "balanced_accuracy": _balanced_accuracy(labels, pred),
            "macro_f1": float(skm.f1_score(labels, pred, labels=ids, average="macro",
                                           zero_division=0)),
            "weighted_f1": float(skm.f1_score(labels, pred, labels=ids, average="weighted",
                                              zero_division=0)),
            "loss": float(skm.log_loss(labels, probs / probs.sum(-1, keepdims=True),
                                       labels=ids)),
            "roc_auc": _mean(a for a, _ in auc),  # macro over classes with both outcomes
            "pr_auc": _mean(b for _, b in auc),
            "ece": cal["ece"],
        },
        "per_class": {name: {"precision": float(p[c]), "recall": float(r[c]),
                             "f1": float(f[c]), "support": int(s[c]),
                             "roc_auc": auc[c][0], "pr_auc": auc[c][1]}
                      for c, name in enumerate(class_names)},
        "confusion": skm.confusion_matrix(labels, pred, labels=ids).tolist(),
        "calibration": cal,
    }


def cost_threshold(val_probs: np.ndarray, val_labels: np.ndarray, probs: np.ndarray,
                   labels: np.ndarray, positive: int, fn_cost: float, fp_cost: float) -> dict:
    """Binary decision threshold on P(positive) minimising fn_cost*FN + fp_cost*FP on val,
    and the evaluated split's cost, precision and recall at it and at argmax (0.5)."""
    score = val_probs[:, positive]
    cands = np.unique(np.concatenate([score, [0.5, 1.0 + 1e-9]]))
    y = val_labels == positive
    fn = np.array([(y & (score < t)).sum() for t in cands])
    fp = np.array([(~y & (score >= t)).sum() for t in cands])
    best = cands[int(np.argmin(fn_cost * fn + fp_cost * fp))]

    def at(t):
        yt, hit = labels == positive, probs[:, positive] >= t
        cost = fn_cost * float((yt & ~hit).sum()) + fp_cost * float((~yt & hit).sum())
        return (cost, float(skm.precision_score(yt, hit, zero_division=0)),
                float(skm.recall_score(yt, hit, zero_division=0)))

    cost, prec, rec = at(best)
    d_cost, d_prec, d_rec = at(0.5)
    return {"threshold": float(best), "cost": cost, "precision": prec, "recall": rec,
            "default_cost": d_cost, "default_precision": d_prec, "default_recall": d_rec,
            "false_negative": fn_cost, "false_positive": fp_cost}
