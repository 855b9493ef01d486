"""The adaptation methods on a small random X3D: what they update, their filters and
resets, CEMA's message boundary and accounting, and that a stream compiles each step once."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dmd_jax import models, parallel, tta
from dmd_jax.model_store import LoadedModel
from dmd_jax.tta import cema, eata, filters, losses
from dmd_jax.tta.adaptable import Adaptable, num_bytes, split_norm_affine
from dmd_jax.tta.base import Context
from conftest import tiny_config

CLIP = (4, 16, 16, 3)
NUM_CLASSES = 5


def random_model(seed: int, width: float = 0.25) -> Adaptable:
    config = tiny_config("").model
    config.width_factor = width
    module = models.build(config, NUM_CLASSES, {"depthwise_impl": "xla"})
    variables = jax.jit(module.init)(jax.random.key(seed), jnp.zeros((1, *CLIP)))
    names = tuple(f"class_{i}" for i in range(NUM_CLASSES))
    return Adaptable.of(LoadedModel(module, dict(variables), config, names, CLIP, "random"))


def clips(seed: int, batch: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (batch, *CLIP), dtype=np.uint8)


def settings() -> ml_collections.ConfigDict:
    config = tiny_config("", "adapt").adapt
    for method in ("tent", "eata", "sar"):
        config[method].learning_rate = 1.0  # large enough to move a random model in one step
    config.cema.update(edge_learning_rate=1.0)
    return config


def context(mesh, name: str, foundation=None, clean=()) -> Context:
    """What the adapt job would give a method: here, a random cloud and fixed clean clips."""
    return Context(name=name, mesh=mesh, seed=0, batch_size=8,
                   foundation=lambda: foundation,
                   clean_batches=lambda split, count: iter(clean))


def build(name: str, edge: Adaptable, mesh, adapt=None, **kwargs):
    """Method `name` as the adapt job builds it, from a (modified) `config.adapt`."""
    return tta.build(adapt or settings(), name, edge, context(mesh, name, **kwargs))


@pytest.fixture(scope="module")
def mesh():
    return parallel.make_mesh()


@pytest.fixture(scope="module")
def edge():
    return random_model(0)


def cloud_all_settings() -> ml_collections.ConfigDict:
    config = settings().cema
    config.update(new_per_step=8, replay_per_step=8, replay_from=16)
    return config


@pytest.fixture(scope="module")
def shared(edge, mesh):
    """Methods built (and so compiled) once for the whole module; each test resets them."""
    adapt = settings()
    adapt.cema = cloud_all_settings()
    return {"norm": build("norm", edge, mesh),
            "tent": build("tent", edge, mesh),
            "eata": build("eata", edge, mesh, clean=[on_mesh(clips(4), mesh)]),
            "sar": build("sar", edge, mesh),
            "cloud_all": build("cloud_all", edge, mesh, adapt, foundation=random_model(1))}


def on_mesh(batch: np.ndarray, mesh) -> jax.Array:
    return parallel.to_global(batch, mesh)


def test_only_norm_scale_and_bias_are_adapted(edge):
    affine, frozen = split_norm_affine(edge.model.variables["params"])
    assert affine and all(k.rsplit("/", 1)[-1] in ("scale", "bias") for k in affine)
    assert all("norm" in k for k in affine)  # X3D names every BatchNorm *norm*
    assert not any("norm" in k for k in frozen)
    assert any(k.endswith("kernel") for k in frozen)


def test_adaptable_normalises_with_the_batch_and_without_dropout(edge, mesh):
    x = jnp.asarray(clips(1))
    running = jax.jit(edge.model.apply)(edge.model.variables, x)[0]
    logits = jax.jit(edge.logits)
    from_batch = logits(edge.source_norm_affine, edge.constants(), x)
    assert not np.allclose(running, from_batch, atol=1e-4)  # statistics of this batch
    again = logits(edge.source_norm_affine, edge.constants(), x)
    np.testing.assert_array_equal(from_batch, again)  # deterministic: no dropout
    half = logits(edge.source_norm_affine, edge.constants(), x[:4])
    assert not np.allclose(from_batch[:4], half, atol=1e-5)  # depends on the batch


def test_losses():
    uniform = jnp.zeros((2, NUM_CLASSES))
    np.testing.assert_allclose(losses.entropy(uniform), np.log(NUM_CLASSES), rtol=1e-6)
    logits = jax.random.normal(jax.random.key(0), (3, NUM_CLASSES))
    kl, ce = losses.distillation(logits, logits)
    np.testing.assert_allclose(kl, 0.0, atol=1e-6)
    np.testing.assert_allclose(ce, -jax.nn.log_softmax(logits).max(-1), rtol=1e-6)
    assert float(losses.masked_mean(jnp.ones(4), jnp.zeros(4, bool))) == 0.0


def test_tent_predicts_before_it_updates_and_only_moves_norm_affine(edge, mesh, shared):
    tent, norm = shared["tent"], shared["norm"]
    tent.reset()
    first, second = on_mesh(clips(2), mesh), on_mesh(clips(3), mesh)
    np.testing.assert_allclose(tent.process(first).logits, norm.process(first).logits,
                               rtol=1e-5, atol=1e-5)
    result = tent.process(second)
    assert not np.allclose(result.logits, norm.process(second).logits, atol=1e-4)
    assert result.updated and np.isfinite(result.loss) and result.learned_from.all()
    changed = [k for k, v in tent.state["params"].items()
               if not np.allclose(v, edge.source_norm_affine[k])]
    assert changed and set(changed) <= set(edge.source_norm_affine)
    tent.reset()
    np.testing.assert_allclose(tent.process(first).logits, norm.process(first).logits,
                               rtol=1e-5, atol=1e-5)


def test_eata_filters_unreliable_and_redundant_clips():
    margin = 0.5
    probs = jnp.asarray([[0.98, 0.01, 0.01], [0.01, 0.98, 0.01], [0.34, 0.33, 0.33]])
    ent = losses.entropy(jnp.log(probs))
    select = lambda ema, has: filters.reliable(ent, margin) & filters.novel(probs, ema, has, 0.05)
    first = select(jnp.zeros(3), jnp.array(False))
    assert first.tolist() == [True, True, False]  # the near-uniform clip is unreliable
    later = select(jnp.asarray([1.0, 0.0, 0.0]), jnp.array(True))
    assert later.tolist() == [False, True, False]  # the first is redundant with the average
    new, has = filters.update_probs_ema(jnp.zeros(3), jnp.array(False), probs,
                                        jnp.asarray([True, False, False]), 0.9)
    np.testing.assert_allclose(new, probs[0]) and bool(has)
    kept, _ = filters.update_probs_ema(new, has, probs, jnp.zeros(3, bool), 0.9)
    np.testing.assert_allclose(kept, new)  # nothing selected: unchanged


def test_eata_fisher_penalty_anchors_to_the_source(edge, shared):
    fisher = jax.device_get(shared["eata"].const["fisher"])
    assert all(np.all(f >= 0) for f in fisher.values()) and any(f.sum() > 0 for f in fisher.values())
    source = edge.source_norm_affine
    assert float(eata.fisher_penalty(source, source, fisher)) == 0.0
    moved = {k: v + 1.0 for k, v in source.items()}
    assert float(eata.fisher_penalty(moved, source, fisher)) > 0.0


def test_redundancy_margin_scales_with_the_class_count():
    assert filters.redundancy_margin(0.05, 1000, 1000) == 0.05
    assert filters.redundancy_margin(0.05, 1000, 12) == 0.46  # sqrt(1000 / 12) ~ 9.1
    assert filters.redundancy_margin(0.3, 0, 12) == 0.3  # 0: as given


def test_sar_resets_itself_when_its_loss_average_falls_below_the_bound(edge, mesh):
    adapt = settings()
    adapt.sar.margin_factor = 10.0  # every clip reliable
    adapt.sar.reset_loss_ema = 1e9  # any loss average is "below": reset after the first step
    for full_reset in (False, True):
        adapt.sar.full_reset = full_reset
        sar = build("sar", edge, mesh, adapt)
        result = sar.process(on_mesh(clips(5), mesh))
        assert result.self_resets == 1
        state = jax.device_get(sar.state)
        for k, v in state["params"].items():
            np.testing.assert_array_equal(v, edge.source_norm_affine[k])
        momentum = jax.tree.leaves(state["opt"])
        if full_reset:  # a clean restart: no momentum, no loss average
            assert not any(np.any(m) for m in momentum) and not state["has_ema"]
        else:  # the authors': momentum and the loss average carry over, so it resets again
            assert any(np.any(m) for m in momentum) and state["has_ema"]
            assert sar.process(on_mesh(clips(6), mesh)).self_resets == 1


def filter_settings(**overrides) -> ml_collections.ConfigDict:
    config = settings().cema
    config.update(warmup_clips=4, **overrides)
    return config


def test_upload_filter_thresholds():
    probs = np.asarray([[0.9, 0.05, 0.05, 0, 0], [0.2] * 5, [1.0, 0, 0, 0, 0]]) + 1e-9
    ent = -np.sum(probs * np.log(probs), -1)
    f = cema.UploadFilter(NUM_CLASSES, filter_settings(redundancy_filter=False, dynamic_emax=False))
    # reliable (H < 0.4 ln 5 = 0.64) and informative (H > 0.02 ln 5): only the first
    keep, failed = f.select(probs, ent)
    assert keep.tolist() == [True, False, False]
    # The uniform clip is unreliable, the one-hot one uninformative; the filter is off.
    assert {k: v.tolist() for k, v in failed.items()} == {
        "unreliable": [False, True, False], "low_info": [False, False, True],
        "redundant": [False, False, False]}
    f = cema.UploadFilter(NUM_CLASSES, filter_settings(low_info_filter=False,
                                                       redundancy_filter=False))
    assert f.e_max() == pytest.approx(f.e0)
    f.select(probs, ent)
    f.select(probs, ent)  # 6 clips seen: warm-up over, mean H unchanged since
    assert f.e_max() == pytest.approx(f.e0 * 0.6)
    f.select(probs[1:2].repeat(6, 0), ent[1:2].repeat(6))  # entropy rises -> E_max rises
    assert f.e_max() > f.e0 * 0.6


def test_upload_filter_redundancy():
    probs = np.asarray([[0.96, 0.01, 0.01, 0.01, 0.01], [0.01, 0.96, 0.01, 0.01, 0.01]])
    ent = -np.sum(probs * np.log(probs), -1)
    f = cema.UploadFilter(NUM_CLASSES, filter_settings(dynamic_emax=False))
    assert f.select(probs[:1], ent[:1])[0].tolist() == [True]
    keep, failed = f.select(probs, ent)
    assert keep.tolist() == [False, True]  # the first repeats the average
    assert failed["redundant"].tolist() == [True, False]


def test_random_upload_sends_its_share_of_the_stream():
    """The matched-upload control: exactly round(fraction * clips seen) go up, drawn
    from the candidates only, the same draws for the same seed and stream position."""
    chooser = cema.RandomUpload(0.2, seed=0, upload_all=False)
    masks = [chooser.choose(64) for _ in range(10)]
    assert np.cumsum([m.sum() for m in masks]).tolist() == [
        round(0.2 * 64 * (i + 1)) for i in range(10)]
    again = cema.RandomUpload(0.2, seed=0, upload_all=False)
    assert all((again.choose(64) == m).all() for m in masks)
    other = cema.RandomUpload(0.2, seed=1, upload_all=False)
    assert any((other.choose(64) != m).any() for m in masks)
    candidates = np.zeros(64, bool)
    candidates[:5] = True  # fewer candidates than the batch's due: all of them, no more
    keep = cema.RandomUpload(0.2, seed=0, upload_all=False).choose(64, candidates)
    assert keep.tolist() == candidates.tolist()
    with pytest.raises(ValueError, match="random_upload=1.5"):
        cema.RandomUpload(1.5, seed=0, upload_all=False)
    with pytest.raises(ValueError, match="set one of them"):
        cema.RandomUpload(0.2, seed=0, upload_all=True)


def test_random_upload_edge_resumes_its_draws_exactly(shared):
    """The edge's random draws continue where they stopped after its state went through
    the stream checkpoint's file format and a reset (the cloud's resume: cloud_all's test)."""
    from flax import serialization

    edge = shared["cloud_all"].edge  # compiled once; switched to the random control here
    edge.upload_all, edge.random = False, cema.RandomUpload(0.3, 3, False)
    try:
        logits = np.zeros((8, NUM_CLASSES), np.float32)
        edge.reset()
        first = [edge.choose(logits)[0] for _ in range(2)]
        saved = serialization.msgpack_serialize(serialization.to_state_dict(edge.state_dict()))
        straight = [edge.choose(logits)[0] for _ in range(3)]
        edge.reset()
        edge.load_state_dict(serialization.msgpack_restore(saved))
        resumed = [edge.choose(logits)[0] for _ in range(3)]
        assert all((a == b).all() for a, b in zip(straight, resumed))
        assert [int(m.sum()) for m in first + straight] == [2, 3, 2, 3, 2]  # 0.3 x 8, 16, ...
    finally:
        edge.upload_all, edge.random = True, cema.RandomUpload(0.0, 0, True)


