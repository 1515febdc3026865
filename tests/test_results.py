"""Reproduced claims: every claim experiment composes for each of its arms and runs under
debug=smoke; `ftlab-results` computes means, paired differences and verdicts from run dirs;
the committed docs/results.md is exactly what `ftlab-results` renders from the committed
evidence."""
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import compose_cfg
from ftlab import results
from ftlab.schema import ConfigError

ROOT = Path(__file__).resolve().parent.parent
CLAIMS = sorted(p.stem for p in (ROOT / "conf" / "experiment" / "claims").glob("*.yaml"))


def arms_of(claim: str) -> list[str]:
    cfg = yaml.safe_load((ROOT / "conf" / "experiment" / "claims" / f"{claim}.yaml").read_text())
    return cfg["hydra"]["sweeper"]["params"]["arm"].split(",")


def seeds_of(claim: str) -> list[str]:
    cfg = yaml.safe_load((ROOT / "conf" / "experiment" / "claims" / f"{claim}.yaml").read_text())
    return str(cfg["hydra"]["sweeper"]["params"]["trainer.seed"]).split(",")


BEST = re.compile(r"\$\{ftlab_best:([^,]+),([^}]+)\}")


def fake_studies(root: Path, claim: str) -> dict:
    """For arms reading a search's best params (${ftlab_best:<dir>,<param>}): a finished
    study's optimization_results.yaml under `root`, as Optuna's sweeper writes it."""
    found = {}
    for arm in arms_of(claim):
        for sweep, param in BEST.findall((ROOT / "conf" / "arm" / f"{arm}.yaml").read_text()):
            found.setdefault(sweep, {})[param] = 0.25 + len(found.get(sweep, {}))
    for sweep, params in found.items():
        (root / sweep).mkdir(parents=True, exist_ok=True)
        (root / sweep / "optimization_results.yaml").write_text(yaml.safe_dump(
            {"name": "optuna", "best_params": params, "best_value": 0.9}))
    return {p: v for params in found.values() for p, v in params.items()}


@pytest.mark.parametrize("claim", CLAIMS)
def test_claim_composes_for_every_arm(claim, tmp_path, monkeypatch):
    """Each arm sets its name; the compared arms exist; a sweep has >= 3 seeds; the header
    says what it reproduces, how it was adapted, the command and where the result is. An
    arm that reads a search's best params gets exactly them."""
    monkeypatch.chdir(tmp_path)
    tuned = fake_studies(tmp_path, claim)
    header = (ROOT / "conf" / "experiment" / "claims" / f"{claim}.yaml").read_text()
    for word in ("Claim", "Adapted:", f"ftlab-train -m experiment=claims/{claim}", "Result:"):
        assert word in header, word
    assert len(seeds_of(claim)) >= 3
    names = []
    for arm in arms_of(claim):
        cfg = compose_cfg(f"experiment=claims/{claim}", f"arm={arm}")
        assert cfg.claim.id == claim and cfg.claim.arm and cfg.claim.statement
        names.append(cfg.claim.arm)
        for param in BEST.findall((ROOT / "conf" / "arm" / f"{arm}.yaml").read_text()):
            key, node = param[1].split("."), cfg
            for k in key:
                node = node[k] if isinstance(node, dict) else getattr(node, k)
            assert node == tuned[param[1]]
    assert len(set(names)) == len(names)
    if cfg.claim.kind == "curve":  # every arm is a point: each needs its x
        xs = [compose_cfg(f"experiment=claims/{claim}", f"arm={a}").claim.x
              for a in arms_of(claim)]
        assert None not in xs and len(set(xs)) == len(xs)
    else:
        wanted = [cfg.claim.treatment] + ([cfg.claim.baseline]
                                          if cfg.claim.kind == "difference" else [])
        assert set(wanted) <= set(names)


def fake_run(root: Path, claim: dict, seed: int, results_: dict, smoke=False) -> Path:
    run = root / f"{claim['id']}-{claim['arm']}-{seed}"
    (run / ".hydra").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"claim": claim,
                                                     "trainer": {"seed": seed}}))
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(
        [f"trainer.seed={seed}"] + (["debug=smoke"] if smoke else [])))
    (run / "results.json").write_text(json.dumps({"train_seconds": 60.0, **results_}))
    return run


def definition(**kw) -> dict:
    return {"statement": "s", "source": "p", "adapted": "a", "metric": "test/accuracy",
            "kind": "difference", "baseline": "base", "treatment": "new", "expect": [3, 8],
            "extra_metrics": ["test/macro_f1"], **kw}


