"""A label job killed with SIGKILL and started again loses no clip and writes none twice."""

import glob
import os
import signal
import subprocess
import sys

import numpy as np

from conftest import REPO
from dmd_jax.data import labels


def test_sigkill_then_restart_labels_every_clip_once(data_dir, tiny_pipeline, tmp_path):
    root = str(tmp_path)
    edge = f"{tiny_pipeline}/edge/model"
    overrides = {"edge.path": edge, "cloud.path": edge, "label.batch_size": 8,
                 "label.chunk_size": 8}
    command = [sys.executable, "-m", "dmd_jax.main", f"--config={REPO}/configs/demo.py:label,tiny",
               f"--workdir={root}/label", f"--config.data.data_dir={data_dir}",
               *(f"--config.{k}={v}" for k, v in overrides.items())]

    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    for line in proc.stdout:  # kill right after the second chunk of the first split is written
        if "unlabelled: clips 16/32" in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert len(glob.glob(f"{root}/label/unlabelled/chunk_*.npz")) == 2
    assert not os.path.exists(f"{root}/label/summary.json")

    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "2 of 4 chunks already on disk" in done.stdout
    for split in ("unlabelled", "calibration", "test"):
        labelled = labels.read_split(f"{root}/label", split)
        np.testing.assert_array_equal(labelled["id"], np.arange(32))  # each clip exactly once
    # Edge and cloud are the same model here, so every clip agrees.
    assert labels.read_split(f"{root}/label", "unlabelled")["hard"].all()
