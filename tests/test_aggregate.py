"""`ftlab-aggregate`: jobs' overrides and results in one table, seeds as mean ± std."""
import csv
import json
import subprocess
import sys

import numpy as np
import pytest

from ftlab.aggregate import collect, write
from ftlab.cli import aggregate
from ftlab.schema import ConfigError


def fake_job(root, name, overrides, results):
    job = root / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (job / "results.json").write_text(json.dumps(results))


def test_seeds_fold_into_mean_and_std_per_setting(tmp_path):
    accs = {("0.0", "0"): 0.80, ("0.0", "1"): 0.84, ("0.0", "2"): 0.82, ("0.1", "0"): 0.70}
    for (wd, seed), acc in accs.items():
        fake_job(tmp_path, f"wd={wd},seed={seed}",
                 [f"optimizer.weight_decay={wd}", f"trainer.seed={seed}", "trainer.progress=false"],
                 {"test/accuracy": acc, "test/macro_f1": acc - 0.1, "train_seconds": 1.0})
    (tmp_path / "unfinished" / ".hydra").mkdir(parents=True)  # no results.json: skipped
    summary, out = write(tmp_path)
    by = {r["setting"]: r for r in summary}
    a = by["optimizer.weight_decay=0.0"]
    assert a["n"] == 3 and a["seeds"] == "0,1,2"
    assert a["test/accuracy mean"] == pytest.approx(0.82)
    assert a["test/accuracy std"] == pytest.approx(np.std([0.80, 0.84, 0.82], ddof=1))
    b = by["optimizer.weight_decay=0.1"]
    assert b["n"] == 1 and np.isnan(b["test/accuracy std"])
    md = (out / "summary.md").read_text()
    assert "| optimizer.weight_decay=0.0 | 3 | 0.8200 ± 0.0200 |" in md
    with open(out / "jobs.csv") as f:
        jobs = list(csv.DictReader(f))
    assert len(jobs) == 4 and "trainer.progress" not in jobs[0]
    assert {j["trainer.seed"] for j in jobs} == {"0", "1", "2"}


def test_empty_or_missing_sweep_dir_is_one_line_error(tmp_path, capsys):
    with pytest.raises(ConfigError, match="no finished job"):
        collect(tmp_path)
    with pytest.raises(SystemExit) as e:
        aggregate([str(tmp_path / "nope")])
    assert e.value.code == 2 and "not a directory" in capsys.readouterr().err


def test_multirun_over_seeds_then_aggregate(tmp_path):
    """One command runs a setting over seeds (basic launcher), one aggregates it."""
    cmd = [sys.executable, "-c", "from ftlab.cli import train; train()", "--multirun",
           "experiment=digits_tiny", "debug=smoke", "trainer.seed=0,1",
           "optimizer.weight_decay=0.0,0.1", "eval.baselines=false", "eval.latency=false",
           "eval.plots=false", f"hydra.sweep.dir={tmp_path}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    summary, _ = write(tmp_path)
    assert sorted((r["setting"], r["n"]) for r in summary) == [
        ("debug=smoke, eval.baselines=False, eval.latency=False, eval.plots=False, "
         f"experiment=digits_tiny, optimizer.weight_decay={wd}", 2) for wd in ("0.0", "0.1")]
    assert all(not np.isnan(r["test/accuracy mean"]) for r in summary)
