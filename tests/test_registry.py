"""`ftlab-registry`: a registered version loads the run's exact weights; rollback restores
the previous production exactly; two processes registering and promoting at once lose
nothing; bad refs and unfinished runs fail in one line; a crash before the rename leaves no
version behind. Most tests use fake run dirs (the registry only copies files); one uses a
real smoke run for the load check."""
import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import compose_cfg
from ftlab import registry as reg
from ftlab.cli import registry as cli
from ftlab.schema import ConfigError

TINY = ("experiment=digits_tiny", "debug=smoke", "schedule=full", "schedule.phases.train.epochs=1",
        "eval.baselines=false", "eval.latency=false", "eval.plots=false")  # one phase, 3 steps


def fake_run(path: Path, name: str = "toy", step: int = 3, seed: int = 0) -> Path:
    """A finished run dir as the registry sees it: files, two best steps, a latest one."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(f"name: {name}\nlogger:\n  mode: disabled\n")
    (path / "results.json").write_text(json.dumps(
        {"test/accuracy": 0.5 + seed / 100, "test/macro_f1": 0.4, "best_step": step,
         "report": "eval/test/report.md"}))
    (path / "manifest.csv").write_text(f"sample_id,split\n{seed},train\n")
    for kind, s in (("best", 1), ("best", step), ("latest", step)):
        d = path / "ckpt" / kind / str(s)
        (d / "params").mkdir(parents=True, exist_ok=True)
        (d / "_CHECKPOINT_METADATA").write_text("{}")
        (d / "params" / "blob").write_bytes(rng.bytes(64))
    return path


def tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def best3(run: Path) -> dict[str, str]:
    """The files of a fake run's best checkpoint (step 3), the only one a version keeps."""
    return {k: v for k, v in tree(run / "ckpt").items() if k.startswith("best/3/")}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    from ftlab.train import run
    run_dir = tmp_path_factory.mktemp("registry") / "run"
    run(compose_cfg(*TINY), run_dir)
    return run_dir


def test_registered_version_loads_the_runs_best_params_bit_identical(smoke_run, tmp_path):
    from ftlab import tasks
    from ftlab.models.loading import WEIGHTS
    from ftlab.runs import load_config, load_model
    from flax import nnx
    seen = []
    rec = reg.register(tmp_path, smoke_run, aliases=["production"],
                       reference_fn=lambda d: seen.append((d, (d / "config.yaml").exists())))
    vdir, name, version = reg.locate("digits_tiny", tmp_path)
    assert (name, version, rec["version"], rec["parent"]) == ("digits_tiny", "1", 1, None)
    assert seen and seen[0][1] and seen[0][0] != vdir  # ran on the private copy
    step = json.loads((smoke_run / "results.json").read_text())["best_step"]
    assert sorted(p.name for p in (vdir / "ckpt").iterdir()) == ["best"]
    assert [p.name for p in (vdir / "ckpt" / "best").iterdir()] == [str(step)]
    cfg = load_config(vdir)
    specs = tasks.load(vdir / "tasks.json")
    n = len(json.loads((vdir / "data_summary.json").read_text())["classes"])
    got, got_step = load_model(cfg, vdir, n, "best", specs)
    want, want_step = load_model(load_config(smoke_run), smoke_run, n, "best", specs)
    assert got_step == want_step == step
    a, b = jax.tree.leaves(nnx.state(got, WEIGHTS)), jax.tree.leaves(nnx.state(want, WEIGHTS))
    assert len(a) == len(b) > 0
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
    assert rec["data_sha256"] == hashlib.sha256(
        (smoke_run / "manifest.csv").read_bytes()).hexdigest()
    assert rec["metrics"]["test/accuracy"] == json.loads(
        (smoke_run / "results.json").read_text())["test/accuracy"]


