"""The cloud as its own process: the serve job started by the test on 127.0.0.1, an edge
client (`RemoteCloud`) talking to it, and the faults a link has — a slow cloud, a full
queue, malformed and oversized messages, the cloud killed and restarted mid-stream.
Every loop here is bounded in count and time."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import jax
import numpy as np
import pytest

from conftest import REPO
from dmd_jax import hybrid, model_store, uploads
from dmd_jax.serve import client, cloud_pb2, cloud_pb2_grpc, messages
from dmd_jax.tta.adaptable import Adaptable

START_TIMEOUT_S = 120


class Server:
    """`python -m dmd_jax.main --config configs/demo.py:serve,tiny` as a subprocess."""

    def __init__(self, root: str, workdir: str, **serve):
        self.root, self.workdir, self.serve = root, workdir, serve
        self.proc = None

    def start(self) -> str:
        info_path = os.path.join(self.workdir, "server.json")
        if os.path.exists(info_path):
            os.remove(info_path)
        args = [sys.executable, "-m", "dmd_jax.main",
                f"--config={REPO}/configs/demo.py:serve,tiny", f"--workdir={self.workdir}",
                f"--config.cloud.path={self.root}/teacher/model",
                f"--config.edge.path={self.root}/edge/model"]
        args += [f"--config.serve.{k}={v}" for k, v in self.serve.items()]
        os.makedirs(self.workdir, exist_ok=True)
        self.log = open(os.path.join(self.workdir, "log.txt"), "ab")
        self.proc = subprocess.Popen(args, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not os.path.exists(info_path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the server did not start: " + open(
                    os.path.join(self.workdir, "log.txt")).read()[-2000:])
            time.sleep(0.1)
        info = json.load(open(info_path))
        self.serve["port"] = info["port"]  # a restart listens where the edges expect it
        return info["address"]

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=20)
        self.proc = None


@pytest.fixture(scope="module")
def server(tiny_pipeline, tmp_path_factory):
    srv = Server(tiny_pipeline, str(tmp_path_factory.mktemp("serve")), port=0, max_message_mb=2)
    address = srv.start()
    yield srv, address
    srv.stop()


@pytest.fixture(scope="module")
def clips(tiny_pipeline):
    return np.random.default_rng(0).integers(0, 256, (5, 8, 32, 32, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def cloud(tiny_pipeline):
    model = model_store.load(f"{tiny_pipeline}/teacher/model")
    forward = jax.jit(hybrid.cloud_forward(model))
    return lambda x: np.asarray(forward(model.variables, x))


def test_classify_raw_and_h264_as_the_cloud_in_this_process(server, clips, cloud):
    _, address = server
    raw = client.RemoteCloud(address, deadline_s=30)
    np.testing.assert_allclose(raw(clips), cloud(clips), rtol=1e-5, atol=1e-5)
    assert raw.stats.bytes_up == clips.nbytes and raw.last_timing["batch_clips"] >= 5
    encoded = client.RemoteCloud(address, deadline_s=30, crf=28)
    decoded, sizes = uploads.encode_decode(clips, 28)
    np.testing.assert_allclose(encoded(clips), cloud(decoded), rtol=1e-5, atol=1e-5)
    assert encoded.stats.bytes_up == sizes.sum() < clips.nbytes
    health = raw.health()
    assert health.num_classes == 12 and health.capacity == 64 and health.queued == 0


def test_bad_messages_get_error_statuses_and_the_server_lives_on(server, clips):
    _, address = server
    stub = cloud_pb2_grpc.CloudStub(grpc.insecure_channel(address))
    bad = [cloud_pb2.Clips(shape=[2, 8, 32, 32, 3], encoding="raw", raw=b"short"),
           cloud_pb2.Clips(shape=[1, 8, 32, 32], encoding="raw", raw=b""),
           cloud_pb2.Clips(shape=[1, 8, 32, 32, 3], encoding="png", raw=b""),
           cloud_pb2.Clips(shape=[1, 8, 32, 32, 3], encoding="h264", encoded=[b"not an mp4"])]
    for message in bad:
        with pytest.raises(grpc.RpcError) as err:
            stub.Classify(cloud_pb2.ClassifyRequest(clips=message), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    garbage = grpc.insecure_channel(address).unary_unary("/dmd_jax.serve.Cloud/Classify")
    with pytest.raises(grpc.RpcError) as err:  # not even a protobuf message
        garbage(b"\xff\x00\xfe" * 10, timeout=30)
    assert err.value.code() != grpc.StatusCode.OK
    big, _ = messages.encode_clips(np.zeros((120, 8, 32, 32, 3), np.uint8))  # 2.9 MB > 2 MB
    with pytest.raises(grpc.RpcError) as err:
        stub.Classify(cloud_pb2.ClassifyRequest(clips=big), timeout=30)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert client.RemoteCloud(address, deadline_s=30)(clips).shape == (5, 12)  # still serving


def parameters_after_the_step(remote, timeout_s: float = 60) -> bytes:
    """Asks (an `Adapt` without clips) until the cloud's step has made parameters."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        data = remote.adapt(np.zeros((0, 8, 32, 32, 3), np.uint8))
        if data is not None:
            return data
        time.sleep(0.05)
    raise AssertionError(f"no parameters within {timeout_s} s")


