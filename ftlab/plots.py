"""PNG figures for a finished run's evaluation (training curves, confusion, calibration, ...).

Figures are built on `matplotlib.figure.Figure` and rendered with the Agg canvas directly, so
nothing here touches pyplot's global state or needs a display. Each function writes one PNG
at `out` and returns `out`.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 110
ACCENT = "#d62728"  # errors, worst slice, calibration gap
BASE = "#1f77b4"


def save_figure(fig: Figure, out: Path) -> Path:
    """Render `fig` to `out` with the Agg canvas; the figure is dropped with its last reference."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(out, dpi=DPI)
    fig.clear()
    return out


def _message(out: Path, text: str) -> Path:
    """A placeholder figure saying why there is nothing to plot, so report links never break."""
    fig = Figure(figsize=(5, 2.5))
    ax = fig.add_subplot()
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=13, color="0.3")
    ax.set_axis_off()
    return save_figure(fig, out)


def _series(rows: list[dict], key: str) -> tuple[list, list]:
    """(steps, values) for rows that logged `key` with a usable number."""
    xs, ys = [], []
    for i, row in enumerate(rows):
        v = row.get(key)
        if isinstance(v, (int, float)) and not math.isnan(v):
            xs.append(row.get("step", i))
            ys.append(v)
    return xs, ys


def _phase_lines(ax, rows: list[dict], phase_names: list[str] | None) -> None:
    """Dashed vertical line after the last epoch of each phase, labelled with the new phase."""
    def label(x, phase, coords="data") -> None:
        ok = phase_names and 0 <= phase < len(phase_names)
        ax.annotate(phase_names[phase] if ok else f"phase {phase}", (x, 1.0),
                    xycoords=(coords, "axes fraction"), xytext=(3, -12),
                    textcoords="offset points", fontsize=8, color="0.3")

    changes = [i for i in range(1, len(rows)) if None not in (rows[i - 1].get("phase"),
               rows[i].get("phase")) and rows[i - 1]["phase"] != rows[i]["phase"]]
    if changes:
        label(0.0, rows[0]["phase"], "axes fraction")  # the first phase, at the left edge
    for i in changes:
        x = rows[i - 1].get("step", i - 1)
        ax.axvline(x, color="0.4", linestyle="--", linewidth=1)
        label(x, rows[i]["phase"])


def training_curves(rows: list[dict], out: Path, phase_names: list[str] | None = None) -> Path:
    """Loss (train vs val) and accuracy/F1 against step, with dashed lines at phase changes.

    Args:
      rows: lines of a run's `metrics.jsonl`, one per epoch; missing keys are skipped.
      out: PNG path.
      phase_names: optional names for the phase indices in `rows[...]["phase"]`.
    """
    if not rows:
        return _message(out, "no epochs logged")
    fig = Figure(figsize=(11, 4), layout="constrained")
    panels = [("loss", ["train/loss", "val/loss"]),
              ("metric", ["train/accuracy", "val/accuracy", "val/macro_f1"])]
    for k, (ylabel, keys) in enumerate(panels):
        ax = fig.add_subplot(1, 2, k + 1)
        for key in keys:
            xs, ys = _series(rows, key)
            if xs:
                ax.plot(xs, ys, marker="o", markersize=3, label=key)
        _phase_lines(ax, rows, phase_names)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title("Loss" if ylabel == "loss" else "Accuracy / macro-F1")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return save_figure(fig, out)


def confusion_matrix(cm: list[list[int]], class_names: list[str], out: Path) -> Path:
    """Counts per (true, predicted) cell, coloured by the row-normalised fraction (recall).

    Colouring by row fraction keeps errors in small classes visible next to large ones.
    """
    counts = np.asarray(cm, dtype=np.int64)
    if counts.size == 0:
        return _message(out, "empty confusion matrix")
    totals = counts.sum(axis=1, keepdims=True)
    frac = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    n = len(counts)
    side = max(4.0, 0.7 * n + 2.5)
    fig = Figure(figsize=(side + 1, side), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, label="fraction of true class")
    small = n > 12
    for i in range(n):
        for j in range(counts.shape[1]):
            text = f"{counts[i, j]}" if small else f"{counts[i, j]}\n{frac[i, j]:.0%}"
            ax.text(j, i, text, ha="center", va="center", fontsize=7 if small else 9,
                    color="white" if frac[i, j] > 0.5 else "black")
    names = list(class_names) or [str(i) for i in range(n)]
    long = max(len(s) for s in names) > 6
    ax.set_xticks(range(len(names)), names, rotation=45 if long else 0,
                  ha="right" if long else "center")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix (colour = row-normalised)")
    return save_figure(fig, out)


