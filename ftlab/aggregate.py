"""`ftlab-aggregate <sweep dir>`: every finished job's overrides and results in one table
(`jobs.csv`), and each setting's seeds folded into mean ± std (`summary.csv`, `summary.md`).

A job is a directory holding `results.json`; its overrides come from Hydra's
`.hydra/overrides.yaml`. A setting is a job's overrides without the seed keys.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

from ftlab.schema import ConfigError

SEED_KEYS = ("trainer.seed",)
# Overrides that never change what is computed (they may differ between a run and its rerun).
IGNORED = ("trainer.progress", "trainer.halt_after_steps", "logger", "logger.mode", "name")
METRICS = ("test/accuracy", "test/macro_f1", "test/balanced_accuracy", "val/macro_f1",
           "train_seconds")


def _overrides(job: Path) -> dict[str, str]:
    path = job / ".hydra" / "overrides.yaml"
    if not path.exists():
        return {}
    import yaml
    out = {}
    for item in yaml.safe_load(path.read_text()) or []:
        key, _, value = str(item).lstrip("+~").partition("=")
        if key not in IGNORED:
            out[key] = value
    return out


def collect(sweep_dir: Path) -> list[dict]:
    """One row per job under `sweep_dir`: {"job", "overrides", "results"}; sorted by path."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise ConfigError("sweep_dir", f"{sweep_dir} is not a directory; give the sweep dir "
                                       "ftlab-train --multirun wrote "
                                       "(runs/<name>/multirun/<sweep>)")
    jobs = sorted(p.parent for p in sweep_dir.rglob("results.json"))
    if not jobs:
        raise ConfigError("sweep_dir", f"no finished job (results.json) under {sweep_dir}")
    return [{"job": str(j.relative_to(sweep_dir)) or ".", "overrides": _overrides(j),
             "results": json.loads((j / "results.json").read_text())} for j in jobs]


def metric_names(rows: list[dict], wanted=METRICS) -> list[str]:
    """The wanted metrics present in any job, then every other per-task test metric."""
    present = set().union(*(r["results"] for r in rows))
    extra = sorted(k for k in present if k.startswith("test/") and k.count("/") == 2
                   and k.rsplit("/", 1)[-1] in ("macro_f1", "mae", "micro_f1")
                   and not k.startswith("test/recall/"))
    return [m for m in wanted if m in present] + [m for m in extra if m not in wanted]


def summarise(rows: list[dict], metrics: list[str],
              seed_keys=SEED_KEYS) -> list[dict]:
    """Per setting (overrides minus seeds): n, and mean / std (ddof 1) of each metric."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        setting = tuple(sorted((k, v) for k, v in r["overrides"].items() if k not in seed_keys))
        groups.setdefault(setting, []).append(r)
    out = []
    for setting, members in groups.items():
        row = {"setting": ", ".join(f"{k}={v}" for k, v in setting) or "(defaults)",
               "n": len(members),
               "seeds": ",".join(sorted(m["overrides"].get(seed_keys[0], "-")
                                        for m in members))}
        for m in metrics:
            vals = [float(x["results"][m]) for x in members
                    if isinstance(x["results"].get(m), (int, float))]
            row[f"{m} mean"] = float(np.mean(vals)) if vals else math.nan
            row[f"{m} std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else math.nan
        out.append(row)
    return out


def markdown(summary: list[dict], metrics: list[str]) -> str:
    def cell(row, m):
        mean, std = row[f"{m} mean"], row[f"{m} std"]
        if math.isnan(mean):
            return "—"
        return f"{mean:.4f}" if math.isnan(std) else f"{mean:.4f} ± {std:.4f}"
    head = ["setting", "n", *metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join([r["setting"], str(r["n"]), *(cell(r, m) for m in metrics)])
              + " |" for r in summary]
    return "\n".join(lines) + "\n"


def write(sweep_dir: Path, out_dir: Path | None = None) -> tuple[list[dict], Path]:
    """Collect, summarise and write jobs.csv, summary.csv and summary.md into `out_dir`
    (default: the sweep dir)."""
    rows = collect(sweep_dir)
    metrics = metric_names(rows)
    summary = summarise(rows, metrics)
    out = Path(out_dir or sweep_dir)
    out.mkdir(parents=True, exist_ok=True)
    keys = sorted(set().union(*(r["overrides"] for r in rows)))
    with open(out / "jobs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["job", *keys, *metrics])
        for r in rows:
            w.writerow([r["job"], *(r["overrides"].get(k, "") for k in keys),
                        *(r["results"].get(m, "") for m in metrics)])
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(summary[0]))
        w.writeheader()
        w.writerows(summary)
    (out / "summary.md").write_text(markdown(summary, metrics))
    return summary, out
