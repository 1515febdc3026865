"""Console entry points. The only place Hydra is imported: DictConfig in, typed Config out."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, read_write

from ftlab.app_schema import (AdaptAppConfig, CombineAppConfig, EvalAppConfig, MonitorAppConfig,
                              PredictAppConfig, QuantizeAppConfig, RetrainAppConfig,
                              SelectAppConfig)
from ftlab.schema import Config, ConfigError, from_omegaconf

ConfigStore.instance().store(name="ftlab_config", node=Config)
ConfigStore.instance().store(name="ftlab_eval_config", node=EvalAppConfig)
ConfigStore.instance().store(name="ftlab_adapt_config", node=AdaptAppConfig)
ConfigStore.instance().store(name="ftlab_combine_config", node=CombineAppConfig)
ConfigStore.instance().store(name="ftlab_quantize_config", node=QuantizeAppConfig)
ConfigStore.instance().store(name="ftlab_predict_config", node=PredictAppConfig)
ConfigStore.instance().store(name="ftlab_monitor_config", node=MonitorAppConfig)
ConfigStore.instance().store(name="ftlab_select_config", node=SelectAppConfig)
ConfigStore.instance().store(name="ftlab_retrain_config", node=RetrainAppConfig)
def run_dirname(overrides: str) -> str:
    """The run dir's name from its overrides; list brackets become parentheses, since
    TensorStore (Orbax) cannot read a checkpoint under a path with '[' or ']'."""
    return (overrides or "default").replace("[", "(").replace("]", ")")


OmegaConf.register_new_resolver("ftlab_dirname", run_dirname, replace=True)
# A sweep's dir, from the sweep's own overrides. Cached like Hydra's ${now:}: each job's config
# (whose overrides are the job's) gets the value the sweep resolved first (copy_cache).
OmegaConf.register_new_resolver("ftlab_sweep_dirname", run_dirname, use_cache=True, replace=True)


def _best_param(sweep_dir: str, param: str, _node_=None):
    from ftlab.sweeps import best_param
    return best_param(sweep_dir, param, "?" if _node_ is None else _node_._get_full_key(None))


# ${ftlab_best:<sweep dir>,<param>}: a finished Optuna sweep's best value of <param>.
OmegaConf.register_new_resolver("ftlab_best", _best_param, replace=True)

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def _setup_jax() -> None:
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.ERROR)
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax: INFO per save, read-only notes
    from ftlab.compiles import enable_persistent_cache
    cache = os.environ.get("FTLAB_JAX_CACHE", os.path.expanduser("~/.cache/ftlab/jax"))
    if cache:
        enable_persistent_cache(cache)
    from ftlab.parallel import initialize
    initialize()  # multi-node SLURM jobs: jax.distributed from SLURM's environment


def _fail(e: Exception) -> None:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


class SweepCallback(Callback):
    """At the start of a multirun (conf/config.yaml hydra.callbacks): a SLURM launcher's
    request goes through `sbatch --test-only`, so one SLURM refuses fails in one line before
    any job is submitted; an Optuna study with a storage resumes, its `n_trials` counting
    the trials earlier invocations finished (ftlab/sweeps.py)."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        from ftlab import sweeps
        launcher, sweeper = config.hydra.launcher, config.hydra.sweeper
        if str(launcher.get("_target_", "")).endswith(".SlurmLauncher"):
            from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
            # The executor parameters the submitit launcher passes, named as it names them.
            generic = set(OmegaConf.structured(BaseQueueConf).keys())
            params = {k if k in generic else f"slurm_{k}": v
                      for k, v in OmegaConf.to_container(launcher, resolve=True).items()
                      if k not in ("_target_", "submitit_folder", "max_num_timeout")}
            reason = sweeps.slurm_refusal(params)
            if reason:
                asked = ", ".join(f"{k}={launcher[k]}" for k in (
                    "partition", "account", "qos", "nodes", "gpus_per_node", "cpus_per_task",
                    "mem_gb", "timeout_min") if launcher.get(k) is not None)
                _fail(ValueError(f"hydra.launcher: SLURM would not run the sweep's jobs: "
                                 f"{reason} (asked: {asked}); `sinfo -o '%P %c %m %G %l'` lists each "
                                 "partition's CPUs, memory (MB), GRES and time limit"))
        if str(sweeper.get("_target_", "")).endswith(".OptunaSweeper") and sweeper.storage:
            Path(config.hydra.sweep.dir).mkdir(parents=True, exist_ok=True)  # for sqlite
            done = sweeps.resume_study(sweeper.storage, sweeper.study_name)
            if done:
                logging.getLogger(__name__).info(
                    "study %s has %d finished trials: running %d more", sweeper.study_name,
                    done, max(0, sweeper.n_trials - done))
            with read_write(sweeper):
                sweeper.n_trials = max(0, sweeper.n_trials - done)