def test_cema_message_boundary_and_accounting(edge, mesh, shared):
    edge_model, method = edge, shared["cloud_all"]
    method.reset()
    results = [method.process(on_mesh(clips(10 + i), mesh)) for i in range(3)]
    clip_bytes = int(np.prod(CLIP))
    down_bytes = num_bytes(edge_model.source_norm_affine)
    assert [r.bytes_up for r in results] == [8 * clip_bytes] * 3
    assert [r.cloud_steps for r in results] == [1, 1, 1]
    assert [r.bytes_down for r in results] == [down_bytes] * 3
    assert len(method.cloud.buffer) == 24
    # the edge holds exactly what came down, and the cloud's copy is what went down
    edge_params = jax.device_get(method.edge.norm_affine)
    cloud_params = jax.device_get(method.cloud.state["edge"])
    for k in edge_params:
        np.testing.assert_array_equal(edge_params[k], cloud_params[k])
    assert any(not np.allclose(edge_params[k], edge_model.source_norm_affine[k])
               for k in edge_params)
    method.reset()
    assert len(method.cloud.buffer) == 0


def test_cema_replay_only_step_when_nothing_new_arrives(mesh, shared):
    config = cloud_all_settings()  # new_per_step=8, replay_per_step=8, replay_from=16
    cloud = shared["cloud_all"].cloud
    cloud.reset()
    assert cloud.receive(cema.Upload(clips(20, batch=4))) == (None, [])  # too few to step
    download, steps = cloud.receive(cema.Upload(clips(21, batch=12)))
    assert download is not None and len(steps) == 2  # 16 new clips: two steps
    # Replay alone needs *more* than replay_from clips in the buffer (the authors' `> 256`).
    assert cloud.receive(cema.Upload(clips(22, batch=0))) == (None, [])  # exactly 16
    download, steps = cloud.receive(cema.Upload(clips(23, batch=1)))
    assert download is not None and len(steps) == 1  # 17: replayed 16 clips from the buffer
    # min_cloud_steps: replay-only steps fill each upload's steps up to it.
    built = cloud.cfg
    cloud.cfg = ml_collections.ConfigDict({**built.to_dict(), "min_cloud_steps": 3})
    try:
        assert len(cloud.receive(cema.Upload(clips(24, batch=0)))[1]) == 3
        assert len(cloud.receive(cema.Upload(clips(25, batch=8)))[1]) == 3  # 1 new, 2 replayed
        assert cloud.replay_only_steps == 1 + 3 + 2
    finally:
        cloud.cfg = built
    for bad in ({"replay_from": 8}, {"min_cloud_steps": 1.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            cema.Cloud(random_model(0), random_model(1), mesh,
                       ml_collections.ConfigDict({**config.to_dict(), **bad}), seed=0)


class CompileCounter:
    """Counts jit traces and backend compilations while active."""

    def __init__(self):
        self.events = 0

    def __call__(self, event, duration, **kwargs):
        if event in ("/jax/core/compile/jaxpr_trace_duration",
                     "/jax/core/compile/backend_compile_duration"):
            self.events += 1

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self)


def test_every_method_compiles_once_over_a_stream(edge, mesh, shared):
    """A second pass over a stream (after reset) compiles nothing: each step was jitted
    once per shape during the first."""
    stream = [on_mesh(clips(30 + i), mesh) for i in range(4)]
    methods = [build("source", edge, mesh), shared["norm"], shared["tent"], shared["eata"],
               shared["sar"], shared["cloud_all"]]
    for method in methods:
        method.reset()
        for batch in stream:
            method.process(batch)
        method.reset()
        with CompileCounter() as counter:
            for batch in stream:
                method.process(batch)
        assert counter.events == 0, f"{method.name} recompiled during the stream"


def assert_resumes_exactly(method, stream, cut: int) -> None:
    """`state_dict` after `cut` batches, through the stream checkpoint's file format and a
    reset, then the rest of the stream: the same results as never stopping."""
    from flax import serialization

    method.reset()
    for batch in stream[:cut]:
        method.process(batch)
    saved = serialization.msgpack_serialize(serialization.to_state_dict(method.state_dict()))
    straight = [method.process(batch) for batch in stream[cut:]]
    method.reset()
    method.load_state_dict(serialization.msgpack_restore(saved))
    resumed = [method.process(batch) for batch in stream[cut:]]
    for a, b in zip(straight, resumed):
        np.testing.assert_array_equal(a.logits, b.logits, err_msg=method.name)
        np.testing.assert_array_equal(a.uploaded, b.uploaded, err_msg=method.name)
        np.testing.assert_equal(a.loss, b.loss, err_msg=method.name)  # nan == nan here
        assert (a.cloud_steps, a.bytes_up, a.bytes_down, a.metrics) == (
            b.cloud_steps, b.bytes_up, b.bytes_down, b.metrics), method.name


def test_every_method_resumes_mid_stream_exactly(mesh, shared):
    stream = [on_mesh(clips(60 + i), mesh) for i in range(5)]
    for name in ("norm", "tent", "eata", "sar", "cloud_all"):
        assert_resumes_exactly(shared[name], stream, cut=2)
    assert len(shared["cloud_all"].cloud.buffer) > 0


def test_batch_renormalisation_values_and_statistics(edge):
    """Initialised from a batch it normalises with that batch's statistics, the variance
    unbiased as the authors' `torch.var_mean`; then it normalises with the running
    statistics, which only an 'update' moves (momentum 0.1)."""
    import flax.linen as nn
    from dmd_jax.tta import renorm as renorm_lib

    x = jax.random.normal(jax.random.key(3), (4, 3, 5, 5, 6)) * 3.0 + 1.0
    layer = nn.BatchNorm(use_running_average=True, epsilon=1e-5)
    variables = layer.init(jax.random.key(0), x)
    variables["params"] = {"scale": jnp.arange(1.0, 7.0), "bias": jnp.full(6, 0.5)}
    with nn.intercept_methods(renorm_lib.interceptor("init")):
        y, _ = layer.apply(variables, x, mutable=["batch_stats"])
    axes = (0, 1, 2, 3)
    expected = ((x - x.mean(axes)) / jnp.sqrt(x.var(axes, ddof=1) + 1e-5)
                * jnp.arange(1.0, 7.0) + 0.5)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)

    x, y = jnp.asarray(clips(40)), jnp.asarray(clips(41))
    constants, affine = edge.constants(), edge.source_norm_affine
    template = edge.model.variables["batch_stats"]
    renorm = jax.jit(edge.renorm_logits, static_argnums=4)
    logits, stats = renorm(affine, template, constants, x, "init")
    used, unchanged = renorm(affine, stats, constants, y, "use")
    jax.tree.map(np.testing.assert_array_equal, unchanged, stats)
    _, moved = renorm(affine, stats, constants, y, "update")
    _, y_stats = renorm(affine, template, constants, y, "init")
    first = lambda tree: tree["stem"]["norm"]["mean"]  # its input depends on no other norm
    np.testing.assert_allclose(first(moved), first(stats) + 0.1 * (first(y_stats) - first(stats)),
                               rtol=1e-5, atol=1e-6)
    renormed_y, _ = renorm(affine, y_stats, constants, y, "use")
    assert not np.allclose(used, renormed_y, atol=1e-4)  # x's statistics, not y's


