"""label -> train_switcher -> evaluate_hybrid on the tiny dataset, and the hybrid API."""

import json
import os

import jax
import numpy as np
import pytest

from conftest import tiny_config
from dmd_jax import hybrid, model_store, uploads
from dmd_jax.data import labels, pipeline
from dmd_jax.errors import UserError
from dmd_jax.jobs import label
from dmd_jax.routers import switcher


@pytest.fixture(scope="module")
def runs(data_dir, tiny_pipeline):
    """The tiny pipeline: a tiny edge, a (wider) tiny cloud, then the three DMD stages."""
    root = tiny_pipeline
    summaries = {name: json.load(open(f"{root}/{name}/summary.json"))
                 for name in ("label", "switcher", "hybrid")}
    summary = json.load(open(f"{root}/summary.json"))
    assert summary["stages"]["switcher"]["switcher_auroc"] == summaries["switcher"]["switcher_auroc"]
    assert summary["operating_point"] == summaries["hybrid"]["operating_point"]

    def config(stage, **overrides):
        paths = {"edge.path": f"{root}/edge/model", "cloud.path": f"{root}/teacher/model",
                 "switcher.label_dir": f"{root}/label", "hybrid.label_dir": f"{root}/label",
                 "hybrid.switcher_dir": f"{root}/switcher"}
        sections = {"label": ("edge", "cloud"), "switcher": ("switcher",),
                    "hybrid": ("edge", "cloud", "hybrid")}[stage]
        base = {k: v for k, v in paths.items() if k.split(".")[0] in sections}
        if stage == "label":  # the tiny pipeline's labels are made with H.264 offloads too
            base["label.upload_crfs"] = (30,)
        return tiny_config(data_dir, stage, **{**base, **overrides})

    return root, summaries, config


def test_pipeline_report(runs):
    root = runs[0]
    report = open(f"{root}/REPORT.md").read()
    assert "| hybrid (DMD switcher) |" in report and "| dmd_switcher |" in report
    assert "![deferral curves](hybrid/deferral.png)" in report
    assert os.path.exists(f"{root}/hybrid/deferral.png")
    summary = json.load(open(f"{root}/summary.json"))
    assert summary["devices"]["device_count"] == 8
    assert "Ran on 8 cpu devices (backend cpu) in 1 process." in report
    # the adapt stage: its table in REPORT.md, its mPC per method in summary.json
    assert "## Online adaptation under corruptions" in report and "| cema |" in report
    assert set(summary["stages"]["adapt"]["mpc"]) == {"norm", "cema"}  # the tiny stage's
    assert os.path.exists(f"{root}/adapt/accuracy_vs_upload.png")
    # The cloud trains on the edge's clips and the broader data (ceiling cameras).
    edge, teacher = (json.load(open(f"{root}/{m}/summary.json")) for m in ("edge", "teacher"))
    assert (edge["train_split"], edge["num_train_clips"]) == ("train", 64)
    assert (teacher["train_split"], teacher["num_train_clips"]) == ("train+broad", 80)


def test_label_outputs(runs):
    root, summaries, _ = runs
    assert summaries["label"]["num_labelled"] == 32
    unlabelled = labels.read_split(f"{root}/label", "unlabelled")
    np.testing.assert_array_equal(unlabelled["id"], np.arange(32))
    assert unlabelled["edge_features"].shape[0] == 32 and unlabelled["edge_logits"].shape == (32, 12)
    agree = unlabelled["edge_logits"].argmax(-1) == unlabelled["cloud_logits"].argmax(-1)
    np.testing.assert_array_equal(unlabelled["hard"], agree)
    assert summaries["label"]["agreement_rate"] == pytest.approx(agree.mean())
    assert np.all((unlabelled["soft"] >= 0) & (unlabelled["soft"] <= 1))
    # The stored logits are the exported edge's logits on these clips.
    clips = pipeline.Split(pipeline.make_builder(runs[2]("label").data), "unlabelled", 8,
                           32).rows(np.arange(4))["video"]
    edge = model_store.load(f"{root}/edge/model", runtime={"depthwise_impl": "xla"})
    logits, _ = jax.jit(edge.logits_and_features)(edge.variables, pipeline.normalize(clips))
    np.testing.assert_allclose(logits, unlabelled["edge_logits"][:4], rtol=1e-4, atol=1e-4)


