"""The evaluate_cascade job on the tiny pipeline's models.

The tiny pipeline has two models; its edge stands in as the middle tier too (tiers edge ->
middle -> cloud with edge and middle the same model and the same labels), which gives the
job's results properties that can be checked exactly: edge -> cloud and middle -> cloud are
the same hybrid, and the full cascade with its middle passing every clip on is edge -> cloud
paying for the middle as well."""

import json
import os

import numpy as np
import pytest

from conftest import REPO
from dmd_jax import stamps
from dmd_jax.config_utils import load_config
from dmd_jax.errors import UserError
from dmd_jax.jobs import cascade as cascade_job


def _config(root, **cascade):
    config = load_config(f"{REPO}/configs/tiers.py:cascade:middle")
    config.runtime.depthwise_impl = "xla"  # as the tiny models were compiled
    config.cascade.update(
        models=(f"{root}/edge/model", f"{root}/edge/model", f"{root}/teacher/model"),
        label_dirs=(f"{root}/label", f"{root}/label"),
        switcher_dirs=(f"{root}/switcher", f"{root}/switcher"),
        rates_per_hop=11, compute_budget=0.9, **cascade)  # the tiny edge: ~half the cloud
    return config


@pytest.fixture(scope="module")
def result(tiny_pipeline, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("cascade"))
    return cascade_job.run(_config(tiny_pipeline), workdir), workdir


def test_cascade_outputs_and_their_consistency(result):
    summary, workdir = result
    for name in ("summary.json", "grids.npz", "cascade.png", "report.md", "config.json"):
        assert os.path.getsize(f"{workdir}/{name}") > 0
    assert json.load(open(f"{workdir}/summary.json"))["tiers"] == ["edge", "middle", "cloud"]
    assert set(summary["systems"]) == {"dmd", "max_prob"}
    for system, chains in summary["systems"].items():
        assert list(chains) == ["edge->middle->cloud", "edge->cloud", "middle->cloud"]
        # The same model and labels as edge and as middle: the same two-tier hybrid.
        assert chains["edge->cloud"]["aiq"] == pytest.approx(chains["middle->cloud"]["aiq"])
        assert chains["edge->cloud"]["test_hull"] == chains["middle->cloud"]["test_hull"]
        assert chains["edge->cloud"]["operating_point"]["within_budget"]
        for chain in chains.values():
            point = chain["operating_point"]
            assert point["within_budget"] == (
                point["calibration"]["gflops_per_clip"] <= summary["gflops_budget"] + 1e-12)
            assert point["test"]["reach"][0] == 1.0
            assert 0.0 <= chain["aiq"] <= 1.0
    grids = np.load(f"{workdir}/grids.npz")
    full, two = "dmd/edge->middle->cloud", "dmd/edge->cloud"
    np.testing.assert_allclose(grids[f"{full}/test_accuracy"][:, -1], grids[f"{two}/test_accuracy"])
    assert np.all(grids[f"{full}/test_gflops"][:, -1] >= grids[f"{two}/test_gflops"] - 1e-12)
    # Each tier alone is the corner of its chain: nothing offloaded.
    edge_alone = summary["tiers_alone"]["edge"]["accuracy"]
    assert grids[f"{two}/test_accuracy"][0] == pytest.approx(edge_alone)
    cloud = summary["tiers_alone"]["cloud"]
    assert grids[f"{two}/test_accuracy"][-1] == pytest.approx(cloud["accuracy"])
    assert summary["last_tier_gflops_per_clip"] == cloud["gflops_per_clip"]
    report = open(f"{workdir}/report.md").read()
    assert "| dmd | edge->middle->cloud |" in report and "| max_prob | middle->cloud |" in report


def test_labels_made_by_another_model_are_refused(tiny_pipeline, tmp_path):
    root = tiny_pipeline
    config = _config(root)
    config.cascade.models = (f"{root}/teacher/model", f"{root}/edge/model",
                             f"{root}/teacher/model")
    with pytest.raises(stamps.StaleArtifactError, match=r"label_dirs\[0\].*another edge"):
        cascade_job.run(config, str(tmp_path / "a"))
    assert not os.path.exists(tmp_path / "a" / "summary.json")


@pytest.mark.parametrize("change, message", [
    (dict(label_dirs=("x",)), r"label_dirs has 1 entries.*need 2"),
    (dict(systems=dict(dmd=("max_prob",))), r"systems.dmd gives 1 routers"),
    (dict(deploy="nope"), r"deploy='nope' is not one of"),
    (dict(tiers=("edge", "edge", "cloud")), r"each once"),
])
def test_inconsistent_settings_are_refused(tiny_pipeline, tmp_path, change, message):
    config = _config(tiny_pipeline)
    config.cascade.update(change)
    with pytest.raises(UserError, match=message):
        cascade_job.run(config, str(tmp_path))