def test_cema_with_batch_renorm_sends_statistics_down(mesh):
    edge_model, foundation = random_model(0), random_model(1)
    adapt = settings()
    adapt.cema.update(new_per_step=8, replay_per_step=8,
                      replay_from=10_000)  # no replay: one step shape to compile
    method = build("cloud_all_tbr", edge_model, mesh, adapt, foundation=foundation)
    results = [method.process(on_mesh(clips(50 + i), mesh)) for i in range(3)]
    stats_bytes = num_bytes(edge_model.model.variables["batch_stats"])
    assert results[-1].bytes_down == num_bytes(edge_model.source_norm_affine) + stats_bytes
    # The edge's first statistics go up once, with its first upload: the cloud's copy of
    # the edge starts from them (the authors' edge and cloud share one model).
    clip_bytes = 8 * int(np.prod(CLIP))
    assert [r.bytes_up for r in results] == [clip_bytes + stats_bytes, clip_bytes, clip_bytes]
    for edge_leaf, cloud_leaf in zip(jax.tree.leaves(jax.device_get(method.edge.stats)),
                                     jax.tree.leaves(jax.device_get(method.cloud.state["edge_stats"]))):
        np.testing.assert_array_equal(edge_leaf, cloud_leaf)
    assert all(np.isfinite(r.loss) for r in results)
    # The running statistics of edge and cloud survive a mid-stream checkpoint.
    stream = [on_mesh(clips(55 + i), mesh) for i in range(3)]
    assert_resumes_exactly(method, stream, cut=1)


