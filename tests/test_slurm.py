"""Sweeps through a real SLURM: the single-node cluster of `slurm/local_cluster.sh up` and the
`hydra/launcher=slurm_local` config. Skipped where that cluster does not answer; CI brings it
up and sets FTLAB_REQUIRE_SLURM=1, so there they fail instead."""
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import compose_cfg
from test_sweeps import TINY, finished_jobs, jax_cache, multirun, sweep_dirs


def _why_not() -> str | None:
    """Why the local test cluster cannot be used, or None when its node answers."""
    if shutil.which("sinfo") is None:
        return "SLURM is not installed"
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-n", "localhost", "-p", "debug", "-o", "%t"],
                             capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer in 30 s"
    state = out.stdout.strip()
    if out.returncode != 0 or not state.startswith(("idle", "mix", "alloc")):
        return f"sinfo: {(out.stderr.strip() or state or 'no node localhost in partition debug')}"
    return None


WHY_NOT = _why_not()
pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(WHY_NOT is not None and not os.environ.get("FTLAB_REQUIRE_SLURM"),
                       reason=f"needs the local SLURM cluster (slurm/local_cluster.sh up): "
                              f"{WHY_NOT}"),
]


@pytest.fixture(autouse=True)
def _cluster_answers():
    if WHY_NOT is not None:  # only reached with FTLAB_REQUIRE_SLURM set
        pytest.fail(f"FTLAB_REQUIRE_SLURM is set but the local SLURM cluster does not answer: "
                    f"{WHY_NOT}")


def sacct_states(job: str) -> list[str]:
    """Every state the job went through (requeues included), oldest first."""
    out = subprocess.run(["sacct", "-D", "-X", "-n", "-P", "-o", "State", "-j", job],
                         capture_output=True, text=True, timeout=30)
    return [s.split()[0] for s in out.stdout.split()]


def test_sweep_of_four_jobs_runs_as_one_job_array(tmp_path, tmp_path_factory):
    sweep = (*TINY, "trainer.seed=0,1", "optimizer.weight_decay=0,0.01")
    out = multirun(tmp_path, jax_cache(tmp_path_factory), "hydra/launcher=slurm_local", *sweep)
    assert out.returncode == 0, out.stdout[-3000:]
    sweep_dir, jobs = sweep_dirs(*sweep)
    assert len(set(jobs)) == 4 and finished_jobs(tmp_path) == sorted(jobs)
    for job in jobs:
        assert json.loads((tmp_path / job / "results.json").read_text())["steps"] > 0
    tasks = sorted(p.name for p in (tmp_path / sweep_dir / ".submitit").iterdir()
                   if re.fullmatch(r"\d+_\d+", p.name))
    array = tasks[0].split("_")[0]
    assert tasks == [f"{array}_{i}" for i in range(4)]  # one array, one task per job
    assert all(sacct_states(t)[-1] in ("COMPLETED", "COMPLETING", "RUNNING") for t in tasks)
    from ftlab.aggregate import write
    summary, _ = write(tmp_path / sweep_dir)  # and the sweep aggregates: 2 settings x 2 seeds
    assert sorted(r["n"] for r in summary) == [2, 2]
    assert all(r["seeds"] == "0,1" for r in summary)


def node_memory_gb() -> int:
    out = subprocess.run(["sinfo", "-h", "-N", "-n", "localhost", "-o", "%m"],
                         capture_output=True, text=True, timeout=30)
    return int(out.stdout.split()[0]) // 1000


