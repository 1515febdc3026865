"""docs/performance.md is generated from the committed benchmark results, and every ratio in
them names its reference: a row of the same run, or the reference's own timing in the row
(`ratio_to: autodiff` with `autodiff_ms`)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def test_committed_performance_doc_is_generated_from_the_results():
    out = subprocess.run([sys.executable, "benchmarks/report.py"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    assert out == (ROOT / "docs" / "performance.md").read_text(), (
        "docs/performance.md is stale: python benchmarks/report.py > docs/performance.md")


def test_every_ratio_names_its_reference():
    files = sorted(RESULTS.glob("*.jsonl"))
    assert files
    for path in files:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        names = {r["name"] for r in rows if "name" in r}
        for r in rows:
            ref = r.get("ratio_to")
            in_row = ref is not None and any(k.startswith(f"{ref}_") for k in r)
            assert ref is None or ref in names or in_row, f"{path.name}: {r['name']} -> {ref}"
