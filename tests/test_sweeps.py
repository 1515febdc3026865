"""`ftlab-train --multirun` on the basic and submitit_local launchers, sweep dir naming, and an
Optuna study that resumes after its invocation is killed. (SLURM itself: test_slurm.py.)"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf

from conftest import compose_cfg

BIN = Path(sys.executable).parent / "ftlab-train"
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
# A few steps of tiny BERT on digits, without the report's extras: ~15 s a job once compiled.
TINY = ("experiment=digits_tiny", "debug=smoke", "eval.baselines=false", "eval.latency=false",
        "eval.plots=false")
TINY_DIR = "debug=smoke,eval.baselines=false,eval.latency=false,eval.plots=false"
TINY_JOB = "debug=smoke,eval.baselines=False,eval.latency=False,eval.plots=False"


def jax_cache(tmp_path_factory) -> str:
    """The session's compilation cache (tests/conftest.py): jobs after the first compile
    nothing."""
    return os.environ["FTLAB_JAX_CACHE"]


def multirun(cwd, cache, *args, log=None, timeout=900):
    """`ftlab-train -m ARGS` in cwd (outputs under cwd/runs/), stdout and stderr together in
    `.stdout`; with `log` (a path) it is started in its own session, writing there."""
    env = {**os.environ, "WANDB_MODE": "disabled", "FTLAB_JAX_CACHE": cache}
    cmd = [str(BIN), "-m", *args]
    if log is not None:
        with open(log, "w") as f:
            return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
    return subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)


def sweep_dirs(*overrides: str) -> tuple[str, list[str]]:
    """(sweep dir, [job dir per job]) as Hydra resolves them for `-m overrides`, jobs from
    Hydra's own sweep expansion; nothing runs."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        hydra = GlobalHydra.instance().hydra
        master = hydra.compose_config("config", list(overrides), run_mode=RunMode.MULTIRUN,
                                      with_log_configuration=False)
        sweep_dir = str(master.hydra.sweep.dir)
        parsed = OverridesParser.create().parse_overrides(list(overrides))
        jobs = []
        for job in BasicSweeper.split_arguments(parsed, None)[0]:
            cfg = hydra.config_loader.load_sweep_config(master, list(job))
            HydraConfig.instance().set_config(cfg)
            assert cfg.hydra.sweep.dir == sweep_dir  # every job sees its sweep's dir
            jobs.append(str(Path(cfg.hydra.sweep.dir) / cfg.hydra.sweep.subdir))
    HydraConfig.instance().cfg = None
    return sweep_dir, jobs


def test_sweep_dirs_come_from_name_and_overrides_only():
    a_dir, a_jobs = sweep_dirs(*TINY, "trainer.seed=0,1")
    assert a_dir == f"runs/digits_tiny/multirun/{TINY_DIR},trainer.seed=0,1"
    assert a_jobs == [f"{a_dir}/{TINY_JOB},trainer.seed={s}" for s in (0, 1)]
    assert sweep_dirs(*TINY, "trainer.seed=0,1") == (a_dir, a_jobs)  # stable: no clock
    b_dir, b_jobs = sweep_dirs(*TINY, "trainer.seed=1,2")
    assert b_dir != a_dir and not set(a_jobs) & set(b_jobs)  # seed 1 runs in each sweep's dir
    c_dir, _ = sweep_dirs(*TINY, "trainer.seed=0,1", "optimizer.weight_decay=0,0.01")
    assert len({a_dir, b_dir, c_dir}) == 3


@pytest.mark.parametrize("override", ["hydra/launcher=slurm", "hydra/launcher=slurm_local",
                                      "hparams_search=digits_tiny"])
def test_launcher_and_search_configs_compose(override):
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        cfg = GlobalHydra.instance().hydra.compose_config(
            "config", ["experiment=digits_tiny", override], run_mode=RunMode.MULTIRUN)
    launcher, sweeper = cfg.hydra.launcher, cfg.hydra.sweeper
    if override.startswith("hydra/launcher"):
        assert launcher._target_.endswith(".SlurmLauncher") and launcher.name == "ftlab-digits_tiny"
        local = override.endswith("_local")
        expected = ("debug", "ftlab") if local else (None, None)
        assert (launcher.partition, launcher.account) == expected
        assert launcher.gpus_per_node == (None if local else 1) and launcher.max_num_timeout == 0
    else:
        assert sweeper._target_.endswith(".OptunaSweeper") and sweeper.study_name == "digits_tiny"
        assert sweeper.storage == ("sqlite:///runs/digits_tiny/multirun/"
                                   "hparams_search=digits_tiny/optuna.db")
        assert set(sweeper.params) == {"optimizer.weight_decay", "schedule.phases.all.lr"}


def finished_jobs(cwd) -> list[str]:
    return sorted(str(p.parent.relative_to(cwd)) for p in Path(cwd).rglob("results.json"))


