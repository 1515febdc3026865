"""What a run dir records about how it was made: config, git sha, package versions."""
from __future__ import annotations

import json
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

PACKAGES = ("ftlab", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "hydra-core",
            "omegaconf", "wandb", "tokenizers", "safetensors", "scikit-learn", "numpy")


def git_sha(cwd: Path) -> dict:
    def run(*args):
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    try:
        return {"sha": run("rev-parse", "HEAD") or None,
                "dirty": bool(run("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {"sha": None, "dirty": None}


def versions() -> dict[str, str | None]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def write(run_dir: Path, config_yaml: str, pretrained: dict | None = None) -> None:
    """config.yaml, run_info.json and, given the model's metadata (`models.ModelMeta`:
    sizes, input size, normalisation, tokenizer, classifier, licence, chained-from run),
    model.json."""
    import jax
    (run_dir / "config.yaml").write_text(config_yaml)
    if pretrained is not None:
        (run_dir / "model.json").write_text(json.dumps(pretrained, indent=2))
    info = {"git": git_sha(Path(__file__).parent), "packages": versions(),
            "pretrained": pretrained,
            "python": sys.version.split()[0], "platform": platform.platform(),
            "devices": [str(d) for d in jax.devices()], "argv": sys.argv}
    (run_dir / "run_info.json").write_text(json.dumps(info, indent=2))
