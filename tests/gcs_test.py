"""A pipeline whose workdir and data dir are Cloud Storage buckets (`gs://`), against a
local Cloud Storage emulator this test starts on 127.0.0.1 and stops: the same results as
on local disk.

Files go through etils.epath (gcsfs, which honours STORAGE_EMULATOR_HOST), checkpoints
and exported models through orbax (tensorstore, TENSORSTORE_GCS_HTTP_URL), TensorBoard
events through google-cloud-storage; the dataset's array_record files are read from a
local mirror of the bucket (`pipeline.local_data_dir`).
"""

import json
import logging
import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO, TEST_XLA_FLAGS

BUCKET = "dmd-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def bucket(monkeypatch):
    """The emulator's address, with this process's clients pointed at it."""
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, os.path.join(os.path.dirname(__file__), "gcs_emulator.py"), str(port),
         BUCKET], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:  # bounded: until the port answers or 30 s pass
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline and server.poll() is None, "emulator did not start"
            time.sleep(0.2)
        url = f"http://127.0.0.1:{port}"
        env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url}
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        logging.getLogger("gcsfs").setLevel(logging.ERROR)  # "no credentials": expected here
        yield env
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_tiny_pipeline_in_a_bucket_equals_local_disk(bucket, data_dir, tiny_pipeline, tmp_path):
    from etils import epath

    from dmd_jax import files

    # The tiny dataset, prepared once locally, as a bucket data_dir holds it.
    local = epath.Path(data_dir) / "synthetic_actions"
    for path in files.walk_files(local):
        files.write_bytes(epath.Path(f"gs://{BUCKET}/tfds/synthetic_actions") /
                          path.relative_to(local), path.read_bytes())
    workdir = f"gs://{BUCKET}/runs/tiny"
    teacher = f"{tiny_pipeline}/teacher/model"
    command = [sys.executable, "-m", "dmd_jax.main", "--config=configs/demo.py:pipeline,tiny",
               f"--workdir={workdir}", f"--config.data.data_dir=gs://{BUCKET}/tfds",
               f"--config.data.cache_dir={tmp_path / 'mirror'}",
               "--config.stage_order=('edge', 'label', 'switcher', 'hybrid')",
               f"--config.stages.label.cloud.path={teacher}",
               f"--config.stages.hybrid.cloud.path={teacher}"]
    env = {**os.environ, **bucket, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"{TEST_XLA_FLAGS} --xla_force_host_platform_device_count=8"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    read = lambda name: json.loads(epath.Path(f"{workdir}/{name}").read_text())  # noqa: E731
    ours, theirs = read("summary.json"), json.load(open(f"{tiny_pipeline}/summary.json"))
    assert ours["stages"]["edge"]["param_fingerprint"] == (
        theirs["stages"]["edge"]["param_fingerprint"])  # bit-identical training
    assert ours["stages"]["label"]["agreement_rate"] == theirs["stages"]["label"]["agreement_rate"]
    assert ours["operating_point"]["accuracy"] == theirs["operating_point"]["accuracy"]
    for name in ("edge/model/model.json", "edge/stamp.json", "label/stamp.json",
                 "label/test/chunk_00000000.npz", "switcher/hard/switcher/switcher.json",
                 "hybrid/deferral.png", "REPORT.md"):
        assert epath.Path(f"{workdir}/{name}").exists(), name
    assert any(p.name.startswith("events.out.tfevents")
               for p in epath.Path(f"{workdir}/edge").iterdir())
    assert os.listdir(tmp_path / "mirror")  # the dataset was read from the local mirror

    # Started again: the stages find their results and stamps in the bucket and resume.
    resume = [c if not c.startswith("--config.stage_order") else
              "--config.stage_order=('edge', 'label')" for c in command]
    again = subprocess.run(resume, cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from checkpoint step 6" in again.stdout
    assert "unlabelled: 2 of 2 chunks already on disk" in again.stdout