def test_targets_hand_computed():
    outputs = {"edge_logits": np.log(np.array([[0.6, 0.4], [0.3, 0.7], [0.9, 0.1]])),
               "cloud_logits": np.log(np.array([[0.8, 0.2], [0.9, 0.1], [0.5, 0.5 + 1e-9]])),
               "label": np.array([0, 0, -1])}
    t = labels.targets(outputs)
    np.testing.assert_array_equal(t["hard"], [1, 0, 0])
    np.testing.assert_allclose(t["soft"], [0.8, 0.1, 0.5], atol=1e-6)
    np.testing.assert_array_equal(t["ground_truth"], [1, 0, -1])


def test_switcher_summary_and_exports(runs):
    root, summaries, _ = runs
    s = summaries["switcher"]
    assert s["switcher_auroc"] is None or 0.0 <= s["switcher_auroc"] <= 1.0  # None: one class
    assert set(s["targets"]) == {"hard", "ground_truth"}
    for target in ("hard", "ground_truth"):
        module, params, info = switcher.load(f"{root}/switcher/{target}/switcher")
        assert info["target"] == target
    assert json.load(open(f"{root}/switcher/summary.json"))["target"] == "hard"


def test_hybrid_summary_contract(runs):
    root, summaries, _ = runs
    s = summaries["hybrid"]
    assert set(s["routers"]) == {"dmd_switcher", "gt_switcher", "max_prob", "entropy", "margin",
                                 "random", "oracle"}
    for metrics in s["routers"].values():
        assert set(metrics) >= {"auc", "apgr", "cpt_50", "cpt_80", "oracle_gap"}
    for name in ("dmd_switcher", "gt_switcher"):
        versus = s["routers"][name]["auc_vs_max_prob"]
        assert versus["difference"] == pytest.approx(
            s["routers"][name]["auc"] - s["routers"]["max_prob"]["auc"])
        assert versus["ci95_low"] <= versus["ci95_high"]
    point = s["operating_point"]
    for key in ("target_offload", "offload_rate", "accuracy", "gflops_per_clip",
                "cloud_gflops_per_clip"):
        assert key in point
    assert point["cloud_gflops_per_clip"] > point["edge_gflops_per_clip"] > 0
    assert point["gflops_per_clip"] == pytest.approx(
        point["edge_gflops_per_clip"] + point["router_gflops_per_clip"]
        + point["offload_rate"] * point["cloud_gflops_per_clip"])
    # The oracle is never beaten; every file the job promises is there.
    assert all(m["auc"] <= s["routers"]["oracle"]["auc"] + 1e-12 for m in s["routers"].values())
    for name in ("summary.json", "predictions.npz", "curves.npz", "operating_point.json",
                 "deferral.png", "report.md", "uploads.png"):
        assert os.path.getsize(f"{root}/hybrid/{name}") > 0
    predictions = np.load(f"{root}/hybrid/predictions.npz")
    assert np.mean(predictions["prediction"] == predictions["label"]) == pytest.approx(
        point["accuracy"])
    raw, h264 = s["uploads"]  # raw uint8, then H.264 at the label job's CRF 30
    assert raw["accuracy"] == point["accuracy"] and raw["bytes_per_uploaded_clip"] == 8 * 32 * 32 * 3
    assert h264["crf"] == 30 and 0 < h264["bytes_per_uploaded_clip"] < raw["bytes_per_uploaded_clip"]
    assert h264["bytes_per_clip"] == pytest.approx(
        h264["bytes_per_uploaded_clip"] * point["offload_rate"], rel=1e-6) or point["offload_rate"] == 0


