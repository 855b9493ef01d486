"""The deployed edge: the edge + router exported through PyTorch into ONNX compute what
JAX computes, run without JAX, and take CEMA's downloads atomically between batches."""

import functools
import os
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import REPO
from dmd_jax import model_store, models, routers
from dmd_jax.convert import mapping, x3d as x3d_rules
from dmd_jax.deploy import export, runtime
from dmd_jax.routers import switcher
from dmd_jax.tta.adaptable import Adaptable, merge, split_norm_affine
from dmd_jax.tta.cema import Download

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

CLIP = (4, 32, 32, 3)
ARCH = dict(name="x3d", width_factor=0.25, depth_factor=0.5, head_dim=32, dropout_rate=0.0)
CLASSES = tuple(f"class{i}" for i in range(6))


@functools.lru_cache(maxsize=None)  # one per module: the tests never change it
def _random_edge(seed: int = 0) -> model_store.LoadedModel:
    """A tiny X3D with every normalisation parameter and statistic randomised (at their
    initial values BatchNorm is the identity and the head tiny, which would hide errors)."""
    config = ml_collections.ConfigDict(ARCH)
    module = models.build(config, len(CLASSES), {"depthwise_impl": "xla"})
    variables = jax.device_get(jax.jit(module.init)(jax.random.key(seed), jnp.zeros((1, *CLIP))))
    rng = np.random.default_rng(seed)

    def randomise(path, x):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if name.endswith(("/scale", "/var")):
            return rng.uniform(0.6, 1.6, x.shape).astype(np.float32)
        if name.endswith(("/bias", "/mean")):
            return rng.normal(0.0, 0.2, x.shape).astype(np.float32)
        if "head_proj/kernel" in name:
            return rng.normal(0.0, 0.3, x.shape).astype(np.float32)
        return np.asarray(x)

    variables = jax.tree_util.tree_map_with_path(randomise, variables)
    return model_store.LoadedModel(module, variables, config, CLASSES, CLIP, "random")


@functools.lru_cache(maxsize=None)
def _switcher_router() -> routers.Router:
    module = switcher.Switcher(hidden=(16, 8))
    params = jax.jit(module.init)(jax.random.key(1), jnp.zeros((1, ARCH["head_dim"])),
                                  jnp.zeros((1, len(CLASSES))))["params"]
    params = jax.tree.map(lambda x: x + 0.3 * np.random.default_rng(2).normal(size=x.shape)
                          .astype(np.float32), params)
    return routers.Router("switcher:hard", switcher._score_functions(module), params,
                          learned=True)


def _clips(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, *CLIP), dtype=np.uint8)


@functools.lru_cache(maxsize=None)
def _jax_forward(normalization: str):
    """The random edge + switcher in JAX, jitted once per normalisation: `(norm_affine,
    batch_stats, clips) -> (logits, scores)`."""
    edge, router = _random_edge(), _switcher_router()
    adaptable = Adaptable.of(edge)
    _, frozen = split_norm_affine(edge.variables["params"])

    @jax.jit
    def forward(norm_affine, stats, constants, router_params, clips):
        if normalization == "batch":
            logits, features = adaptable.outputs(norm_affine, constants, clips)
        else:
            logits, features = edge.apply({"params": merge(norm_affine, frozen),
                                           "batch_stats": stats}, clips)
        return logits, router.score(router_params, features, logits)

    return lambda affine, stats, clips: forward(affine, stats, adaptable.constants(),
                                                router.params, clips)


