"""The evaluation report of a model on one split: metrics from scikit-learn, slices, error
review, cost-aware threshold, baselines side by side, inference cost, PNGs and report.md.

Runs at the end of training (on the best checkpoint) and from `ftlab-eval` on a finished
run dir, through the same `evaluate_model`, so both give the same numbers.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
from flax import nnx

from ftlab import analysis, metrics, tasks
from ftlab.data.batches import ArrayData, batches
from ftlab.data.prepare import Prepared
from ftlab.loop import predict
from ftlab.schema import Config, ConfigError, EvalConfig
from ftlab.step import make_eval_step, set_modes

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Predictions:
    """One split's model outputs with what the report needs to explain them."""
    ids: np.ndarray
    labels: np.ndarray
    probs: np.ndarray  # (N, C)
    columns: dict[str, np.ndarray]  # slice columns, aligned with rows
    texts: list[str] | None = None
    images: np.ndarray | None = None
    tasks: list | None = None  # multi-task: every task's spec (ftlab.tasks.Task) ...
    outputs: dict[str, np.ndarray] | None = None  # ... raw outputs ...
    targets: dict[str, np.ndarray] | None = None  # ... and targets, by task name


@dataclasses.dataclass
class Source:
    """A split's raw material: prepared inputs plus the examples' columns and texts."""
    data: Prepared
    rows: dict[str, np.ndarray]  # split name -> example indices (Split.parts)
    columns: dict[str, np.ndarray]  # every column of the examples
    texts: list[str] | None


def slice_columns(cfg: EvalConfig, env: str | None, known: dict) -> list[str]:
    """dataset.env (if any) then eval.slices, each checked to exist."""
    names = ([env] if env else []) + [c for c in cfg.slices if c != env]
    for name in names:
        if name not in known:
            raise ConfigError("eval.slices", f"no column '{name}' to slice by; columns: "
                                             f"{', '.join(known) or 'none'}")
    return names


def check(cfg: EvalConfig, class_names: list[str]) -> None:
    """Config checks that need only the class list."""
    c = cfg.cost
    if c.positive is not None and c.positive not in class_names:
        raise ConfigError("eval.cost.positive", f"'{c.positive}' is not a class; classes: "
                                                f"{', '.join(class_names)}")
    if c.false_negative < 0 or c.false_positive < 0:
        raise ConfigError("eval.cost", "false_negative and false_positive must be >= 0")
    if cfg.calibration_bins < 1 or cfg.top_errors < 0:
        raise ConfigError("eval.calibration_bins", "needs >= 1 bins and top_errors >= 0")
    if any(b < 1 for b in cfg.latency_batch_sizes) or cfg.latency_iters < 1:
        raise ConfigError("eval.latency_batch_sizes", "batch sizes and latency_iters must "
                                                      "be >= 1")


def predictions(eval_fn, state, src: Source, split: str, slices: list[str], batch_size: int,
                limit: int | None) -> Predictions:
    outs, labels = predict(eval_fn, state, src.data.parts[split], batch_size, limit)
    specs = src.data.tasks
    n = len(labels)
    rows = src.rows[split][:n]
    arrays = src.data.parts[split].arrays
    images = arrays.get("image")
    multi = isinstance(outs, dict)
    return Predictions(
        src.data.ids[split][:n], labels, metrics.softmax(tasks.primary(outs, specs)),
        {c: np.asarray(src.columns[c])[rows] for c in slices},
        None if src.texts is None else [src.texts[i] for i in rows],
        None if images is None else images[:n],
        specs if multi else None, outs if multi else None,
        {t.name: arrays[t.key][:n] for t in specs} if multi else None)


def assess(cfg: EvalConfig, pred: Predictions, class_names: list[str],
           val: Predictions | None = None) -> dict:
    """Everything computed from predictions alone (no model needed)."""
    ev = {"n": int(len(pred.labels)), "class_names": list(class_names),
          **metrics.full(pred.probs, pred.labels, class_names, cfg.calibration_bins)}
    ev["slices"] = analysis.slice_metrics(pred.probs, pred.labels, pred.columns)
    ev["worst_slice"] = analysis.worst_slice(ev["slices"], ev["metrics"])
    ev["confused_pairs"] = analysis.confused_pairs(ev["confusion"], class_names)
    ev["errors"] = analysis.review(pred.probs, pred.labels, pred.ids, class_names,
                                   cfg.top_errors, pred.texts)
    if pred.outputs is not None:
        ev["tasks"] = {t.name: task_report(t, pred) for t in pred.tasks}
    ev["threshold"] = None
    if len(class_names) == 2 and val is not None:
        c = cfg.cost
        pos = class_names.index(c.positive) if c.positive else \
            int(np.argmin(np.bincount(val.labels, minlength=2)))
        ev["threshold"] = {"positive": class_names[pos], **metrics.cost_threshold(
            val.probs, val.labels, pred.probs, pred.labels, pos, c.false_negative,
            c.false_positive)}
    return ev