def test_cema_runs_on_a_device_count_that_does_not_divide_its_cloud_batches(edge):
    """On 6 devices the cloud's 8- and 16-clip batches run on 4 of them; the stream's
    predictions, uploads and steps are those of the 8-device mesh."""
    outcomes = {}
    for devices in (8, 6):
        mesh = parallel.make_mesh(devices)
        adapt = settings()
        adapt.cema = cloud_all_settings()
        method = build("cloud_all", edge, mesh, adapt, foundation=random_model(1))
        stream = [parallel.to_global(clips(60 + i, batch=24), mesh) for i in range(2)]
        outcomes[devices] = [method.process(batch) for batch in stream]
    for ours, theirs in zip(outcomes[6], outcomes[8]):
        assert ours.cloud_steps == theirs.cloud_steps == 3
        np.testing.assert_allclose(ours.logits, theirs.logits, rtol=1e-4, atol=1e-4)
    assert parallel.submesh_dividing(parallel.make_mesh(6), 8, 16).size == 4


def test_lame_on_a_batch_of_one_clip_keeps_its_prediction():
    """At batch 1 the Gaussian affinity's width is 0 (the nearest clip is the clip): the
    kernel is the clip's affinity to itself, and the assignment stays finite and keeps
    the model's label."""
    from dmd_jax.tta import lame

    features = lame.normalize(jnp.asarray([[0.3, -1.0, 2.0]]))
    log_probs = jax.nn.log_softmax(jnp.asarray([[0.2, 1.0, -0.5, 0.1]]))
    for kind in lame.AFFINITIES:
        kernel = lame.affinity(features, kind, 5)
        y = lame.laplacian_assignment(log_probs, kernel, 1.0, 100)
        assert np.all(np.isfinite(y)) and int(y.argmax()) == 1, kind


