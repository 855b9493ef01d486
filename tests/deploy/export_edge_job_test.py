"""The export_edge job on the tiny pipeline's edge, switcher and operating point, and the
link's CEMA edges running its artifact."""

import json
import os
import shutil

import flax
import jax
import ml_collections
import numpy as np
import pytest

from conftest import tiny_config
from dmd_jax import files, hybrid, parallel, stamps
from dmd_jax.data import pipeline
from dmd_jax.deploy import runtime
from dmd_jax.jobs import export_edge, link
from dmd_jax.tta import cema
from dmd_jax.tta.adaptable import Adaptable

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")


def _config(data_dir: str, root: str, point: str = "", **overrides):
    config = tiny_config(data_dir, "export_edge", **overrides)
    config.edge.update(path=os.path.join(root, "edge", "model"),
                       switcher_dir=os.path.join(root, "switcher"),
                       operating_point=point or os.path.join(root, "hybrid",
                                                             "operating_point.json"))
    return config


def _test_batches(data_dir: str) -> list[np.ndarray]:
    config = tiny_config(data_dir, "export_edge")
    clips = export_edge._clips(pipeline.prepare(config.data), config, "test", 24)["video"]
    return [clips[i:i + 8] for i in range(0, 24, 8)]


@pytest.fixture(scope="module")
def point(data_dir, tiny_pipeline, tmp_path_factory) -> str:
    """The tiny pipeline's operating point with the threshold at the median score of the
    CEMA edge (batch statistics) on the test batches: it routes about half of them."""
    system = _system(tiny_pipeline, os.path.join(tiny_pipeline, "hybrid",
                                                 "operating_point.json"))
    forward = export_edge.jax_forward(system.edge, system.router, "batch")
    scores = np.concatenate([np.asarray(forward(b)[1]) for b in _test_batches(data_dir)])
    path = tmp_path_factory.mktemp("point") / "operating_point.json"
    path.write_text(json.dumps({**files.read_json(os.path.join(
        tiny_pipeline, "hybrid", "operating_point.json")), "threshold": float(np.median(scores))}))
    return str(path)


def _system(root: str, point: str) -> hybrid.HybridClassifier:
    return hybrid.HybridClassifier.from_dirs(
        os.path.join(root, "edge", "model"), os.path.join(root, "switcher"), point,
        os.path.join(root, "teacher", "model"), cloud=lambda clips: None)


@pytest.fixture(scope="module")
def exported(data_dir, tiny_pipeline, point, tmp_path_factory):
    """The job's workdir and summary (batch normalisation, int8 too)."""
    workdir = str(tmp_path_factory.mktemp("export"))
    return workdir, export_edge.run(_config(data_dir, tiny_pipeline, point), workdir)


def test_the_job_exports_the_deployed_edge_and_checks_it_against_jax(
        exported, point, data_dir, tiny_pipeline, tmp_path):
    workdir, summary = exported
    manifest = runtime.read_manifest(workdir)
    assert manifest["router"] == files.read_json(point)["router"]
    assert manifest["threshold"] == files.read_json(point)["threshold"]
    assert set(manifest["files"]) == {"fp32", "int8"}
    assert summary["fp32"]["max_logit_diff"] <= 1e-4
    assert summary["fp32"]["offload_agreement_with_jax"] == 1.0
    assert summary["fp32"]["accuracy"] == summary["jax"]["accuracy"]
    assert 0.0 <= summary["int8"]["agreement_with_jax"] <= 1.0
    assert summary["int8"]["accuracy_loss_vs_fp32"] == pytest.approx(
        summary["fp32"]["accuracy"] - summary["int8"]["accuracy"])
    assert "ONNX Runtime int8" in open(os.path.join(workdir, "report.md")).read()

    copy = str(tmp_path / "export")
    shutil.copytree(workdir, copy)
    assert export_edge.run(_config(data_dir, tiny_pipeline, point), copy) == summary  # reused
    changed = _config(data_dir, tiny_pipeline, point, **{"export.normalization": "running",
                                                         "export.int8": False})
    with pytest.raises(stamps.StaleArtifactError, match="normalization"):
        export_edge.run(changed, copy)
    changed.overwrite = True
    summary = export_edge.run(changed, copy)
    assert runtime.read_manifest(copy)["normalization"] == "running"
    assert summary["fp32"]["max_logit_diff"] <= 1e-4 and "int8" not in summary
    assert not os.path.exists(os.path.join(copy, "edge_int8.onnx"))
    with pytest.raises(link.LinkError, match="'running' normalisation"):
        link._check_deployed_edge(copy, _system(tiny_pipeline, point))
    with pytest.raises(link.LinkError, match="another threshold"):
        link._check_deployed_edge(workdir, _system(tiny_pipeline, os.path.join(
            tiny_pipeline, "hybrid", "operating_point.json")))


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


class _Cloud:
    """A stand-in for `RemoteCloud`: fixed answers, and new parameters on the second call."""

    def __init__(self, parameters: bytes, num_classes: int):
        self.calls, self._parameters, self._classes = 0, parameters, num_classes

    def _reply(self):
        self.calls += 1
        return self._parameters if self.calls == 2 else None

    def classify(self, clips, adapt, adapted_answer):
        logits = np.eye(self._classes, dtype=np.float32)[np.arange(len(clips)) % self._classes]
        return 10 * logits, self._reply()

    def adapt(self, clips):
        return self._reply()


@pytest.mark.parametrize("method", ["cema", "dmd_cema"])
def test_the_link_cema_edges_answer_alike_on_jax_and_on_the_deployed_edge(
        exported, point, tiny_pipeline, data_dir, method):
    """The same batches through `link`'s CEMA edge, in JAX and on the artifact, with the
    same download arriving after the first batch: the same answers before and after it."""
    workdir, _ = exported
    system = _system(tiny_pipeline, point)
    link._check_deployed_edge(workdir, system)
    adaptable = Adaptable.of(system.edge)
    adapted = jax.tree.map(lambda x: np.asarray(x) * 0.8 + 0.05, adaptable.source_norm_affine)
    parameters = flax.serialization.to_bytes(adapted)
    settings = ml_collections.ConfigDict({**tiny_config(data_dir, "link").cema.to_dict(),
                                          "upload_crf": 0, "batch_renorm": False})
    mesh = parallel.make_mesh()
    batches = _test_batches(data_dir)
    runs = {}
    for where in ("jax", "deployed"):
        edge = cema.Edge(adaptable, mesh, settings)
        deployed = runtime.DeployedEdge(workdir) if where == "deployed" else None
        cloud, counts = _Cloud(parameters, len(system.edge.class_names)), {
            "correct": 0, "offloaded": 0, "adapted_on": 0, "fallback": 0, "downloads": 0}
        runs[where] = [link._adapting_edge_batch(method, system, edge, cloud, mesh, b, counts,
                                                 adapted_answer=True, deployed=deployed)
                       for b in batches]
        assert counts["downloads"] == 1
        if deployed is not None:
            assert deployed.updates == 1
            np.testing.assert_array_equal(
                deployed.parameters()[f"norm_affine/{next(iter(adapted))}"],
                adapted[next(iter(adapted))])
    for (jax_predictions, jax_routed), (onnx_predictions, onnx_routed) in zip(
            runs["jax"], runs["deployed"]):
        np.testing.assert_array_equal(jax_routed, onnx_routed)
        np.testing.assert_array_equal(jax_predictions, onnx_predictions)
    if method == "dmd_cema":  # the router's decisions came from the deployed graph
        assert 0 < sum(int(r.sum()) for _, r in runs["deployed"]) < 24
