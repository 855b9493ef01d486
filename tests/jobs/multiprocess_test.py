"""The train job as 2 processes x 4 CPU devices equals 1 process x 8 devices.

The same code path as a multi-host TPU slice: `jax.distributed.initialize` (through
`DMD_COORDINATOR`, gloo collectives on CPU), each process loading only its rows of the
global batch, checkpoints and exports written cooperatively.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np

from conftest import REPO, TEST_XLA_FLAGS, tiny_config
from dmd_jax.jobs import train

SETTINGS = {"train.steps": 4, "train.checkpoint_every": 2, "train.eval_every": 100}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_of_four_devices_match_one_process_of_eight(data_dir, tmp_path):
    reference = train.run(tiny_config(data_dir, **SETTINGS), str(tmp_path / "one"))

    workdir, port = str(tmp_path / "two"), _free_port()
    command = [sys.executable, "-m", "dmd_jax.main", f"--config={REPO}/configs/demo.py:tiny",
               f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
               *(f"--config.{k}={v}" for k, v in SETTINGS.items())]
    procs = [subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env={
                                  **os.environ, "JAX_PLATFORMS": "cpu",
                                  "XLA_FLAGS": f"{TEST_XLA_FLAGS} --xla_force_host_platform_device_count=4",
                                  "DMD_COORDINATOR": f"127.0.0.1:{port}",
                                  "DMD_NUM_PROCESSES": "2", "DMD_PROCESS_ID": str(i)})
             for i in range(2)]
    outputs = [p.communicate(timeout=400)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-4000:]

    summary = json.load(open(os.path.join(workdir, "summary.json")))
    assert summary["devices"]["process_count"] == 2 and summary["devices"]["device_count"] == 8
    assert summary["steps"] == 4
    assert "[train]" in outputs[0] and "[train]" not in outputs[1]  # only the main host logs
    ours = np.load(os.path.join(workdir, "predictions.npz"))
    theirs = np.load(os.path.join(tmp_path, "one", "predictions.npz"))
    np.testing.assert_array_equal(ours["id"], theirs["id"])
    np.testing.assert_allclose(ours["logits"], theirs["logits"], rtol=1e-4, atol=1e-4)
    assert summary["eval_accuracy"] == reference["eval_accuracy"]
