"""The retraining pipeline: labels in, a gated candidate out.

1. The annotated CSV joins every label received so far for this model name
   (`<registry>/<name>/labels.csv`, kept whether or not a candidate was promoted) and
   production's own `dataset.extra_train`; test rows are refused before anything trains.
2. A candidate is fine-tuned with production's exact config (only `dataset.extra_train`
   differs), registered with production as its parent and the `candidate` alias.
3. Both models score the same held-out rows (the gate's split, optionally one environment);
   McNemar's exact test on the paired correct / wrong outcomes says whether the difference
   could be chance.
4. The candidate is promoted only if it passes the gate; otherwise production stays and the
   report says why.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
from scipy import stats

from ftlab import metrics
from ftlab.app_schema import CombineAppConfig, GateConfig, RetrainAppConfig
from ftlab.data import labeled
from ftlab.data.prepare import load_split
from ftlab.schema import ConfigError

log = logging.getLogger(__name__)


def check(gate: GateConfig) -> None:
    if gate.metric not in ("accuracy", "macro_f1"):
        raise ConfigError("gate.metric", f"'{gate.metric}' is not one of: accuracy, macro_f1")
    if not 0 < gate.alpha <= 1:
        raise ConfigError("gate.alpha", f"{gate.alpha} is not in (0, 1]")
    if gate.split not in ("val", "test"):
        raise ConfigError("gate.split", f"'{gate.split}' is not one of: val, test (held-out "
                                        "rows neither model trained on)")


POOL = "labels.csv"  # <registry>/<name>/labels.csv: every label received for that model


def merged_labels(previous: list, new: str, class_names: list[str], out: Path
                  ) -> tuple[Path, int]:
    """One CSV with every label so far: the `previous` CSVs (those that exist) in order, then
    the new ones (a sample labeled again takes its latest label). Written atomically;
    (its path, its number of labels)."""
    rows: dict[str, str] = {}
    for path in [p for p in previous if p and Path(p).is_file()] + [new]:
        ids, ys = labeled.read(path, class_names)
        rows.update({s: class_names[y] for s, y in zip(ids, ys)})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sample_id", "label"])
        w.writerows(rows.items())
    tmp.replace(out)
    return out, len(rows)


def mcnemar(right_a: np.ndarray, right_b: np.ndarray) -> dict:
    """Exact McNemar test of paired outcomes: b = only A right, c = only B right; under
    'equally good' the discordant pairs split 50/50 (two-sided binomial p)."""
    b = int((right_a & ~right_b).sum())
    c = int((~right_a & right_b).sum())
    p = 1.0 if b + c == 0 else float(stats.binomtest(c, b + c, 0.5).pvalue)
    return {"only_baseline_right": b, "only_candidate_right": c, "p_value": p}


def decide(gate: GateConfig, base: dict, cand: dict, test: dict) -> tuple[bool, str]:
    """(promote?, why) from both models' metrics on the gate's rows and McNemar's test."""
    m = gate.metric
    delta = cand[m] - base[m]
    if delta <= 0 or delta < gate.margin:
        return False, (f"candidate {m} {cand[m]:.4f} vs baseline {base[m]:.4f} "
                       f"({delta:+.4f}) does not beat it by the margin {gate.margin}")
    if gate.require_significance and test["p_value"] >= gate.alpha:
        return False, (f"candidate {m} {cand[m]:.4f} vs baseline {base[m]:.4f} is "
                       f"{delta:+.4f} better, but McNemar p = "
                       f"{test['p_value']:.3g} >= alpha {gate.alpha}: could be chance")
    return True, (f"candidate {m} {cand[m]:.4f} vs baseline {base[m]:.4f} ({delta:+.4f} >= "
                  f"margin {gate.margin}; McNemar p = {test['p_value']:.3g})")


def _scored(model_dir: Path, split: str, env_col: str | None):
    """(class names, primary-task predictions with the env column) of a model dir on its
    own dataset's split."""
    from ftlab.combine import predict_run
    from ftlab.runs import load_config
    ecfg = dataclasses.replace(load_config(model_dir).eval, slices=[])
    return predict_run(str(model_dir), CombineAppConfig(split=split, out=str(model_dir)),
                       ecfg, env_col)


def compare(base_dir: Path, cand_dir: Path, gate: GateConfig, env_col: str | None) -> dict:
    """Both models on the same held-out rows (checked id by id), overall and per env."""
    classes, base = _scored(base_dir, gate.split, env_col)
    _, cand = _scored(cand_dir, gate.split, env_col)
    if list(base.ids) != list(cand.ids):
        raise ConfigError("gate.split", f"baseline and candidate {gate.split} splits hold "
                                        "different rows; both must come from one dataset "
                                        "config and split seed")
    rows = np.ones(len(base.ids), bool)
    if gate.env is not None:
        if env_col is None:
            raise ConfigError("gate.env", "needs dataset.env (the environment column)")
        envs = np.asarray(base.columns[env_col]).astype(str)
        if gate.env not in set(envs):
            raise ConfigError("gate.env", f"'{gate.env}' is not a value of '{env_col}' in the "
                                          f"{gate.split} split; values: {sorted(set(envs))}")
        rows = envs == gate.env
    y = base.labels[rows]
    out = {"n": int(rows.sum()), "ids": [str(s) for s in base.ids[rows]]}
    for name, p in (("baseline", base), ("candidate", cand)):
        m = metrics.from_probs(p.probs[rows], y, classes)
        out[name] = {k: m[k] for k in ("accuracy", "macro_f1")}
        if env_col is not None:
            envs = np.asarray(p.columns[env_col]).astype(str)
            out[name]["by_env"] = {
                e: metrics.from_probs(p.probs[envs == e], p.labels[envs == e], classes)[
                    "accuracy"] for e in sorted(set(envs))}
    out["mcnemar"] = mcnemar(base.probs[rows].argmax(-1) == y,
                             cand.probs[rows].argmax(-1) == y)
    return out


