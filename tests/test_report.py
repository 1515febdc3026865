"""Rendering an evaluation: every PNG is a real image and report.md holds every section."""
import re

import numpy as np
from PIL import Image

from ftlab import plots
from ftlab.report import render_all, write_report

CLASSES = ["business", "sports", "science|tech"]


def _fake_ev() -> dict:
    bins = [{"lo": i / 5, "hi": (i + 1) / 5, "count": c, "confidence": i / 5 + 0.1,
             "accuracy": a} for i, (c, a) in enumerate([(0, 0.0), (4, 0.2), (10, 0.5),
                                                         (20, 0.6), (30, 0.95)])]
    err = {"id": "doc-7", "true": "sports", "pred": "business", "confidence": 0.97,
           "snippet": "Profit | loss\nfor the club " + "x" * 200}
    return {
        "split": "test", "n": 64, "checkpoint": "runs/x/ckpt/best",
        "class_names": CLASSES,
        "metrics": {"accuracy": 0.8125, "balanced_accuracy": 0.79, "macro_f1": 0.8,
                    "weighted_f1": 0.81, "loss": 0.55, "roc_auc": None, "pr_auc": 0.7,
                    "ece": 0.052},
        "per_class": {c: {"precision": 0.8, "recall": 0.7, "f1": 0.75, "support": 20,
                          "roc_auc": 0.9, "pr_auc": 0.8} for c in CLASSES},
        "confusion": [[18, 2, 0], [3, 15, 2], [1, 4, 19]],
        "confused_pairs": [{"true": "science|tech", "pred": "sports", "count": 4}],
        "calibration": {"ece": 0.052, "bins": bins},
        "slices": {"cell_type": {"mono": {"n": 40, "accuracy": 0.9, "macro_f1": 0.85,
                                          "balanced_accuracy": 0.86},
                                 "poly": {"n": 24, "accuracy": 0.7, "macro_f1": 0.71,
                                          "balanced_accuracy": 0.69}}},
        "worst_slice": {"column": "cell_type", "value": "poly", "metric": "macro_f1",
                        "score": 0.71, "overall": 0.8, "n": 24},
        "baselines": {"tfidf_logreg": {"accuracy": 0.7, "macro_f1": 0.68},
                      "linear_probe": {"accuracy": 0.75, "macro_f1": 0.72,
                                       "balanced_accuracy": 0.7},
                      "fine_tuned": {"accuracy": 0.8125, "macro_f1": 0.8,
                                     "balanced_accuracy": 0.79}},
        "threshold": {"positive": "sports", "threshold": 0.31, "cost": 12.0,
                      "default_cost": 20.0, "precision": 0.7, "recall": 0.9,
                      "default_precision": 0.8, "default_recall": 0.75,
                      "false_negative": 5.0, "false_positive": 1.0},
        "cost": {"params": 1_234_567, "disk_bytes": 5_000_000, "device": "cpu",
                 "latency": {"1": {"p50_ms": 3.2, "p95_ms": 4.1, "throughput": 300.0},
                             "32": {"p50_ms": 20.0, "p95_ms": 25.0, "throughput": 1600.0}}},
        "errors": {"confident_mistakes": [err], "unsure_correct": [dict(err, id="doc-9")]},
    }


def _fake_rows() -> list[dict]:
    return [{"step": 10 * (e + 1), "train/loss": 1.0 / (e + 1), "val/loss": 1.1 / (e + 1),
             "train/accuracy": 0.5 + 0.05 * e, "val/accuracy": 0.5 + 0.04 * e,
             **({"val/macro_f1": 0.45 + 0.04 * e} if e else {}),
             "phase": int(e >= 2), "lr_scale": 1.0} for e in range(4)]


def _assert_png(path) -> None:
    assert path.exists(), path
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.width > 100 and img.height > 100
        assert np.asarray(img.convert("RGB")).std() > 0


def _cells(row: str) -> list[str]:
    """Cells of a Markdown table row, splitting on unescaped pipes only."""
    return re.split(r"(?<!\\)\|", row.strip())[1:-1]


def test_render_all_and_report(tmp_path):
    ev = _fake_ev()
    rng = np.random.default_rng(0)
    thumbs = ([rng.integers(0, 255, (32, 32, 3), dtype=np.uint8),
               rng.integers(0, 255, (24, 40), dtype=np.uint8)], ["a", "b"])
    images = render_all(tmp_path, ev, _fake_rows(), phase_names=["head", "full"], thumbs=thumbs)
    expected = {"training_curves", "confusion_matrix", "reliability", "slices", "errors"}
    assert expected <= set(images)
    for name in images.values():
        _assert_png(tmp_path / name)

    text = write_report(tmp_path, ev, images, "AG news fine-tune").read_text()
    for name in images.values():
        assert f"]({name})" in text
    for name in ["business", "sports", "science\\|tech"]:
        assert name in text
    assert "science\\\\|tech" not in text  # escaped once, not twice
    confusion_header = next(line for line in text.splitlines() if line.startswith("| true / pred"))
    assert len(_cells(confusion_header)) == 4
    assert "**Worst slice**: cell_type=poly (macro_f1 0.7100 vs 0.8000 overall, n=24)" in text
    for name in ev["baselines"]:
        assert name in text
    assert "roc_auc | n/a" in text and "1.2346" not in text and "1234567" in text

    rows = [line for line in text.splitlines() if line.startswith("| doc-7")]
    assert len(rows) == 1
    cells = _cells(rows[0])
    assert len(cells) == 5
    assert "Profit \\| loss for the club" in cells[4]
    assert len(cells[4].strip()) <= 122
    header = next(line for line in text.splitlines() if line.startswith("| model |"))
    baseline = next(line for line in text.splitlines() if line.startswith("| tfidf_logreg"))
    assert len(_cells(baseline)) == len(_cells(header)) == 4
    assert "n/a" in baseline


def test_missing_sections_are_skipped(tmp_path):
    ev = {"metrics": {"accuracy": 0.5, "macro_f1": None}, "class_names": ["a", "b"]}
    images = render_all(tmp_path, ev, None)
    assert images == {}
    text = write_report(tmp_path, ev, images, "minimal").read_text()
    assert "accuracy | 0.5000" in text and "macro_f1 | n/a" in text
    for section in ["Slices", "Baselines", "Cost", "Error review", "Worst slice", "!["]:
        assert section not in text


def test_training_curves_empty_rows(tmp_path):
    _assert_png(plots.training_curves([], tmp_path / "empty.png"))


def test_lr_find_plot(tmp_path):
    lr = np.logspace(-6, -1, 40)
    loss = 2.0 - np.log10(lr / 1e-6) * 0.3 + np.where(lr > 1e-2, 5 * lr, 0)
    curves = {"backbone": {"lr": lr.tolist(), "loss": loss.tolist(), "suggested": 1e-4},
              "head": {"lr": lr.tolist(), "loss": (loss + 0.2).tolist(), "suggested": None}}
    out = plots.lr_find(curves, tmp_path / "lr.png")
    assert out == tmp_path / "lr.png"
    _assert_png(out)
