"""Offloading on an adaptation stream: `dmd` (the router sends clips to the cloud, nothing
adapts) and `dmd_cema` (one upload, two uses: the offloaded clips are answered by the
cloud and, those CEMA's filters keep, adapt the edge), on small random models with a
confidence router's operating point written by the test."""

import json

import jax
import numpy as np
import pytest

from dmd_jax import hybrid, parallel
from dmd_jax.tta import offload
from tta_methods_test import (CLIP, NUM_CLASSES, build, clips, cloud_all_settings, on_mesh,
                              random_model, settings, assert_resumes_exactly)


@pytest.fixture(scope="module")
def mesh():
    return parallel.make_mesh()


@pytest.fixture(scope="module")
def models():
    return random_model(0), random_model(1)


def operating_point(path, edge, threshold: float, fusion_weight: float = 1.0) -> str:
    path.write_text(json.dumps({"router": "max_prob", "threshold": threshold,
                                "fusion_weight": fusion_weight,
                                "edge_fingerprint": edge.model.fingerprint}))
    return str(path)


def adapt_settings(point: str, **dmd_cema):
    adapt = settings()
    adapt.cema = cloud_all_settings()
    adapt.cema.upload_all = False
    adapt.dmd.update(operating_point=point, switcher_dir="")
    adapt.dmd_cema.update(operating_point=point, switcher_dir="", **dmd_cema)
    return adapt


def max_prob(logits):
    return np.asarray(jax.nn.softmax(logits, -1)).max(-1)


def test_dmd_offloads_below_the_threshold_and_answers_with_the_cloud(models, mesh, tmp_path):
    edge, cloud = models
    stream = [clips(100 + i) for i in range(2)]
    running = jax.jit(edge.model.apply)
    confidence = max_prob(running(edge.model.variables, stream[0])[0])
    point = operating_point(tmp_path / "point.json", edge, float(np.median(confidence)))
    method = build("dmd", edge, mesh, adapt_settings(point), foundation=cloud)
    result = method.process(on_mesh(stream[0], mesh))
    np.testing.assert_array_equal(result.uploaded, confidence < np.median(confidence))
    assert not result.learned_from.any()
    assert result.bytes_up == result.uploaded.sum() * int(np.prod(CLIP))
    cloud_logits = jax.jit(cloud.model.apply)(cloud.model.variables, stream[0][result.uploaded])[0]
    np.testing.assert_array_equal(result.logits[result.uploaded].argmax(-1),
                                  np.asarray(cloud_logits).argmax(-1))
    edge_logits = running(edge.model.variables, stream[0])[0]
    np.testing.assert_allclose(result.logits[~result.uploaded],
                               np.asarray(edge_logits)[~result.uploaded], atol=1e-5)


@pytest.fixture(scope="module")
def joint(models, mesh, tmp_path_factory):
    """One dmd_cema (built and compiled once); each test sets its threshold, filters and
    who answers, and resets it."""
    edge, cloud = models
    point = operating_point(tmp_path_factory.mktemp("joint") / "point.json", edge, 2.0)
    adapt = adapt_settings(point, cloud_answers="adapted")
    method = build("dmd_cema", edge, mesh, adapt, foundation=cloud)
    return method, adapt


def test_dmd_cema_adapts_only_on_what_it_offloads(joint, mesh):
    method, adapt = joint
    answer, method._answer = method._answer, None  # the cloud model as trained answers
    try:
        method.reset()
        method.offloader.threshold = 2.0  # max_prob < 2: offload everything
        method.edge.upload_all = True  # and adapt on every offloaded clip
        stream = [on_mesh(clips(110 + i), mesh) for i in range(3)]
        first = method.process(stream[0])
        assert first.uploaded.all() and first.learned_from.all()
        assert first.bytes_up == 8 * int(np.prod(CLIP)) and first.cloud_steps == 1
        assert len(method.cloud.buffer) == 8
        cloud = method.cloud.foundation.model
        expected = jax.jit(cloud.apply)(cloud.variables, np.asarray(parallel.fetch(stream[0])))[0]
        np.testing.assert_array_equal(first.logits.argmax(-1), np.asarray(expected).argmax(-1))
        # Nothing offloaded: nothing goes up, for either use, and the cloud learns nothing.
        method.offloader.threshold = -1.0
        second = method.process(stream[1])
        assert not second.uploaded.any() and not second.learned_from.any()
        assert second.bytes_up == 0 and len(method.cloud.buffer) == 8
        # Everything offloaded again, but CEMA's filters keep none of it for adaptation.
        method.edge.upload_all = False
        method.edge.filter.e0 = 0.0  # no clip is reliable now
        method.offloader.threshold = 2.0
        third = method.process(stream[2])
        assert third.uploaded.all() and not third.learned_from.any()
        assert len(method.cloud.buffer) == 8 and third.bytes_up == 8 * int(np.prod(CLIP))
    finally:
        method._answer, method.edge.upload_all = answer, False
        method.edge.filter.e0 = method.cloud.e0


def test_dmd_cema_answers_with_the_adapted_cloud_and_resumes_exactly(joint, mesh):
    method, adapt = joint
    edge = method.edge.model
    logits = jax.jit(edge.logits)(edge.source_norm_affine, edge.constants(), clips(120))
    method.offloader.threshold = float(np.median(max_prob(logits)))
    method.edge.upload_all = True
    try:
        method.reset()
        stream = [on_mesh(clips(120 + i), mesh) for i in range(4)]
        results = [method.process(batch) for batch in stream]
        assert all(0 < r.uploaded.sum() < 8 for r in results)
        assert all((r.learned_from == r.uploaded).all() for r in results)  # upload_all
        # The answers of the last batch: the foundation as CEMA adapted it, not as trained.
        method.reset()
        for batch in stream[:3]:
            method.process(batch)
        sent = np.asarray(parallel.fetch(stream[3]))[results[3].uploaded]
        adapted = method.cloud.classify(sent, adapt.cema.new_per_step)
        np.testing.assert_array_equal(results[3].logits[results[3].uploaded].argmax(-1),
                                      adapted.argmax(-1))
        assert_resumes_exactly(method, stream, cut=2)
    finally:
        method.edge.upload_all = False


def test_offloading_refuses_a_missing_operating_point_and_another_edge(models, mesh, tmp_path):
    edge, cloud = models
    with pytest.raises(ValueError, match="operating point"):
        build("dmd", edge, mesh, adapt_settings(str(tmp_path / "none.json")), foundation=cloud)
    point = operating_point(tmp_path / "point.json", cloud, 0.5)  # calibrated for another edge
    with pytest.raises(hybrid.OperatingPointMismatchError, match="another edge"):
        build("dmd", edge, mesh, adapt_settings(point), foundation=cloud)
