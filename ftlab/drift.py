"""Drift statistics: a window of the prediction log against a model's reference (its
validation split scored at registration). Pure functions on arrays; `ftlab.monitor` reads
the log, calls `assess` and writes the report.

Each check pairs an effect size with a test, and flags only when both agree:

| check | effect size (threshold) | test |
|---|---|---|
| confidence, each embedding projection | PSI (`psi`) | two-sample KS |
| predicted-class mix | PSI of class shares (`class_mix_psi`) | chi-square, 2 x classes |
| accuracy, where labels arrived | reference - window (`accuracy_drop`) | one-sided Fisher |

Why both: on thousands of rows a test rejects shifts too small to matter, and on a few dozen
rows PSI alone is noisy (its expected value with no shift is about (bins - 1) / rows, ~0.2
for 10 bins and 50 rows). The tests are Bonferroni-corrected: each needs p < `pvalue` / the
number of checks, so an unshifted window raises any flag with probability below `pvalue`
(the exit status a scheduler acts on is one decision, not one per check). A window with
fewer than `min_rows` rows (labeled rows, for accuracy) is reported and never flagged.
"""
from __future__ import annotations

import numpy as np
from scipy import stats

from ftlab.predlog import Reference, Window, uncertainty

EPS = 1e-4  # floor of a bin's share in PSI: an empty bin adds a large finite term, not inf


def _psi_shares(ref: np.ndarray, win: np.ndarray) -> float:
    """PSI = sum (w - r) * ln(w / r) over bins, shares floored at EPS."""
    r, w = np.maximum(ref, EPS), np.maximum(win, EPS)
    return float(np.sum((w - r) * np.log(w / r)))


def psi(reference: np.ndarray, window: np.ndarray, bins: int = 10) -> float:
    """Population stability index of `window` against `reference` for one feature.

    Bins are the reference's quantiles (equal reference mass per bin; tied edges merged, so a
    feature with many equal values gets fewer bins), open-ended at both sides so window values
    outside the reference's range still count. Each bin's share is floored at EPS (1e-4)
    before the log, so an empty bin contributes a large but finite term. Rule of thumb:
    < 0.1 stable, 0.1-0.2 moderate, > 0.2 a significant shift.
    """
    reference, window = np.asarray(reference, np.float64), np.asarray(window, np.float64)
    if len(reference) == 0 or len(window) == 0:
        raise ValueError(f"psi needs rows on both sides ({len(reference)} reference, "
                         f"{len(window)} window)")
    edges = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)[1:-1]))
    ref_idx = np.searchsorted(edges, reference, side="left")  # bin i: (edge[i-1], edge[i]]
    win_idx = np.searchsorted(edges, window, side="left")
    nb = len(edges) + 1
    return _psi_shares(np.bincount(ref_idx, minlength=nb) / len(reference),
                       np.bincount(win_idx, minlength=nb) / len(window))