def run_app(app: RetrainAppConfig) -> dict:
    """Retrain `app.ref` on its baseline's data plus `app.labels`; register, compare, gate."""
    from ftlab import registry, train
    from ftlab.predict import write_reference
    from ftlab.runs import class_names_of, load_config
    check(app.gate)
    if any(c in app.ref for c in "@:/"):
        raise ConfigError("ref", f"'{app.ref}' should be a registered model's name; the "
                                   f"baseline alias is `baseline` ({app.baseline})")
    base_dir, name, base_version = registry.locate(f"{app.ref}@{app.baseline}", app.registry)
    cfg = load_config(base_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    out = Path(app.out) if app.out else Path("runs") / cfg.name / "retrain" / stamp
    classes = class_names_of(base_dir)
    if classes is None:
        raise ConfigError("ref", f"{base_dir} has no data_summary.json (its class list); "
                                   "register a run ftlab-train finished")
    n_new = len(labeled.read(app.labels, classes)[0])
    pool = Path(app.registry).absolute() / name / POOL
    merged, n_total = merged_labels([pool, cfg.dataset.extra_train], app.labels, classes,
                                    out.absolute() / "labels.csv")
    cand_cfg = dataclasses.replace(cfg, dataset=dataclasses.replace(
        cfg.dataset, extra_train=str(merged)))
    load_split(cand_cfg.dataset)  # refuses test rows and unknown ids before training
    shutil.copyfile(merged, pool.with_name(POOL + ".tmp"))  # the labels are kept, whatever
    pool.with_name(POOL + ".tmp").replace(pool)  # the gate decides about the candidate
    log.info("retraining %s (baseline v%s) with %d new labels (%s)", name, base_version,
             n_new, merged)
    t0 = time.perf_counter()
    results = train.run(cand_cfg, out / "run")
    if results.get("halted"):
        return {"halted": True, "out": str(out), "step": results.get("step")}
    cand = registry.register(app.registry, out / "run", name=name, aliases=["candidate"],
                             parent=int(base_version), reference_fn=write_reference,
                             note=f"retrained with {n_new} new labels ({app.labels})")
    cand_version = str(cand["version"])
    cand_dir, _, _ = registry.locate(f"{name}:{cand_version}", app.registry)
    cmp = compare(base_dir, cand_dir, app.gate, cfg.dataset.env)
    ok, why = decide(app.gate, cmp["baseline"], cmp["candidate"], cmp["mcnemar"])
    promoted = bool(ok and app.promote)
    if promoted:
        registry.promote(app.registry, name, int(cand_version), app.baseline)
    res = {"model": name, "baseline_version": base_version, "candidate_version": cand_version,
           "new_labels": n_new, "labels": str(merged), "total_labels": n_total,
           "gate": dataclasses.asdict(app.gate),
           "passed": ok, "promoted": promoted, "reason": why, "compare": cmp,
           "train_seconds": round(time.perf_counter() - t0, 1), "out": str(out)}
    (out / "retrain.json").write_text(json.dumps(res, indent=2))
    (out / "report.md").write_text(report(res))
    return res


def report(res: dict) -> str:
    c, g = res["compare"], res["gate"]
    where = f"{g['split']} split" + (f", {g['env']} rows" if g["env"] else "")
    lines = [f"# Retraining {res['model']}: v{res['candidate_version']} vs "
             f"v{res['baseline_version']}", "",
             f"{res['new_labels']} new labels, {res['total_labels']} in all ({res['labels']}); "
             "the baseline's config otherwise.", "",
             f"Scored on the same {c['n']} held-out rows ({where}).", "",
             "| model | accuracy | macro-F1 |" + "".join(
                 f" {e} accuracy |" for e in c["baseline"].get("by_env", {})),
             "|---|---|---|" + "---|" * len(c["baseline"].get("by_env", {}))]
    for who, v in (("baseline", res["baseline_version"]), ("candidate",
                                                           res["candidate_version"])):
        m = c[who]
        lines.append(f"| {who} v{v} | {m['accuracy']:.4f} | {m['macro_f1']:.4f} |" + "".join(
            f" {a:.4f} |" for a in m.get("by_env", {}).values()))
    t = c["mcnemar"]
    lines += ["", f"McNemar (exact): only baseline right {t['only_baseline_right']}, only "
                  f"candidate right {t['only_candidate_right']}, p = {t['p_value']:.3g}.", "",
              f"**{'Promoted' if res['promoted'] else 'Not promoted'}**: {res['reason']}"
              + ("" if res["promoted"] or not res["passed"] else " (promote=false)") + "."]
    return "\n".join(lines) + "\n"


def summary(res: dict) -> str:
    if res.get("halted"):
        return f"halted at step {res['step']}; rerun the same command to resume ({res['out']})"
    c = res["compare"]
    m = res["gate"]["metric"]
    verdict = (f"promoted v{res['candidate_version']} to production" if res["promoted"]
               else f"kept v{res['baseline_version']}")
    return (f"{res['model']}: candidate v{res['candidate_version']} {m} "
            f"{c['candidate'][m]:.4f} vs baseline v{res['baseline_version']} "
            f"{c['baseline'][m]:.4f} on {c['n']} held-out rows (McNemar p = "
            f"{c['mcnemar']['p_value']:.3g}): {verdict}. {res['reason']}.\n"
            f"report: {res['out']}/report.md")
