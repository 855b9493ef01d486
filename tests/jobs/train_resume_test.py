"""A train job killed with SIGKILL and started again finishes bit-identical to one never killed."""

import json
import os
import signal
import subprocess
import sys

from conftest import REPO, tiny_config
from dmd_jax.jobs import train

SETTINGS = {"train.steps": 12, "train.checkpoint_every": 2, "train.log_every": 1,
            "train.eval_every": 100}


def _command(workdir: str, data_dir: str) -> list[str]:
    overrides = [f"--config.{k}={v}" for k, v in SETTINGS.items()]
    return [sys.executable, "-m", "dmd_jax.main", f"--config={REPO}/configs/demo.py:tiny",
            f"--workdir={workdir}", f"--config.data.data_dir={data_dir}", *overrides]


def _run_until(command: list[str], marker: str) -> None:
    """Starts the job and SIGKILLs it as soon as `marker` appears on its stdout."""
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if marker in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL, "".join(lines[-20:])


def test_sigkill_then_restart_matches_uninterrupted(data_dir, tmp_path):
    reference = train.run(tiny_config(data_dir, **SETTINGS), str(tmp_path / "reference"))

    workdir = str(tmp_path / "killed")
    command = _command(workdir, data_dir)
    _run_until(command, "step 7/12")  # mid-run, with an asynchronous save in flight or done
    assert not os.path.exists(os.path.join(workdir, "summary.json"))

    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "resumed from checkpoint step" in done.stdout
    resumed_at = int(done.stdout.split("resumed from checkpoint step ")[1].split()[0])
    assert 0 < resumed_at < 12
    summary = json.load(open(os.path.join(workdir, "summary.json")))
    assert summary["steps"] == 12
    assert summary["param_fingerprint"] == reference["param_fingerprint"]