def _errors() -> tuple:
    from ftlab.checkpoint import CheckpointMismatch
    from ftlab.data.user import DataError
    from ftlab.models.loading import LoadError
    return ConfigError, DataError, LoadError, CheckpointMismatch


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
def evaluate(cfg: DictConfig) -> None:
    """`ftlab-eval run_dir=runs/<name>/<overrides> [split=test] [dataset=...]`."""
    from ftlab.runs import evaluate_run

    _setup_jax()
    try:
        ev, out = evaluate_run(from_omegaconf(cfg))
    except _errors() as e:
        _fail(e)
    m = ev["metrics"]
    worst = ev.get("worst_slice")
    print(f"{ev['split']} ({ev['n']} samples): accuracy {m['accuracy']:.4f}, macro-F1 "
          f"{m['macro_f1']:.4f}, balanced accuracy {m['balanced_accuracy']:.4f}"
          + (f"; worst slice {worst['column']}={worst['value']} "
             f"(macro-F1 {worst['score']:.4f})" if worst else "")
          + f"; report: {out / 'report.md'}")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def train(cfg: DictConfig) -> float | None:
    """`ftlab-train [experiment=...] [key=value ...]`; returns `trainer.monitor`'s value at
    the best checkpoint (what an Optuna sweep optimizes), None when halted."""
    from ftlab.train import run

    _setup_jax()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        config: Config = from_omegaconf(cfg)
        results = run(config, run_dir)
    except _errors() as e:
        _fail(e)
    if results.get("halted"):
        why = results.get("preempted")
        if why:
            from ftlab.preempt import requeue
            requeued = requeue()
            again = "requeued this SLURM job" if requeued else "rerun the same command"
            print(f"{why}: saved at step {results['step']}; {again} to resume ({run_dir})")
            if requeued:
                # Leave without a result, as submitit's own requeue does: a returned None
                # would be this job's result, and the sweep would end before the job does.
                raise SystemExit(0)
        else:
            print(f"halted at step {results['step']}; rerun the same command to resume "
                  f"({run_dir})")
        return
    recall = ", ".join(f"{k.split('/')[-1]} {v:.3f}" for k, v in results.items()
                       if k.startswith("test/recall/"))
    print(f"{config.name}: test accuracy {results['test/accuracy']:.4f}, "
          f"macro-F1 {results['test/macro_f1']:.4f}; recall per class: {recall} "
          f"(best step {results['best_step']}; {run_dir}/results.json)")
    ev_path = Path(results["report"]).parent / "eval.json"
    if ev_path.exists():
        import json
        from ftlab.evaluate import summary_table
        print(summary_table(json.loads(ev_path.read_text())))
    if results.get("adapt_table"):
        print(f"test-time adaptation ({config.adapt.method}), test split:\n"
              f"{results['adapt_table']}")
    worst = results.get("test/worst_slice")
    if worst:
        print(f"worst slice: {worst} (macro-F1 {results['test/worst_slice/macro_f1']:.4f}); "
              f"report: {results['report']}")
    else:
        print(f"report: {results['report']}")
    return results.get(config.trainer.monitor)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def lr_find(cfg: DictConfig) -> None:
    """`ftlab-lr-find experiment=... [lr_find.phase=top2]`: LR range test per param group."""
    from ftlab.lr_find import Curve, run, summary

    _setup_jax()
    out_dir = Path(HydraConfig.get().runtime.output_dir) / "lr_find"
    try:
        found = run(from_omegaconf(cfg), out_dir)
    except _errors() as e:
        _fail(e)
    print(f"LR range test of phase {found['phase']} ({out_dir}/lr_find.json, lr_find.png):")
    for name, curve in found["groups"].items():
        print(summary(name, Curve(**curve)))


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="adapt")
def adapt(cfg: DictConfig) -> None:
    """`ftlab-adapt run_dir=runs/<name>/<overrides> [adapt.method=tent adapt.lr=1e-3]`."""
    from ftlab.adapt import run_app

    _setup_jax()
    try:
        res = run_app(from_omegaconf(cfg))
    except _errors() as e:
        _fail(e)
    done = res["adapt"][res["method"]]
    print(f"{res['split']} split, source vs test-time adaptation ({res['method']}: "
          f"{done['steps']} steps on the inputs of '{res['pool']}', mean entropy "
          f"{done['entropy_before']:.4f} -> {done['entropy_after']:.4f}); accuracy / macro-F1:")
    print(res["table"])
    print(f"report: {res['out']}/report.md")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="combine")
