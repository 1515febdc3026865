"""Active learning (`ftlab-select`): the logged inputs to label next, as a CSV for annotators.

Uncertainty comes from the columns the log already holds (confidence, margin, entropy), so
selection needs no model. With `diversity`, k-center greedy over the logged embedding
projections picks spread-out samples among the most uncertain, so the queue is not one tight
cluster of near-duplicates. The CSV's empty `label` column is what annotators fill;
`ftlab-retrain labels=<that CSV>` takes it back.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from ftlab.app_schema import SelectAppConfig
from ftlab.monitor import log_path, read_window
from ftlab.predlog import Window
from ftlab.schema import ConfigError

STRATEGIES = ("least_confidence", "margin", "entropy")
COLUMNS = ("rank", "sample_id", "stream", "input", "env", "pred_name", "confidence", "margin",
           "entropy", "score", "label")


def scores(window: Window, strategy: str) -> np.ndarray:
    """Uncertainty per row, higher = less sure: 1 - confidence (least_confidence), 1 - margin
    between the top two probabilities (margin), or the entropy in nats (entropy)."""
    if strategy == "least_confidence":
        return 1.0 - window.confidence
    if strategy == "margin":
        return 1.0 - window.margin
    if strategy == "entropy":
        return window.entropy.astype(np.float64)
    raise ConfigError("strategy", f"unknown strategy '{strategy}'; use one of: "
                                  f"{', '.join(STRATEGIES)}")


def candidates(window: Window, include_labeled: bool = False) -> np.ndarray:
    """Row indices eligible for labeling: the newest row of each sample id, minus rows whose
    label already arrived (unless `include_labeled`)."""
    newest = {s: i for i, s in enumerate(window.sample_id)}  # oldest first: the last wins
    rows = np.asarray(sorted(newest.values()), np.int64)
    if not include_labeled:
        rows = rows[window.label[rows] < 0]
    return rows


def k_center(points: np.ndarray, k: int) -> list[int]:
    """Greedy k-center: start from point 0, then repeatedly the point farthest from those
    chosen (ties: the lowest index). Points in priority order make ties go to the first."""
    dist = np.linalg.norm(points - points[0], axis=1)
    dist[0] = -np.inf  # chosen points are never picked again, even among duplicates
    chosen = [0]
    while len(chosen) < min(k, len(points)):
        i = int(np.argmax(dist))
        chosen.append(i)
        dist = np.minimum(dist, np.linalg.norm(points - points[i], axis=1))
        dist[i] = -np.inf
    return chosen


def select(window: Window, n: int, strategy: str, diversity: bool = False, pool: int = 5,
           include_labeled: bool = False) -> np.ndarray:
    """Row indices of `window` to label next, in rank order.

    Args:
      window: rows of the prediction log.
      n: how many (fewer if fewer samples are eligible).
      strategy: least_confidence | margin | entropy.
      diversity: k-center greedy over the embedding projections among the `pool * n` most
        uncertain, starting from the most uncertain.
      pool: the diversity candidate pool, in multiples of `n`.
      include_labeled: also consider samples whose label arrived.
    """
    if n < 1:
        raise ConfigError("n", f"{n} < 1; give how many samples to select")
    if pool < 1:
        raise ConfigError("pool", f"{pool} < 1; give the candidate pool as a multiple of n")
    s = scores(window, strategy)
    rows = candidates(window, include_labeled)
    rows = rows[np.argsort(-s[rows], kind="stable")]  # most uncertain first; ties: oldest
    if not diversity:
        return rows[:n]
    if window.proj.shape[1] == 0:
        raise ConfigError("diversity", "the logged rows have no embedding projections; "
                                       "set diversity=false")
    rows = rows[:pool * n]
    return rows[k_center(window.proj[rows], n)] if len(rows) else rows


def write_csv(window: Window, rows: np.ndarray, score: np.ndarray, out: Path) -> Path:
    """The annotators' queue: one line per selected row, `label` left empty."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for rank, i in enumerate(rows, start=1):
            w.writerow([rank, window.sample_id[i], window.stream[i], window.input[i] or "",
                        window.env[i] or "", window.pred_name[i],
                        f"{window.confidence[i]:.6f}", f"{window.margin[i]:.6f}",
                        f"{window.entropy[i]:.6f}", f"{score[i]:.6f}", ""])
    return out


def run_app(app: SelectAppConfig) -> dict:
    """Select `app.n` samples of the model version's logged rows and write `app.out`."""
    if app.strategy not in STRATEGIES:
        raise ConfigError("strategy", f"unknown strategy '{app.strategy}'; use one of: "
                                      f"{', '.join(STRATEGIES)}")
    if app.n < 1:
        raise ConfigError("n", f"{app.n} < 1; give how many samples to select")
    log = log_path(app.log, app.registry)
    from ftlab.registry import locate
    _, name, version = locate(app.ref, app.registry)
    win = read_window(log, name, version, stream=app.stream)
    eligible = len(candidates(win, app.include_labeled))
    if not eligible:
        raise ConfigError("include_labeled", f"all {len(win)} logged rows of {name} already "
                                             "have labels; set include_labeled=true to rank "
                                             "them anyway, or log new inputs")
    rows = select(win, app.n, app.strategy, app.diversity, app.pool, app.include_labeled)
    score = scores(win, app.strategy)
    out = write_csv(win, rows, score, Path(app.out))
    return {"out": str(out), "model": name, "version": version, "strategy": app.strategy,
            "diversity": app.diversity, "n": app.n, "selected": len(rows),
            "eligible": eligible, "rows": len(win),
            "top": [(str(win.sample_id[i]), float(score[i])) for i in rows[:3]]}


def summary(res: dict) -> str:
    """A few lines for the terminal: how many, from how many, where the CSV is."""
    who = res["model"] + (f" v{res['version']}" if res["version"] != "run" else "")
    how = res["strategy"] + (" + diversity" if res["diversity"] else "")
    lines = [(f"{who}: selected {res['selected']} of {res['eligible']} eligible samples "
              f"({res['rows']} logged rows) by {how}")]
    if res["selected"] < res["n"]:
        lines.append(f"  asked for {res['n']}: only {res['eligible']} samples are eligible")
    name = res["model"] if res["version"] != "run" else "<name>"
    lines += ["  first in the queue (score): " + ", ".join(f"{s} ({v:.3f})"
                                                        for s, v in res["top"]),
              (f"queue: {res['out']} (fill its label column, then ftlab-retrain "
               f"ref={name} labels={res['out']})")]
    return "\n".join(lines)