@pytest.mark.parametrize("gain, verdict", [(0.05, "agrees"), (0.12, "exceeds"),
                                           (0.01, "smaller"), (-0.02, "disagrees")])
def test_paired_difference_and_verdict(tmp_path, gain, verdict):
    rng = np.random.default_rng(0)
    base = 0.7 + 0.02 * rng.standard_normal(3)
    for seed in range(3):
        d = definition(id="c", arm="base")
        fake_run(tmp_path / "runs", d, seed, {"test/accuracy": base[seed],
                                              "test/macro_f1": 0.5})
        fake_run(tmp_path / "runs", {**d, "arm": "new"}, seed,
                 {"test/accuracy": base[seed] + gain, "test/macro_f1": 0.6})
    fake_run(tmp_path / "runs", {**definition(id="c", arm="new")}, 9, {"test/accuracy": 0.0},
             smoke=True)  # a smoke run never enters the table
    rows, text = results.run([tmp_path / "runs"], tmp_path / "ev.jsonl", tmp_path / "r.md")
    assert len(rows) == 6 and len(results.read(tmp_path / "ev.jsonl")) == 6
    a = results.assess(rows)
    assert a["verdict"] == verdict
    assert a["effect"][0] == pytest.approx(100 * gain) and a["effect"][1] == pytest.approx(
        0, abs=1e-9)  # paired by seed: the seeds' spread cancels
    assert a["arms"]["base"][0] == pytest.approx(100 * base.mean())
    assert f"**{verdict}**" in text and f"{100 * gain:+.1f} ± 0.0 points" in text
    assert "| new | " in text and "60.0 ± 0.0 (n=3)" in text  # the extra metric


def test_a_gain_within_the_seeds_noise_is_inconclusive(tmp_path):
    for seed, (b, n) in enumerate(((0.70, 0.74), (0.72, 0.71), (0.70, 0.73))):
        d = definition(id="c", arm="base")
        fake_run(tmp_path, d, seed, {"test/accuracy": b})
        fake_run(tmp_path, {**d, "arm": "new"}, seed, {"test/accuracy": n})
    a = results.assess(results.collect([tmp_path]))
    assert a["effect"][0] == pytest.approx(2.0) and a["verdict"] == "inconclusive"
    assert "95% CI -" in a["measured"]


def test_a_mean_gain_inside_the_claim_is_inconclusive_when_the_seeds_disagree(tmp_path):
    """Claimed +3..+8: a mean of +5 from seeds at +15, -10 and +10 is not agreement."""
    for seed, gain in enumerate((0.15, -0.10, 0.10)):
        d = definition(id="c", arm="base")
        fake_run(tmp_path, d, seed, {"test/accuracy": 0.7})
        fake_run(tmp_path, {**d, "arm": "new"}, seed, {"test/accuracy": 0.7 + gain})
    a = results.assess(results.collect([tmp_path]))
    assert a["effect"][0] == pytest.approx(5.0) and a["verdict"] == "inconclusive"


@pytest.mark.parametrize("new, verdict", [((0.69, 0.73, 0.69), "inconclusive"),
                                          ((0.60, 0.61, 0.60), "disagrees")])
def test_at_least_as_good_claims_need_the_interval_below_zero_to_disagree(tmp_path, new,
                                                                          verdict):
    """expect [0, x] claims "no worse": a small loss inside the seeds' noise is inconclusive,
    a clear one disagrees."""
    for seed, (b, n) in enumerate(zip((0.70, 0.72, 0.70), new)):
        d = definition(id="c", arm="base", expect=[0, 5])
        fake_run(tmp_path, d, seed, {"test/accuracy": b})
        fake_run(tmp_path, {**d, "arm": "new"}, seed, {"test/accuracy": n})
    assert results.assess(results.collect([tmp_path]))["verdict"] == verdict