@pytest.mark.parametrize("launcher", ["basic", "submitit_local"])
def test_sweep_runs_every_job_on_launcher(tmp_path, tmp_path_factory, launcher):
    out = multirun(tmp_path, jax_cache(tmp_path_factory), f"hydra/launcher={launcher}", *TINY,
                   "trainer.seed=0,1")
    assert out.returncode == 0, out.stdout[-3000:]
    assert finished_jobs(tmp_path) == sweep_dirs(*TINY, "trainer.seed=0,1")[1]
    if launcher == "submitit_local":  # submitit's logs live in the sweep dir
        assert any(tmp_path.glob("runs/digits_tiny/multirun/*/.submitit/*/*_log.out"))


def test_slurm_launcher_without_slurm_fails_in_one_line(tmp_path):
    env_path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                               if not (Path(p) / "sbatch").exists())
    env = {**os.environ, "PATH": env_path, "WANDB_MODE": "disabled"}
    out = subprocess.run([str(BIN), "-m", "hydra/launcher=slurm", *TINY, "trainer.seed=0,1"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.strip().splitlines() == [
        "error: hydra.launcher: SLURM would not run the sweep's jobs: sbatch is not on PATH: "
        "run the sweep from a SLURM login node (asked: nodes=1, gpus_per_node=1, "
        "cpus_per_task=8, mem_gb=64, timeout_min=240); `sinfo -o '%P %c %m %G %l'` lists each "
        "partition's CPUs, memory (MB), GRES and time limit"]
    assert not (tmp_path / "runs").exists()


def _study(storage: str):
    import optuna
    from optuna.trial import TrialState
    try:
        trials = optuna.load_study(study_name="digits_tiny", storage=storage).get_trials()
    except Exception:  # not created yet, or the sweep holds the sqlite lock for a moment
        return None
    by_state = {s: [t for t in trials if t.state == s] for s in TrialState}
    return by_state


def test_optuna_study_resumes_after_its_sweep_is_killed(tmp_path, tmp_path_factory):
    """n_trials=3: killed during the 2nd trial, the rerun runs that trial again (same params,
    so the same run dir) and one more: 3 complete trials in all, not 3 + 3."""
    from optuna.trial import TrialState

    cache = jax_cache(tmp_path_factory)
    args = (*TINY, "hparams_search=digits_tiny", "hydra.sweeper.n_trials=3")
    sweep_dir = tmp_path / sweep_dirs(*args)[0]
    storage = f"sqlite:///{sweep_dir}/optuna.db"

    first = multirun(tmp_path, cache, *args, log=tmp_path / "first.log")
    deadline = time.time() + 600
    try:
        while time.time() < deadline:
            st = _study(storage) if (sweep_dir / "optuna.db").exists() else None
            # The 2nd trial running with both params drawn (the sweeper writes them one at a
            # time; killed in between, the rerun would rightly draw the missing one anew).
            if st and len(st[TrialState.COMPLETE]) == 1 and st[TrialState.RUNNING] and \
                    len(st[TrialState.RUNNING][0].params) == 2:
                break
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.5)
        else:
            pytest.fail("the first trial did not finish in 600 s")
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # a crash or a node lost: no cleanup at all
        first.wait()
    interrupted = _study(storage)[TrialState.RUNNING][0].params

    again = multirun(tmp_path, cache, *args)
    assert again.returncode == 0, again.stdout[-3000:]
    st = _study(storage)
    complete = [t.params for t in st[TrialState.COMPLETE]]
    assert len(complete) == 3 and not st[TrialState.RUNNING], again.stdout[-3000:]
    assert complete[1] == interrupted  # the stopped trial ran again first
    assert [t.params for t in st[TrialState.FAIL]] == [interrupted]
    assert "has 1 finished trials: running 2 more" in again.stdout
    assert len(finished_jobs(tmp_path)) == 3  # its run dir was reused, not a fourth
    best = OmegaConf.load(sweep_dir / "optimization_results.yaml")
    assert best.best_value == max(t.value for t in st[TrialState.COMPLETE])


def test_best_param_reads_a_finished_study_and_names_the_key_when_it_cannot(tmp_path):
    from ftlab.schema import ConfigError
    from ftlab.sweeps import best_param
    with pytest.raises(ConfigError, match=r"^tasks.severity.weight: .*run that search first"):
        best_param(str(tmp_path), "tasks.severity.weight", "tasks.severity.weight")
    (tmp_path / "optimization_results.yaml").write_text(
        "name: optuna\nbest_params:\n  tasks.severity.weight: 0.31\nbest_value: 0.8\n")
    assert best_param(str(tmp_path), "tasks.severity.weight") == 0.31
    with pytest.raises(ConfigError, match="searched: tasks.severity.weight"):
        best_param(str(tmp_path), "optimizer.lr", "optimizer.lr")


def test_task_weight_search_composes_and_searches_keys_that_exist():
    """experiment=elpv_task_weights_search: an Optuna study over keys of the composed config
    (a misspelled key would only fail at the first trial)."""
    import yaml
    exp = yaml.safe_load((Path(CONF_DIR) / "experiment" / "elpv_task_weights_search.yaml")
                         .read_text())
    cfg = compose_cfg("experiment=elpv_task_weights_search")
    assert cfg.weighting.scheme == "static" and cfg.trainer.monitor == "val/combined"
    for key in exp["hydra"]["sweeper"]["params"]:
        task, field = key.split(".")[1:]
        assert getattr(cfg.tasks[task], field) == 1.0
