"""Bad input and faults, as a careless or hostile user meets them: one clear line naming
the thing and the fix, a non-zero exit, no traceback, and nothing on disk damaged."""

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO

MAIN = [sys.executable, "-m", "dmd_jax.main"]
CONVERT = [sys.executable, "-m", "dmd_jax.convert"]


def run(command, timeout=300):
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def assert_one_clear_line(out, *named):
    assert out.returncode != 0, out.stdout[-2000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), out.stderr[-2000:]
    for text in named:
        assert text in last, last


def tree_digest(root):
    """Every file's path and content hash under `root`: to prove nothing changed."""
    digests = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                digests[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return digests


def tiny(workdir, data_dir, *overrides, variant="tiny"):
    return [*MAIN, f"--config=configs/demo.py:{variant}", f"--workdir={workdir}",
            f"--config.data.data_dir={data_dir}", *overrides]


def test_a_config_file_that_does_not_exist(tmp_path):
    out = run([*MAIN, "--config=configs/nope.py", f"--workdir={tmp_path / 'w'}"])
    assert_one_clear_line(out, "configs/nope.py")
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("override,named", [
    ("--config.train.optimizer=adam", "config.train.optimizer 'adam'; use 'adamw' or 'sgd'"),
    ("--config.train.batch_size=0", "config.train.batch_size=0 must be an integer >= 1"),
    ("--config.train.steps=0", "config.train.steps=0 must be an integer >= 1"),
    ("--config.train.steps=-5", "config.train.steps=-5 must be an integer >= 1"),
    ("--config.train.log_every=0", "config.train.log_every=0 must be an integer >= 1"),
    ("--config.data.frames=0", "config.data.frames=0 must be an integer >= 1"),
])
def test_bad_values_are_one_line_with_the_valid_range(tmp_path, data_dir, override, named):
    out = run(tiny(tmp_path / "w", data_dir, override))
    assert_one_clear_line(out, named)
    assert not (tmp_path / "w" / "model").exists()  # no model exported, trained or not


def test_a_second_job_on_a_workdir_in_use_is_refused(tmp_path, data_dir):
    workdir = tmp_path / "w"
    first = subprocess.Popen(tiny(workdir, data_dir, "--config.train.steps=40"), cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (workdir / ".lock").exists():  # bounded: the first job has claimed it
            assert time.monotonic() < deadline and first.poll() is None, first.stdout.read()
            time.sleep(0.1)
        second = run(tiny(workdir, data_dir, "--config.train.steps=40"))
        assert_one_clear_line(second, "is in use by process", str(first.pid), ".lock")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    # Killed, it left its lock: the next job takes it over (its owner is gone); a short
    # run, so it recomputes the killed one's results (overwrite) instead of finishing it.
    assert (workdir / ".lock").exists()
    again = run(tiny(workdir, data_dir, "--config.train.steps=2", "--config.overwrite=True"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "taking it over" in again.stderr and not (workdir / ".lock").exists()


def test_a_model_directory_that_lies_about_its_model(tmp_path, data_dir, tiny_pipeline):
    """model.json of the edge over the teacher's variables, a truncated model.json, and a
    missing variables/ folder: each one line naming the directory, none damaged."""
    cases = {}
    lying = tmp_path / "lying"
    shutil.copytree(f"{tiny_pipeline}/teacher/model", lying)
    shutil.copy(f"{tiny_pipeline}/edge/model/model.json", lying / "model.json")
    cases["lying"] = ("cannot be read as the x3d",)
    truncated = tmp_path / "truncated"
    shutil.copytree(f"{tiny_pipeline}/edge/model", truncated)
    text = (truncated / "model.json").read_text()
    (truncated / "model.json").write_text(text[: len(text) // 2])
    cases["truncated"] = ("model.json is not valid JSON",)
    no_variables = tmp_path / "no_variables"
    shutil.copytree(f"{tiny_pipeline}/edge/model", no_variables)
    shutil.rmtree(no_variables / "variables")
    cases["no_variables"] = ("cannot be read",)
    truncated_variables = tmp_path / "truncated_variables"
    shutil.copytree(f"{tiny_pipeline}/edge/model", truncated_variables)
    for folder, _, names in os.walk(truncated_variables / "variables"):
        for name in names:
            if os.path.getsize(os.path.join(folder, name)) > 1000:  # the array data
                with open(os.path.join(folder, name), "r+b") as f:
                    f.truncate(100)
    cases["truncated_variables"] = ("cannot be read",)
    for name, named in cases.items():
        before = tree_digest(tmp_path / name)
        out = run(tiny(tmp_path / f"label_{name}", data_dir, f"--config.edge.path={tmp_path / name}",
                       f"--config.cloud.path={tiny_pipeline}/teacher/model",
                       "--config.label.upload_crfs=(30,)",  # as the tiny pipeline's labels
                       variant="label,tiny"))
        assert_one_clear_line(out, str(tmp_path / name), *named)
        assert tree_digest(tmp_path / name) == before


@pytest.mark.parametrize("case", ["safetensors", "pyth", "out_is_a_file"])
def test_converter_input_that_is_damaged(tmp_path, case):
    if case == "safetensors":
        src = tmp_path / "hf"
        src.mkdir()
        (src / "config.json").write_text(json.dumps({"model_type": "videomae"}))
        (src / "model.safetensors").write_bytes(b"\xff" * 64)  # "header too large"
        out = run([*CONVERT, "--family=videomae", f"--src={src}", f"--out={tmp_path / 'o'}"])
        assert_one_clear_line(out, "model.safetensors", "download it again")
    elif case == "pyth":
        torch = pytest.importorskip("torch")
        src = tmp_path / "X3D_S.pyth"
        torch.save({"model_state": {"w": torch.ones(1000)}}, src)
        src.write_bytes(src.read_bytes()[:300])  # truncated mid-download
        out = run([*CONVERT, "--family=x3d", f"--src={src}", f"--out={tmp_path / 'o'}"])
        assert_one_clear_line(out, "X3D_S.pyth", "truncated or damaged")
    else:
        blocker = tmp_path / "taken"
        blocker.write_text("a file")
        out = run([*CONVERT, "--family=x3d", f"--src={tmp_path / 'none.pyth'}",
                   f"--out={blocker}"])
        assert_one_clear_line(out, "is a file, not a model directory")
        assert blocker.read_text() == "a file"
    assert not (tmp_path / "o" / "model.json").exists()


def test_a_read_only_data_dir(tmp_path):
    if os.geteuid() == 0:  # root writes anywhere: make the data dir a file instead
        data_dir = tmp_path / "data"
        data_dir.write_text("not a folder")
    else:
        data_dir = tmp_path / "data"
        data_dir.mkdir()
        data_dir.chmod(0o500)
    out = run(tiny(tmp_path / "w", data_dir))
    assert_one_clear_line(out, "cannot prepare dataset", "data.data_dir")


def test_a_damaged_dataset_file(tmp_path, data_dir):
    damaged = tmp_path / "tfds"
    shutil.copytree(data_dir, damaged, ignore=shutil.ignore_patterns("*.lock", ".built"))
    (shard,) = [os.path.join(r, f) for r, _, fs in os.walk(damaged) for f in fs
                if "train.array_record" in f]
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 3)
    out = run(tiny(tmp_path / "w", damaged, "--config.data.prepare=False"))
    assert_one_clear_line(out, "cannot be read", "Delete that folder")


def test_a_write_that_fails_leaves_no_temporary_file_and_the_old_file(tmp_path, monkeypatch):
    from dmd_jax import files

    target = tmp_path / "summary.json"
    target.write_text("the old summary")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(files.WorkdirError, match="summary.json.*No space left"):
        files.write_json(target, {"new": 1})
    assert target.read_text() == "the old summary"
    assert os.listdir(tmp_path) == ["summary.json"]  # no tmp* left


def test_files_follow_the_umask(tmp_path):
    from dmd_jax import files

    old = os.umask(0o022)
    try:
        files.save_npz(tmp_path / "a.npz", x=np.zeros(2))
        files.write_json(tmp_path / "b.json", {})
    finally:
        os.umask(old)
    for name in ("a.npz", "b.json"):
        assert oct(os.stat(tmp_path / name).st_mode & 0o777) == oct(0o644)  # not 0600


def test_a_damaged_label_chunk_says_how_to_mend_it_and_the_label_job_does(tmp_path, data_dir,
                                                                          tiny_pipeline):
    labels = tmp_path / "label"
    shutil.copytree(f"{tiny_pipeline}/label", labels)
    chunk = labels / "unlabelled" / "chunk_00000016.npz"
    chunk.write_bytes(chunk.read_bytes()[:100])
    before = tree_digest(labels)
    out = run([*MAIN, "--config=configs/demo.py:switcher,tiny",
               f"--workdir={tmp_path / 'switcher'}", f"--config.switcher.label_dir={labels}"])
    assert_one_clear_line(out, "chunk_00000016.npz is damaged", "run the label job")
    assert tree_digest(labels) == before
    relabel = run(tiny(labels, data_dir, f"--config.edge.path={tiny_pipeline}/edge/model",
                       f"--config.cloud.path={tiny_pipeline}/teacher/model",
                       "--config.label.upload_crfs=(30,)",  # as the tiny pipeline's labels
                       variant="label,tiny"))
    assert relabel.returncode == 0, relabel.stderr[-3000:]
    assert "1 of 2 chunks already on disk" in relabel.stdout
    assert tree_digest(labels)["unlabelled/chunk_00000016.npz"] == tree_digest(
        f"{tiny_pipeline}/label")["unlabelled/chunk_00000016.npz"]  # recomputed, the same
