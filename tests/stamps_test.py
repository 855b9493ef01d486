"""Artifact stamps: results on disk are reused only when the same settings and inputs made
them; otherwise a rerun is refused (naming what differs) or, with overwrite, recomputed."""

import json
import os
import shutil

import numpy as np
import pytest

from conftest import tiny_config
from dmd_jax import stamps
from dmd_jax.jobs import adapt, label, switcher


def test_differences_name_every_changed_key():
    old = stamps.make({"train": {"lr": 0.1, "steps": 6}, "seed": 0}, {"edge": "abc"})
    new = stamps.make({"train": {"lr": 0.2, "steps": 6}, "seed": 0, "extra": [1, 2]},
                      {"edge": "abd"})
    assert stamps.differences(old, new) == [
        "inputs.edge: \"abc\" -> \"abd\"", "settings.extra: (absent) -> [1, 2]",
        "settings.train.lr: 0.1 -> 0.2"]
    assert stamps.differences(old, old) == []
    assert stamps.digest(old) == stamps.digest(json.loads(json.dumps(old)))
    assert stamps.digest(old) != stamps.digest(new)


def test_check_reuses_recomputes_or_refuses():
    stamp = stamps.make({"a": 1})
    assert stamps.check(stamp, stamp, "x", "here", overwrite=False, has_results=True)
    assert not stamps.check(None, stamp, "x", "here", overwrite=False, has_results=False)
    assert not stamps.check(stamps.make({"a": 2}), stamp, "x", "here", overwrite=True,
                            has_results=True)
    with pytest.raises(stamps.StaleArtifactError, match=r"settings.a: 2 -> 1.*overwrite=True"):
        stamps.check(stamps.make({"a": 2}), stamp, "x", "here", overwrite=False,
                     has_results=True)
    with pytest.raises(stamps.StaleArtifactError, match="no stamp"):  # an older dmd_jax's
        stamps.check(None, stamp, "x", "here", overwrite=False, has_results=True)


def test_a_new_computation_version_is_a_difference_and_version_1_writes_none():
    assert "version" not in stamps.make({"a": 1}, version=1)  # stamps from before versions
    assert stamps.differences(stamps.make({"a": 1}), stamps.make({"a": 1}, version=2)) == [
        "version: (absent) -> 2"]


@pytest.fixture()
def copied(tiny_pipeline, tmp_path):
    """A writable copy of the tiny pipeline's outputs."""
    root = tmp_path / "run"
    shutil.copytree(tiny_pipeline, root, ignore=shutil.ignore_patterns("*.lock"))
    return root


def _files(directory):
    return {os.path.join(r, f): os.path.getmtime(os.path.join(r, f))
            for r, _, names in os.walk(directory) for f in names}


def test_adapt_stream_of_another_learning_rate_is_refused_then_recomputed(copied, data_dir):
    config = json.load(open(copied / "adapt" / "config.json"))
    import ml_collections
    config = ml_collections.ConfigDict(config)
    config.adapt.cema.edge_learning_rate *= 10
    before = _files(copied / "adapt")
    with pytest.raises(stamps.StaleArtifactError, match="edge_learning_rate"):
        adapt.run(config, str(copied / "adapt"))
    assert _files(copied / "adapt") == before  # refused before writing anything
    config.overwrite = True
    summary = adapt.run(config, str(copied / "adapt"))
    stream = copied / "adapt" / "reset" / "cema" / "seed0" / "gaussian_noise@5.npz"
    assert os.path.getmtime(stream) > before[str(stream)]  # recomputed
    saved = json.loads(str(np.load(stream)["stamp"]))
    assert saved["settings"]["method"]["settings"]["edge_learning_rate"] == (
        config.adapt.cema.edge_learning_rate)
    norm = copied / "adapt" / "reset" / "norm" / "seed0" / "gaussian_noise@5.npz"
    assert os.path.getmtime(norm) == before[str(norm)]  # its own stamp still matched
    assert set(summary["methods"]) == {"norm", "cema"}