@pytest.mark.parametrize("override,reason", [
    ("hydra.launcher.partition=nope", "Invalid partition name specified"),
    (None, "Requested node configuration is not available"),  # more memory than the node
])
def test_request_slurm_refuses_fails_in_one_line(tmp_path, override, reason):
    override = override or f"hydra.launcher.mem_gb={2 * node_memory_gb() + 1}"
    before = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True)
    t0 = time.time()
    out = multirun(tmp_path, "", "hydra/launcher=slurm_local", *TINY, "trainer.seed=0,1",
                   override, timeout=120)
    assert out.returncode == 2 and time.time() - t0 < 60, out.stdout[-3000:]
    errors = [line for line in out.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out.stdout[-3000:]
    assert reason in errors[0] and override.split(".")[-1] in errors[0], errors[0]
    assert "Traceback" not in out.stdout
    assert not (tmp_path / "runs").exists()  # nothing submitted, nothing written
    after = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True)
    assert after.stdout == before.stdout


# Long enough (12 epochs) that a signal after an epoch's evaluation lands mid-training.
PREEMPT = ("experiment=digits_tiny", "dataset.subset=400", "trainer.batch_size=32",
           "trainer.progress=false", "schedule.phases.all.epochs=10", "eval.baselines=false",
           "eval.latency=false", "eval.plots=false", "trainer.seed=0")


def _wait(what, cond, timeout=300, sweep=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = cond()
        if value:
            return value
        if sweep is not None and sweep.poll() is not None:
            pytest.fail(f"the sweep exited ({sweep.returncode}) while waiting for {what}")
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def _evals(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _started_again(job: str, requeues: int) -> bool:
    """True once the job, requeued `requeues` times, runs again. SLURM holds a requeued job
    for about two minutes (reason BeginTime): the test lets it start at once."""
    if sacct_states(job).count("REQUEUED") < requeues:
        return False
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T %r"], capture_output=True,
                         text=True, timeout=30).stdout.split()
    if out == ["PENDING", "BeginTime"]:
        subprocess.run(["scontrol", "update", f"jobid={job}", "starttime=now"],
                       capture_output=True, timeout=30)
    return out[:1] == ["RUNNING"]


def test_preempted_job_requeues_itself_and_ends_bit_identical(tmp_path, tmp_path_factory):
    """`scancel --signal=USR2` twice mid-training: each time the run saves at the next step,
    requeues its own SLURM job and exits; the job restarts in the same run dir and resumes.
    The sweep returns only once the job really finished, with the uninterrupted run's params."""
    from test_train import latest_params
    from ftlab.train import run

    log = tmp_path / "sweep.log"
    sweep = multirun(tmp_path, jax_cache(tmp_path_factory), "hydra/launcher=slurm_local",
                     *PREEMPT, log=log)
    job = None
    try:
        sweep_dir, (job_dir,) = sweep_dirs(*PREEMPT)
        run_dir = tmp_path / job_dir
        submitit = tmp_path / sweep_dir / ".submitit"  # one dir per job, named by its id
        job = _wait("the job", lambda: submitit.exists() and next(
            (p.name for p in submitit.iterdir() if re.fullmatch(r"\d+(_0)?", p.name)), None),
            sweep=sweep)
        seen = 0
        for n in (1, 2):
            # An evaluation logged by this start of the job: it is training (signal handled).
            _wait(f"an evaluation of start {n}", lambda: _evals(run_dir) > seen, sweep=sweep)
            subprocess.run(["scancel", "--signal=USR2", job], check=True, timeout=30)
            _wait(f"requeue {n}", lambda: _started_again(job, n), sweep=sweep)
            seen = _evals(run_dir)
        sweep.wait(timeout=600)
        assert sweep.returncode == 0, log.read_text()[-3000:]
        assert (run_dir / "results.json").exists(), log.read_text()[-3000:]
        assert sacct_states(job)[:2] == ["REQUEUED", "REQUEUED"], sacct_states(job)
    finally:
        if sweep.poll() is None:  # failed midway: nothing of the test's outlives it
            sweep.kill()
            if job is not None:
                subprocess.run(["scancel", job], capture_output=True, timeout=30)
    cfg = compose_cfg(*PREEMPT)
    run(cfg, tmp_path / "ref")
    a, b = latest_params(tmp_path / "ref", cfg), latest_params(run_dir, cfg)
    assert a.keys() == b.keys() and all(np.array_equal(a[p], b[p]) for p in a)
