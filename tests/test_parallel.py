"""Data parallel over 4 (forced host) CPU devices gives the single-device loss curve."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import compose_cfg
from ftlab.schema import ConfigError
from ftlab.train import check_config

SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, "tests")
    from conftest import compose_cfg
    from ftlab.train import run
    from test_train import latest_params
    assert len(jax.devices()) == 4, jax.devices()
    out = sys.argv[1]
    over = ("experiment=digits_tiny", "dataset.subset=400", "trainer.batch_size=32",
            "trainer.progress=false", "eval.baselines=false", "eval.latency=false",
            "eval.plots=false")
    params = {}
    for n in (1, 4):
        cfg = compose_cfg(*over, f"trainer.devices={n}")
        run(cfg, f"{out}/d{n}")
        params[n] = latest_params(__import__("pathlib").Path(f"{out}/d{n}"), cfg)
    diff = max(float(np.abs(params[1][p] - params[4][p]).max()) for p in params[1])
    print(json.dumps({"max_param_diff": diff}))
""")


def test_four_devices_follow_the_single_device_loss_curve(tmp_path):
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    env = {**os.environ, "XLA_FLAGS": flags.strip(), "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=900,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    diff = json.loads(done.stdout.strip().splitlines()[-1])["max_param_diff"]
    rows = {n: [json.loads(x) for x in (tmp_path / f"d{n}" / "metrics.jsonl").read_text()
                .splitlines()] for n in (1, 4)}
    assert len(rows[1]) == len(rows[4]) > 3
    for a, b in zip(rows[1], rows[4]):
        assert a["step"] == b["step"]
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-4)
        assert b["val/loss"] == pytest.approx(a["val/loss"], rel=1e-4)
    # Params drift a little more than the losses: Adam divides by sqrt(v), so a gradient
    # near zero summed in another order moves its weight by up to ~lr (measured 1.4e-3).
    assert diff < 1e-2


def test_devices_and_batch_size_checked_before_any_work():
    with pytest.raises(ConfigError) as e:
        check_config(compose_cfg("experiment=digits_tiny", "trainer.devices=64"))
    assert e.value.key == "trainer.devices"