def test_rollback_restores_the_previous_production_exactly(tmp_path):
    root = tmp_path / "reg"
    runs = [fake_run(tmp_path / f"run{i}", seed=i) for i in range(3)]
    snap = {}
    for i, run in enumerate(runs, 1):
        rec = reg.register(root, run)
        assert rec["version"] == i and rec["parent"] == (i - 1 or None)  # lineage
        reg.promote(root, "toy", i)
        snap[i] = tree(reg.locate("toy", root)[0])
    assert reg.show(root, "toy")["lineage"] == [3, 2, 1]
    for back in (2, 1):
        out = reg.rollback(root, "toy")
        assert (out["from"], out["to"]) == (back + 1, back)
        vdir, _, version = reg.locate("toy", root)
        assert version == str(back) and vdir == root / "toy" / f"v{back}"
        assert tree(vdir) == snap[back]
        assert tree(vdir / "ckpt") == best3(runs[back - 1])
    with pytest.raises(ConfigError, match="no earlier version to roll back to"):
        reg.rollback(root, "toy")
    assert reg.locate("toy", root)[2] == "1"  # a refused rollback changes nothing
    reg.promote(root, "toy", 3)  # a new push after the pops
    assert reg.rollback(root, "toy")["to"] == 1
    h = reg.history(root, "toy", "production")
    assert [(e["action"], e["from"], e["to"]) for e in h] == [
        ("promote", None, 1), ("promote", 1, 2), ("promote", 2, 3), ("rollback", 3, 2),
        ("rollback", 2, 1), ("promote", 1, 3), ("rollback", 3, 1)]


WORKER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from ftlab import registry as reg
    root, run, tag = sys.argv[1:]
    gate = Path(run).parent
    (gate / f"ready-{tag}").touch()  # start together, once both have imported
    while len(list(gate.glob("ready-*"))) < 2:
        time.sleep(0.01)
    for i in range(10):
        rec = reg.register(root, run, note=f"{tag}-{i}", parent=None)
        reg.promote(root, "toy", rec["version"])
