"""`ftlab-monitor`: a window of the prediction log against the model's reference.

Reads the rows one model version logged (optionally one stream, since a time, the newest
N), runs the checks of `ftlab.drift.assess` against `<model dir>/reference.npz` and writes
`drift.json`, `report.md` and `drift.png`. The CLI exits 1 when drift is flagged, so a
scheduler (cron, SLURM) can trigger labeling or retraining on it.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
import time
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from ftlab import drift, predlog
from ftlab.app_schema import DriftThresholds, MonitorAppConfig
from ftlab.plots import ACCENT, BASE, save_figure
from ftlab.schema import ConfigError


def log_path(log: str | None, root: str) -> Path:
    """The prediction log (`log`, else `<registry root>/predictions.db`), which must exist."""
    path = Path(log) if log else Path(root) / "predictions.db"
    if not path.is_file():
        raise ConfigError("log", f"{path} does not exist; ftlab-predict writes it (or set "
                                 "log=<path to the prediction log>)")
    return path


def parse_since(since: str | None) -> float | None:
    """An ISO time as unix seconds (a time without a zone is UTC, like the log)."""
    if since is None:
        return None
    try:
        t = dt.datetime.fromisoformat(str(since))
    except ValueError:
        raise ConfigError("since", f"'{since}' is not an ISO time; e.g. since=2025-01-31 or "
                                   "since=2025-01-31T12:00:00Z") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return t.timestamp()


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(float(ts), dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def read_window(log: Path, model: str, version: str, *, stream: str | None = None,
                since: float | None = None, last: int | None = None) -> predlog.Window:
    """The model version's rows; an empty window is an error naming the filter to change."""
    win = predlog.read(log, model=model, version=version, stream=stream, since=since,
                       last=last)
    if len(win):
        return win
    con = predlog.connect(log)
    try:
        models = con.execute("SELECT model, version, COUNT(*) FROM predictions "
                             "GROUP BY model, version").fetchall()
        streams = [s for (s,) in con.execute(
            "SELECT DISTINCT stream FROM predictions WHERE model = ? AND version = ?",
            (model, version))]
    finally:
        con.close()
    if not streams:
        known = ", ".join(f"{m} v{v} ({n} rows)" for m, v, n in models) or "none"
        raise ConfigError("ref", f"{log} has no rows of {model} version {version}; run "
                                   f"ftlab-predict with it first (logged: {known})")
    if stream is not None and stream not in streams:
        raise ConfigError("stream", f"{model} v{version} has no rows of stream '{stream}'; "
                                    f"its streams: {', '.join(streams)}")
    raise ConfigError("since", f"no rows of {model} v{version} logged at or after "
                               f"{_iso(since)}; give an earlier time")


def _check_thresholds(th: DriftThresholds) -> None:
    for key in ("psi", "class_mix_psi", "accuracy_drop"):
        if getattr(th, key) < 0:
            raise ConfigError(f"thresholds.{key}", f"{getattr(th, key)} is negative; give a "
                                                   "value >= 0")
    if not 0 < th.pvalue <= 1:
        raise ConfigError("thresholds.pvalue", f"{th.pvalue} is not in (0, 1]; e.g. 0.01")
    if th.min_rows < 1:
        raise ConfigError("thresholds.min_rows", f"{th.min_rows} < 1; give a row count")


def _out_dir(app: MonitorAppConfig, log: Path, name: str, version: str) -> Path:
    if app.out:
        return Path(app.out)
    label = (f"{name}-v{version}" if version != "run" else "_".join(Path(name).parts[-2:]))
    label = re.sub(r"[^A-Za-z0-9._-]+", "_", label)
    return log.parent / "monitor" / f"{label}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"


