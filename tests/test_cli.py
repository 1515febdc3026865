"""The console script end to end, as a user runs it."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BIN = Path(sys.executable).parent / "ftlab-train"


def ftlab_train(tmp_path, *args):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    return subprocess.run([str(BIN), f"hydra.run.dir={tmp_path}", *args], capture_output=True,
                          text=True, env=env, timeout=600)


def test_smoke_run_of_tiny_experiment(tmp_path):
    out = ftlab_train(tmp_path, "experiment=digits_tiny", "debug=smoke")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "test accuracy" in out.stdout
    for name in ("config.yaml", "run_info.json", "manifest.csv", "results.json"):
        assert (tmp_path / name).exists(), name


@pytest.mark.parametrize("override,key", [
    ("schedule.groups.head.pattern=decoder/.*", "schedule.groups.head"),
    ("schedule.groups.rest.pattern=.*", "schedule.groups."),  # overlaps
    ("model.source=/nonexistent/minilm", "model.source"),
    ("model.head.num_classes=3", "model.head.num_classes"),
])
def test_bad_config_is_one_line_naming_the_key(tmp_path, override, key):
    out = ftlab_train(tmp_path, "experiment=digits_tiny", "debug=smoke", override)
    assert out.returncode == 2
    errors = [l for l in out.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and key in errors[0], out.stderr[-2000:]
    assert not (tmp_path / "ckpt").exists()  # rejected before any work


def test_unknown_key_fails_before_running(tmp_path):
    out = ftlab_train(tmp_path, "experiment=digits_tiny", "trainer.epochs=3")
    assert out.returncode != 0 and "epochs" in out.stderr
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.slow
def test_smoke_run_of_default_minilm_experiment(tmp_path):
    out = ftlab_train(tmp_path, "debug=smoke")
    assert out.returncode == 0, out.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert 0.0 <= results["test/accuracy"] <= 1.0


def test_persistent_compilation_cache_serves_a_rerun(tmp_path):
    """Every program goes to the cache (not only slow ones), so a second process compiles
    nothing from scratch."""
    def once(run_dir):
        env = {**os.environ, "WANDB_MODE": "disabled", "FTLAB_JAX_CACHE": str(tmp_path / "c")}
        out = subprocess.run([str(BIN), f"hydra.run.dir={run_dir}", "experiment=digits_tiny",
                              "debug=smoke"], capture_output=True, text=True, env=env,
                             timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads((run_dir / "results.json").read_text())["compiles"]

    first, second = once(tmp_path / "a"), once(tmp_path / "b")
    # The first run compiles almost everything (a program repeated within it may hit).
    assert sum(c["count"] - c["cache_hits"] for c in first.values()) >= len(first)
    assert any((tmp_path / "c").iterdir())
    for phase, c in second.items():
        assert c["cache_hits"] == c["count"] > 0, phase


def test_training_modules_leave_scikit_learn_until_first_use():
    """Importing scikit-learn costs ~1 s of every start: the training path imports it when
    it first computes a metric or a split, not before the first step."""
    code = ("import sys, ftlab.cli, ftlab.train, ftlab.evaluate; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'sklearn')[:3])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
    from ftlab import metrics  # and the first use imports it
    assert metrics.from_probs(np.eye(2), np.arange(2), ["a", "b"])["accuracy"] == 1.0
