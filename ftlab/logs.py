"""Metric sinks: a local JSONL file always, wandb unless disabled (offline by default)."""
from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path

from ftlab.schema import ConfigError, LoggerConfig

log = logging.getLogger(__name__)


def validate(cfg: LoggerConfig) -> None:
    if cfg.mode not in ("offline", "online", "disabled"):
        raise ConfigError("logger.mode", f"'{cfg.mode}' is not one of: offline, online, disabled")


class MetricLog:
    def __init__(self, run_dir: Path, cfg: LoggerConfig, config: dict, name: str):
        validate(cfg)
        self.path = Path(run_dir) / "metrics.jsonl"
        self.wandb = None
        if cfg.mode != "disabled":
            import wandb
            id_file = Path(run_dir) / "wandb_id.txt"
            run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
            id_file.write_text(run_id)
            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb = wandb.init(project=cfg.project, entity=cfg.entity, name=name,
                                    tags=list(cfg.tags), config=config, dir=str(run_dir),
                                    mode=cfg.mode, id=run_id, resume="allow")

    def write(self, step: int, metrics: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def summary(self, metrics: dict) -> None:
        if self.wandb is not None:
            self.wandb.summary.update(metrics)

    def images(self, directory: Path) -> None:
        """Log the PNGs of a report directory (wandb only; the files stay in the run dir)."""
        if self.wandb is not None:
            import wandb
            self.wandb.log({f"eval/{p.stem}": wandb.Image(str(p))
                            for p in sorted(Path(directory).glob("*.png"))})

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
