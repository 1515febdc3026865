"""A finished run's evaluation as PNGs plus one Markdown report (`report.md`).

The evaluation dict `ev` is computed elsewhere; this module only renders it. Every section is
optional: a missing or None key skips its section, so partial evaluations still give a report.
"""
from __future__ import annotations

import math
from pathlib import Path

from ftlab import plots

HEADLINE = ("accuracy", "balanced_accuracy", "macro_f1", "ece")
METRIC_ORDER = ("accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "loss",
                "roc_auc", "pr_auc", "ece")
PER_CLASS_COLS = ("precision", "recall", "f1", "support", "roc_auc", "pr_auc")
SLICE_COLS = ("n", "accuracy", "macro_f1", "balanced_accuracy")
SNIPPET_CHARS = 120
IMAGE_NAMES = {"training_curves": "training_curves.png", "confusion_matrix": "confusion_matrix.png",
               "reliability": "reliability.png", "slices": "slices.png", "errors": "errors.png",
               "lr_find": "lr_find.png"}


def fmt(v) -> str:
    """Numbers to 4 decimals (ints as ints), None as 'n/a', anything else as a table-safe cell."""
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4f}"
    return cell(str(v))


def cell(text: str, limit: int | None = None) -> str:
    """Escape `|` and flatten newlines so text can't break a Markdown table row."""
    text = " ".join(str(text).split())
    if limit is not None and len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("|", "\\|")


def table(header: list[str], rows: list[list]) -> list[str]:
    """A Markdown table; cells are formatted with `fmt` unless already strings."""
    def line(cells):
        return "| " + " | ".join(c if isinstance(c, str) else fmt(c) for c in cells) + " |"
    return [line([cell(h) for h in header]), "|" + "---|" * len(header),
            *(line(r) for r in rows), ""]


def _image(images: dict[str, str], role: str, alt: str) -> list[str]:
    return [f"![{alt}]({images[role]})", ""] if images.get(role) else []


def _summary(ev: dict) -> list[str]:
    metrics = ev.get("metrics") or {}
    parts = [f"{k} {fmt(metrics[k])}" for k in HEADLINE if k in metrics]
    lines = [f"**Summary**: {', '.join(parts)}", ""] if parts else []
    w = ev.get("worst_slice")
    if w:
        lines += [f"**Worst slice**: {cell(w.get('column'))}={cell(w.get('value'))} "
                  f"({w.get('metric', 'score')} {fmt(w.get('score'))} vs {fmt(w.get('overall'))}"
                  f" overall, n={fmt(w.get('n'))})", ""]
    return lines


def _metrics(metrics: dict) -> list[str]:
    keys = [k for k in METRIC_ORDER if k in metrics] + [k for k in metrics if k not in METRIC_ORDER]
    return ["## Metrics", "", *table(["metric", "value"], [[k, metrics[k]] for k in keys])]


def _per_class(per_class: dict) -> list[str]:
    cols = [c for c in PER_CLASS_COLS if any(c in m for m in per_class.values())]
    rows = [[cell(name), *(m.get(c) for c in cols)] for name, m in per_class.items()]
    return ["## Per class", "", *table(["class", *cols], rows)]


def _confusion(cm: list[list[int]], names: list[str]) -> list[str]:
    names = [str(n) for n in names] or [str(i) for i in range(len(cm))]
    rows = [[cell(names[i]) if i < len(names) else str(i), *r] for i, r in enumerate(cm)]
    return ["## Confusion matrix", "", "Rows are true classes, columns predicted.", "",
            *table(["true / pred", *names], rows)]


def _confused_pairs(pairs: list[dict]) -> list[str]:
    rows = [[cell(p.get("true")), cell(p.get("pred")), p.get("count")] for p in pairs]
    return ["### Most confused pairs", "", *table(["true", "predicted", "count"], rows)]


def _slices(slices: dict) -> list[str]:
    rows = [[cell(col), cell(val), *(m.get(c) for c in SLICE_COLS)]
            for col, values in slices.items() for val, m in values.items()]
    return ["## Slices", "", *table(["column", "value", *SLICE_COLS], rows)]


def _tasks(tasks: dict) -> list[str]:
    """Every task's metrics, then per slice value (task x environment)."""
    rows, srows = [], []
    for name, t in tasks.items():
        m = {k: v for k, v in t["metrics"].items() if "/" not in k}
        rows.append([name, t["type"], t["n"], ", ".join(f"{k} {fmt(v)}" for k, v in m.items())])
        for col, vals in t["slices"].items():
            for value, sm in vals.items():
                srows.append([name, f"{col}={value}", sm["n"], ", ".join(
                    f"{k} {fmt(v)}" for k, v in sm.items() if k != "n")])
    lines = ["## Tasks", "", *table(["task", "type", "labeled", "metrics"], rows)]
    if srows:
        lines += ["", "### Tasks per slice", "", *table(["task", "slice", "n", "metrics"], srows)]
    return lines


def _baselines(baselines: dict) -> list[str]:
    cols: list[str] = []
    for m in baselines.values():
        cols += [k for k in m if k not in cols]
    rows = [[cell(name), *(m.get(c) for c in cols)] for name, m in baselines.items()]
    return ["## Baselines", "", *table(["model", *cols], rows)]


