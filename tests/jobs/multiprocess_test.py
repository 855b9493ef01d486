"""Jobs as 2 processes x 4 CPU devices equal 1 process x 8 devices.

The same code path as a multi-host TPU slice: `jax.distributed.initialize` (through
`DMD_COORDINATOR`, gloo collectives on CPU), each process loading only its rows of the
global batch, checkpoints and exports written cooperatively, only the main host writing
summaries.
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


def _run_two_processes(config_spec: str, workdir: str, *overrides: str) -> list[str]:
    """`python -m dmd_jax.main` as 2 processes of 4 CPU devices; their outputs."""
    port = _free_port()
    command = [sys.executable, "-m", "dmd_jax.main", f"--config={config_spec}",
               f"--workdir={workdir}", *overrides]
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
    return outputs


def test_two_processes_of_four_devices_match_one_process_of_eight(data_dir, tmp_path):
    reference = train.run(tiny_config(data_dir, **SETTINGS), str(tmp_path / "one"))

    workdir = str(tmp_path / "two")
    outputs = _run_two_processes(f"{REPO}/configs/demo.py:tiny", workdir,
                                 f"--config.data.data_dir={data_dir}",
                                 *(f"--config.{k}={v}" for k, v in SETTINGS.items()))
    summary = json.load(open(os.path.join(workdir, "summary.json")))
    assert summary["devices"]["process_count"] == 2 and summary["devices"]["device_count"] == 8
    assert summary["steps"] == 4
    assert "[train]" in outputs[0] and "[train]" not in outputs[1]  # only the main host logs
    ours = np.load(os.path.join(workdir, "predictions.npz"))
    theirs = np.load(os.path.join(tmp_path, "one", "predictions.npz"))
    np.testing.assert_array_equal(ours["id"], theirs["id"])
    np.testing.assert_allclose(ours["logits"], theirs["logits"], rtol=1e-4, atol=1e-4)
    assert summary["eval_accuracy"] == reference["eval_accuracy"]


def test_adapt_job_on_two_processes_matches_one_process(tiny_pipeline, tmp_path):
    """The tiny pipeline's adapt stage (1 process x 8 devices: norm, cema) again as
    2 processes x 4, plus cloud_all (every clip uploaded: cloud steps and the replay buffer
    on every host) against its own 1-process run: the same predictions, uploads and cloud
    steps. Every host must take the same decisions from the gathered batches, or the
    processes deadlock (as they did before `_clean_accuracy` broadcast its resume check)."""
    import ml_collections
    from dmd_jax.jobs import adapt

    stage = json.load(open(f"{tiny_pipeline}/adapt/config.json"))
    reference_methods = list(stage["adapt"]["methods"])
    stage["adapt"]["methods"] = reference_methods + ["cloud_all"]
    (tmp_path / "stage.json").write_text(json.dumps(stage))
    (tmp_path / "stage_config.py").write_text(
        "import json, ml_collections\n\n\ndef get_config():\n"
        f"    return ml_collections.ConfigDict(json.load(open({str(tmp_path / 'stage.json')!r})))\n")
    workdir = str(tmp_path / "two")
    _run_two_processes(str(tmp_path / "stage_config.py"), workdir)

    cloud_all = {**stage, "adapt": {**stage["adapt"], "methods": ["cloud_all"]}}
    adapt.run(ml_collections.ConfigDict(cloud_all), str(tmp_path / "one"))
    ours = json.load(open(os.path.join(workdir, "summary.json")))
    assert ours["devices"]["process_count"] == 2
    assert ours["methods"]["cloud_all"]["cloud_steps"] > 0
    references = {m: f"{tiny_pipeline}/adapt" for m in reference_methods}
    references["cloud_all"] = str(tmp_path / "one")
    for method, reference in references.items():
        for name in os.listdir(f"{reference}/reset/{method}"):
            a = np.load(os.path.join(workdir, "reset", method, name))
            b = np.load(f"{reference}/reset/{method}/{name}")
            for key in ("id", "prediction", "uploaded", "learned_from", "cloud_steps"):
                np.testing.assert_array_equal(a[key], b[key], err_msg=f"{method} {name} {key}")