def test_value_and_curve_claims_and_evidence_update(tmp_path):
    v = definition(id="v", kind="value", baseline=None, treatment="cnn", expect=[86, 90])
    for seed, acc in enumerate((0.87, 0.88, 0.89)):
        fake_run(tmp_path / "a", {**v, "arm": "cnn"}, seed, {"test/accuracy": acc})
    c = definition(id="curve", kind="curve", expect=[10000, 1.0])
    for x, acc in ((10, 0.6), (100, 0.8), (1000, 0.85)):
        fake_run(tmp_path / "a", {**c, "arm": f"n{x}", "x": x}, 0, {"test/accuracy": acc})
    results.run([tmp_path / "a"], tmp_path / "ev.jsonl", tmp_path / "r.md")
    by = {cl: results.assess([r for r in results.read(tmp_path / "ev.jsonl")
                              if r["claim"] == cl]) for cl in ("v", "curve")}
    assert by["v"]["verdict"] == "agrees" and by["v"]["effect"][0] == pytest.approx(88.0)
    assert by["curve"]["verdict"] == "not testable here"  # largest x 1000 < 10000
    assert "10: 60.0, 100: 80.0, 1000: 85.0" in by["curve"]["measured"]
    # rerunning one claim replaces its rows and keeps the other claim's
    for seed in range(3):
        fake_run(tmp_path / "b", {**v, "arm": "cnn"}, seed, {"test/accuracy": 0.80})
    results.run([tmp_path / "b"], tmp_path / "ev.jsonl", tmp_path / "r.md")
    ev = results.read(tmp_path / "ev.jsonl")
    assert {r["value"] for r in ev if r["claim"] == "v"} == {0.80}
    assert sum(r["claim"] == "curve" for r in ev) == 3
    assert "**disagrees**" in (tmp_path / "r.md").read_text()


def test_checks_judge_more_metrics_of_the_treatment_arm(tmp_path):
    """claim.checks: each key is judged as a value on the treatment arm, with its own row in
    the table; a check no run reported is not testable rather than silently dropped."""
    d = definition(id="q", kind="value", baseline=None, treatment="ptq", expect=[0.5, 2.0],
                   metric="quantize/ptq/accuracy_drop",
                   checks={"quantize/ptq/size_ratio": [10, 25], "quantize/ptq/nope": [0, 1]})
    for seed, (drop, size) in enumerate(((0.004, 0.27), (0.006, 0.28), (0.008, 0.29))):
        fake_run(tmp_path, {**d, "arm": "ptq"}, seed, {"quantize/ptq/accuracy_drop": drop,
                                                       "quantize/ptq/size_ratio": size})
    rows = results.collect([tmp_path])
    main, *checks = results.judged(rows)
    by = {c["definition"]["metric"]: c for c in checks}
    size, nope = by["quantize/ptq/size_ratio"], by["quantize/ptq/nope"]
    assert main["verdict"] == "agrees" and main["effect"][0] == pytest.approx(0.6)
    assert size["verdict"] == "disagrees" and size["effect"][0] == pytest.approx(28.0)
    assert nope["verdict"] == "not testable here"
    text = results.render(rows)
    assert ("| quantize/ptq/size_ratio | ptq: 10–25 | 28.0 ± 1.0 (n=3), above the claimed range "
            "| **disagrees** |") in text
    assert "**Measured** (quantize/ptq/size_ratio): 28.0 ± 1.0 (n=3)" in text


def test_checks_of_a_difference_claim_are_paired_differences_too(tmp_path):
    """'On every task': a difference claim's check compares the same two arms, seed by seed,
    on its own metric."""
    d = definition(id="u", expect=[0, 5], checks={"test/severity/macro_f1": [0, 5]})
    for seed in range(3):
        fake_run(tmp_path, {**d, "arm": "base"}, seed,
                 {"test/accuracy": 0.80, "test/severity/macro_f1": 0.52 + 0.01 * seed})
        fake_run(tmp_path, {**d, "arm": "new"}, seed,
                 {"test/accuracy": 0.81, "test/severity/macro_f1": 0.49 + 0.01 * seed})
    main, severity = results.judged(results.collect([tmp_path]))
    assert main["verdict"] == "agrees" and main["effect"][0] == pytest.approx(1.0)
    assert severity["definition"]["kind"] == "difference"
    assert severity["effect"][0] == pytest.approx(-3.0) and severity["verdict"] == "disagrees"


def test_missing_metric_is_a_one_line_error(tmp_path):
    fake_run(tmp_path, definition(id="c", arm="base", metric="test/nope"), 0,
             {"test/accuracy": 0.5})
    with pytest.raises(results.ConfigError) as e:
        results.collect([tmp_path])
    assert e.value.key == "claim.metric" and "\n" not in str(e.value)


