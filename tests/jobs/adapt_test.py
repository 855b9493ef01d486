"""The adapt job end to end on the tiny dataset and models: contract, resumption, mixed
streams, forced divergence, bad input."""

import json
import os
import re

import numpy as np
import pytest

from conftest import tiny_config
from dmd_jax.jobs import adapt


def adapt_config(data_dir, root, **overrides):
    base = {"edge.path": f"{root}/edge/model", "cloud.path": f"{root}/teacher/model"}
    return tiny_config(data_dir, "adapt", **{**base, **overrides})


@pytest.fixture(scope="module")
def mixed_run(data_dir, tiny_pipeline, tmp_path_factory):
    """One method of each kind on a mixed stream of the tiny config's two corruptions
    (every method's step is covered by tests/tta; compiling all of them here again
    would only cost time)."""
    workdir = str(tmp_path_factory.mktemp("adapt"))
    config = adapt_config(data_dir, tiny_pipeline, **{
        "adapt.protocol": "mixed",
        "adapt.methods": ("source", "tent", "cema", "cloud_all")})
    return config, workdir, adapt.run(config, workdir)


def test_summary_contract(mixed_run):
    config, workdir, summary = mixed_run
    conditions = {f"{c}@5" for c in config.adapt.corruptions}
    assert set(summary["methods"]) == set(config.adapt.methods)
    for name, method in summary["methods"].items():
        assert set(method["corruptions"]) == conditions
        for cond in method["corruptions"].values():
            for key in ("accuracy", "upload_fraction", "bytes_up", "bytes_down"):
                assert key in cond
        accuracies = [c["accuracy"] for c in method["corruptions"].values()]
        assert method["accuracy"] == pytest.approx(np.mean(accuracies))
    clip_bytes = 8 * 32 * 32 * 3
    rows = np.load(os.path.join(workdir, "mixed", "cema", "seed0", "mixed.npz"))
    assert summary["methods"]["cema"]["bytes_up"] == rows["uploaded"].sum() * clip_bytes
    assert summary["methods"]["cema"]["upload_fraction"] == pytest.approx(rows["uploaded"].mean())
    # A clip goes up only if no filter turned it down: the recorded failures explain it.
    failed = np.any([rows[f"failed_{k}"] for k in ("unreliable", "low_info", "redundant")], 0)
    np.testing.assert_array_equal(rows["uploaded"], ~failed)
    rejected = summary["methods"]["cema"]["rejected"]
    assert set(rejected) == {"unreliable", "low_info", "redundant"}
    assert all(rejected[k] + summary["methods"]["cema"]["upload_fraction"] <= 1 + 1e-9
               for k in rejected)
    assert "rejected" not in summary["methods"]["tent"]
    for name in ("source", "tent"):
        assert summary["methods"][name]["upload_fraction"] == 0.0
        assert summary["methods"][name]["bytes_up"] == 0.0
    assert summary["methods"]["tent"]["learned_from_fraction"] == 1.0
    on_disk = json.load(open(os.path.join(workdir, "summary.json")))
    assert on_disk["methods"]["tent"]["accuracy"] == summary["methods"]["tent"]["accuracy"]
    report = open(os.path.join(workdir, "report.md")).read()
    assert "| cema |" in report and "gaussian_noise@5" in report and "mPC" in report
    assert re.search(r"^Ran on \d+ cpu devices? \(backend cpu\) in 1 process\.$", report, re.M)
    assert os.path.getsize(os.path.join(workdir, "accuracy_vs_upload.png")) > 1000


def test_predictions_on_disk_reproduce_the_summary(mixed_run):
    config, workdir, summary = mixed_run
    for name in config.adapt.methods:
        rows = np.load(os.path.join(workdir, "mixed", name, "seed0", "mixed.npz"))
        assert len(rows["id"]) == 2 * 32 and len(rows["loss"]) == 8
        for cond, stats in summary["methods"][name]["corruptions"].items():
            keep = rows["condition"] == cond
            assert np.mean(rows["prediction"][keep] == rows["label"][keep]) == pytest.approx(
                stats["accuracy"])