def reliability(bins: list[dict], ece: float, out: Path) -> Path:
    """Accuracy per confidence bin against the diagonal, gap shaded, bin counts underneath."""
    used = [b for b in bins if b.get("count")]
    if not used:
        return _message(out, "no predictions to calibrate")
    lo = np.array([b["lo"] for b in used])
    width = np.array([b["hi"] - b["lo"] for b in used])
    acc = np.array([b["accuracy"] for b in used])
    conf = np.array([b["confidence"] for b in used])
    fig = Figure(figsize=(5.5, 6), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    top.bar(lo, acc, width=width, align="edge", color=BASE, edgecolor="white", label="accuracy")
    top.bar(lo, conf - acc, bottom=acc, width=width, align="edge", color=ACCENT, alpha=0.3,
            hatch="//", edgecolor=ACCENT, label="gap to confidence")
    top.plot([0, 1], [0, 1], linestyle="--", color="0.3", label="perfect calibration")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    ece_text = "n/a" if ece is None else f"{ece:.4f}"
    top.set_title(f"Reliability diagram (ECE = {ece_text})")
    top.legend(fontsize=8, loc="upper left")
    bottom.bar(lo, [b["count"] for b in used], width=width, align="edge", color="0.5")
    bottom.set_xlabel("confidence")
    bottom.set_ylabel("count")
    return save_figure(fig, out)


def slice_bars(slices: dict[str, dict[str, dict]], metric: str, out: Path) -> Path:
    """Horizontal bars of `metric` per column=value, annotated with n; the worst bar in red."""
    items = [(f"{col}={val}", m[metric], m.get("n"))
             for col, values in slices.items() for val, m in values.items()
             if isinstance(m.get(metric), (int, float))]
    if not items:
        return _message(out, f"no slices with {metric}")
    labels, scores, ns = zip(*items)
    worst = int(np.argmin(scores))
    fig = Figure(figsize=(7, 1.2 + 0.45 * len(items)), layout="constrained")
    ax = fig.add_subplot()
    y = np.arange(len(items))
    colors = [ACCENT if i == worst else BASE for i in range(len(items))]
    ax.barh(y, scores, color=colors)
    for i, (s, n) in enumerate(zip(scores, ns)):
        ax.text(s, i, f" {s:.3f} (n={n})", va="center", fontsize=8)
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    ax.set_xlim(0, max(1.0, max(scores)) * 1.25)
    ax.set_xlabel(metric)
    ax.set_title(f"{metric} per slice (worst in red)")
    return save_figure(fig, out)


def lr_find(curves: dict[str, dict], out: Path) -> Path:
    """Loss against learning rate on a log axis, one line per param group, suggested LR marked."""
    curves = {k: c for k, c in curves.items()
              if len(c.get("lr", [])) and len(c.get("loss", []))}
    if not curves:
        return _message(out, "no LR sweep recorded")
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for name, c in curves.items():
        lr, loss = np.asarray(c["lr"], float), np.asarray(c["loss"], float)
        (line,) = ax.plot(lr, loss, label=name)
        s = c.get("suggested")
        if s:
            order = np.argsort(lr)
            at = np.interp(np.log(s), np.log(lr[order]), loss[order])
            ax.plot([s], [at], marker="o", markersize=9, color=line.get_color(),
                    markeredgecolor="black", label=f"{name}: suggested {s:.2e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss")
    ax.set_title("LR range test")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return save_figure(fig, out)


def thumbnails(images: list[np.ndarray], titles: list[str], out: Path, cols: int = 5) -> Path:
    """A grid of uint8 images (H,W,3 or H,W) with small titles, for reviewing errors."""
    if not images:
        return _message(out, "no images")
    cols = max(1, min(cols, len(images)))
    rows = math.ceil(len(images) / cols)
    fig = Figure(figsize=(2.2 * cols, 2.4 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for i, ax in enumerate(axes):
        ax.set_axis_off()
        if i >= len(images):
            continue
        img = np.asarray(images[i])
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255)
        if i < len(titles):
            ax.set_title(titles[i], fontsize=7)
    return save_figure(fig, out)