def test_committed_results_table_is_generated_from_the_evidence():
    """docs/results.md is `ftlab-results`' rendering of docs/results/claims.jsonl, byte for
    byte: regenerate it with `ftlab-results`, never edit it."""
    evidence = ROOT / results.EVIDENCE
    assert evidence.exists(), "run the claims and ftlab-results (docs/results.md)"
    ev = results.read(evidence)
    assert (ROOT / results.OUT).read_text() == results.render(ev)
    assert not any(r["smoke"] for r in ev)
    for r in ev:
        assert r["claim"] in CLAIMS, f"evidence of a claim with no experiment: {r['claim']}"
    for claim in CLAIMS:  # each config's header carries its result, as ftlab-results wrote it
        text = (ROOT / "conf" / "experiment" / "claims" / f"{claim}.yaml").read_text()
        assert results.RESULT.search(text).group(0) == results.header(claim, ev), claim


def fake_row(claim: str, arm: str, seed: int, value: float) -> dict:
    return {"claim": claim, "arm": arm, "seed": seed, "value": value, "extra": {}, "x": None,
            "smoke": False, "run": f"runs/{claim}/{arm}/{seed}", "train_seconds": 60.0,
            "definition": definition(baseline="base", treatment="treat")}


def test_result_headers_follow_the_evidence(tmp_path):
    """write_headers rewrites only the `# Result:` block (and its continuation lines); a
    config without one is refused with the fix."""
    claims = tmp_path / "claims"
    claims.mkdir()
    body = "# Claim: x\n# Run: ftlab-train -m experiment=claims/a\n{}defaults: []\n"
    (claims / "a.yaml").write_text(body.format("# Result: old\n#   more old\n"))
    rows = [fake_row("a", "base", s, 0.50) for s in range(3)] + \
        [fake_row("a", "treat", s, 0.53 + s / 100) for s in range(3)]
    assert results.write_headers(claims, rows) == ["a"]
    text = (claims / "a.yaml").read_text()
    assert "old" not in text and text.startswith("# Claim: x\n# Run:")
    assert "# Result: agrees, test/accuracy +4.0 ± 1.0 points" in text
    assert text.endswith("(docs/results.md#a)\ndefaults: []\n")
    assert results.write_headers(claims, rows) == []  # unchanged the second time
    assert "not measured yet" in results.header("b", rows)
    (claims / "b.yaml").write_text("defaults: []\n")
    with pytest.raises(ConfigError, match="no '# Result:' header line"):
        results.write_headers(claims, rows)


@pytest.mark.slow
def test_a_claim_sweep_runs_under_smoke_and_feeds_the_table(tmp_path):
    """`ftlab-train -m experiment=claims/<claim> debug=smoke` runs its arms (the sweep's
    own params), and `ftlab-results --include-smoke` reads them back."""
    bindir = Path(sys.executable).parent
    configs = {p: p.read_text() for p in (ROOT / "conf" / "experiment" / "claims").glob("*")}
    out = subprocess.run([str(bindir / "ftlab-train"), "-m", "experiment=claims/ft_vs_fe",
                          "debug=smoke", "trainer.seed=0"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=900, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    out = subprocess.run([str(bindir / "ftlab-results"), "runs", "--include-smoke",
                          "--evidence", "ev.jsonl", "--out", "r.md"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    ev = results.read(tmp_path / "ev.jsonl")
    assert {r["arm"] for r in ev} == {"feature_extraction", "fine_tune"}
    assert all(r["smoke"] for r in ev) and "ft_vs_fe" in (tmp_path / "r.md").read_text()
    assert all(p.read_text() == text for p, text in configs.items())  # smoke: headers untouched


def treatment_arm(claim: str) -> str:
    exp = yaml.safe_load((ROOT / "conf" / "experiment" / "claims" / f"{claim}.yaml")
                         .read_text())["claim"]
    for arm in arms_of(claim):
        name = yaml.safe_load((ROOT / "conf" / "arm" / f"{arm}.yaml").read_text())["claim"]["arm"]
        if name == exp.get("treatment") or exp.get("kind") == "curve":
            return arm
    raise AssertionError(f"{claim}: no arm is the treatment")


@pytest.mark.slow
@pytest.mark.parametrize("claim", [c for c in CLAIMS if c != "ft_vs_fe"])
def test_every_claim_runs_under_smoke(claim, tmp_path):
    """Each claim's treatment arm (its distinctive recipe; every arm composes above, and
    ft_vs_fe runs its whole sweep above) trains under debug=smoke and writes the claim's
    metric."""
    from ftlab.train import run
    cfg = compose_cfg(f"experiment=claims/{claim}", f"arm={treatment_arm(claim)}",
                      "debug=smoke", "eval.plots=false")
    res = run(cfg, tmp_path / "run")
    assert isinstance(res[cfg.claim.metric], float)