def test_api_reproduces_the_evaluation(runs):
    root, summaries, config = runs
    system = hybrid.HybridClassifier.from_dirs(
        f"{root}/edge/model", f"{root}/switcher",
        f"{root}/hybrid/operating_point.json", f"{root}/teacher/model",
        runtime=config("hybrid").runtime)  # the tiny configs' depthwise convolution
    split = pipeline.Split(pipeline.make_builder(config("label").data), "test", 8, 32)
    batch = split.rows(np.arange(len(split)))
    result = system(batch["video"])
    saved = np.load(f"{root}/hybrid/predictions.npz")
    np.testing.assert_array_equal(result.offloaded, saved["offloaded"])
    np.testing.assert_array_equal(result.predictions, saved["prediction"])
    point = summaries["hybrid"]["operating_point"]
    assert result.gflops == pytest.approx(point["gflops_per_clip"] * len(split), rel=1e-3)
    assert result.upload_bytes == result.offloaded.sum() * 8 * 32 * 32 * 3


def test_api_sends_only_offloaded_clips_to_the_cloud(runs):
    root, _, config = runs
    seen = []

    def cloud(clips):
        seen.append(len(clips))
        return np.zeros((len(clips), 12))

    system = hybrid.HybridClassifier.from_dirs(
        f"{root}/edge/model", f"{root}/switcher",
        f"{root}/hybrid/operating_point.json", f"{root}/teacher/model", cloud=cloud)
    system.threshold = 2.0  # every clip offloaded
    clips = pipeline.Split(pipeline.make_builder(config("label").data), "test", 8, 32).rows(
        np.arange(5))["video"]
    assert system(clips).offloaded.all() and seen == [5]
    system.threshold = -1.0  # none
    assert not system(clips).offloaded.any() and seen == [5]


def test_label_refuses_labels_made_by_other_models(runs):
    root, _, config = runs
    from dmd_jax.errors import UserError
    with pytest.raises(UserError, match="other settings or inputs.*inputs.cloud"):
        label.run(config("label", **{"cloud.path": f"{root}/edge/model"}), f"{root}/label")


def test_budget_calibration(runs, tmp_path):
    """A budget of edge + switcher + 25% of the cloud, in GFLOPs or as a fraction of the
    cloud alone, allows at most 25% offload; an impossible budget offloads nothing."""
    root, summaries, config = runs
    point = summaries["hybrid"]["operating_point"]
    budget = (point["edge_gflops_per_clip"] + point["router_gflops_per_clip"]
              + 0.25 * point["cloud_gflops_per_clip"])
    from dmd_jax.jobs import hybrid as hybrid_job
    for name, override in (("gflops", {"hybrid.gflops_budget": budget}),
                           ("fraction", {"hybrid.compute_budget":
                                         budget / point["cloud_gflops_per_clip"]}),
                           ("impossible", {"hybrid.compute_budget": 1e-6})):
        summary = hybrid_job.run(config("hybrid", **override), str(tmp_path / name))
        assert summary["operating_point"]["target_offload"] <= 0.25 + 1e-9
    assert summary["operating_point"]["offload_rate"] == 0.0
    system = hybrid.HybridClassifier.from_dirs(  # a null (infinite) threshold loads
        f"{root}/edge/model", f"{root}/switcher",
        str(tmp_path / "impossible" / "operating_point.json"), f"{root}/teacher/model")
    assert system.threshold == -np.inf


def test_relaxed_targets_balance_the_calibration_labels():
    """Hybrid LLM's relaxation: t is the gap (top cloud probability minus the cloud's
    probability of the edge's class) that makes half the labels positive."""
    cloud = np.asarray([[0.9, 0.1], [0.6, 0.4], [0.55, 0.45], [0.2, 0.8]])
    edge = np.asarray([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])  # edge: 1, 1, 1, 0
    data = {"cloud_logits": np.log(cloud), "edge_logits": edge}
    np.testing.assert_allclose(labels.relaxation_gap(data), [0.8, 0.2, 0.1, 0.6], atol=1e-6)
    t = labels.balanced_relaxation(data)  # no agreement at all: t = 0.2 gives 2 of 4
    assert t == pytest.approx(0.2, abs=1e-6)
    np.testing.assert_array_equal(labels.relaxed_targets(data, t), [0, 1, 1, 0])
    np.testing.assert_array_equal(labels.relaxed_targets(data, 0.0), [0, 0, 0, 0])  # = hard


