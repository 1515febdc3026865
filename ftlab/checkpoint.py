"""Orbax checkpoints of a run: best-k by the monitored metric, plus the latest.

`latest/` holds params, optimizer state and the host-side run state (phase, data position,
early-stopping and plateau state) so a restarted run resumes exactly; `best/` holds params.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from ftlab.schema import ConfigError


def _key(entry) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _shapes(tree) -> dict[str, tuple]:
    """'/'-joined leaf path -> shape; an nnx Variable's `.value` and a saved dict's
    ['value'] read the same, so live targets compare with stored metadata."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    out = {}
    for keypath, leaf in flat:
        parts = [_key(k) for k in keypath]
        if parts and parts[-1] == "value":
            parts.pop()
        out["/".join(parts)] = tuple(np.shape(leaf))
    return out


def _latest_handlers() -> dict:
    return {"params": ocp.StandardCheckpointHandler(), "opt": ocp.StandardCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler()}


class CheckpointMismatch(ValueError):
    pass


def _restore(mngr, step: int, **targets) -> dict:
    """Restore items against abstract targets; every tree difference is an error."""
    args = {k: ocp.args.StandardRestore(v) for k, v in targets.items()}
    meta = mngr.item_metadata(step)
    for name, target in targets.items():
        want, have = _shapes(target), _shapes(meta[name])
        diff = sorted(set(want) ^ set(have))
        diff += [f"{k}: {have[k]} != {want[k]}" for k in want.keys() & have.keys()
                 if have[k] != want[k]]
        if diff:
            raise CheckpointMismatch(
                f"{mngr.directory}/{step}/{name} does not fit this model "
                f"({len(diff)} differences, e.g. {', '.join(diff[:5])}); "
                "it was written by another config: use a new run dir")
    return mngr.restore(step, args=ocp.args.Composite(**args))


def check_dir(directory: Path) -> Path:
    """The absolute checkpoint dir; refused if TensorStore could write but not read it."""
    directory = Path(directory).absolute()
    if set("[]") & set(str(directory)):
        raise ConfigError("run_dir", f"{directory}: TensorStore (Orbax) cannot read a "
                                     "checkpoint under a path with '[' or ']'; use another "
                                     "directory (hydra.run.dir=...)")
    return directory


class Checkpoints:
    def __init__(self, directory: Path, monitor: str, mode: str, keep_best: int):
        directory = check_dir(directory)
        sync = dict(enable_async_checkpointing=False, create=True)
        # Handlers named up front, so a reopened manager can read item metadata.
        self.best = ocp.CheckpointManager(
            directory / "best", options=ocp.CheckpointManagerOptions(
                max_to_keep=keep_best, best_fn=lambda m: m[monitor], best_mode=mode, **sync),
            item_handlers={"params": ocp.StandardCheckpointHandler()})
        self.latest = ocp.CheckpointManager(
            directory / "latest", options=ocp.CheckpointManagerOptions(max_to_keep=1, **sync),
            item_handlers=_latest_handlers())

    def save_best(self, step: int, params: Any, metrics: dict[str, float]) -> None:
        self.best.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)),
                       metrics=metrics)

    def save_latest(self, step: int, params: Any, opt_state: Any, meta: dict) -> None:
        self.latest.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), opt=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(meta)), force=True)

    def restore_latest(self, params_target, opt_target=None) -> tuple[Any, Any]:
        step = self.latest.latest_step()
        targets = {"params": params_target}
        if opt_target is not None:
            targets["opt"] = opt_target
        out = _restore(self.latest, step, **targets)
        return out["params"], out.get("opt")

    def best_metrics(self) -> dict[str, float]:
        """The val metrics the best checkpoint was saved with (its monitor among them)."""
        return dict(self.best.metrics(self.best.best_step()) or {})

    def restore_best(self, params_target) -> tuple[int, Any]:
        step = self.best.best_step()
        return step, _restore(self.best, step, params=params_target)["params"]

    def close(self) -> None:
        self.best.close()
        self.latest.close()


def latest_meta(directory: Path) -> dict | None:
    """The run state saved in `directory`/latest, or None; reads only, creates nothing."""
    path = Path(directory).absolute() / "latest"
    if not path.is_dir():
        return None
    mngr = ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(read_only=True),
                                 item_handlers=_latest_handlers())
    try:
        step = mngr.latest_step()
        return None if step is None else mngr.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))["meta"]
    finally:
        mngr.close()


def restore_params(directory: Path, which: str, target: Any, monitor: str,
                   mode: str) -> tuple[int, Any]:
    """(step, params) of a run's `best` (by `monitor`) or `latest` checkpoint; reads only."""
    if which not in ("best", "latest"):
        raise CheckpointMismatch(f"checkpoint '{which}' is not one of: best, latest")
    path = Path(directory).absolute() / which
    if not path.is_dir():
        raise CheckpointMismatch(f"{path} does not exist; is this a run dir of ftlab-train?")
    best = dict(best_fn=lambda m: m[monitor], best_mode=mode) if which == "best" else {}
    mngr = ocp.CheckpointManager(
        path, options=ocp.CheckpointManagerOptions(read_only=True, **best),
        item_handlers={"params": ocp.StandardCheckpointHandler()} if which == "best"
        else _latest_handlers())
    try:
        step = mngr.best_step() if which == "best" else mngr.latest_step()
        if step is None:
            raise CheckpointMismatch(f"{path} holds no checkpoint yet; rerun ftlab-train "
                                     "with the same overrides to finish the run")
        return step, _restore(mngr, step, params=target)["params"]
    finally:
        mngr.close()