def test_cema_uploads_encoded_clips_and_counts_their_bytes(edge, mesh):
    """upload_crf: the clips go up as H.264, counted at their encoded size, and the cloud
    receives them decoded (close to, not equal to, what the edge holds)."""
    cfg = cloud_all_settings()
    cfg.update(upload_all=True, upload_crf=28)
    sender = cema.Edge(edge, mesh, cfg)
    batch = np.repeat(np.repeat(clips(70), 4, axis=2), 4, axis=3)  # 64x64: something to code
    batch = (batch // 32 * 32).astype(np.uint8)  # blocky, so it compresses
    upload, keep, _ = sender.select(on_mesh(batch, mesh), np.zeros((8, NUM_CLASSES), np.float32))
    assert keep.all() and upload.clips.shape == batch.shape
    assert 0 < upload.nbytes < batch.nbytes / 4
    assert not np.array_equal(upload.clips, batch)
    assert np.abs(upload.clips.astype(int) - batch).mean() < 20
    cfg.upload_crf = 0
    raw, _, _ = cema.Edge(edge, mesh, cfg).select(on_mesh(batch, mesh),
                                                np.zeros((8, NUM_CLASSES), np.float32))
    assert raw.nbytes == batch.nbytes and np.array_equal(raw.clips, batch)


def test_downloads_that_arrive_k_batches_late(edge, mesh, shared):
    """download_delay=k: every clip goes up (cloud_all), so the cloud's steps do not
    depend on the edge; the late edge holds after batch b what the on-time edge held
    after batch b-k, each update's loss is reported when it arrives, and downloads still
    in flight survive a resume."""
    method = shared["cloud_all"]
    stream = [on_mesh(clips(80 + i), mesh) for i in range(5)]

    def run():
        method.reset()
        results, held = [], []
        for batch in stream:
            results.append(method.process(batch))
            held.append(jax.device_get(method.edge.norm_affine))
        return results, held

    on_time, on_time_params = run()
    method.downlink = cema.Downlink(2)
    try:
        late, late_params = run()
        for b, params in enumerate(late_params):
            expected = on_time_params[b - 2] if b >= 2 else edge.source_norm_affine
            for k in params:
                np.testing.assert_array_equal(params[k], expected[k], err_msg=f"batch {b}")
        assert [r.updated for r in late] == [False, False, True, True, True]
        assert [r.cloud_steps for r in late] == [r.cloud_steps for r in on_time]
        assert np.isnan(late[0].loss) and late[2].loss == on_time[0].loss
        assert_resumes_exactly(method, stream, cut=3)
    finally:
        method.downlink = cema.Downlink(0)
    with pytest.raises(ValueError, match="download_delay"):
        cema.Downlink(-1)


def test_a_spawned_cloud_shares_the_compiled_steps_not_the_state(mesh, shared):
    """The serve job's clouds, one per edge: spawned from one template, each with its own
    buffer and parameters, and no compilation for a new edge."""
    template = shared["cloud_all"].cloud
    template.reset()
    template.receive(cema.Upload(clips(90)))  # compiled (a new-clips step)
    other = template.spawn(seed=0)
    assert len(other.buffer) == 0 and len(template.buffer) == 8
    with CompileCounter() as counter:
        download, steps = other.receive(cema.Upload(clips(91)))
    assert counter.events == 0 and download is not None and len(steps) == 1
    assert len(template.buffer) == 8 and len(other.buffer) == 8
    moved = jax.device_get(other.state["edge"])
    kept = jax.device_get(template.state["edge"])
    assert any(not np.array_equal(moved[k], kept[k]) for k in moved)
