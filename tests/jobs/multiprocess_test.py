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


def test_dmd_stages_and_adapt_on_two_processes_match_one_process(tiny_pipeline, tmp_path):
    """label -> train_switcher -> evaluate_hybrid -> adapt as one pipeline of 2 processes x
    4 devices, on the tiny pipeline's edge and teacher, against that pipeline's own stages
    (1 process x 8 devices): the same labels, switcher scores, operating point and
    streams. The adapt stage adds cloud_all (every clip uploaded: cloud steps and the replay
    buffer on every host), checked against its own 1-process run. Every host must take the
    same decisions from the gathered batches and the main host's files, or the processes
    deadlock."""
    import shutil

    import ml_collections
    from dmd_jax.data import labels
    from dmd_jax.jobs import adapt

    config = json.load(open(f"{tiny_pipeline}/config.json"))
    config["stage_order"] = ["label", "switcher", "hybrid", "adapt"]
    del config["stages"]["edge"], config["stages"]["teacher"]
    for stage in ("label", "hybrid", "adapt"):
        config["stages"][stage]["cloud"]["path"] = f"{tiny_pipeline}/teacher/model"
    config["stages"]["adapt"]["adapt"]["methods"] += ["cloud_all"]
    workdir = tmp_path / "two"
    shutil.copytree(f"{tiny_pipeline}/edge/model", workdir / "edge" / "model")
    (tmp_path / "run.json").write_text(json.dumps(config))
    (tmp_path / "run_config.py").write_text(
        "import json, ml_collections\n\n\ndef get_config():\n"
        f"    return ml_collections.ConfigDict(json.load(open({str(tmp_path / 'run.json')!r})))\n")
    _run_two_processes(str(tmp_path / "run_config.py"), str(workdir))

    for split in ("unlabelled", "calibration", "test"):
        ours, theirs = (labels.read_split(f"{root}/label", split)
                        for root in (workdir, tiny_pipeline))
        np.testing.assert_array_equal(ours["id"], theirs["id"])
        np.testing.assert_array_equal(ours["hard"], theirs["hard"])
        np.testing.assert_allclose(ours["cloud_logits"], theirs["cloud_logits"], atol=1e-4)
    for target in ("hard", "ground_truth"):
        ours, theirs = (np.load(f"{root}/switcher/{target}/predictions.npz")
                        for root in (workdir, tiny_pipeline))
        np.testing.assert_allclose(ours["score"], theirs["score"], atol=1e-4)
    ours, theirs = (json.load(open(f"{root}/hybrid/operating_point.json"))
                    for root in (workdir, tiny_pipeline))
    assert ours["offload_rate"] == theirs["offload_rate"]
    assert ours["accuracy"] == theirs["accuracy"]

    stage = json.load(open(f"{tiny_pipeline}/adapt/config.json"))
    stage["adapt"]["methods"] = ["cloud_all"]
    adapt.run(ml_collections.ConfigDict(stage), str(tmp_path / "one"))
    summary = json.load(open(workdir / "adapt" / "summary.json"))
    assert summary["devices"]["process_count"] == 2
    assert summary["methods"]["cloud_all"]["cloud_steps"] > 0
    references = {m: f"{tiny_pipeline}/adapt" for m in ("norm", "cema")}
    references["cloud_all"] = str(tmp_path / "one")
    for method, reference in references.items():
        for name in os.listdir(f"{reference}/reset/{method}/seed0"):
            a = np.load(workdir / "adapt" / "reset" / method / "seed0" / name)
            b = np.load(f"{reference}/reset/{method}/seed0/{name}")
            for key in ("id", "prediction", "uploaded", "learned_from", "cloud_steps"):
                np.testing.assert_array_equal(a[key], b[key], err_msg=f"{method} {name} {key}")
