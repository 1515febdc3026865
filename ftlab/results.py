"""`ftlab-results`: the reproduced claims' table, generated from run dirs.

A claim run is a finished run whose config sets `claim.id` (conf/experiment/claims/<id>.yaml
sweeps its arms, conf/arm/, over seeds). `collect` reads every such run under the given dirs
into evidence rows (one per run: claim, arm, seed, the claim's metric and its definition);
`update` replaces the evidence of the claims it found in `docs/results/claims.jsonl` and keeps
the others; `render` turns the evidence into `docs/results.md`. The markdown is a pure
function of the evidence file, so a test can check the committed table was generated; so are
the `# Result:` lines in the claims' configs (`write_headers`).
"""
from __future__ import annotations

import json
import math
import os
import re
import textwrap
from pathlib import Path

import numpy as np

from ftlab.schema import ConfigError

EVIDENCE = Path("docs/results/claims.jsonl")
OUT = Path("docs/results.md")
# agrees: inside the claimed range; exceeds / smaller: the claimed direction, outside it;
# inconclusive: the seeds' 95% interval holds no difference too, for a claimed gain (lo > 0)
# wherever the mean falls, for "at least as good" (lo = 0) when the mean is outside it.
VERDICTS = ("agrees", "exceeds", "smaller", "inconclusive", "disagrees", "not testable here")


def _overrides(run: Path) -> list[str]:
    import yaml
    for path in (run / ".hydra" / "overrides.yaml", run.parent / ".hydra" / "overrides.yaml"):
        if path.exists():
            return [str(o) for o in yaml.safe_load(path.read_text()) or []]
    return []


def collect(dirs) -> list[dict]:
    """One evidence row per finished claim run under `dirs`."""
    import yaml
    rows = []
    for d in map(Path, dirs):
        if not d.is_dir():
            raise ConfigError("dirs", f"{d} is not a directory; give the dirs holding the "
                                      "claims' runs (default: runs/)")
        for res_path in sorted(d.rglob("results.json")):
            run = res_path.parent
            if not (run / "config.yaml").exists():
                continue
            cfg = yaml.safe_load((run / "config.yaml").read_text()) or {}
            claim = cfg.get("claim") or {}
            if not claim.get("id"):
                continue
            results = json.loads(res_path.read_text())
            metric = claim["metric"]
            if metric not in results:
                raise ConfigError("claim.metric", f"{run}/results.json has no '{metric}' "
                                                  f"(claim {claim['id']}); keys like it: "
                                                  f"{', '.join(k for k in results if k.split('/')[0] == metric.split('/')[0])[:300]}")
            overrides = _overrides(run)
            rows.append({
                "claim": claim["id"], "arm": claim.get("arm"), "x": claim.get("x"),
                "seed": int((cfg.get("trainer") or {}).get("seed", 0)),
                "value": float(results[metric]),
                "extra": {k: float(results[k]) for k in _extras(claim)
                          if isinstance(results.get(k), (int, float))},
                "train_seconds": float(results.get("train_seconds", 0.0)),
                "smoke": any(o.startswith("debug=") for o in overrides),
                "run": os.path.relpath(run),  # relative: the evidence is committed
                "definition": {k: claim.get(k) for k in (
                    "statement", "source", "adapted", "metric", "kind", "baseline",
                    "treatment", "expect", "extra_metrics", "checks")}})
    return rows


def _extras(d: dict) -> list[str]:
    """Metrics shown next to the claim's own: extra_metrics, then the checks' keys."""
    shown = list(d.get("extra_metrics") or [])
    return shown + [k for k in d.get("checks") or {} if k not in shown]


def judged(rows: list[dict]) -> list[dict]:
    """The claim's assessment, then one per check (`claim.checks`): for a difference claim,
    the same treatment - baseline difference on metric `key`; otherwise a value claim on the
    treatment arm's `key`."""
    d = rows[0]["definition"]
    out = [assess(rows)]
    kind = "difference" if d["kind"] == "difference" else "value"
    arms = (d["baseline"], d["treatment"]) if kind == "difference" else (d["treatment"],)
    for key, expect in sorted((d.get("checks") or {}).items()):  # the evidence sorts keys
        sub = {**d, "metric": key, "kind": kind, "expect": list(expect), "checks": {}}
        have = [{**r, "value": r["extra"][key], "definition": sub}
                for r in rows if key in r["extra"] and r["arm"] in arms]
        out.append(assess(have) if have else
                   {"definition": sub, "measured": f"no run reported {key}",
                    "verdict": "not testable here"})
    return out


def update(evidence: Path, rows: list[dict]) -> list[dict]:
    """The evidence file with the claims in `rows` replaced by `rows` (others kept)."""
    old = read(evidence) if evidence.exists() else []
    claims = {r["claim"] for r in rows}
    merged = [r for r in old if r["claim"] not in claims] + rows
    merged.sort(key=lambda r: (r["claim"], str(r["arm"]), r["seed"]))
    evidence.parent.mkdir(parents=True, exist_ok=True)
    evidence.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in merged))
    return merged


