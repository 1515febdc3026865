import math

import pytest

from ftlab.param_groups import assign
from ftlab.schema import ConfigError, GroupRule, PhaseConfig

SHAPES = {
    "embeddings/word/embedding": (10, 4),
    "layers/0/fc1/kernel": (4, 8),
    "layers/1/fc1/kernel": (4, 8),
    "layers/10/fc1/kernel": (4, 8),
    "head/layers/0/kernel": (4, 3),
    "head/layers/0/bias": (3,),
}
PHASES = {"head": PhaseConfig(), "all": PhaseConfig()}


def rules(**kw):
    return {k: GroupRule(**v) for k, v in kw.items()}


def test_every_param_assigned_and_phases_unfreeze_progressively():
    g = assign(SHAPES, rules(head=dict(pattern="head/.*", train_from="head"),
                             body=dict(pattern="(embeddings|layers)/.*", train_from="all")),
               PHASES)
    assert g.trainable(0) == {"head/layers/0/kernel", "head/layers/0/bias"}
    assert g.trainable(1) == set(SHAPES)
    assert "15" in g.table() and "head" in g.table()  # head has 12 + 3 params


def test_anchored_patterns_do_not_match_prefixes():
    g = assign(SHAPES, rules(l1=dict(pattern="layers/1/.*", train_from="all"),
                             head=dict(pattern="head/.*", train_from="head"),
                             rest=dict(pattern="(embeddings|layers/(0|10))/.*")),
               PHASES)
    assert g.assignment["layers/10/fc1/kernel"] == "rest"


def test_rule_matching_nothing_names_rule_and_prefixes():
    with pytest.raises(ConfigError) as e:
        assign(SHAPES, rules(head=dict(pattern="head/.*", train_from="head"),
                             ghost=dict(pattern="decoder/.*"),
                             rest=dict(pattern="(embeddings|layers)/.*")), PHASES)
    assert e.value.key == "schedule.groups.ghost"
    assert "layers/" in str(e.value) and "\n" not in str(e.value)


def test_overlapping_rules_fail_naming_both():
    with pytest.raises(ConfigError) as e:
        assign(SHAPES, rules(head=dict(pattern="head/.*", train_from="head"),
                             everything=dict(pattern=".*", train_from="all")), PHASES)
    assert "head" in str(e.value) and "everything" in str(e.value)


def test_uncovered_params_fail():
    with pytest.raises(ConfigError) as e:
        assign(SHAPES, rules(head=dict(pattern="head/.*", train_from="head")), PHASES)
    assert e.value.key == "schedule.groups" and "4 params" in str(e.value)


def test_unknown_phase_and_empty_phase_fail():
    with pytest.raises(ConfigError) as e:
        assign(SHAPES, rules(all=dict(pattern=".*", train_from="nope")), PHASES)
    assert e.value.key == "schedule.groups.all.train_from"
    with pytest.raises(ConfigError) as e:
        assign(SHAPES, rules(all=dict(pattern=".*", train_from="all")), PHASES)
    assert e.value.key == "schedule.phases.head"


def test_param_counts_in_table_add_up():
    g = assign(SHAPES, rules(all=dict(pattern=".*", train_from="head")), {"head": PhaseConfig()})
    assert f"{sum(math.prod(s) for s in SHAPES.values()):,}" in g.table()


@pytest.mark.parametrize("mults", [{"a": 1.0, "b": 0.1}, {"a": 0.5, "b": 0.5}])
def test_group_lr_and_weight_decay_multipliers_reach_the_update(mults):
    import jax.numpy as jnp
    from ftlab import optim
    from ftlab.schema import OptimizerConfig, PhaseConfig
    params = {"a": jnp.ones(3), "b": jnp.ones(2)}
    grads = {"a": jnp.full(3, 2.0), "b": jnp.full(2, 2.0)}
    cfg = OptimizerConfig(name="sgd", momentum=0.0, clip_norm=None, weight_decay=0.1)
    tx = optim.build(cfg, PhaseConfig(lr=0.01, schedule="constant", warmup=0.0), 10, params,
                     mults, {"a": 1.0, "b": 0.0})
    updates, _ = tx.update(grads, tx.init(params), params)
    # SGD: -lr * mult * (grad + wd * wd_mult * param)
    assert jnp.allclose(updates["a"], -0.01 * mults["a"] * (2.0 + 0.1))
    assert jnp.allclose(updates["b"], -0.01 * mults["b"] * 2.0)


def test_slanted_triangular_lr():
    """ULMFiT's STLR: lr/32 at the first step, lr at the cut (the warmup fraction), lr/32
    again at the end, linear in between."""
    from ftlab.optim import lr_schedule
    s = lr_schedule(PhaseConfig(lr=0.01, schedule="stlr", warmup=0.1), 100)
    assert float(s(0)) == pytest.approx(0.01 / 32)
    assert float(s(10)) == pytest.approx(0.01)
    assert float(s(100)) == pytest.approx(0.01 / 32)
    assert float(s(55)) == pytest.approx((0.01 + 0.01 / 32) / 2)


def test_step_lr_divides_by_ten_at_30_60_90_percent():
    """BiT-HyperRule: x0.1 at 30%, 60% and 90% of the phase's steps (warmup included)."""
    from ftlab.optim import lr_schedule
    s = lr_schedule(PhaseConfig(lr=0.01, schedule="step", warmup=0.1), 100)
    got = {i: float(s(i)) for i in (5, 29, 30, 59, 60, 89, 90, 99)}
    assert got[5] == pytest.approx(0.005)  # warming up
    want = {29: 1e-2, 30: 1e-3, 59: 1e-3, 60: 1e-4, 89: 1e-4, 90: 1e-5, 99: 1e-5}
    for i, v in want.items():
        assert got[i] == pytest.approx(v), i


def test_unknown_schedule_is_named():
    with pytest.raises(ConfigError) as e:
        assign(SHAPES, rules(all=dict(pattern=".*", train_from="p")),
               {"p": PhaseConfig(schedule="triangle")})
    assert e.value.key == "schedule.phases.p.schedule" and "stlr" in str(e.value)
