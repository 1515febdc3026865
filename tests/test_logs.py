"""Metric sinks: metrics.jsonl always; wandb (offline here) started on a thread, and its
metrics reach the wandb run; a wandb start that fails is raised by the first metric."""
import json

import pytest

from ftlab.logs import MetricLog
from ftlab.schema import LoggerConfig


def test_offline_wandb_run_receives_the_metrics(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    log = MetricLog(tmp_path, LoggerConfig(mode="offline", project="p"), {"lr": 0.1}, "n")
    log.write(0, {"train/loss_metric_xyz": 1.5})
    log.summary({"test/accuracy": 0.9})
    log.close()
    # finish() only publishes "finish" to wandb's service, which closes the record file a
    # moment later (at process exit in a real run); teardown waits for the service.
    import wandb
    wandb.teardown()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {
        "step": 0, "train/loss_metric_xyz": 1.5}
    run_id = (tmp_path / "wandb_id.txt").read_text().strip()
    (record,) = (tmp_path / "wandb").glob(f"offline-run-*-{run_id}/*.wandb")
    assert b"train/loss_metric_xyz" in record.read_bytes()


def test_a_failed_wandb_start_is_raised_by_the_first_metric(tmp_path, monkeypatch):
    import wandb
    monkeypatch.delenv("WANDB_MODE", raising=False)

    def broken(**kwargs):
        raise RuntimeError("wandb: no such entity 'nobody'")
    monkeypatch.setattr(wandb, "init", broken)
    log = MetricLog(tmp_path, LoggerConfig(mode="offline", entity="nobody"), {}, "n")
    with pytest.raises(RuntimeError, match="no such entity"):
        log.write(0, {"x": 1.0})
    log.close()  # quiet: the error was raised once already
