"""The entry point: bad input ends in one clear line, never a traceback."""

import subprocess
import sys

from conftest import REPO


def _main(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dmd_jax.main", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_unknown_override_key_names_the_nearest_valid_keys(tmp_path):
    out = _main("--config=configs/demo.py", f"--workdir={tmp_path}", "--config.train.stepz=3")
    assert out.returncode != 0
    assert "unknown config key 'train.stepz'" in out.stderr
    assert "train.steps" in out.stderr
    assert "Traceback" not in out.stderr
    assert not any(tmp_path.iterdir())  # nothing written


def test_unknown_top_level_key(tmp_path):
    out = _main("--config=configs/demo.py", f"--workdir={tmp_path}", "--config.modle.width_factor=2")
    assert out.returncode != 0 and "'modle.width_factor'" in out.stderr
    assert "model.width_factor" in out.stderr


def test_unknown_job_lists_the_jobs(tmp_path):
    out = _main("--config=configs/demo.py", f"--workdir={tmp_path}", "--config.job=fly")
    assert out.returncode != 0 and "'fly'" in out.stderr and "train" in out.stderr


def test_unknown_config_variant(tmp_path):
    out = _main("--config=configs/demo.py:huge", f"--workdir={tmp_path}")
    assert out.returncode != 0 and "unknown variant 'huge'" in out.stderr
    assert "Traceback" not in out.stderr


def test_unprepared_dataset_is_one_line(tmp_path):
    out = _main("--config=configs/demo.py:tiny", f"--workdir={tmp_path / 'run'}",
                f"--config.data.data_dir={tmp_path / 'empty'}", "--config.data.prepare=False")
    assert out.returncode == 1, out.stderr[-2000:]
    assert "is not prepared" in out.stderr and "data.prepare=True" in out.stderr
    assert "Traceback" not in out.stderr


def test_unwritable_workdir_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = _main("--config=configs/demo.py:tiny", f"--workdir={blocker / 'run'}")
    assert out.returncode == 1 and "not writable" in out.stderr
    assert "Traceback" not in out.stderr


def test_missing_models_for_labelling_is_one_line(tmp_path):
    out = _main("--config=configs/demo.py:label", f"--workdir={tmp_path / 'label'}",
                f"--config.edge.path={tmp_path / 'nowhere'}")
    assert out.returncode == 1, out.stderr[-2000:]
    assert "no exported model" in out.stderr and "nowhere" in out.stderr
    assert "Traceback" not in out.stderr


def test_missing_labels_for_the_hybrid_evaluation_is_one_line(tmp_path):
    out = _main("--config=configs/demo.py:hybrid", f"--workdir={tmp_path / 'hybrid'}",
                f"--config.hybrid.label_dir={tmp_path / 'nolabels'}")
    assert out.returncode == 1, out.stderr[-2000:]
    assert "no labels for split 'calibration'" in out.stderr and "label job" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_setting_no_job_of_the_run_reads_is_refused(tmp_path):
    """A label config has no train section: `train.steps` there is an unknown key, not a
    setting silently ignored."""
    out = _main("--config=configs/demo.py:label", f"--workdir={tmp_path}", "--config.train.steps=3")
    assert out.returncode != 0 and "unknown config key 'train.steps'" in out.stderr
    assert "Traceback" not in out.stderr and not any(tmp_path.iterdir())


def test_another_job_on_a_variant_without_its_sections_is_one_line(tmp_path):
    for job, named in (("pipeline", "no section 'stage_order'"), ("label", "no section 'edge'")):
        out = _main("--config=configs/demo.py:tiny", f"--workdir={tmp_path}", f"--config.job={job}")
        assert out.returncode == 1, out.stderr[-2000:]
        assert named in out.stderr and "configs/demo.py:label" in out.stderr
        assert "Traceback" not in out.stderr and not any(tmp_path.iterdir())