def test_mixed_stream_interleaves_corruptions(mixed_run):
    _, workdir, _ = mixed_run
    rows = np.load(os.path.join(workdir, "mixed", "source", "seed0", "mixed.npz"))
    per_batch = rows["condition"].reshape(8, 8)
    assert any(len(set(batch)) > 1 for batch in per_batch)
    for cond in set(rows["condition"]):  # every clip once per corruption
        assert sorted(rows["id"][rows["condition"] == cond]) == list(range(32))


def test_rerun_resumes_from_the_streams_on_disk(mixed_run, capsys):
    config, workdir, summary = mixed_run
    path = os.path.join(workdir, "mixed", "cema", "seed0", "mixed.npz")
    before = os.path.getmtime(path)
    again = adapt.run(config, workdir)
    assert os.path.getmtime(path) == before
    assert "[adapt] cema " not in capsys.readouterr().out  # nothing re-ran
    assert again["methods"] == json.loads(json.dumps(summary["methods"]))


def test_divergence_is_detected_logged_and_reset(data_dir, tiny_pipeline, tmp_path, capsys):
    config = adapt_config(data_dir, tiny_pipeline, **{
        "adapt.methods": ("tent",), "adapt.corruptions": ("gaussian_noise",),
        "adapt.tent.learning_rate": 3e38})  # ~float32's largest: the first update overflows
    summary = adapt.run(config, str(tmp_path))
    assert summary["methods"]["tent"]["stability_resets"] >= 1
    assert "resetting to the source model" in capsys.readouterr().out
    rows = np.load(tmp_path / "reset" / "tent" / "seed0" / "gaussian_noise@5.npz")
    assert any(reason.startswith("non-finite") for reason in rows["stability_reset"])


def test_unknown_method_is_one_clear_error(data_dir, tiny_pipeline, tmp_path):
    config = adapt_config(data_dir, tiny_pipeline, **{"adapt.methods": ("tent", "memo")})
    with pytest.raises(ValueError, match="'memo'.*no module"):
        adapt.run(config, str(tmp_path))


def test_collapse_is_judged_against_the_predictions_before_adapting():
    from dmd_jax.tta.base import BatchResult

    collapsed = np.zeros((10, 4))
    collapsed[:, 2] = 5.0  # every clip predicted as class 2
    result = BatchResult(collapsed, np.ones(10, bool), np.zeros(10, bool), loss=0.1, updated=True)
    assert "collapse" in adapt.health_problem(result, True, 0.9, before=0.3)
    assert adapt.health_problem(result, True, 0.9, before=0.95) is None  # was so already
    assert adapt.health_problem(result, False, 0.9, before=0.3) is None  # not adapted yet
    nan = BatchResult(collapsed, np.ones(10, bool), np.zeros(10, bool), loss=float("nan"),
                      updated=True)
    assert "non-finite" in adapt.health_problem(nan, False, 0.9, before=0.3)


class Interrupted(Exception):
    pass