""")


def test_concurrent_registrations_and_promotions_lose_nothing(tmp_path):
    root = tmp_path / "reg"  # not created yet: both processes race to create it too
    runs = [fake_run(tmp_path / f"run{i}", seed=i) for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(root), str(run), tag],
                              stderr=subprocess.PIPE, text=True)
             for run, tag in zip(runs, "ab")]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()
    recs = reg.versions(root, "toy")
    assert [r["version"] for r in recs] == list(range(1, 21))
    assert sorted(r["note"] for r in recs) == sorted(f"{t}-{i}" for t in "ab" for i in range(10))
    for r in recs:  # every dir holds its own run's files
        src = runs["ab".index(r["note"][0])]
        assert tree(Path(r["dir"]) / "ckpt") == best3(src)
    h = reg.history(root, "toy", "production")
    assert sorted(e["to"] for e in h) == list(range(1, 21))
    assert [e["from"] for e in h] == [None] + [e["to"] for e in h[:-1]]  # no lost update
    assert reg.locate("toy", root)[2] == str(h[-1]["to"])
    assert not list((root / ".tmp").iterdir())


def test_bad_refs_and_unfinished_runs_fail_in_one_line(tmp_path, capsys):
    root = tmp_path / "reg"
    with pytest.raises(ConfigError, match="registry is empty") as e:
        reg.locate("toy", root)
    assert e.value.key == "ref" and not root.exists()  # readers create nothing
    unfinished = fake_run(tmp_path / "unfinished")
    (unfinished / "results.json").unlink()
    with pytest.raises(ConfigError, match="has no results.json: the run has not finished"):
        reg.register(root, unfinished)
    nockpt = fake_run(tmp_path / "nockpt", step=7)
    (nockpt / "results.json").write_text(json.dumps({"best_step": 5}))
    with pytest.raises(ConfigError, match=r"no best checkpoint \(ckpt/best/5\)"):
        reg.register(root, nockpt)
    with pytest.raises(ConfigError, match="has no config.yaml"):
        reg.register(root, tmp_path / "nowhere")
    run = fake_run(tmp_path / "run")
    with pytest.raises(ConfigError, match="'Prod' is not a valid alias"):
        reg.register(root, run, aliases=["Prod"])
    assert not root.exists()  # every refusal came before anything was written
    reg.register(root, run, aliases=["candidate"])
    bad = {"toy@staging": "toy has no alias 'staging' (aliases: candidate -> v1; versions: 1)",
           "toy": "toy has no alias 'production'", "toy:9": "toy has no version 9; versions: 1",
           "other": "'other' is neither a run dir nor a registered model (registered: toy)",
           "no/such/dir": "no/such/dir is not a run dir"}
    for ref, msg in bad.items():
        with pytest.raises(ConfigError) as e:
            reg.locate(ref, root)
        assert msg in str(e.value) and "\n" not in str(e.value), ref
    with pytest.raises(ConfigError, match="toy has no version 4"):
        reg.promote(root, "toy", 4)
    with pytest.raises(ConfigError, match="toy has no version 9"):
        reg.register(root, run, parent=9)
    with pytest.raises(SystemExit) as ex:
        cli(["--root", str(root), "show", "toy:9"])
    err = capsys.readouterr().err
    assert ex.value.code == 2 and err == "error: ref: toy has no version 9; versions: 1\n"


def test_a_crash_before_the_rename_leaves_no_version(tmp_path):
    root = tmp_path / "reg"
    run = fake_run(tmp_path / "run")

    def crash(vdir):
        assert (vdir / "ckpt" / "best" / "3" / "params" / "blob").exists()
        raise RuntimeError("killed while scoring the reference")

    with pytest.raises(RuntimeError, match="killed"):
        reg.register(root, run, aliases=["production"], reference_fn=crash)
    assert reg.versions(root) == [] and not (root / "toy").exists()
    assert not list((root / ".tmp").iterdir())
    # A dir renamed into place whose transaction never committed is invisible and reused.
    (root / "toy" / "v1").mkdir(parents=True)
    (root / "toy" / "v1" / "junk").write_text("half")
    rec = reg.register(root, run)
    assert rec["version"] == 1 and not (root / "toy" / "v1" / "junk").exists()
    assert json.loads((root / "toy" / "v1" / "version.json").read_text())["version"] == 1


def test_cli_register_promote_list_show(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FTLAB_REGISTRY", str(tmp_path / "reg"))
    runs = [fake_run(tmp_path / f"run{i}", seed=i) for i in range(2)]
    cli(["register", str(runs[0]), "--no-reference", "--note", "first"])
    cli(["promote", "toy", "1"])
    cli(["register", str(runs[1]), "--no-reference", "--alias", "candidate"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("registered toy:1 (step 3, parent -, aliases -)")
    assert out[1] == "toy@production: v1"
    assert out[2].startswith("registered toy:2 (step 3, parent 1, aliases candidate)")
    cli(["list"])
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:4] == ["name", "version", "created", "aliases"]
    assert table[1].split()[3:7] == ["production", "0.5000", "0.4000", "-"]
    assert table[2].split()[3:7] == ["candidate", "0.5100", "0.4000", "v1"]
    cli(["show", "toy@candidate"])
    shown = json.loads(capsys.readouterr().out)
    assert shown["version"] == 2 and shown["lineage"] == [2, 1]
    assert shown["metrics"] == {"test/accuracy": 0.51, "test/macro_f1": 0.4, "best_step": 3}
    cli(["promote", "toy", "2"])
    cli(["rollback", "toy"])
    assert capsys.readouterr().out.splitlines() == ["toy@production: v1 -> v2",
                                                    "toy@production: v2 -> v1"]


def test_wandb_mirror_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    (tmp_path / "wb").mkdir()
    root = tmp_path / "reg"
    rec = reg.register(root, fake_run(tmp_path / "run"), aliases=["candidate"], wandb=True)
    assert rec["wandb"].endswith("/toy")
    import wandb
    wandb.teardown()  # the service closes the record file after finish(); wait for it
    logged = b"".join(p.read_bytes() for p in (tmp_path / "wb").rglob("offline-run-*/*.wandb"))
    assert b"ftlab-v1" in logged and b"candidate" in logged  # the artifact, with its aliases
    out = reg.promote(root, "toy", 1, wandb=True)
    assert out["changed"] and out["wandb"].startswith("skipped: WANDB_MODE=offline")
