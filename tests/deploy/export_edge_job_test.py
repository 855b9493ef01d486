"""The export_edge job on the tiny pipeline's edge, switcher and operating point."""

import os

import pytest

from conftest import tiny_config
from dmd_jax import files, stamps
from dmd_jax.deploy import runtime
from dmd_jax.jobs import export_edge

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")


def _config(data_dir: str, root: str, **overrides):
    config = tiny_config(data_dir, "export_edge", **overrides)
    config.edge.update(path=os.path.join(root, "edge", "model"),
                       switcher_dir=os.path.join(root, "switcher"),
                       operating_point=os.path.join(root, "hybrid", "operating_point.json"))
    return config


def test_the_job_exports_the_deployed_edge_and_checks_it_against_jax(
        data_dir, tiny_pipeline, tmp_path):
    workdir = str(tmp_path / "export")
    summary = export_edge.run(_config(data_dir, tiny_pipeline), workdir)
    point = files.read_json(os.path.join(tiny_pipeline, "hybrid", "operating_point.json"))
    manifest = runtime.read_manifest(workdir)
    assert manifest["router"] == point["router"] and set(manifest["files"]) == {"fp32", "int8"}
    assert summary["fp32"]["max_logit_diff"] <= 1e-4
    assert summary["fp32"]["offload_agreement_with_jax"] == 1.0
    assert summary["fp32"]["accuracy"] == summary["jax"]["accuracy"]
    assert 0.0 <= summary["int8"]["agreement_with_jax"] <= 1.0
    assert summary["int8"]["accuracy_loss_vs_fp32"] == pytest.approx(
        summary["fp32"]["accuracy"] - summary["int8"]["accuracy"])
    assert "ONNX Runtime int8" in open(os.path.join(workdir, "report.md")).read()

    assert export_edge.run(_config(data_dir, tiny_pipeline), workdir) == summary  # reused
    changed = _config(data_dir, tiny_pipeline, **{"export.normalization": "running"})
    with pytest.raises(stamps.StaleArtifactError, match="normalization"):
        export_edge.run(changed, workdir)
    changed.overwrite = True
    summary = export_edge.run(changed, workdir)
    assert runtime.read_manifest(workdir)["normalization"] == "running"
    assert summary["fp32"]["max_logit_diff"] <= 1e-4


def test_bad_settings_are_refused_before_anything_is_written(data_dir, tiny_pipeline,
                                                             tmp_path):
    from dmd_jax.errors import ConfigValueError
    for key, value, message in (("export.normalization", "group", "normalization"),
                                ("runtime.dtype", "bfloat16", "float32"),
                                ("export.check_clips", 10_000, "fewer than")):
        with pytest.raises(ConfigValueError, match=message):
            export_edge.run(_config(data_dir, tiny_pipeline, **{key: value}),
                            str(tmp_path / key))
        assert not os.path.exists(tmp_path / key / runtime.MANIFEST)
