"""Console entry points. The only place Hydra is imported: DictConfig in, typed Config out."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from ftlab.schema import Config, ConfigError, from_omegaconf

ConfigStore.instance().store(name="ftlab_config", node=Config)
OmegaConf.register_new_resolver("ftlab_dirname", lambda s: s or "default", replace=True)

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def _setup_jax() -> None:
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.ERROR)
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every save at INFO
    import jax
    cache = os.environ.get("FTLAB_JAX_CACHE", os.path.expanduser("~/.cache/ftlab/jax"))
    if cache:
        jax.config.update("jax_compilation_cache_dir", cache)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def train(cfg: DictConfig) -> None:
    from ftlab.checkpoint import CheckpointMismatch
    from ftlab.data.user import DataError
    from ftlab.models.loading import LoadError
    from ftlab.train import run

    _setup_jax()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        config: Config = from_omegaconf(cfg)
        results = run(config, run_dir)
    except (ConfigError, DataError, LoadError, CheckpointMismatch) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if results.get("halted"):
        print(f"halted at step {results['step']}; rerun the same command to resume ({run_dir})")
        return
    recall = ", ".join(f"{k.split('/')[-1]} {v:.3f}" for k, v in results.items()
                       if k.startswith("test/recall/"))
    print(f"{config.name}: test accuracy {results['test/accuracy']:.4f}, "
          f"macro-F1 {results['test/macro_f1']:.4f}; recall per class: {recall} "
          f"(best step {results['best_step']}; {run_dir}/results.json)")