def read(evidence: Path) -> list[dict]:
    return [json.loads(line) for line in Path(evidence).read_text().splitlines() if line]


def _stats(values) -> tuple[float, float, int]:
    v = np.asarray(values, float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else math.nan, len(v)


def _pm(mean: float, std: float, n: int, digits: int = 1) -> str:
    return f"{mean:.{digits}f}" + ("" if math.isnan(std) else f" ± {std:.{digits}f}") + \
        f" (n={n})"


def assess(rows: list[dict]) -> dict:
    """One claim's arms (points, mean ± std over seeds), its measured effect and verdict."""
    d = rows[0]["definition"]
    arms: dict[str, list[dict]] = {}
    for r in rows:
        arms.setdefault(r["arm"], []).append(r)
    table = {a: _stats([100 * r["value"] for r in rs]) for a, rs in arms.items()}
    extra = {a: {k: _stats([100 * r["extra"][k] for r in rs if k in r["extra"]])
                 for k in _extras(d) if any(k in r["extra"] for r in rs)}
             for a, rs in arms.items()}
    lo, hi = (d["expect"] + [math.nan, math.nan])[:2]
    out = {"definition": d, "arms": table, "extra": extra,
           "x": {a: rs[0]["x"] for a, rs in arms.items()},
           "minutes": round(sum(r["train_seconds"] for r in rows) / 60, 1),
           "smoke": any(r["smoke"] for r in rows)}
    kind = d["kind"]
    if kind == "difference":
        missing = [a for a in (d["baseline"], d["treatment"]) if a not in arms]
        if missing:
            return {**out, "measured": f"arm {', '.join(missing)} missing",
                    "verdict": "not testable here"}
        base = {r["seed"]: 100 * r["value"] for r in arms[d["baseline"]]}
        treat = {r["seed"]: 100 * r["value"] for r in arms[d["treatment"]]}
        seeds = sorted(set(base) & set(treat))
        diff = _stats([treat[s] - base[s] for s in seeds]) if seeds else \
            (table[d["treatment"]][0] - table[d["baseline"]][0], math.nan, 0)
        m = diff[0]
        verdict = ("agrees" if lo <= m <= hi else "exceeds" if m > hi else
                   "smaller" if m > 0 else "disagrees")
        measured = f"{m:+.1f} points"
        if diff[2] > 1:  # Student's t interval of the mean paired difference
            from scipy import stats
            half = stats.t.ppf(0.975, diff[2] - 1) * diff[1] / math.sqrt(diff[2])
            measured = (f"{m:+.1f} ± {diff[1]:.1f} points (paired over {diff[2]} seeds; "
                        f"95% CI {m - half:+.1f} to {m + half:+.1f})")
            if m - half <= 0 <= m + half and (lo > 0 or (lo == 0 and verdict != "agrees")):
                # a claimed gain (or "at least as good") the seeds cannot tell from none: a
                # mean inside +0.5..+5 with an interval of -19..+21 does not agree
                verdict = "inconclusive"
        return {**out, "effect": diff, "verdict": verdict, "measured": measured}
    if kind == "value":
        m = table[d["treatment"]]
        verdict = "agrees" if lo <= m[0] <= hi else "disagrees"
        side = "" if verdict == "agrees" else \
            f", {'above' if m[0] > hi else 'below'} the claimed range"
        return {**out, "effect": m, "verdict": verdict, "measured": _pm(*m) + side}
    if kind == "curve":  # expect: [x where the claim says it plateaus, tolerance in points]
        order = sorted(arms, key=lambda a: out["x"][a])
        xs = [out["x"][a] for a in order]
        ms = [table[a][0] for a in order]
        gain = ms[-1] - ms[-2] if len(ms) > 1 else math.nan
        measured = ", ".join(f"{x:g}: {m:.1f}" for x, m in zip(xs, ms))
        if xs[-1] < lo:
            verdict = "not testable here"
        else:
            verdict = "agrees" if abs(gain) <= hi else "disagrees"
        return {**out, "effect": (gain, math.nan, 0), "verdict": verdict,
                "measured": f"{measured} (last step {gain:+.1f} points)"}
    raise ConfigError("claim.kind", f"'{kind}' is not one of: difference, value, curve")


def _claimed(d: dict) -> str:
    lo, hi = (d["expect"] + [math.nan, math.nan])[:2]
    if d["kind"] == "difference":
        return f"{d['treatment']} − {d['baseline']}: {lo:+g} to {hi:+g} points"
    if d["kind"] == "value":
        return f"{d['treatment']}: {lo:g}–{hi:g}"
    return f"plateau past x = {lo:g} (within {hi:g} points)"


def render(evidence_rows: list[dict], include_smoke: bool = False) -> str:
    """docs/results.md from the evidence rows (a pure function of them)."""
    rows = [r for r in evidence_rows if include_smoke or not r["smoke"]]
    claims: dict[str, list[dict]] = {}
    for r in rows:
        claims.setdefault(r["claim"], []).append(r)
    lines = ["# Reproduced claims", "",
             "Generated by `ftlab-results` from the claims' run dirs (evidence: "
             "`docs/results/claims.jsonl`, one row per run); do not edit by hand. Each claim "
             "is one sweep, `ftlab-train -m experiment=claims/<claim>`, over its arms and "
             "seeds; numbers are the metric in points, mean ± std over seeds; a difference "
             "is paired by seed. 2-core CPU unless stated.", "",
             "| claim | source | metric | claimed | ftlab measured | verdict |",
             "|---|---|---|---|---|---|"]
    done = {c: judged(rs) for c, rs in sorted(claims.items())}
    for c, checks in done.items():
        for a in checks:
            d = a["definition"]
            lines.append(f"| [{c}](#{c}) | {d['source']} | {d['metric']} | {_claimed(d)} | "
                         f"{a['measured']} | **{a['verdict']}** |")
    for c, checks in done.items():
        a = checks[0]
        d = a["definition"]
        lines += ["", f"## {c}", "", f"**Claim** ({d['source']}): {d['statement']}", "",
                  f"**Adapted**: {d['adapted']}", "",
                  f"**Command**: `ftlab-train -m experiment=claims/{c}` then `ftlab-results`"
                  f" ({a['minutes']} min of training in all)", ""]
        extras = _extras(d)
        lines += ["| " + " | ".join(["arm"] + (["x"] if d["kind"] == "curve" else [])
                                   + [d["metric"]] + extras) + " |",
                  "|---|" + ("---|" if d["kind"] == "curve" else "") + "---|" * (1 + len(extras))]
        order = sorted(a["arms"], key=lambda k: (a["x"][k] is None, a["x"][k] or 0, str(k)))
        for arm in order:
            x = f"{a['x'][arm]:g} | " if d["kind"] == "curve" else ""
            cells = "".join(f"{_pm(*a['extra'][arm][k])} | " if k in a["extra"][arm] else "- | "
                            for k in extras)
            lines.append(f"| {arm} | {x}{_pm(*a['arms'][arm])} | {cells}".rstrip())
        for i, b in enumerate(checks):
            what = "" if i == 0 else f" ({b['definition']['metric']})"
            lines += ["", f"**Measured**{what}: {b['measured']}. **Verdict: {b['verdict']}.**"]
        if a["smoke"]:
            lines[-1] += " (debug=smoke runs: a pipeline check, not a result)"
    if not done:
        lines += ["", "No claim has finished runs yet."]
    return "\n".join(lines) + "\n"


RESULT = re.compile(r"^# Result:.*\n(?:#   .*\n)*", re.M)


def header(claim: str, evidence_rows: list[dict]) -> str:
    """The `# Result:` lines of a claim's config: each check's verdict and measurement."""
    rows = [r for r in evidence_rows if r["claim"] == claim and not r["smoke"]]
    if not rows:
        text = "Result: not measured yet (run the command above, then ftlab-results)"
    else:
        text = "Result: " + "; ".join(f"{a['verdict']}, {a['definition']['metric']} "
                                      f"{a['measured']}" for a in judged(rows))
        text += f" (docs/results.md#{claim})"
    return "\n".join(textwrap.wrap(text, 93, initial_indent="# ",
                                   subsequent_indent="#   ", break_on_hyphens=False)) + "\n"


def write_headers(claims_dir: Path, evidence_rows: list[dict]) -> list[str]:
    """Rewrite the `# Result:` lines of every claim config in `claims_dir` from the evidence;
    returns the claims whose file changed."""
    changed = []
    for path in sorted(Path(claims_dir).glob("*.yaml")):
        text = path.read_text()
        if not RESULT.search(text):
            raise ConfigError("claim", f"{path} has no '# Result:' header line; add one "
                                       "after its '# Run:' lines")
        new = RESULT.sub(lambda _: header(path.stem, evidence_rows), text, count=1)
        if new != text:
            path.write_text(new)
            changed.append(path.stem)
    return changed


def run(dirs, evidence: Path = EVIDENCE, out: Path = OUT, include_smoke: bool = False,
        headers: Path | None = None) -> tuple[list[dict], str]:
    """Collect `dirs`, update the evidence, write the markdown (and, given `headers`, the
    claims' `# Result:` lines there): (new rows, markdown)."""
    rows = collect(dirs)
    if not include_smoke:
        rows = [r for r in rows if not r["smoke"]]
    merged = update(Path(evidence), rows) if rows else (
        read(evidence) if Path(evidence).exists() else [])
    text = render(merged, include_smoke)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(text)
    if headers is not None:
        write_headers(headers, merged)
    return rows, text
