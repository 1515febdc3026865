"""Preemption: SIGUSR2 (SLURM / submitit's warning before preemption or the time limit) or
SIGTERM ends the run at the next step boundary with its state saved; under SLURM the job then
requeues itself and, restarted in the same run dir, resumes from that checkpoint.

submitit's own USR2 handler would requeue at once, before anything is saved; the run
replaces it while it trains and puts it back afterwards.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


class Preemption:
    """Context manager: `requested` turns true when one of SIGNALS arrives."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict = {}

    def __enter__(self) -> "Preemption":
        if threading.current_thread() is threading.main_thread():  # signals go to main only
            self._old = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)
        self._old = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            log.warning("received %s: saving at the next step boundary, then stopping",
                        signal.Signals(signum).name)
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str | None:
        return None if self.signum is None else signal.Signals(self.signum).name


def slurm_job() -> str | None:
    """This process's SLURM job id (array jobs: `<array job>_<task>`), or None."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


def requeue() -> bool:
    """Ask SLURM to requeue this job (it restarts with the same command and run dir);
    False outside SLURM or when scontrol refuses (the message is logged)."""
    job = slurm_job()
    if job is None:
        return False
    done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if done.returncode != 0:
        log.error("scontrol requeue %s failed: %s", job, done.stderr.strip())
        return False
    log.info("requeued SLURM job %s", job)
    return True