def test_labels_of_another_split_spec_or_camera_mix_are_refused(copied, data_dir):
    base = {"edge.path": str(copied / "edge" / "model"),
            "cloud.path": str(copied / "teacher" / "model")}
    for override, named in (({"data.split_specs": {"unlabelled": "unlabelled[:50%]"}},
                             "split_specs.unlabelled"),
                            ({"label.chunk_size": 8}, "settings.chunk_size: 16 -> 8")):
        with pytest.raises(stamps.StaleArtifactError, match=named):
            label.run(tiny_config(data_dir, "label", **base, **override), str(copied / "label"))
    # Another camera mix is another prepared dataset: its identity, in every stamp, differs
    # (checked on the builders, without generating the other dataset).
    from dmd_jax.data import pipeline
    data = tiny_config(data_dir, "label").data
    other = tiny_config(data_dir, "label", **{"data.ceiling_cameras": {"test": 0.5}}).data
    assert (pipeline.dataset_identity(pipeline.make_builder(data), data)["dataset"]
            != pipeline.dataset_identity(pipeline.make_builder(other), other)["dataset"])


def test_switcher_of_another_seed_is_refused_then_retrained(copied, data_dir):
    config = tiny_config(data_dir, "switcher", **{"switcher.label_dir": str(copied / "label"),
                                                  "seed": 1})
    with pytest.raises(stamps.StaleArtifactError, match="settings.seed: 0 -> 1"):
        switcher.run(config, str(copied / "switcher"))
    before = np.load(copied / "switcher" / "hard" / "predictions.npz")["score"]
    config.overwrite = True
    switcher.run(config, str(copied / "switcher"))
    after = np.load(copied / "switcher" / "hard" / "predictions.npz")["score"]
    assert not np.allclose(before, after)  # another initialisation and batch order


def test_results_of_an_older_computation_version_are_refused(copied, data_dir, monkeypatch):
    """A job whose numerics changed bumps its STAMP_VERSION: the results its older code
    made stop being reused (the stamp names the version)."""
    config = tiny_config(data_dir, "switcher", **{"switcher.label_dir": str(copied / "label")})
    monkeypatch.setattr(switcher, "STAMP_VERSION", 2)
    with pytest.raises(stamps.StaleArtifactError, match=r"version: \(absent\) -> 2"):
        switcher.run(config, str(copied / "switcher"))


def test_switcher_refuses_relabelled_data(copied, data_dir):
    """Labels changed under a switcher (another stamp in the label dir) make it stale."""
    stamp_path = copied / "label" / "stamp.json"
    stamp = json.load(open(stamp_path))
    stamp["inputs"]["cloud"] = "another cloud"
    stamp_path.write_text(json.dumps(stamp))
    config = tiny_config(data_dir, "switcher", **{"switcher.label_dir": str(copied / "label")})
    with pytest.raises(stamps.StaleArtifactError, match="inputs.labels"):
        switcher.run(config, str(copied / "switcher"))


def test_hybrid_refuses_a_switcher_trained_on_other_labels(copied, data_dir):
    from dmd_jax.jobs import hybrid as hybrid_job

    stamp_path = copied / "label" / "stamp.json"
    stamp = json.load(open(stamp_path))
    stamp["settings"]["chunk_size"] = 999  # the labels now claim another origin
    stamp_path.write_text(json.dumps(stamp))
    config = tiny_config(data_dir, "hybrid", **{
        "hybrid.label_dir": str(copied / "label"), "hybrid.switcher_dir": str(copied / "switcher"),
        "edge.path": str(copied / "edge" / "model"), "cloud.path": str(copied / "teacher" / "model")})
    with pytest.raises(stamps.StaleArtifactError, match="trained on other labels"):
        hybrid_job.run(config, str(copied / "hybrid2"))
