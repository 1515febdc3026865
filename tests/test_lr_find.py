"""LR range test on tiny BERT + digits: one curve per group, early stop, only that group moves."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from conftest import compose_cfg
from ftlab import lr_find, models, param_groups
from ftlab.data.prepare import load_split, prepare
from ftlab.schema import ConfigError
from ftlab.step import first_trainable_stage
from ftlab.train import build_model

FAST = ("experiment=digits_tiny", "dataset.subset=200", "trainer.batch_size=16",
        "trainer.progress=false", "lr_find.steps=12", "lr_find.min_lr=1e-4",
        "lr_find.max_lr=0.1")


def flat(state) -> dict[str, np.ndarray]:
    return {"/".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(state)}


def test_one_curve_per_trainable_group_with_growing_lr(tmp_path):
    out = lr_find.run(compose_cfg(*FAST, "lr_find.phase=top"), tmp_path)
    saved = json.loads((tmp_path / "lr_find.json").read_text())
    assert saved == out and saved["phase"] == "top"
    assert list(saved["groups"]) == ["head", "top"]  # rest is frozen in phase top
    for c in saved["groups"].values():
        assert len(c["lr"]) == len(c["loss"]) == len(c["smoothed"]) == 12  # max_lr 0.1: no blow-up
        assert c["lr"][0] == pytest.approx(1e-4) and c["lr"][-1] == pytest.approx(0.1)
        assert np.all(np.diff(c["lr"]) > 0)
        assert c["suggested"] is None or 1e-4 <= c["suggested"] <= 0.1
    assert (tmp_path / "lr_find.png").stat().st_size > 0


def test_stops_early_when_the_loss_diverges(tmp_path):
    out = lr_find.run(compose_cfg(*FAST, "lr_find.max_lr=1e6", "lr_find.steps=30"), tmp_path)
    assert out["phase"] == "head"  # the first phase by default
    curve = out["groups"]["head"]
    assert 0 < len(curve["lr"]) < 30
    assert all(np.isfinite(curve["loss"]))


def test_only_the_tested_group_changes():
    cfg = compose_cfg(*FAST)
    split = load_split(cfg.dataset)
    data = prepare(split.examples, split.parts, cfg.dataset, cfg.model)
    model = build_model(cfg, data.num_classes)
    groups = param_groups.assign(models.loading.param_paths(model), cfg.schedule.groups,
                                 cfg.schedule.phases)
    paths = lr_find.group_paths(groups, 1)["top"]  # layers/1, between frozen stages
    start = first_trainable_stage(model, paths)
    assert start == 2
    before = flat(nnx.state(model, nnx.Param))
    inputs = lr_find.prefix_inputs(model, data.parts["train"], 0, start, 64)
    curve, after = lr_find.range_test(cfg, cfg.tasks["main"], model, paths,
                                      groups.multipliers(paths, "wd_mult"), inputs, start, 1)
    assert len(curve.lr) == 12
    after = flat(after)
    assert set(after) == set(before)
    for p in before:
        assert np.array_equal(before[p], after[p]) == (p not in paths), p
    assert all(np.array_equal(v, before[p]) for p, v in flat(nnx.state(model, nnx.Param)).items())


def test_suggestion_is_steepest_descent_before_the_minimum():
    lr = np.geomspace(1e-4, 1.0, 9)
    smoothed = [2.0, 1.95, 1.8, 1.3, 1.1, 1.0, 0.9, 2.0, 5.0]
    assert lr_find.suggest(lr, smoothed) == pytest.approx(lr[3])
    assert lr_find.suggest(lr[:5], [1.0, 2.0, 3.0, 4.0, 5.0]) is None  # rises from the start
    assert lr_find.suggest(lr[:3], [2.0, 1.9, 1.8]) is None  # too few points after the warm-up
    steep_start = [3.0, 2.0, 1.95, 1.9, 1.6, 1.5, 1.45, 2.0]  # EMA warm-up noise at the edge
    assert lr_find.suggest(lr[:8], steep_start, skip=2) == pytest.approx(lr[4])


@pytest.mark.parametrize("override,key", [
    ("lr_find.phase=nope", "lr_find.phase"),
    ("lr_find.min_lr=0", "lr_find.min_lr"),
    ("lr_find.max_lr=1e-5", "lr_find.max_lr"),
    ("lr_find.steps=4", "lr_find.steps"),
])
def test_bad_settings_name_their_key(tmp_path, override, key):
    with pytest.raises(ConfigError) as e:
        lr_find.run(compose_cfg(*FAST, override), tmp_path)
    assert e.value.key == key
    if key == "lr_find.phase":
        assert "known phases: head, top, all" in str(e.value)


def test_console_script(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    out = subprocess.run([str(Path(sys.executable).parent / "ftlab-lr-find"),
                          f"hydra.run.dir={tmp_path}", *FAST, "lr_find.steps=6"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "head: " in out.stdout
    saved = json.loads((tmp_path / "lr_find" / "lr_find.json").read_text())
    assert list(saved["groups"]) == ["head"] and len(saved["groups"]["head"]["lr"]) == 6