def _threshold(t: dict) -> list[str]:
    rows = [["at argmax", "argmax", t.get("default_cost"), t.get("default_precision"),
             t.get("default_recall")],
            ["at cost-optimal threshold", t.get("threshold"), t.get("cost"), t.get("precision"),
             t.get("recall")]]
    note = (f"Positive class `{cell(t.get('positive'))}`; a false negative costs "
            f"{fmt(t.get('false_negative'))}, a false positive {fmt(t.get('false_positive'))}.")
    return ["## Decision threshold", "", note, "",
            *table(["decision", "threshold", "cost", "precision", "recall"], rows)]


def _cost(c: dict) -> list[str]:
    mb = c["disk_bytes"] / 1e6 if c.get("disk_bytes") is not None else None
    lines = ["## Cost", "", *table(["params", "disk (MB)", "device"],
                                   [[c.get("params"), mb, cell(c.get("device"))]])]
    latency = c.get("latency") or {}
    if latency:
        rows = [[str(bs), m.get("p50_ms"), m.get("p95_ms"), m.get("throughput")]
                for bs, m in latency.items()]
        lines += table(["batch size", "p50 (ms)", "p95 (ms)", "throughput (/s)"], rows)
    return lines


def _error_table(title: str, items: list[dict]) -> list[str]:
    snippets = any("snippet" in e for e in items)
    header = ["id", "true", "pred", "confidence"] + (["snippet"] if snippets else [])
    rows = [[cell(e.get("id")), cell(e.get("true")), cell(e.get("pred")), e.get("confidence"),
             *([cell(e.get("snippet", ""), SNIPPET_CHARS)] if snippets else [])] for e in items]
    return [f"### {title}", "", *table(header, rows)]


def _errors(errors: dict, images: dict[str, str]) -> list[str]:
    lines = ["## Error review", ""]
    if errors.get("confident_mistakes"):
        lines += _error_table("Confident mistakes", errors["confident_mistakes"])
    if errors.get("unsure_correct"):
        lines += _error_table("Unsure but correct", errors["unsure_correct"])
    return lines + _image(images, "errors", "error thumbnails")


def write_report(out_dir: Path, ev: dict, images: dict[str, str], title: str) -> Path:
    """Write `out_dir/report.md` from `ev`, embedding the PNGs named in `images` (by role)."""
    out_dir = Path(out_dir)
    lines = [f"# {title}", ""]
    meta = [f"{k}: `{cell(ev[k])}`" for k in ("split", "n", "checkpoint") if ev.get(k) is not None]
    if meta:
        lines += [" · ".join(meta), ""]
    lines += _summary(ev)
    if ev.get("metrics"):
        lines += _metrics(ev["metrics"])
    lines += _image(images, "training_curves", "training curves")
    lines += _image(images, "lr_find", "LR range test")
    if ev.get("per_class"):
        lines += _per_class(ev["per_class"])
    if ev.get("confusion"):
        lines += _confusion(ev["confusion"], ev.get("class_names") or [])
    lines += _image(images, "confusion_matrix", "confusion matrix")
    if ev.get("confused_pairs"):
        lines += _confused_pairs(ev["confused_pairs"])
    lines += _image(images, "reliability", "reliability diagram")
    if ev.get("slices"):
        lines += _slices(ev["slices"])
    lines += _image(images, "slices", "metric per slice")
    if ev.get("tasks"):
        lines += _tasks(ev["tasks"])
    sections = (("baselines", _baselines), ("threshold", _threshold), ("cost", _cost))
    for key, render in sections:
        if ev.get(key):
            lines += render(ev[key])
    if ev.get("errors") or images.get("errors"):
        lines += _errors(ev.get("errors") or {}, images)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def _reliability_bins(ev: dict) -> tuple[list[dict], float | None]:
    """`ev["calibration"]` ({"bins", "ece"} or a bare bin list); ECE falls back to metrics."""
    rel = ev.get("calibration")
    bins = rel.get("bins", []) if isinstance(rel, dict) else list(rel or [])
    ece = rel.get("ece") if isinstance(rel, dict) else None
    return bins, ece if ece is not None else (ev.get("metrics") or {}).get("ece")


def render_all(out_dir: Path, ev: dict, rows: list[dict] | None,
               phase_names: list[str] | None = None,
               thumbs: tuple[list, list] | None = None) -> dict[str, str]:
    """Draw every figure `ev` / `rows` have data for into `out_dir`; returns role -> file name.

    Args:
      out_dir: folder for the PNGs (created if missing).
      ev: the evaluation dict; uses "confusion" + "class_names", "calibration" (bins),
        "slices", "lr_find" (curves per param group).
      rows: lines of `metrics.jsonl`; None skips the training curves.
      phase_names: labels for the phase boundaries in the training curves.
      thumbs: (images, titles) for the error-review grid.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images: dict[str, str] = {}

    def draw(role: str, fn, *args, **kwargs) -> None:
        fn(*args, out_dir / IMAGE_NAMES[role], **kwargs)
        images[role] = IMAGE_NAMES[role]

    if rows is not None:
        draw("training_curves", plots.training_curves, rows, phase_names=phase_names)
    if ev.get("confusion"):
        draw("confusion_matrix", plots.confusion_matrix, ev["confusion"],
             ev.get("class_names") or [])
    bins, ece = _reliability_bins(ev)
    if bins:
        draw("reliability", plots.reliability, bins, ece)
    if ev.get("slices"):
        draw("slices", plots.slice_bars, ev["slices"], "macro_f1")
    if ev.get("lr_find"):
        draw("lr_find", plots.lr_find, ev["lr_find"])
    if thumbs is not None:
        draw("errors", plots.thumbnails, thumbs[0], thumbs[1])
    return images