def ks(reference: np.ndarray, window: np.ndarray) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov test: (statistic, p-value)."""
    res = stats.ks_2samp(np.asarray(reference, np.float64), np.asarray(window, np.float64))
    return float(res.statistic), float(res.pvalue)


def class_mix(ref_pred: np.ndarray, win_pred: np.ndarray, num_classes: int) -> dict:
    """The predicted-class mixes (shares per class), their PSI (shares floored at EPS) and a
    chi-square test of the 2 x classes count table (classes neither side predicts dropped)."""
    ref_n = np.bincount(np.asarray(ref_pred, np.int64), minlength=num_classes)[:num_classes]
    win_n = np.bincount(np.asarray(win_pred, np.int64), minlength=num_classes)[:num_classes]
    table = np.stack([ref_n, win_n])
    table = table[:, table.sum(0) > 0]
    if table.shape[1] > 1 and win_n.sum() and ref_n.sum():
        chi2, p = stats.chi2_contingency(table, correction=False)[:2]
    else:
        chi2, p = 0.0, 1.0
    ref_share, win_share = ref_n / max(ref_n.sum(), 1), win_n / max(win_n.sum(), 1)
    return {"psi": _psi_shares(ref_share, win_share), "chi2": float(chi2), "pvalue": float(p),
            "reference": ref_share.tolist(), "window": win_share.tolist()}


def accuracy(ref_pred: np.ndarray, ref_labels: np.ndarray, win_pred: np.ndarray,
             win_labels: np.ndarray) -> dict | None:
    """Reference vs window accuracy on the rows with a label (label >= 0); None when no
    window row has one. `pvalue`: one-sided Fisher exact test that the window's accuracy is
    lower (2 x 2 table of right / wrong counts)."""
    ref_pred, ref_labels = np.asarray(ref_pred), np.asarray(ref_labels)
    win_pred, win_labels = np.asarray(win_pred), np.asarray(win_labels)
    rk, wk = ref_labels >= 0, win_labels >= 0
    if not wk.any() or not rk.any():
        return None
    ref_right = int((ref_pred[rk] == ref_labels[rk]).sum())
    win_right = int((win_pred[wk] == win_labels[wk]).sum())
    ref_n, win_n = int(rk.sum()), int(wk.sum())
    table = [[ref_right, ref_n - ref_right], [win_right, win_n - win_right]]
    odds, p = stats.fisher_exact(table, alternative="greater")
    return {"reference": ref_right / ref_n, "window": win_right / win_n,
            "drop": ref_right / ref_n - win_right / win_n, "n": win_n, "n_reference": ref_n,
            "odds_ratio": float(odds), "pvalue": float(p)}


def _check(feature: str, statistic: str, value: float, threshold: float, test: str,
           test_stat: float, p: float, n: int) -> dict:
    return {"feature": feature, "statistic": statistic, "value": float(value),
            "threshold": float(threshold), "test": test, "test_statistic": float(test_stat),
            "pvalue": float(p), "n": int(n)}


def _flag(checks: list[dict], th) -> float:
    """Set each check's `flagged` (and a `note` when too few rows); returns the corrected
    p-value threshold."""
    alpha = th.pvalue / len(checks)
    for c in checks:
        enough = c["n"] >= th.min_rows
        c["flagged"] = bool(enough and c["value"] >= c["threshold"] and c["pvalue"] < alpha)
        c["note"] = "" if enough else f"{c['n']} rows < min_rows {th.min_rows}: not flagged"
    return alpha


def assess(ref: Reference, win: Window, thresholds) -> dict:
    """Every drift check of `win` against `ref` (rule in the module docstring).

    Args:
      ref: the model's reference.
      win: rows of the prediction log (at least one).
      thresholds: a `DriftThresholds` (psi, pvalue, class_mix_psi, accuracy_drop, min_rows).

    Returns:
      {"drift": any check flagged, "checks": one dict per check (feature, statistic, value,
      threshold, test, test_statistic, pvalue, n, flagged, note), "alpha": the corrected
      p-value threshold, "class_mix": class names
      and both mixes, "accuracy": reference / window accuracy or None, "n", "n_reference",
      "labeled", "small_window"}.
    """
    th = thresholds
    n = len(win)
    if n == 0:
        raise ValueError("assess needs a window with at least one row")
    k = ref.proj.shape[1]
    if win.proj.shape[1] != k:
        raise ValueError(f"the window's rows have {win.proj.shape[1]} embedding projections, "
                         f"the reference {k}: they come from another model version")
    ref_conf = uncertainty(ref.probs)["confidence"]
    features = [("confidence", ref_conf, win.confidence)] + [
        (f"pc{j + 1}", ref.proj[:, j], win.proj[:, j]) for j in range(k)]
    checks = []
    for name, r, w in features:
        stat, p = ks(r, w)
        checks.append(_check(name, "psi", psi(r, w), th.psi, "ks", stat, p, n))
    ref_pred = ref.probs.argmax(-1)
    mix = class_mix(ref_pred, win.pred, len(ref.class_names))
    checks.append(_check("class mix", "psi", mix["psi"], th.class_mix_psi, "chi2", mix["chi2"],
                         mix["pvalue"], n))
    acc = accuracy(ref_pred, ref.labels, win.pred, win.label)
    if acc is not None:
        checks.append(_check("accuracy", "drop", acc["drop"], th.accuracy_drop, "fisher",
                             acc["odds_ratio"], acc["pvalue"], acc["n"]))
    alpha = _flag(checks, th)
    return {"drift": any(c["flagged"] for c in checks), "checks": checks, "alpha": alpha,
            "class_mix": {"classes": list(ref.class_names), "reference": mix["reference"],
                          "window": mix["window"]},
            "accuracy": acc, "n": n, "n_reference": len(ref.probs),
            "labeled": int((win.label >= 0).sum()), "small_window": n < th.min_rows}
