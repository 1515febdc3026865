import atexit
import os
import shutil
import tempfile
from pathlib import Path

# Tests compile far more than they run (a smoke run: a few steps per compiled phase), so XLA
# optimizes less: at backend level 0 the claims' smoke runs took ~40% less time here (compile
# faster, steps slower). Set before the first computation; ftlab-* subprocesses inherit it.
# Runs outside the tests keep XLA's defaults; an XLA_FLAGS that sets the level wins.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_backend_optimization_level=0").strip()

import pytest  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

import ftlab.cli  # registers the schema and resolvers  # noqa: F401,E402
from ftlab.schema import Config, from_omegaconf  # noqa: E402

os.environ.setdefault("WANDB_MODE", "disabled")
# One persistent compilation cache for the whole session, cold at its start: a program the
# tests compile once (a tiny model's step, its init programs) is read back by later tests and
# by the ftlab-* subprocesses they start (which inherit the variable). Compile counts still
# count cache hits, so the tests on them hold.
if "FTLAB_JAX_CACHE" not in os.environ:
    os.environ["FTLAB_JAX_CACHE"] = tempfile.mkdtemp(prefix="ftlab-test-jax-")
    atexit.register(shutil.rmtree, os.environ["FTLAB_JAX_CACHE"], ignore_errors=True)
# Decoded datasets (ftlab/data/cache.py) likewise: cold at the start, shared by the session.
if "FTLAB_DATA_CACHE" not in os.environ:
    os.environ["FTLAB_DATA_CACHE"] = tempfile.mkdtemp(prefix="ftlab-test-data-")
    atexit.register(shutil.rmtree, os.environ["FTLAB_DATA_CACHE"], ignore_errors=True)
if os.environ["FTLAB_JAX_CACHE"]:
    from ftlab.compiles import enable_persistent_cache
    enable_persistent_cache(os.environ["FTLAB_JAX_CACHE"])
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def compose_cfg(*overrides: str) -> Config:
    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        cfg = compose("config", overrides=list(overrides))
    return from_omegaconf(cfg)


@pytest.fixture
def compose_config():
    return compose_cfg


# Longest files first: `make test` runs `-n 2 --dist loadfile --no-loadscope-reorder`, so
# xdist hands out whole files in this order, and a long file started last cannot leave one
# worker running alone at the end. Ordered by measured time per file on this 2-core CPU.
LONGEST_FIRST = ("test_results.py", "test_train.py", "test_slurm.py", "test_cli.py",
                 "test_monitor_loop.py", "test_quantize.py", "test_vision.py", "test_sweeps.py",
                 "test_adapt.py", "test_evaluate.py", "test_combine.py", "test_zoo.py",
                 "test_peft.py", "test_preempt.py", "test_parallel.py", "test_multitask.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable within a file