def test_relaxed_switcher_trains_and_routes(runs, tmp_path):
    """t chosen both ways and reported; with `relaxation='auc'` the relaxed switcher is
    trained at the candidate whose probe switcher has the best calibration deferral AUC."""
    root, _, config = runs
    from dmd_jax import routing
    from dmd_jax.jobs import switcher as switcher_job
    summary = switcher_job.run(config("switcher", **{
        "switcher.targets": ("relaxed",), "switcher.relaxation": "auc",
        "switcher.relaxation_candidates": 3}), str(tmp_path))
    calibration = labels.read_split(f"{root}/label", "calibration")
    gaps = labels.relaxation_gap(calibration)
    chosen = summary["relaxation"]
    balance = chosen["balance"]["t"]
    assert balance == pytest.approx(labels.balanced_relaxation(calibration))
    rate = np.mean(gaps <= balance)
    assert abs(rate - 0.5) <= min(abs(np.mean(gaps <= t) - 0.5) for t in gaps) + 1e-9
    candidates = {c["t"]: c["calibration_auc"] for c in chosen["candidates"]}
    assert 0.0 in candidates and balance in candidates and len(candidates) >= 3
    assert chosen["used"] == "auc" and chosen["auc"]["calibration_auc"] == max(candidates.values())
    module, params, info = switcher.load(f"{tmp_path}/relaxed/switcher")
    assert info["target"] == "relaxed"
    score = switcher_job.scores(module, params, calibration)
    edge_correct = calibration["edge_logits"].argmax(-1) == calibration["label"]
    cloud_correct = calibration["cloud_logits"].argmax(-1) == calibration["label"]
    auc = np.mean(routing.deferral_curve(-score, edge_correct, cloud_correct))
    assert auc == pytest.approx(chosen["auc"]["calibration_auc"], abs=1e-6)  # trained at that t
    with pytest.raises(UserError, match="relaxation"):
        switcher_job.run(config("switcher", **{"switcher.targets": ("relaxed",),
                                               "switcher.relaxation": "median"}),
                         str(tmp_path / "bad"))


def test_routers_under_shift(runs, tmp_path):
    """The label job labels the test split seen under a corruption; the hybrid job
    evaluates every router there: APGRs, the learned switchers' APGR minus max_prob's
    with intervals, the deployed threshold's realised offload and its recalibration."""
    import shutil

    root, summaries, config = runs
    from dmd_jax.jobs import hybrid as hybrid_job
    shutil.copytree(f"{root}/label", tmp_path / "label")
    shifted = ("test@gaussian_noise@5", "test@fog@1")
    label.run(config("label", **{"label.splits": shifted}), str(tmp_path / "label"))
    clean, noisy = (labels.read_split(str(tmp_path / "label"), s)
                    for s in ("test", "test@gaussian_noise@5"))
    np.testing.assert_array_equal(clean["id"], noisy["id"])
    assert not np.allclose(clean["edge_logits"], noisy["edge_logits"], atol=1e-3)
    summary = hybrid_job.run(config("hybrid", **{
        "hybrid.label_dir": str(tmp_path / "label"), "hybrid.shift_splits": shifted,
        "hybrid.recalibration_window": 8, "hybrid.bootstrap_resamples": 50}),
        str(tmp_path / "hybrid"))
    point = summary["operating_point"]
    for split in shifted:
        s = summary["shift"][split]
        data = labels.read_split(str(tmp_path / "label"), split)
        scores = switcher.router("hard", __import__("dmd_jax").routers.Context(
            switcher_dir=f"{root}/switcher")).scores(data["edge_features"], data["edge_logits"])
        assert s["offload_rate"] == pytest.approx(np.mean(scores < point["threshold"]))
        assert s["target_offload"] == point["target_offload"]
        assert set(s["apgr"]) == set(summaries["hybrid"]["routers"]) - {"random", "oracle"}
        for versus in s["apgr_vs_max_prob"].values():
            assert versus["ci95_low"] <= versus["difference"] <= versus["ci95_high"] or \
                np.isnan(versus["difference"])
        assert 0.0 <= s["recalibrated_offload_rate"] <= 1.0
    report = (tmp_path / "hybrid" / "report.md").read_text()
    assert "Under shift" in report and "test@fog@1" in report