def combine(cfg: DictConfig) -> None:
    """`ftlab-combine runs=[dir1,dir2] out=DIR` (mean) or `mode=route +route.<env>=dir ...`."""
    from ftlab.combine import combine_runs

    _setup_jax()
    try:
        res = combine_runs(from_omegaconf(cfg))
    except _errors() as e:
        _fail(e)
    ev = res["eval"]
    print(f"{ev['mode']} of {len(res['members'])} runs, {ev['split']} split ({ev['n']} "
          "samples); accuracy / macro-F1:")
    print(res["table"])
    print(f"report: {res['out']}/report.md")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="quantize")
def quantize(cfg: DictConfig) -> None:
    """`ftlab-quantize run_dir=runs/<name>/<overrides> [quantize.qat.epochs=0 ...]`."""
    from ftlab.quantize_report import run

    _setup_jax()
    try:
        res, out = run(from_omegaconf(cfg))
    except _errors() as e:
        _fail(e)
    print(f"{res['name']}: int8 on {res['hardware']} (test, n={res['n_test']}):")
    for name, r in res["table"].items():
        lat = ", ".join(f"b{b} p50 {m['p50_ms']:.1f} ms" for b, m in r["latency"].items())
        print(f"  {name}: accuracy {r['accuracy']:.4f}, macro-F1 {r['macro_f1']:.4f}, "
              f"{r['disk_bytes'] / 1e6:.1f} MB ({r['size_ratio']:.2f}x), {lat}, "
              f"max abs logit diff {r['max_abs_logit_diff']:.4f}")
    print(f"report: {out / 'report.md'}")


def aggregate(argv: list[str] | None = None) -> None:
    """`ftlab-aggregate <sweep dir> [--out DIR]`: every job's overrides and results in one
    table, seeds folded into mean ± std per setting (no Hydra config: a plain path)."""
    import argparse
    from ftlab.aggregate import markdown, write
    p = argparse.ArgumentParser(prog="ftlab-aggregate", description=aggregate.__doc__)
    p.add_argument("sweep_dir", help="a --multirun sweep dir (runs/<name>/multirun/<sweep>)")
    p.add_argument("--out", default=None, help="where to write (default: the sweep dir)")
    args = p.parse_args(argv)
    try:
        summary, out = write(Path(args.sweep_dir), args.out)
    except ConfigError as e:
        _fail(e)
    metrics = [k[:-5] for k in summary[0] if k.endswith(" mean")]
    print(markdown(summary, metrics), end="")
    print(f"{sum(r['n'] for r in summary)} jobs in {len(summary)} settings: "
          f"{out / 'jobs.csv'}, {out / 'summary.csv'}, {out / 'summary.md'}")


def _run_app(module: str, cfg: DictConfig, jax: bool = True) -> dict:
    """`module.run_app` on the typed app config, its `summary` printed; a bad input exits 2
    with one line. `jax`: set up JAX first (the apps that run a model)."""
    import importlib
    app = importlib.import_module(module)
    if jax:
        _setup_jax()
    try:
        res = app.run_app(from_omegaconf(cfg))
    except _errors() as e:
        _fail(e)
    print(app.summary(res))
    return res


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="predict")
def predict(cfg: DictConfig) -> None:
    """`ftlab-predict ref=<run dir | name[@alias|:version]> dataset=... split=...` or
    `inputs=<folder | csv>`: appends one row per input to the prediction log."""
    _run_app("ftlab.predict", cfg)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="monitor")
def monitor(cfg: DictConfig) -> None:
    """`ftlab-monitor ref=<ref> [stream=...] [last=N]`: drift of a window of the prediction
    log against the model's reference; exit status 1 when drift is flagged, 0 when not."""
    res = _run_app("ftlab.monitor", cfg, jax=False)
    sys.exit(1 if res["drift"] else 0)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="select")
def select(cfg: DictConfig) -> None:
    """`ftlab-select ref=<ref> n=50 strategy=margin [diversity=true] out=queue.csv`: the
    logged inputs to label next."""
    _run_app("ftlab.active", cfg, jax=False)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="retrain")
def retrain(cfg: DictConfig) -> None:
    """`ftlab-retrain ref=<name> labels=<annotated csv> [gate.margin=...]`: a candidate
    fine-tuned with production's config plus the new labels, promoted only if it passes the
    gate. Exit status 0 when promoted, 1 when production was kept, 2 on a config error."""
    res = _run_app("ftlab.retrain", cfg)
    sys.exit(0 if res.get("promoted") or res.get("halted") else 1)


