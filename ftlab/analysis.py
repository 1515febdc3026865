"""Where a model fails: metrics per slice (environment or any column), the worst slice,
the most-confused class pairs, and the examples to review."""
from __future__ import annotations

import numpy as np
from ftlab.metrics import skm

MIN_SLICE = 5  # smaller slices are reported but never named the worst


def slice_metrics(probs: np.ndarray, labels: np.ndarray,
                  columns: dict[str, np.ndarray]) -> dict[str, dict[str, dict]]:
    """column -> value -> {n, accuracy, balanced_accuracy, macro_f1} over that value's rows.
    Macro-F1 averages over the classes present in the slice (true or predicted)."""
    pred = probs.argmax(-1)
    out = {}
    for name, col in columns.items():
        col = np.asarray(col).astype(str)
        out[name] = {}
        for value in sorted(set(col)):
            m = col == value
            y, p = labels[m], pred[m]
            out[name][value] = {
                "n": int(m.sum()),
                "accuracy": float(skm.accuracy_score(y, p)),
                "balanced_accuracy": float(_balanced(y, p)),
                "macro_f1": float(skm.f1_score(y, p, average="macro", zero_division=0)),
            }
    return out


def _balanced(y: np.ndarray, p: np.ndarray) -> float:
    """Mean recall over the classes present in y (sklearn's, without its warning when a
    predicted class is absent from y)."""
    return float(np.mean([(p[y == c] == c).mean() for c in np.unique(y)]))


def worst_slice(slices: dict, overall: dict, metric: str = "macro_f1") -> dict | None:
    """The slice with the lowest `metric` among those with at least MIN_SLICE rows."""
    cands = [(m[metric], col, val, m["n"]) for col, vals in slices.items()
             for val, m in vals.items() if m["n"] >= MIN_SLICE and len(vals) > 1]
    if not cands:
        return None
    score, col, val, n = min(cands)
    return {"column": col, "value": val, "metric": metric, "score": score,
            "overall": overall[metric], "n": n}


def confused_pairs(confusion: list[list[int]], class_names: list[str],
                   top: int = 5) -> list[dict]:
    """Off-diagonal cells of the confusion matrix, largest first."""
    cm = np.asarray(confusion)
    pairs = [(int(cm[i, j]), i, j) for i in range(len(cm)) for j in range(len(cm))
             if i != j and cm[i, j] > 0]
    return [{"true": class_names[i], "pred": class_names[j], "count": n}
            for n, i, j in sorted(pairs, key=lambda t: (-t[0], t[1], t[2]))[:top]]


def review(probs: np.ndarray, labels: np.ndarray, ids: np.ndarray, class_names: list[str],
           top: int, texts: list[str] | None = None) -> dict[str, list[dict]]:
    """The `top` most confident mistakes and least confident correct predictions (row
    indices kept under "row" for thumbnails), with a text snippet when there is text."""
    pred, conf = probs.argmax(-1), probs.max(-1)
    wrong = np.flatnonzero(pred != labels)
    right = np.flatnonzero(pred == labels)

    def rows(idx):
        out = []
        for i in idx[:top]:
            item = {"id": str(ids[i]), "true": class_names[labels[i]],
                    "pred": class_names[pred[i]], "confidence": float(conf[i]),
                    "true_prob": float(probs[i, labels[i]]), "row": int(i)}
            if texts is not None:
                item["snippet"] = " ".join(texts[i].split())[:160]
            out.append(item)
        return out

    return {"confident_mistakes": rows(wrong[np.argsort(-conf[wrong], kind="stable")]),
            "unsure_correct": rows(right[np.argsort(conf[right], kind="stable")])}


def compare_table(evals: dict[str, dict], column: str | None) -> str:
    """Plain-text table of several models on the same rows: accuracy / macro-F1 of each
    (`evals`: name -> an evaluation with "metrics", "n" and "slices"), overall and per
    value of `column` (e.g. the environment)."""
    first = next(iter(evals.values()))
    values = sorted(first["slices"].get(column, {})) if column else []
    header = [column or "rows", "n"] + [f"{name} acc / F1" for name in evals]

    def cells(m: dict) -> str:
        return f"{m['accuracy']:.3f} / {m['macro_f1']:.3f}"

    rows = [header, ["all", str(first["n"])] + [cells(e["metrics"]) for e in evals.values()]]
    for v in values:
        rows.append([v, str(first["slices"][column][v]["n"])] +
                    [cells(e["slices"][column][v]) for e in evals.values()])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
