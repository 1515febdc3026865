"""Sweeps (`ftlab-train -m`): a SLURM request checked before any job is submitted, an
Optuna study that resumes where a stopped invocation left off, and a finished study's best
params read back into a config. No Hydra here: ftlab/cli.py applies these to the launcher
and sweeper configs at the start of a multirun, and registers `${ftlab_best:...}`."""
from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from ftlab.schema import ConfigError

_SBATCH_PREFIX = re.compile(r"^((sbatch: )?error: |allocation failure: |"
                            r"Batch job submission failed: )+")


def slurm_refusal(params: dict) -> str | None:
    """SLURM's reason for refusing a job with these submitit `AutoExecutor` parameters
    (generic names such as `mem_gb`, SLURM ones prefixed: `slurm_partition`), from
    `sbatch --test-only` on the script submitit would submit; None when SLURM accepts it.
    Nothing is submitted."""
    import submitit

    if shutil.which("sbatch") is None:
        return "sbatch is not on PATH: run the sweep from a SLURM login node"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            executor = submitit.AutoExecutor(folder=tmp, cluster="slurm")
        except RuntimeError as e:  # no srun: not a SLURM machine
            return str(e)
        executor.update_parameters(**params)
        script = Path(tmp) / "test_only.sh"
        script.write_text(executor._executor._make_submission_file_text("true", "test-only"))
        try:
            out = subprocess.run(["sbatch", "--test-only", str(script)], capture_output=True,
                                 text=True, timeout=60)
        except subprocess.TimeoutExpired:
            return "sbatch --test-only did not answer in 60 s: is slurmctld up (`sinfo`)?"
    if out.returncode == 0:
        return None
    lines = (_SBATCH_PREFIX.sub("", line.strip()) for line in out.stderr.splitlines())
    reasons = dict.fromkeys(line for line in lines if line)  # unique, in order
    return "; ".join(reasons) or f"sbatch --test-only exited {out.returncode}"


def resume_study(storage: str, study_name: str) -> int:
    """Ready a persistent Optuna study for another invocation; returns how many of its trials
    finished (complete or pruned). Trials a stopped invocation left running are marked failed
    and their params enqueued again: the rerun trains them in the same run dirs (same
    overrides), so they resume from their checkpoints. Run one invocation per study at a
    time: another one's running trials would look stopped."""
    import optuna
    from optuna.trial import TrialState

    store = optuna.storages.get_storage(storage)
    try:
        study_id = store.get_study_id_from_name(study_name)
    except KeyError:  # a new study
        return 0
    study = optuna.load_study(study_name=study_name, storage=store)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        store.set_trial_state(store.get_trial_id_from_study_id_trial_number(study_id, t.number),
                              TrialState.FAIL)
        study.enqueue_trial(t.params)
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def best_param(sweep_dir: str, param: str, key: str = "?"):
    """`${ftlab_best:<sweep dir>,<param>}` (at config key `key`): the value of `param` in the
    best trial of the finished Optuna sweep in `sweep_dir` (its optimization_results.yaml),
    so a config can train with what a search found instead of a hand-copied number."""
    import yaml
    path = Path(sweep_dir) / "optimization_results.yaml"
    if not path.exists():
        raise ConfigError(key, f"reads the best {param} of the Optuna sweep in {sweep_dir}, "
                               f"which has no {path.name}; run that search first (see the "
                               "experiment's header) or set the value by hand")
    best = (yaml.safe_load(path.read_text()) or {}).get("best_params") or {}
    if param not in best:
        raise ConfigError(key, f"the sweep in {sweep_dir} did not search '{param}'; it "
                               f"searched: {', '.join(sorted(best)) or 'nothing'}")
    return best[param]