def task_report(task, pred: Predictions) -> dict:
    """One task's metrics overall and per slice (the multi-task table of the report)."""
    out, y = pred.outputs[task.name], pred.targets[task.name]
    m = tasks.task_metrics(task, out, y)
    labeled = int((np.isfinite(y) if task.type == "regression" else
                   (y >= 0).all(-1) if y.ndim > 1 else y >= 0).sum())
    return {"type": task.type, "n": labeled, "metrics": m,
            "slices": tasks.slice_metrics(task, out, y, pred.columns)}


def baselines(cfg: Config, src: Source, pred: Predictions, ev: dict) -> dict:
    """Majority class, a non-deep model on raw inputs and a linear probe on the pretrained
    backbone's features, each fit on train (C chosen on val), scored on `pred`'s rows."""
    from ftlab import baselines as bl
    from ftlab.train import build_model
    parts, k = src.data.parts, src.data.num_classes
    n = len(pred.labels)
    y = {s: parts[s].arrays["label"] for s in ("train", "val")}
    out = {}

    def score(name, probs, info=None):
        m = metrics.full(probs, pred.labels, ev["class_names"])["metrics"]
        out[name] = {key: m[key] for key in ("accuracy", "balanced_accuracy", "macro_f1",
                                             "weighted_f1", "roc_auc")}
        if info and "C" in info:
            out[name]["info"] = f"C={info['C']:g}"

    majority = np.bincount(y["train"], minlength=k).argmax()
    score("majority", np.eye(k)[np.full(n, majority)])
    if src.texts is not None:
        t = {s: [src.texts[i] for i in src.rows[s]] for s in ("train", "val")}
        score("tfidf_logreg", *bl.tfidf_logreg(t["train"], y["train"], t["val"], y["val"],
                                               pred.texts, k, seed=cfg.trainer.seed))
    elif "image" in parts["train"].arrays:
        im = {s: parts[s].arrays["image"] for s in ("train", "val")}
        score("pixel_logreg", *bl.pixel_logreg(im["train"], y["train"], im["val"], y["val"],
                                               pred.images, k, seed=cfg.trainer.seed))
    elif "input_ids" in parts["train"].arrays:
        x = {s: parts[s].arrays["input_ids"].astype(np.float32) for s in ("train", "val")}
        test_x = parts[ev["split"]].arrays["input_ids"][:n].astype(np.float32)
        score("raw_logreg", *bl.linear_probe(x["train"], y["train"], x["val"], y["val"],
                                             test_x, num_classes=k, seed=cfg.trainer.seed))
    if cfg.model.source is not None:
        model = build_model(dataclasses.replace(cfg, peft=dataclasses.replace(
            cfg.peft, lora={}, adapters={})), k)  # the pretrained weights, untouched
        bs = cfg.trainer.eval_batch_size
        f = {s: bl.features(model, parts[s], bs) for s in ("train", "val")}
        test_f = bl.features(model, _head(parts[ev["split"]], n), bs)
        score("linear_probe", *bl.linear_probe(f["train"], y["train"], f["val"], y["val"],
                                               test_f, num_classes=k, seed=cfg.trainer.seed))
    out["fine_tuned"] = {key: ev["metrics"][key] for key in
                         ("accuracy", "balanced_accuracy", "macro_f1", "weighted_f1",
                          "roc_auc")}
    return out


def _head(data: ArrayData, n: int) -> ArrayData:
    return ArrayData({k: v[:n] for k, v in data.arrays.items()})


def cost(cfg: EvalConfig, eval_fn, state, data: ArrayData, model, ckpt_dir: Path | None) -> dict:
    from ftlab import latency
    example = next(batches(data, max(cfg.latency_batch_sizes), np.arange(len(data))))
    example = {k: v for k, v in example.items() if k not in ("label", "weight")}
    lat = latency.measure(eval_fn, state, example, tuple(cfg.latency_batch_sizes),
                          cfg.latency_iters)
    device = lat.pop("device", None)
    return {"params": latency.param_count(nnx.state(model, nnx.Param)),
            "disk_bytes": latency.disk_bytes(ckpt_dir) if ckpt_dir else None,
            "device": device, "latency": lat}