def test_adapt_sends_back_parameters_the_edge_loads(server, tiny_pipeline):
    _, address = server
    remote = client.RemoteCloud(address, deadline_s=60, edge="test-edge")
    uploads_ = np.random.default_rng(1).integers(0, 256, (8, 8, 32, 32, 3), dtype=np.uint8)
    assert remote.adapt(uploads_) is None  # 8 clips: one CEMA step (tiny new_per_step),
    data = parameters_after_the_step(remote)  # which runs on the cloud's own thread
    assert remote.last_parameters[0] == 1 and remote.adapt(uploads_[:0]) is None
    edge = Adaptable.of(model_store.load(f"{tiny_pipeline}/edge/model"))
    received = client.norm_affine_from(data, jax.device_get(edge.source_norm_affine))
    assert jax.tree.structure(received) == jax.tree.structure(edge.source_norm_affine)
    moved = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(received),
                                                   jax.tree.leaves(edge.source_norm_affine))]
    assert any(moved) and all(np.isfinite(x).all() for x in jax.tree.leaves(received))


def test_one_upload_two_uses_classify_adapts_on_the_marked_clips(server, clips):
    """Classify with `adapt` flags: answered as without them, and the marked clips join
    this edge's CEMA buffer (8 of them: one cloud step, whose parameters a later call of
    this edge gets)."""
    _, address = server
    remote = client.RemoteCloud(address, deadline_s=60, edge="joint-edge")
    batch = np.concatenate([clips, clips])[:8]
    plain, none = remote.classify(batch)
    assert none is None
    logits, _ = remote.classify(batch, np.ones(8, bool))  # the answer does not wait for the step
    np.testing.assert_allclose(logits, plain, atol=1e-5)
    parameters_after_the_step(remote)
    assert remote.last_parameters[0] == 1
    _, parameters = remote.classify(batch, np.arange(8) < 3)  # 3 more: no new step
    assert parameters is None
    adapted, _ = remote.classify(batch, adapted_answer=True)  # this edge's adapted cloud
    assert adapted.shape == plain.shape and np.isfinite(adapted).all()
    assert not np.allclose(adapted, plain, atol=1e-3)
    stub = cloud_pb2_grpc.CloudStub(grpc.insecure_channel(address))
    message, _ = messages.encode_clips(batch)
    with pytest.raises(grpc.RpcError) as err:
        stub.Classify(cloud_pb2.ClassifyRequest(clips=message, adapt=[True, False]), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "adapt flags" in err.value.details()


def test_a_slow_cloud_and_a_full_queue_leave_no_clip_unanswered(tiny_pipeline, tmp_path, clips):
    slow = Server(tiny_pipeline, str(tmp_path / "slow"), port=0, delay_ms=400,
                  queue_capacity=1, max_wait_ms=1)
    address = slow.start()
    try:
        late = client.RemoteCloud(address, deadline_s=0.15, backoff_s=(0.01, 0.01))
        with pytest.raises(client.CloudUnavailable, match="DEADLINE_EXCEEDED"):
            late(clips)
        # Six edges at once against a queue of one: each is answered or refused at once.
        outcomes, start = [], threading.Barrier(6)

        def one_edge():
            remote = client.RemoteCloud(address, deadline_s=10)
            start.wait(timeout=10)
            try:
                outcomes.append(("answered", remote(clips[:1]).shape))
            except client.CloudUnavailable as err:
                outcomes.append(("refused", str(err)))
        threads = [threading.Thread(target=one_edge) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert len(outcomes) == 6
        refused = [o for o in outcomes if o[0] == "refused"]
        assert refused and all("RESOURCE_EXHAUSTED" in o[1] for o in refused)
        assert any(o[0] == "answered" for o in outcomes)
    finally:
        slow.stop()


def test_link_job_streams_a_corrupted_split_and_measures_latency(server, tiny_pipeline,
                                                                 data_dir, tmp_path):
    from conftest import tiny_config
    from dmd_jax.jobs import link

    _, address = server
    root = tiny_pipeline
    # The methods' pass at an operating point that routes every clip (so dmd_cema sends,
    # adapts and is answered by the adapted cloud); the rate sweep sets its own thresholds.
    point = json.load(open(f"{root}/hybrid/operating_point.json"))
    point.update(threshold=None, target_offload=1.0)
    (tmp_path / "point.json").write_text(json.dumps(point))
    config = tiny_config(data_dir, "link", **{
        "edge.path": f"{root}/edge/model", "edge.switcher_dir": f"{root}/switcher",
        "edge.operating_point": str(tmp_path / "point.json"),
        "cloud.path": f"{root}/teacher/model", "link.address": address,
        "link.max_batches": 2})
    summary = link.run(config, str(tmp_path / "link"))
    assert summary["clips"] == 16
    offload = [r["offload_rate"] for r in summary["rates"]]
    assert offload[0] == 0 and offload[-1] == 1 and 0.3 <= offload[1] <= 0.7
    for row in summary["rates"]:
        assert row["fallback"] == 0 and 0 < row["latency_p50_ms"] <= row["latency_p99_ms"]
        assert (row["bytes_up_per_clip"] > 0) == (row["offload_rate"] > 0)
    methods = summary["methods"]
    assert set(methods) == {"dmd", "cema", "dmd_cema"}
    assert all(m["fallback"] == 0 and 0 <= m["accuracy"] <= 1 for m in methods.values())
    assert methods["cema"]["offload_rate"] == 0 and methods["dmd"]["adapted_on"] == 0
    assert methods["dmd"]["offload_rate"] == methods["dmd_cema"]["offload_rate"] == 1
    assert methods["dmd_cema"]["adapted_on"] <= 1 and methods["dmd_cema"]["bytes_up_per_clip"] > 0
    model = summary["latency_model"]
    assert model["fixed_ms_per_request"] > 0 and model["rtt_ms"] > 0
    assert all(0.2 < c["ratio"] < 5 for c in model["loopback_check"])
    assert (tmp_path / "link" / "latency.png").stat().st_size > 0


def test_the_cloud_killed_and_restarted_mid_stream(server, tiny_pipeline, clips):
    """A hybrid stream through the link: while the cloud is down its routed clips are
    answered at the edge (fallback), then offloaded again once it is back."""
    srv, address = server
    root = tiny_pipeline
    remote = client.RemoteCloud(address, deadline_s=30, backoff_s=(0.05, 0.2))
    system = hybrid.HybridClassifier.from_dirs(
        f"{root}/edge/model", f"{root}/switcher", f"{root}/hybrid/operating_point.json",
        f"{root}/teacher/model", cloud=remote)
    system.threshold = np.inf  # route every clip, so every batch exercises the link
    batches = [np.random.default_rng(10 + i).integers(0, 256, (4, 8, 32, 32, 3), np.uint8)
               for i in range(6)]
    results = []
    for i, batch in enumerate(batches):
        if i == 2:
            srv.stop(signal.SIGKILL)  # no goodbye: the process is gone
        if i == 4:
            srv.start()
            time.sleep(0.5)  # past the client's (and its channel's) longest back-off
        results.append(system(batch))
    for r in results:
        assert len(r.predictions) == 4  # every clip answered exactly once
        assert (r.offloaded ^ r.fallback).all()  # by the cloud or, routed, by the edge
    assert [int(r.offloaded.sum()) for r in results] == [4, 4, 0, 0, 4, 4]
    assert remote.stats.answered == 4 and remote.stats.failed


def test_the_generated_code_matches_cloud_proto(tmp_path):
    """cloud_pb2*.py are generated from cloud.proto (`python -m grpc_tools.protoc -I.
    --python_out=. --grpc_python_out=. dmd_jax/serve/cloud.proto`): regenerated here, equal."""
    from grpc_tools import protoc

    os.makedirs(tmp_path / "dmd_jax" / "serve")
    proto = os.path.join("dmd_jax", "serve", "cloud.proto")
    with open(os.path.join(REPO, proto)) as src, open(tmp_path / proto, "w") as dst:
        dst.write(src.read())
    assert protoc.main(["protoc", f"-I{tmp_path}", f"--python_out={tmp_path}",
                        f"--grpc_python_out={tmp_path}", str(tmp_path / proto)]) == 0
    for name in ("cloud_pb2.py", "cloud_pb2_grpc.py"):
        assert (tmp_path / "dmd_jax" / "serve" / name).read_text() == open(
            os.path.join(REPO, "dmd_jax", "serve", name)).read(), f"regenerate {name}"
