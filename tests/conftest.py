import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import ftlab.cli  # registers the schema and resolvers  # noqa: F401
from ftlab.schema import Config, from_omegaconf

os.environ.setdefault("WANDB_MODE", "disabled")
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def compose_cfg(*overrides: str) -> Config:
    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        cfg = compose("config", overrides=list(overrides))
    return from_omegaconf(cfg)


@pytest.fixture
def compose_config():
    return compose_cfg