def evaluate_model(cfg: Config, model, src: Source, split: str, out_dir: Path, *,
                   ecfg: EvalConfig | None = None, ckpt_dir: Path | None = None,
                   env: str | None = None, curves: list[dict] | None = None,
                   title: str = "", checkpoint: str = "best") -> dict:
    """Evaluate `model` (in inference mode) on `split` of `src` and write the report.
    `ev["val_metrics"]` holds the per-epoch metric set on val (predicted once, also used to
    pick the cost-aware threshold)."""
    ecfg = ecfg or cfg.eval
    class_names = src.data.class_names
    check(ecfg, class_names)
    slices = slice_columns(ecfg, env, src.columns)
    set_modes(model, None)
    eval_fn, state = make_eval_step(nnx.graphdef(model)), nnx.state(model)
    bs, limit = cfg.trainer.eval_batch_size, cfg.trainer.limit_eval_batches
    pred = predictions(eval_fn, state, src, split, slices, bs, limit)
    val = predictions(eval_fn, state, src, "val", slices, bs, limit) \
        if "val" in src.data.parts and split != "val" else None
    ev = {"split": split, "checkpoint": checkpoint, **assess(ecfg, pred, class_names, val)}
    if val is not None:
        ev["val_metrics"] = metrics.from_probs(val.probs, val.labels, class_names)
    if ecfg.baselines and "train" in src.data.parts and "val" in src.data.parts:
        ev["baselines"] = baselines(cfg, src, pred, ev)
    if ecfg.latency:
        ev["cost"] = cost(ecfg, eval_fn, state, src.data.parts[split], model, ckpt_dir)
    write(Path(out_dir), ev, pred, ecfg, curves, list(cfg.schedule.phases), title)
    return ev


def write(out_dir: Path, ev: dict, pred: Predictions, cfg: EvalConfig,
          curves: list[dict] | None, phase_names: list[str], title: str) -> Path:
    """eval.json, predictions.csv and, with plots on, the PNGs and report.md."""
    from ftlab import report
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps(ev, indent=2))
    names = ev["class_names"]
    with open(out_dir / "predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "label", "pred", *pred.columns, *(f"p_{c}" for c in names)])
        for i in range(len(pred.labels)):
            w.writerow([pred.ids[i], names[pred.labels[i]], names[pred.probs[i].argmax()],
                        *(pred.columns[c][i] for c in pred.columns),
                        *(f"{p:.6f}" for p in pred.probs[i])])
    images = {}
    if cfg.plots:
        thumbs = None
        if pred.images is not None and ev["errors"]["confident_mistakes"]:
            items = ev["errors"]["confident_mistakes"]
            thumbs = ([pred.images[e["row"]] for e in items],
                      [f"{e['id']}\n{e['true']}→{e['pred']} {e['confidence']:.2f}"
                       for e in items])
        images = report.render_all(out_dir, ev, curves, phase_names, thumbs)
    path = report.write_report(out_dir, ev, images, title)
    log.info("evaluation report: %s", path)
    return path


def read_curves(run_dir: Path) -> list[dict] | None:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return None
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


HEADLINE = {"classification": "macro_f1", "regression": "mae", "multi_label": "micro_f1"}


def summary_table(ev: dict) -> str:
    """Plain text: each task's headline metric overall and per value of the first slice
    column (the environment): the table `ftlab-train` prints at the end."""
    rows_in = ev.get("tasks") or {"label": {"type": "classification", "metrics": ev["metrics"],
                                            "slices": ev.get("slices") or {}}}
    first = next(iter(rows_in.values()))
    col = next(iter(first["slices"]), None)
    values = sorted(first["slices"][col]) if col else []
    header = ["task", "metric", "all", *(f"{col}={v}" for v in values)]
    rows = [header]
    for name, t in rows_in.items():
        m = HEADLINE[t["type"]]
        cells = [t["metrics"].get(m)] + [t["slices"][col].get(v, {}).get(m) for v in values]
        rows.append([name, m, *("-" if c is None else f"{c:.3f}" for c in cells)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def slice_headline(ev: dict, prefix: str) -> dict:
    """`<prefix>/<column>=<value>/accuracy|macro_f1` of every slice (e.g. per environment)."""
    return {f"{prefix}/{col}={v}/{k}": m[k] for col, vals in (ev.get("slices") or {}).items()
            for v, m in vals.items() for k in ("accuracy", "macro_f1") if k in m}


def headline(ev: dict, split: str) -> dict:
    """The flat numbers of an evaluation for results.json and the wandb summary."""
    out = {f"{split}/{k}": v for k, v in ev["metrics"].items()}
    for name, t in (ev.get("tasks") or {}).items():
        out.update({f"{split}/{name}/{k}": v for k, v in t["metrics"].items()})
    out.update({f"{split}/recall/{c}": m["recall"] for c, m in ev["per_class"].items()})
    out.update(slice_headline(ev, split))
    w = ev.get("worst_slice")
    if w:
        out[f"{split}/worst_slice"] = f"{w['column']}={w['value']}"
        out[f"{split}/worst_slice/{w['metric']}"] = w["score"]
    for name, m in (ev.get("baselines") or {}).items():
        out[f"baseline/{name}/macro_f1"] = m["macro_f1"]
    t = ev.get("threshold")
    if t:
        out.update({f"{split}/threshold": t["threshold"], f"{split}/threshold/cost": t["cost"],
                    f"{split}/threshold/recall": t["recall"]})
    for b, lat in ((ev.get("cost") or {}).get("latency") or {}).items():
        out[f"latency/b{b}_p50_ms"] = lat["p50_ms"]
    return out