def run_app(app: MonitorAppConfig) -> dict:
    """Assess the window `app` names; write drift.json, report.md, drift.png; return the
    assessment with `out`, `model`, `version` and the window's description."""
    _check_thresholds(app.thresholds)
    if app.last is not None and app.last < 1:
        raise ConfigError("last", f"{app.last} < 1; give the number of newest rows, or drop it")
    since = parse_since(app.since)
    log = log_path(app.log, app.registry)
    from ftlab.registry import locate
    model_dir, name, version = locate(app.ref, app.registry)
    ref_path = Path(model_dir) / "reference.npz"
    if not ref_path.is_file():
        raise ConfigError("ref", f"{model_dir} has no reference.npz; run ftlab-predict "
                                   f"ref={app.ref} (it records the reference) or register "
                                   "the model with ftlab-registry register")
    ref = predlog.load_reference(ref_path)
    win = read_window(log, name, version, stream=app.stream, since=since, last=app.last)
    if win.proj.shape[1] != ref.proj.shape[1]:
        raise ConfigError("ref", f"the logged rows have {win.proj.shape[1]} embedding "
                                   f"projections, {ref_path} has {ref.proj.shape[1]}: the "
                                   "reference was rewritten; log the window again with "
                                   "ftlab-predict")
    res = drift.assess(ref, win, app.thresholds)
    out = _out_dir(app, log, name, version)
    out.mkdir(parents=True, exist_ok=True)
    res.update(model=name, version=version, log=str(log), out=str(out),
               stream=app.stream, streams=sorted(set(win.stream.tolist())),
               first_logged=_iso(win.ts.min()), last_logged=_iso(win.ts.max()),
               thresholds=dataclasses.asdict(app.thresholds))
    (out / "drift.json").write_text(json.dumps(res, indent=2))
    (out / "report.md").write_text(report(res))
    figure(ref, win, res, out / "drift.png")
    return res


def report(res: dict) -> str:
    """The markdown report: verdict, per-check table, class mix, accuracy."""
    who = res["model"] + (f" v{res['version']}" if res["version"] != "run" else "")
    flagged = [c["feature"] for c in res["checks"] if c["flagged"]]
    th = res["thresholds"]
    lines = [f"# Drift: {who}", "",
             (f"Window: {res['n']} rows ({res['first_logged']} to {res['last_logged']}; "
              f"streams: {', '.join(res['streams'])}), {res['labeled']} with labels. "
              f"Reference: {res['n_reference']} validation rows."), "",
             f"**{'Drift' if res['drift'] else 'No drift'}**"
             + (f": {', '.join(flagged)}." if flagged else "."), ""]
    if res["small_window"]:
        lines += [(f"The window has fewer than min_rows = {th['min_rows']} rows: reported, "
                   "never flagged."), ""]
    lines += [("A check is flagged when its effect size reaches its threshold and its test "
               f"gives p < {res['alpha']:.3g} (pvalue {th['pvalue']:g} / "
               f"{len(res['checks'])} checks), with at least {th['min_rows']} rows."), "",
              ("| check | statistic | value | threshold | test | test statistic | p-value | "
               "rows | flagged |"), "|---|---|---|---|---|---|---|---|---|"]
    for c in res["checks"]:
        lines.append(f"| {c['feature']} | {c['statistic']} | {c['value']:.4f} | "
                     f"{c['threshold']:g} | {c['test']} | {c['test_statistic']:.4g} | "
                     f"{c['pvalue']:.3g} | {c['n']} | {'**yes**' if c['flagged'] else 'no'} |")
    mix = res["class_mix"]
    lines += ["", "## Predicted-class mix", "", "| class | reference | window | change |",
              "|---|---|---|---|"]
    for name, r, w in zip(mix["classes"], mix["reference"], mix["window"]):
        lines.append(f"| {name} | {r:.3f} | {w:.3f} | {w - r:+.3f} |")
    acc = res["accuracy"]
    lines += ["", "## Accuracy", ""]
    if acc is None:
        lines.append("No labels have arrived for these rows.")
    else:
        lines += ["| | rows | accuracy |", "|---|---|---|",
                  f"| reference | {acc['n_reference']} | {acc['reference']:.4f} |",
                  f"| window (labeled rows) | {acc['n']} | {acc['window']:.4f} |", "",
                  f"Drop {acc['drop']:+.4f} (one-sided Fisher exact p = {acc['pvalue']:.3g})."]
    lines += ["", "![drift](drift.png)"]
    return "\n".join(lines) + "\n"