def _jax_outputs(edge, router, normalization, clips, norm_affine=None, stats=None):
    assert edge is _random_edge() and router is _switcher_router()
    affine = Adaptable.of(edge).source_norm_affine if norm_affine is None else norm_affine
    stats = edge.variables["batch_stats"] if stats is None else stats
    logits, scores = _jax_forward(normalization)(affine, stats, clips)
    return np.asarray(logits), np.asarray(scores)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Both normalisations of one random edge with a switcher, exported with int8."""
    edge = _random_edge()
    router = _switcher_router()
    out = {}
    for normalization in runtime.NORMALIZATIONS:
        directory = str(tmp_path_factory.mktemp(f"edge_{normalization}"))
        export.export(edge, router, 0.5, directory, normalization=normalization,
                      calibration=_clips(16, seed=5), batch_size=8, stamp={"test": 1})
        out[normalization] = directory
    return edge, router, out


def test_the_rules_run_backwards_to_the_pytorch_weights():
    edge = _random_edge()
    net = x3d_rules.torch_model(edge.module, CLIP)
    template = {k: v.numpy() for k, v in net.state_dict().items()}
    state = mapping.to_state_dict(edge.variables, template, x3d_rules.RULES, x3d_rules.IGNORE)
    assert set(template) - set(state) == {k for k in template if "num_batches_tracked" in k}
    back = mapping.convert(state, edge.variables, x3d_rules.RULES, x3d_rules.IGNORE)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(edge.variables)):
        np.testing.assert_array_equal(a, b)
    del template["blocks.5.proj.bias"]
    with pytest.raises(mapping.ConversionError, match="blocks.5.proj.bias"):
        mapping.to_state_dict(edge.variables, template, x3d_rules.RULES)


@pytest.mark.parametrize("spec", ["max_prob", "entropy", "margin", "switcher"])
def test_each_router_has_the_same_score_in_pytorch(spec):
    from dmd_jax.deploy import torch_edge
    router = (_switcher_router() if spec == "switcher"
              else routers.load(spec, routers.Context()))
    rng = np.random.default_rng(0)
    features = rng.normal(size=(32, ARCH["head_dim"])).astype(np.float32)
    logits = (3 * rng.normal(size=(32, len(CLASSES)))).astype(np.float32)
    expected = np.asarray(router.score(router.params, features, logits))
    with torch.no_grad():
        got = torch_edge.router_score(router)(torch.from_numpy(features),
                                              torch.from_numpy(logits)).numpy()
    assert np.std(expected) > 0.01
    np.testing.assert_allclose(got, expected, atol=2e-6)


@pytest.mark.parametrize("engine", sorted(runtime.ENGINES))
@pytest.mark.parametrize("normalization", runtime.NORMALIZATIONS)
def test_the_deployed_edge_computes_what_jax_computes(exported, normalization, engine):
    edge, router, directories = exported
    clips = _clips(8, seed=1)
    logits, scores = _jax_outputs(edge, router, normalization, clips)
    deployed = runtime.DeployedEdge(directories[normalization], engine=engine)
    answer = deployed.predict(clips)
    assert np.std(logits) > 0.1  # logits that differ enough for the check to mean something
    np.testing.assert_allclose(answer.logits, logits, atol=1e-4)
    np.testing.assert_allclose(answer.scores, scores, atol=1e-5)
    np.testing.assert_array_equal(answer.offload, scores < 0.5)
    int8 = runtime.DeployedEdge(directories[normalization], "int8", engine=engine).predict(clips)
    assert np.abs(int8.logits - logits).max() < 0.5 * np.abs(logits).max()  # close, not equal
    assert not np.array_equal(int8.logits, answer.logits)


def test_a_download_lands_between_batches_and_a_bad_one_changes_nothing(exported):
    edge, router, directories = exported
    deployed = runtime.DeployedEdge(directories["running"])
    clips = _clips(8, seed=2)
    source = Adaptable.of(edge).source_norm_affine
    rng = np.random.default_rng(3)
    adapted = {k: v + 0.2 * rng.normal(size=v.shape).astype(np.float32)
               for k, v in source.items()}
    stats = jax.tree.map(lambda x: x * 1.3, jax.device_get(edge.variables["batch_stats"]))
    before = deployed.predict(clips)

    download = Download(adapted, stats)  # what CEMA's cloud sends (batch renormalisation)
    deployed.apply(download.norm_affine, download.stats)
    logits, scores = _jax_outputs(edge, router, "running", clips, adapted, stats)
    after = deployed.predict(clips)
    np.testing.assert_allclose(after.logits, logits, atol=1e-4)
    np.testing.assert_allclose(after.scores, scores, atol=1e-5)
    assert deployed.updates == 1

    kept = deployed.parameters()
    name = next(iter(adapted))
    bad = [({**adapted, name: adapted[name][:-1]}, "shape"),
           ({**adapted, name: adapted[name] * np.nan}, "non-finite"),
           ({k: v for k, v in adapted.items() if k != name}, "every normalisation"),
           ({**adapted, "nope/scale": adapted[name]}, "not inputs")]
    for norm_affine, message in bad:
        with pytest.raises(runtime.DownloadError, match=message):
            deployed.apply(norm_affine)
    assert all(np.array_equal(kept[k], v) for k, v in deployed.parameters().items())
    np.testing.assert_array_equal(deployed.predict(clips).logits, after.logits)
    assert deployed.updates == 1 and not np.allclose(before.logits, after.logits)

    batch_only = runtime.DeployedEdge(directories["batch"])
    with pytest.raises(runtime.DownloadError, match="normalization='running'"):
        batch_only.apply(adapted, stats)


def test_downloads_racing_the_stream_never_mix_within_a_batch(exported):
    _, _, directories = exported
    deployed = runtime.DeployedEdge(directories["batch"], threads=1)
    clips = _clips(8, seed=4)
    start = {k[len("norm_affine/"):]: v for k, v in deployed.parameters().items()}
    other = {k: v * 0.7 for k, v in start.items()}
    expected = []
    for params in (start, other):
        deployed.apply(params)
        expected.append(deployed.predict(clips).logits)
    stop = threading.Event()

    def keep_downloading():
        for i in range(400):  # bounded
            if stop.is_set():
                return
            deployed.apply((start, other)[i % 2])

    thread = threading.Thread(target=keep_downloading)
    thread.start()
    try:
        for _ in range(30):
            logits = deployed.predict(clips).logits
            assert any(np.array_equal(logits, e) for e in expected)
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not thread.is_alive()


def test_the_deployed_edge_runs_without_jax_or_torch(exported, tmp_path):
    edge, router, directories = exported
    clips = _clips(8, seed=6)
    np.save(tmp_path / "clips.npy", clips)
    script = (
        "import sys, numpy as np\n"
        "for name in ('jax', 'jaxlib', 'flax', 'torch', 'tensorflow'):\n"
        "    sys.modules[name] = None  # importing any of them fails\n"
        "from dmd_jax.deploy.runtime import DeployedEdge\n"
        f"edge = DeployedEdge({directories['batch']!r})\n"
        f"answer = edge.predict(np.load({str(tmp_path / 'clips.npy')!r}))\n"
        f"np.save({str(tmp_path / 'logits.npy')!r}, answer.logits)\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    logits, _ = _jax_outputs(edge, router, "batch", clips)
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), logits, atol=1e-4)


def test_openvino_is_imported_without_forking_its_telemetry():
    """Plain `import openvino` forks a child to send a usage event (a fork of a
    multithreaded JAX process can deadlock); the runtime's import forks nothing and leaves
    openvino_telemetry importable for whoever wants it."""
    script = (
        "import os, sys\n"
        "forks = []\n"
        "os.register_at_fork(before=lambda: forks.append(1))\n"
        "from dmd_jax.deploy import runtime\n"
        "runtime.import_openvino().Core()\n"
        "assert 'openvino_telemetry' not in sys.modules\n"
        "import openvino_telemetry\n"
        "print('forks', len(forks))\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["forks", "0"]


def test_a_damaged_artifact_or_wrong_clips_are_refused(exported, tmp_path):
    import shutil
    _, _, directories = exported
    copy = tmp_path / "edge"
    shutil.copytree(directories["batch"], copy)
    with pytest.raises(runtime.ArtifactError, match="variant"):
        runtime.DeployedEdge(str(copy), "fp16")
    with pytest.raises(runtime.ArtifactError, match="engine"):
        runtime.DeployedEdge(str(copy), engine="tensorrt")
    deployed = runtime.DeployedEdge(str(copy))
    with pytest.raises(runtime.UserError, match="uint8 clips of shape"):
        deployed.predict(_clips(2).astype(np.float32))
    with open(copy / export.FILES["int8"], "r+b") as f:
        f.seek(100)
        f.write(b"\0\0\0\0")
    with pytest.raises(runtime.ArtifactError, match="run export_edge again"):
        runtime.DeployedEdge(str(copy), "int8")
    (copy / runtime.PARAMETERS).write_bytes(b"not an npz")
    with pytest.raises(runtime.ArtifactError, match="starting parameters"):
        runtime.DeployedEdge(str(copy))
    os.remove(copy / runtime.MANIFEST)
    with pytest.raises(runtime.ArtifactError, match="export_edge job"):
        runtime.DeployedEdge(str(copy))


def test_a_router_without_an_exported_form_is_refused():
    from dmd_jax.deploy import torch_edge
    router = routers.Router("tests.deploy.deployed_edge_test", lambda p, f, l: l[:, 0])
    with pytest.raises(torch_edge.NotExportableError, match="torch_score"):
        torch_edge.router_score(router)


def router(arg, context):  # this module as a router without `torch_score`
    return routers.Router("tests.deploy.deployed_edge_test", lambda p, f, l: l[:, 0])
