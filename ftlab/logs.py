"""Metric sinks: a local JSONL file always, wandb unless disabled (offline by default).

wandb's import and `init` (which starts its service process) take 1-3 s; they run on a
thread while the run builds its model and compiles, and the first metric waits for them.
"""
from __future__ import annotations

import json
import logging
import os
import threading
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
        self._wandb = None
        self._starting: threading.Thread | None = None
        self._error: BaseException | None = None
        if cfg.mode != "disabled":
            id_file = Path(run_dir) / "wandb_id.txt"
            run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
            id_file.write_text(run_id)
            os.environ.setdefault("WANDB_SILENT", "true")

            def start():
                try:
                    import wandb
                    self._wandb = wandb.init(
                        project=cfg.project, entity=cfg.entity, name=name, tags=list(cfg.tags),
                        config=config, dir=str(run_dir), mode=cfg.mode, id=run_id,
                        resume="allow")
                except BaseException as e:  # raised in the caller by the first use
                    self._error = e
            self._starting = threading.Thread(target=start, name="wandb-init", daemon=True)
            self._starting.start()

    @property
    def wandb(self):
        """The wandb run (None when disabled), once its start on the thread has finished."""
        if self._starting is not None:
            self._starting.join()
            self._starting = None
            if self._error is not None:
                raise self._error
        return self._wandb

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
        """Finish the wandb run; a start that failed unseen (the run failed first) stays quiet,
        so it cannot hide the run's own error."""
        if self._starting is not None:
            self._starting.join()
            self._starting = None
        if self._wandb is not None:
            self._wandb.finish()
