"""experiments/elpv_monitor_loop.py --smoke: the whole loop through the command-line tools
(train on mono -> register -> predict mono and poly -> monitor -> select -> annotate ->
retrain with the gate -> list / rollback) runs, and what it leaves is consistent."""
import csv
import importlib.util
from pathlib import Path

import pytest

from ftlab import registry

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_monitor_loop_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "elpv_monitor_loop", ROOT / "experiments" / "elpv_monitor_loop.py")
    loop = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loop)
    res = loop.main(["--smoke", "--work", str(tmp_path / "w")])
    reg = tmp_path / "w" / "registry"
    # every step ran; the poly window is the shifted one (its rows, its stream)
    assert [s["step"][:2] for s in res["steps"]][:7] == ["1.", "2.", "3a", "3b", "4a", "4b", "5."]
    assert res["monitor_poly"]["stream"] == "poly" and res["monitor_poly"]["n"] > res["monitor_mono"]["n"]
    # the queue came from the poly stream and its labels became the candidate's extra train
    with open(tmp_path / "w" / "queue_labeled.csv", newline="") as f:
        queued = list(csv.DictReader(f))
    assert len(queued) == res["labeled"] == 30 and all(r["label"] for r in queued)
    assert {r["env"] for r in queued} == {"poly"}
    v2 = registry.show(reg, f"{loop.NAME}:2")
    assert v2["lineage"] == [2, 1]
    # whatever the gate said, production is v1 at the end: kept, or promoted then rolled back
    assert registry.locate(loop.NAME, reg)[2] == "1"
    assert res["retrain_exit"] == (0 if res["retrain"]["promoted"] else 1)
    assert res["rolled_back"] == res["retrain"]["promoted"]
    assert (tmp_path / "w" / "summary.md").read_text().startswith("| step | result |")
