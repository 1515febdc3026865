"""Every config composes; bad keys and types fail at compose time, naming the key."""
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import OmegaConfBaseException

from conftest import CONF_DIR, compose_cfg
from ftlab import models, param_groups
from ftlab.train import build_model
from ftlab.schema import Config, ConfigError

GROUPS = ["model", "dataset", "schedule", "optimizer", "tasks", "trainer", "logger", "peft"]


def options(group):
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes(group, option):
    cfg = compose_cfg(f"{group}={option}")
    assert isinstance(cfg, Config)


@pytest.mark.parametrize("experiment", options("experiment"))
@pytest.mark.parametrize("debug", [None, *options("debug")])
def test_every_experiment_composes_and_its_rules_cover_the_model(experiment, debug):
    cfg = compose_cfg(f"experiment={experiment}", *([f"debug={debug}"] if debug else []))
    assert cfg.name == experiment
    shapes = models.loading.param_paths(build_model(cfg, 5, abstract=True))  # with any LoRA
    groups = param_groups.assign(shapes, cfg.schedule.groups, cfg.schedule.phases)
    assert set(groups.assignment) == set(shapes)


def test_smoke_shrinks_any_experiment():
    cfg = compose_cfg("debug=smoke")
    assert cfg.dataset.subset and cfg.trainer.limit_train_batches and cfg.logger.mode == "disabled"


@pytest.mark.parametrize("override,key", [
    ("trainer.bogus=1", "bogus"),
    ("+trainer.bogus=1", "bogus"),
    ("+schedule.groups.head.lr=0.1", "lr"),
    ("model.head.dropuot=0.2", "dropuot"),
])
def test_unknown_key_fails_at_compose(override, key):
    with pytest.raises((ConfigCompositionException, OmegaConfBaseException, ConfigError)) as err:
        compose_cfg(override)
    assert key in str(err.value) or key in str(err.value.__cause__)


@pytest.mark.parametrize("override,key", [
    ("trainer.batch_size=abc", "batch_size"),
    ("schedule.phases.head.epochs=two", "epochs"),
    ("optimizer.weight_decay=heavy", "weight_decay"),
])
def test_wrong_type_fails_at_compose(override, key):
    with pytest.raises((ConfigCompositionException, OmegaConfBaseException)) as err:
        compose_cfg(override)
    assert key in str(err.value) or key in str(err.value.__cause__)
