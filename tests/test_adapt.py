"""Test-time adaptation (ftlab.adapt): TENT touches only the selected normalisation params
and lowers the entropy on the target; `norm` re-estimates BatchNorm statistics exactly and
changes no param; `run` / `ftlab-adapt` on a smoke run compare source, norm and tent per env."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from conftest import compose_cfg
from ftlab import adapt
from ftlab.data.batches import ArrayData
from ftlab.schema import AdaptConfig, ConfigError
from ftlab.train import build_model


def _model_and_pool(arch: str, n: int = 24, seed: int = 0):
    rng = np.random.default_rng(seed)
    if arch == "efficientnet":
        model = build_model(compose_cfg("experiment=elpv_tiny"), 3)
        data = {"image": rng.integers(0, 256, (n, 32, 32, 3)).astype(np.uint8)}
    else:
        model = build_model(compose_cfg("experiment=digits_tiny"), 3)
        data = {"input_ids": rng.integers(1, 64, (n, 16)).astype(np.int32),
                "attention_mask": np.ones((n, 16), np.int32)}
    # Labels ride along in a split's arrays; adaptation must never read them.
    return model, ArrayData({**data, "label": rng.integers(0, 3, n).astype(np.int32)})


def _values(model, kind=nnx.Param) -> dict[str, np.ndarray]:
    return {k: np.array(v[...]) for k, v in adapt._flat(nnx.state(model, kind)).items()}


NORM_AFFINE = {"efficientnet": r"(stem|top|blocks/\d+)/bn\d?/(scale|bias)",
               "bert": r"(embeddings/norm|layers/\d+/(attention|mlp)_norm)/(scale|bias)"}


@pytest.mark.parametrize("arch", ["efficientnet", "bert"])
def test_tent_updates_only_the_norm_affine_params_and_lowers_entropy(arch):
    import re
    model, pool = _model_and_pool(arch)
    params, stats = _values(model), _values(model, nnx.BatchStat)
    # One full batch, small steps: gradient descent on the entropy of that very batch.
    cfg = AdaptConfig(method="tent", lr=1e-2, steps=6, batch_size=len(pool))
    done = adapt.adapt(model, pool, cfg, eval_batch_size=16)
    after = _values(model)
    changed = {k for k in params if not np.array_equal(params[k], after[k])}
    expected = {k for k in params if re.fullmatch(NORM_AFFINE[arch], k)}
    assert expected and set(done["params"]) == expected  # the default rule, both archs
    assert changed == expected  # every selected param moved; every other bit-identical
    assert done["steps"] == 6 and done["losses"][-1] < done["losses"][0]
    if arch == "efficientnet":
        assert done["batchnorm_layers"] == 13
        assert any(not np.array_equal(stats[k], v)
                   for k, v in _values(model, nnx.BatchStat).items())
        # Against BN adapt (same pool statistics, no gradient step): lower entropy.
        base, _ = _model_and_pool(arch)
        norm = adapt.adapt(base, pool, AdaptConfig(method="norm", batch_size=len(pool)), 16)
        assert done["entropy_after"] < norm["entropy_after"]
        # With one full batch, the final batch entropy is the inference-mode entropy.
        assert done["entropy_after"] < done["losses"][0]
    else:  # LayerNorm only: inference and adaptation compute the same function
        assert done["batchnorm_layers"] == 0
        assert done["entropy_after"] < done["entropy_before"]


def test_norm_changes_no_param_and_reestimates_exact_pool_statistics():
    model, pool = _model_and_pool("efficientnet")
    params, stats = _values(model), _values(model, nnx.BatchStat)
    done = adapt.adapt(model, pool, AdaptConfig(method="norm", batch_size=10), 16)  # 10,10,4
    assert done["steps"] == 0 and done["params"] == []
    after = _values(model)
    assert all(np.array_equal(params[k], after[k]) for k in params)
    pooled = _values(model, nnx.BatchStat)
    assert all(not np.allclose(stats[k], pooled[k]) for k in stats)
    whole, _ = _model_and_pool("efficientnet")  # the statistics of one batch of all 24 rows
    adapt.reestimate(whole, pool, len(pool))
    for k, v in _values(whole, nnx.BatchStat).items():
        # Pooling is exact where the input does not depend on other BatchNorms (the stem);
        # deeper layers see inputs normalised per batch, so agree only roughly.
        exact = k.startswith("stem/")
        np.testing.assert_allclose(pooled[k], v, rtol=1e-5 if exact else 0,
                                   atol=1e-6 if exact else max(0.15 * np.abs(v).max(), 1e-5),
                                   err_msg=k)
    # Momenta and inference mode are back: predictions use the new running statistics.
    bns = [m for _, m in nnx.iter_modules(model) if isinstance(m, nnx.BatchNorm)]
    assert all(m.use_running_average and m.momentum == 0.99 for m in bns)


def test_a_rule_matching_nothing_or_a_bad_setting_is_rejected_naming_the_key():
    model, pool = _model_and_pool("bert", n=4)
    with pytest.raises(ConfigError) as e:
        adapt.adapt(model, pool, AdaptConfig(method="tent", params="(stem|top)/bn/.*"))
    assert e.value.key == "adapt.params" and "matches no parameter" in str(e.value)
    assert "embeddings/" in str(e.value)  # the message shows what the paths look like
    for bad, key in [(dict(method="bn"), "adapt.method"), (dict(optimizer="rmsprop"),
                     "adapt.optimizer"), (dict(steps=0), "adapt.steps"),
                     (dict(lr=0.0), "adapt.lr")]:
        with pytest.raises(ConfigError) as e:
            adapt.check(AdaptConfig(**{"method": "tent", **bad}))
        assert e.value.key == key


def test_batches_are_full_shuffled_passes_and_a_pure_function_of_the_seed():
    order = adapt.target_order(10, 4, 5, seed=3)
    assert order.shape == (5, 4)
    flat = order.ravel()
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) != list(flat[10:])
    assert np.array_equal(order, adapt.target_order(10, 4, 5, seed=3))
    assert not np.array_equal(order, adapt.target_order(10, 4, 5, seed=4))
    assert adapt.num_steps(AdaptConfig(epochs=2, batch_size=4), 10) == 6
    assert adapt.num_steps(AdaptConfig(steps=7, batch_size=64), 10) == 7


def test_tent_is_deterministic_given_the_seed_and_ignores_labels():
    runs = []
    for seed, shuffle_labels in [(0, False), (0, True), (1, False)]:
        model, pool = _model_and_pool("bert", n=12)
        if shuffle_labels:
            pool.arrays["label"] = pool.arrays["label"][::-1].copy()
        adapt.adapt(model, pool, AdaptConfig(method="tent", batch_size=4, epochs=2,
                                             optimizer="sgd", lr=0.05, seed=seed))
        runs.append(_values(model))
    assert all(np.array_equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert any(not np.array_equal(runs[0][k], runs[2][k]) for k in runs[0])


SMOKE = ("experiment=elpv_tiny", "debug=smoke", "eval.baselines=false", "eval.latency=false",
         "eval.plots=false")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    from ftlab.train import run
    run_dir = tmp_path_factory.mktemp("adapt_smoke")
    return run_dir, run(compose_cfg(*SMOKE), run_dir)


def test_run_compares_source_norm_and_tent_per_environment(smoke_run, tmp_path):
    import dataclasses
    from ftlab import evaluate
    from ftlab.runs import load_config, load_model, open_split
    run_dir, results = smoke_run
    cfg = load_config(run_dir)
    cfg = dataclasses.replace(cfg, adapt=AdaptConfig(method="tent", batch_size=8, epochs=2))
    src = open_split(cfg, run_dir, None, "test")
    model, _ = load_model(cfg, run_dir, src.data.num_classes, "best", src.data.tasks)
    source = _values(model, adapt.WEIGHTS)
    res = adapt.run(cfg, model, src, tmp_path)  # no 'adapt' split: the test inputs
    assert all(np.array_equal(v, _values(model, adapt.WEIGHTS)[k]) for k, v in source.items())
    assert res["pool"] == "test" and set(res["compare"]) == {"source", "norm", "tent"}
    assert res["compare"]["source"]["metrics"]["accuracy"] == results["test/accuracy"]
    for name, e in res["compare"].items():
        assert set(e["slices"]["cell_type"]) == {"mono", "poly"}, name
    lines = res["table"].splitlines()
    assert lines[0].split()[:2] == ["cell_type", "n"] and [l.split()[0] for l in lines[1:]] \
        == ["all", "mono", "poly"]
    out = tmp_path / "tent"
    ev = json.loads((out / "eval.json").read_text())
    assert ev["adapt"]["tent"]["steps"] == 6 and ev["adapt"]["pool"] == "test"
    assert ev["metrics"] == res["compare"]["tent"]["metrics"]
    assert res["table"] in (out / "report.md").read_text()
    # The saved adapted weights reproduce the adapted model's evaluation.
    again, _ = load_model(cfg, run_dir, src.data.num_classes, "best", src.data.tasks)
    loaded = adapt.load_adapted(again, out / adapt.ADAPTED_FILE)
    assert set(loaded) == set(res["adapt"]["tent"]["params"]) | \
        set(adapt._flat(nnx.state(again, nnx.BatchStat)))
    slices = evaluate.slice_columns(cfg.eval, cfg.dataset.env, src.columns)
    assert adapt._assess(cfg, again, src, "test", slices, cfg.eval)["metrics"] == ev["metrics"]


BIN = Path(sys.executable).parent / "ftlab-adapt"
ENV = {**os.environ, "WANDB_MODE": "disabled"}


def test_ftlab_adapt_cli(smoke_run, tmp_path):
    run_dir, _ = smoke_run
    ok = subprocess.run([str(BIN), f"run_dir={run_dir}", "adapt.method=norm",
                         f"out={tmp_path}"], capture_output=True, text=True, env=ENV,
                        timeout=600)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "source acc / F1" in ok.stdout and "norm acc / F1" in ok.stdout
    assert "mono" in ok.stdout and (tmp_path / "norm" / "eval.json").exists()
    bad = subprocess.run([str(BIN), f"run_dir={run_dir}", "adapt.method=bn"],
                         capture_output=True, text=True, env=ENV, timeout=600)
    errors = [l for l in bad.stderr.splitlines() if l.startswith("error:")]
    assert bad.returncode == 2 and len(errors) == 1 and "adapt.method" in errors[0]
