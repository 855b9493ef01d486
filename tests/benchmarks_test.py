"""The benchmark suite: runs a benchmark in its own process, renders BENCHMARKS.md, and
never loses a previous result to a failed run."""

import json
import os
import subprocess
import sys

from conftest import REPO
from benchmarks import common, suite


def test_suite_runs_a_benchmark_and_writes_its_section(tmp_path):
    results, output = tmp_path / "results", tmp_path / "BENCHMARKS.md"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.suite", "--only", "videomae_forward", "--quick",
         "--results", str(results), "--output", str(output)],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    section = json.load(open(results / "videomae_forward.json"))
    assert section["machine"]["cores"] == os.cpu_count() and section["devices"]["backend"]
    (row,) = section["rows"]
    assert row[0] == "VideoMAE-S 8x64x64" and row[3] > 0 and row[4] > 0  # both sides timed
    assert float(row[7]) < 1e-4  # converted model agrees with transformers
    text = output.read_text()
    assert "## VideoMAE forward: dmd_jax vs transformers" in text and "Machine: " in text
    assert "| VideoMAE-S 8x64x64 | float32 | 2 |" in text
    assert "## Compile times" in text and "Not yet run: x3d_train_step" in text


def test_a_failed_benchmark_keeps_its_previous_result(tmp_path):
    previous = common.Section("Old title", "cmd", "setup", ["a", "b"], [["x", 1.5]],
                              machine={"cpu": "test cpu", "cores": 2}, devices={"backend": "cpu"})
    suite.write_atomic(str(tmp_path / "hybrid_cost.json"),
                       json.dumps(previous.__dict__))
    error = suite.run_one("no_such_benchmark", quick=True, results_dir=str(tmp_path))
    assert error and "no_such_benchmark" in error
    assert sorted(os.listdir(tmp_path)) == ["hybrid_cost.json"]  # nothing written or removed
    text = suite.render(suite.load_results(str(tmp_path)), {"hybrid_cost": error})
    assert "## Old title" in text and "| x | 1.5 |" in text
    assert "The last run of this benchmark failed" in text
