"""What a run carries across a restart: its host-side state, and the check that a run dir
resumes only the config it was started with."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from omegaconf import OmegaConf

from ftlab.schema import Config, ConfigError

# Keys that may change between a run and its resumption (quantize: runs after training).
RESUMABLE_KEYS = ("trainer.halt_after_steps", "trainer.progress", "logger", "quantize")


@dataclasses.dataclass
class RunState:
    phase: int = 0
    epoch: int = 0  # within the phase
    batch: int = 0  # next batch within the epoch
    step: int = 0  # global optimizer steps
    opt_phase: int = -1  # phase whose optimizer state the checkpoint holds
    stop: dict = dataclasses.field(default_factory=dict)  # Monitor states
    plateau: dict = dataclasses.field(default_factory=dict)
    lr_scale: float = 1.0
    done: bool = False
    sizes: dict = dataclasses.field(default_factory=dict)  # phase -> trainable / optimizer size
    task_losses: list = dataclasses.field(default_factory=list)  # last 2 epochs' (DWA)


def comparable(cfg: dict) -> dict:
    cfg = json.loads(json.dumps(cfg))
    for key in RESUMABLE_KEYS:
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            node = node.get(p, {})
        node.pop(leaf, None)
    return cfg


def with_defaults(saved: dict) -> dict:
    """A saved config with keys added to the schema since then at their defaults, so a run
    made by an older ftlab still resumes."""
    return OmegaConf.to_container(OmegaConf.merge(OmegaConf.structured(Config), saved))


def check_resumable(meta: dict | None, resolved: dict, run_dir: Path) -> None:
    """Refuse, before anything is written, a run dir holding another config's run."""
    saved = None if meta is None else comparable(with_defaults(meta["config"]))
    if saved is not None and saved != comparable(resolved):
        raise ConfigError("run_dir", f"{run_dir} holds a run with a different config; "
                                     "use another name= / overrides, or delete that dir")
