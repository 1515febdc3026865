"""Preemption: a signal mid-training saves at the next step and the rerun finishes with the
same params as an uninterrupted run; a checkpoint cut off mid-write is never restored."""
import os
import shutil
import signal
import threading
import time

import numpy as np
import pytest

from conftest import compose_cfg
from ftlab.checkpoint import latest_meta
from ftlab.preempt import Preemption, slurm_job
from ftlab.train import run
from test_train import FAST, latest_params


def signal_after_first_eval(run_dir, signum):
    """Send `signum` to this process once the run has logged its first evaluation."""
    def watch():
        while not (run_dir / "metrics.jsonl").exists():
            time.sleep(0.01)
        os.kill(os.getpid(), signum)
    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run both resume tests compare with (trained once)."""
    cfg = compose_cfg(*FAST)
    out = tmp_path_factory.mktemp("ref")
    run(cfg, out)
    return latest_params(out, cfg)


def test_signal_saves_at_the_next_step_and_the_rerun_is_bit_identical(tmp_path, reference):
    """End to end with SIGUSR2 (SIGTERM takes the same path: see the flag test below)."""
    signum = signal.SIGUSR2
    cfg = compose_cfg(*FAST)
    before = signal.getsignal(signum)
    watcher = signal_after_first_eval(tmp_path / "cut", signum)
    out = run(cfg, tmp_path / "cut")
    watcher.join(timeout=5)
    assert out["halted"] and out["preempted"] == signal.Signals(signum).name
    assert signal.getsignal(signum) == before  # the run's handler is gone again
    saved = latest_meta(tmp_path / "cut" / "ckpt")["run_state"]
    assert saved["step"] == out["step"] and not saved["done"]
    assert not (tmp_path / "cut" / "results.json").exists()
    run(cfg, tmp_path / "cut")  # the requeued job: same command, same dir
    b = latest_params(tmp_path / "cut", cfg)
    assert all(np.array_equal(reference[p], b[p]) for p in reference)


def test_checkpoint_cut_off_mid_write_is_never_restored(tmp_path, reference):
    """Orbax writes a step into a temporary dir and renames it when complete: a job killed
    while saving leaves only that temporary dir, which the resume ignores."""
    cfg = compose_cfg(*FAST, "trainer.halt_after_steps=13")
    run(cfg, tmp_path / "cut")
    latest = tmp_path / "cut" / "ckpt" / "latest"
    (step,) = [p for p in latest.iterdir() if p.name.isdigit()]
    partial = latest / "17.orbax-checkpoint-tmp-1764170000000000"
    shutil.copytree(step, partial)
    for f in partial.rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # truncated mid-write
    assert latest_meta(tmp_path / "cut" / "ckpt")["run_state"]["step"] == 13
    full = compose_cfg(*FAST)
    run(full, tmp_path / "cut")
    b = latest_params(tmp_path / "cut", full)
    assert all(np.array_equal(reference[p], b[p]) for p in reference)


def test_slurm_job_id_of_array_tasks(monkeypatch):
    for k in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(k, raising=False)
    assert slurm_job() is None
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    assert slurm_job() == "41"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "40")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert slurm_job() == "40_3"


@pytest.mark.parametrize("signum", [signal.SIGUSR2, signal.SIGTERM])
def test_preemption_flag_and_handler_restore(signum):
    before = signal.getsignal(signum)
    with Preemption() as p:
        assert not p.requested
        os.kill(os.getpid(), signum)
        time.sleep(0.05)
        assert p.requested and p.name == signal.Signals(signum).name
    assert signal.getsignal(signum) == before