def results(argv: list[str] | None = None) -> None:
    """`ftlab-results [DIRS...]`: the reproduced claims' runs under DIRS (default runs/) into
    docs/results/claims.jsonl (their claims replaced, others kept), then docs/results.md."""
    import argparse
    from ftlab import results as res
    p = argparse.ArgumentParser(prog="ftlab-results", description=results.__doc__)
    p.add_argument("dirs", nargs="*", default=["runs"], help="dirs holding claim runs")
    p.add_argument("--evidence", default=str(res.EVIDENCE), help="the evidence JSONL")
    p.add_argument("--out", default=str(res.OUT), help="the markdown table")
    p.add_argument("--include-smoke", action="store_true",
                   help="keep debug=smoke runs (never for the published table)")
    p.add_argument("--headers", default=str(Path(CONF_DIR) / "experiment" / "claims"),
                   help="rewrite the '# Result:' lines of the claim configs here from the "
                        "evidence (not with --include-smoke)")
    p.add_argument("--no-headers", action="store_true", help="leave the claim configs alone")
    args = p.parse_args(argv)
    headers = None if args.no_headers or args.include_smoke else Path(args.headers)
    try:
        rows, text = res.run(args.dirs, args.evidence, args.out, args.include_smoke, headers)
    except _errors() as e:
        _fail(e)
    claims = sorted({r["claim"] for r in rows})
    print(f"{len(rows)} runs of {len(claims)} claims ({', '.join(claims) or 'none found'}) "
          f"-> {args.evidence}; table: {args.out}")


def registry(argv: list[str] | None = None) -> None:
    """`ftlab-registry register|promote|rollback|list|show ...` (no Hydra config): numbered
    versions of finished runs and the aliases (production, candidate) pointing at them."""
    import argparse
    import json
    from ftlab import registry as reg
    p = argparse.ArgumentParser(prog="ftlab-registry", description=registry.__doc__)
    p.add_argument("--root", default=None,
                   help="the registry dir (default: $FTLAB_REGISTRY, else registry/)")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("register", help="a finished run's best checkpoint as a new version")
    r.add_argument("run_dir", help="a finished run dir (runs/<name>/<overrides>)")
    r.add_argument("--name", default=None, help="model name (default: the run's `name`)")
    r.add_argument("--alias", action="append", default=[], help="alias to point at it "
                   "(repeatable), e.g. candidate")
    r.add_argument("--parent", default=..., type=lambda s: None if s == "none" else int(s),
                   help="the version it descends from (default: the current production; "
                        "'none': no parent)")
    r.add_argument("--note", default="")
    r.add_argument("--no-reference", action="store_true",
                   help="skip the drift reference (reference.npz, the val split scored)")
    r.add_argument("--wandb", action="store_true", help="also log it as a W&B model artifact")
    for cmd, what in (("promote", "point an alias at a version"),
                      ("rollback", "point an alias back where its latest promotion found it")):
        c = sub.add_parser(cmd, help=what)
        c.add_argument("name")
        if cmd == "promote":
            c.add_argument("version", type=int)
        c.add_argument("--alias", default=reg.PRODUCTION)
        c.add_argument("--wandb", action="store_true", help="also move the W&B alias")
    sub.add_parser("list", help="the versions of one model or all").add_argument(
        "name", nargs="?", default=None)
    sub.add_parser("show", help="one version's record").add_argument(
        "ref", help="<name> (its production), <name>@<alias> or <name>:<version>")
    args = p.parse_args(argv)
    root = Path(args.root) if args.root else reg.default_root()
    try:
        if args.command == "register":
            ref_fn = None
            if not args.no_reference:
                _setup_jax()
                from ftlab.predict import write_reference as ref_fn
            rec = reg.register(root, args.run_dir, args.name, args.alias, args.parent,
                               args.note, ref_fn, args.wandb)
            print(f"registered {rec['name']}:{rec['version']} (step {rec['step']}, parent "
                  f"{rec['parent'] or '-'}, aliases {','.join(rec['aliases']) or '-'}): "
                  f"{rec['dir']}" + (f"; W&B {rec['wandb']}" if rec.get("wandb") else ""))
        elif args.command in ("promote", "rollback"):
            res = (reg.promote(root, args.name, args.version, args.alias, args.wandb)
                   if args.command == "promote" else
                   reg.rollback(root, args.name, args.alias, args.wandb))
            print(f"{res['name']}@{res['alias']}: "
                  + (f"v{res['from']} -> " if res["from"] else "")
                  + f"v{res['to']}" + ("" if res["changed"] else " (unchanged)")
                  + (f"; W&B {res['wandb']}" if "wandb" in res else ""))
        elif args.command == "list":
            recs = reg.versions(root, args.name)
            print(reg.table(recs).rstrip() if recs else f"no models registered in {root}")
        else:
            print(json.dumps(reg.show(root, args.ref), indent=2))
    except _errors() as e:
        _fail(e)