def figure(ref: predlog.Reference, win: predlog.Window, res: dict, out: Path) -> Path:
    """Histograms (reference vs window, densities) of confidence and each projection, and
    the class mix as paired bars; flagged panels' titles in the accent colour."""
    ref_conf = predlog.uncertainty(ref.probs)["confidence"]
    feats = [("confidence", ref_conf, win.confidence)] + [
        (f"pc{j + 1}", ref.proj[:, j], win.proj[:, j]) for j in range(ref.proj.shape[1])]
    flags = {c["feature"]: c for c in res["checks"]}
    acc = res["accuracy"]
    panels = len(feats) + 1 + (acc is not None)
    cols = min(3, panels)
    rows = -(-panels // cols)
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows), layout="constrained")
    for i, (name, r, w) in enumerate(feats):
        ax = fig.add_subplot(rows, cols, i + 1)
        lo, hi = min(r.min(), w.min()), max(r.max(), w.max())
        bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, 31)
        ax.hist(r, bins=bins, density=True, alpha=0.5, color=BASE, label="reference")
        ax.hist(w, bins=bins, density=True, alpha=0.5, color=ACCENT, label="window")
        c = flags[name]
        ax.set_title(f"{name}: PSI {c['value']:.2f}, KS p {c['pvalue']:.2g}", fontsize=10,
                     color=ACCENT if c["flagged"] else "black")
        ax.legend(fontsize=8)
    ax = fig.add_subplot(rows, cols, len(feats) + 1)
    mix, c = res["class_mix"], flags["class mix"]
    x = np.arange(len(mix["classes"]))
    ax.bar(x - 0.2, mix["reference"], 0.4, color=BASE, label="reference")
    ax.bar(x + 0.2, mix["window"], 0.4, color=ACCENT, label="window")
    long = max((len(s) for s in mix["classes"]), default=0) > 6
    ax.set_xticks(x, mix["classes"], rotation=45 if long else 0, ha="right" if long else "center")
    ax.set_ylabel("share of predictions")
    ax.set_title(f"class mix: PSI {c['value']:.2f}, chi2 p {c['pvalue']:.2g}", fontsize=10,
                 color=ACCENT if c["flagged"] else "black")
    ax.legend(fontsize=8)
    if acc is not None:
        ax = fig.add_subplot(rows, cols, panels)
        c = flags["accuracy"]
        ax.bar([0, 1], [acc["reference"], acc["window"]], 0.6, color=[BASE, ACCENT])
        ax.set_xticks([0, 1], [f"reference\n({acc['n_reference']})",
                               f"window, labeled\n({acc['n']})"])
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy")
        ax.set_title(f"accuracy: drop {c['value']:+.3f}, Fisher p {c['pvalue']:.2g}",
                     fontsize=10, color=ACCENT if c["flagged"] else "black")
    return save_figure(fig, out)


def summary(res: dict) -> str:
    """A few lines for the terminal: verdict, flagged checks, where the report is."""
    who = res["model"] + (f" v{res['version']}" if res["version"] != "run" else "")
    flagged = [c for c in res["checks"] if c["flagged"]]
    lines = [f"{who}: {res['n']} rows vs {res['n_reference']} reference rows: "
             + (f"DRIFT in {len(flagged)} of {len(res['checks'])} checks" if flagged
                else f"no drift ({len(res['checks'])} checks)")]
    for c in flagged:
        lines.append(f"  {c['feature']}: {c['statistic']} {c['value']:.3f} >= "
                     f"{c['threshold']:g}, {c['test']} p {c['pvalue']:.2g}")
    if res["small_window"]:
        lines.append(f"  window < min_rows ({res['thresholds']['min_rows']}): reported, "
                     "not flagged")
    out = Path(res["out"])
    lines.append(f"report: {out / 'report.md'} ({out / 'drift.png'}, {out / 'drift.json'})")
    return "\n".join(lines)