def test_a_stream_killed_mid_way_resumes_to_the_uninterrupted_result(
        mixed_run, data_dir, tiny_pipeline, tmp_path, monkeypatch, capsys):
    """Tent and CEMA uploading every clip (parameters, optimisers, the cloud's two models
    and replay buffer) are killed after their second checkpoint of the mixed stream (8
    batches, one every 2): the first run dies in tent's stream at batch 4; the second
    resumes it there, finishes it and dies in cloud_all's at batch 2; a third with another
    learning rate is refused; the last resumes cloud_all at batch 2. Both end with the
    uninterrupted run's predictions, losses, uploads and cloud steps."""
    config, reference_dir, _ = mixed_run
    config = adapt_config(data_dir, tiny_pipeline, **{
        "adapt.protocol": "mixed", "adapt.methods": ("tent", "cloud_all"),
        "adapt.checkpoint_every": 2})
    save = adapt.StreamRecord.save
    saves = []

    def save_then_die(record, job, method):
        save(record, job, method)
        saves.append(record.position)
        if len(saves) == 2:
            raise Interrupted

    monkeypatch.setattr(adapt.StreamRecord, "save", save_then_die)
    partial = lambda name: tmp_path / "mixed" / name / "seed0" / "mixed.partial"
    for dies_in in ("tent", "cloud_all"):
        saves.clear()
        with pytest.raises(Interrupted):
            adapt.run(config.copy_and_resolve_references(), str(tmp_path))
        assert partial(dies_in).exists()
    assert "tent stream mixed (seed 0): resuming at batch 4 of 8" in capsys.readouterr().out
    assert not partial("tent").exists()  # finished: its checkpoint is gone
    monkeypatch.setattr(adapt.StreamRecord, "save", save)
    other = config.copy_and_resolve_references()
    other.adapt.cema.edge_learning_rate = 1e-3
    with pytest.raises(ValueError, match=r"cloud_all stream mixed \(seed 0\) in progress.*"
                                         r"edge_learning_rate"):
        adapt.run(other, str(tmp_path))
    assert partial("cloud_all").exists()  # refused: kept
    adapt.run(config, str(tmp_path))
    assert "cloud_all stream mixed (seed 0): resuming at batch 2 of 8" in capsys.readouterr().out
    for name in ("tent", "cloud_all"):
        ours = np.load(tmp_path / "mixed" / name / "seed0" / "mixed.npz")
        theirs = np.load(os.path.join(reference_dir, "mixed", name, "seed0", "mixed.npz"))
        assert not partial(name).exists()
        for key in theirs.files:
            if key not in ("seconds", "stamp"):
                np.testing.assert_array_equal(ours[key], theirs[key], err_msg=f"{name} {key}")
    cloud = np.load(tmp_path / "mixed" / "cloud_all" / "seed0" / "mixed.npz")
    assert cloud["metric_buffer"][1] > 0 and cloud["cloud_steps"][2:].sum() > 0  # restored, used


def test_seeds_intervals_and_a_class_correlated_stream(data_dir, tiny_pipeline, tmp_path):
    config = adapt_config(data_dir, tiny_pipeline, **{
        "adapt.protocol": "correlated:0.1", "adapt.methods": ("source", "lame"),
        "adapt.corruptions": ("gaussian_noise",), "adapt.seeds": (0, 1),
        "adapt.differences": ("lame-source", "lame-norm")})
    summary = adapt.run(config, str(tmp_path))
    assert summary["seeds"] == [0, 1]
    per_seed = {seed: np.load(tmp_path / "correlated-0.1" / "lame" / f"seed{seed}"
                              / "gaussian_noise@5.npz") for seed in (0, 1)}
    assert not np.array_equal(per_seed[0]["id"], per_seed[1]["id"])  # another order
    accuracies = [np.mean(r["prediction"] == r["label"]) for r in per_seed.values()]
    lame = summary["methods"]["lame"]
    assert lame["accuracy_per_seed"] == pytest.approx(accuracies)
    assert lame["accuracy"] == pytest.approx(np.mean(accuracies))
    assert lame["accuracy_std"] == pytest.approx(np.std(accuracies, ddof=1))
    assert len(lame["batch_accuracy"]) == 4  # 32 clips, batches of 8
    source = [np.load(tmp_path / "correlated-0.1" / "source" / f"seed{seed}"
                      / "gaussian_noise@5.npz") for seed in (0, 1)]
    difference = summary["differences"]["lame-source"]
    correct = lambda runs: np.concatenate([r["prediction"] == r["label"] for r in runs])
    expected = np.mean(correct(per_seed.values())) - np.mean(correct(source))
    assert difference["difference"] == pytest.approx(expected)
    assert difference["ci95_low"] <= difference["difference"] <= difference["ci95_high"]
    assert summary["differences_not_computed"] == ["lame-norm"]
    report = (tmp_path / "report.md").read_text()
    assert "| lame-source |" in report and "Not computed (a method not run): lame-norm" in report
    assert "± " in report and (tmp_path / "accuracy_vs_batch.png").stat().st_size > 1000
