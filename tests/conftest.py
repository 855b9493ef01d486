"""Test setup: 8 fake CPU devices, a shared compilation cache, one tiny prepared dataset.

The device count must be fixed before JAX initialises, hence at import time here.
Tests that need one device build a one-device mesh; everything else runs sharded
over 8, the same code path as a TPU slice.

The suite is bound by XLA:CPU compile time, not by running the tiny models: LLVM
optimisation level 0 cuts a tiny X3D train step's compile from 9.2 s to 5.4 s at the
same step time (333 vs 336 ms, 2-core CPU), so tests (and their subprocesses, which
inherit XLA_FLAGS) use it; it changes only how XLA:CPU generates code, and `make demo`,
the benchmarks and users get XLA's defaults. (XLA:CPU's older loop fusion emitters,
`--xla_cpu_use_fusion_emitters=false`, would halve the compile again, 4.5 s to 2.1 s, and
the whole suite from 15 min 21 s to 11 min 28 s on a 2-core AMD EPYC VM; but in one of the
two suites run with it a worker aborted without a message inside an op-by-op `add`, and
the run then hung: not used until that is understood.) The dataset and the tiny
pipeline are built once per test run and shared by the pytest-xdist workers (a file
lock, the first worker builds).
"""

import os
import sys

TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {TEST_XLA_FLAGS}"
                           " --xla_force_host_platform_device_count=8").strip()
_CACHE = os.path.join(os.path.dirname(__file__), "..", ".jax_cache")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.abspath(_CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402  (after XLA_FLAGS)
import pytest  # noqa: E402
from filelock import FileLock  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, REPO)

from dmd_jax.config_utils import load_config  # noqa: E402
from dmd_jax.data import pipeline  # noqa: E402


# The longest test files, started first so that the xdist workers (`--dist loadfile`)
# finish together instead of one waiting on another's last long file. The first needs
# the tiny pipeline (built once, under a lock); the next ones need no more than the
# dataset, so the other worker need not wait for that build.
SLOW_FIRST = (  # by measured time per file (2-core CPU, cold compilation cache), longest first
    "tests/jobs/multiprocess_test.py", "tests/tta/methods_vs_reference_test.py",
    "tests/serve/serve_test.py", "tests/jobs/real_video_test.py",
    "tests/convert/xclip_vs_reference_test.py", "tests/jobs/train_vs_pmap_reference_test.py",
    "tests/jobs/train_test.py", "tests/jobs/train_resume_test.py",
    "tests/convert/x3d_vs_reference_test.py", "tests/gcs_test.py", "tests/jobs/adapt_test.py",
    "tests/faults_test.py", "tests/tta/tta_methods_test.py",
    "tests/models/mixed_precision_test.py", "tests/notebook_test.py",
    "tests/benchmarks_test.py", "tests/jobs/dmd_chain_test.py", "tests/extension_test.py",
    "tests/data/corruptions_test.py", "tests/data/encoded_video_test.py")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        path = item.nodeid.split("::")[0]
        return next((i for i, slow in enumerate(SLOW_FIRST) if path.endswith(slow[6:])),
                    len(SLOW_FIRST))
    items.sort(key=rank)  # stable: within a file, and among the rest, the collected order


def tiny_config(data_dir: str, stage: str = "edge", **overrides):
    """configs/demo.py:STAGE,tiny on a tfds data_dir, with dotted-key overrides."""
    config = load_config(os.path.join(REPO, "configs", "demo.py") + f":{stage},tiny")
    if "data" in config:
        config.data.data_dir = data_dir
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def dataset_config(data_dir: str, name: str, **overrides):
    """The tiny config's `data` as another dataset's: its own keys (`root`, `fold`, ...)
    instead of the synthetic dataset's, with `overrides`."""
    data = tiny_config(data_dir).data
    del data.split_sizes, data.ceiling_cameras
    data.name = name
    data.update(pipeline.dataset_defaults(name))
    data.update(overrides)
    return data


def _built_once(tmp_path_factory, worker_id: str, testrun_uid: str, name: str, build) -> str:
    """`build(path)` once per test run, whichever xdist worker asks first; its path.

    The directory counts as built only when `build` returns (a marker file), so a
    worker never sees a half-built one."""
    shared = tmp_path_factory.getbasetemp()
    if worker_id != "master":  # xdist: the workers' temp dirs share a parent
        shared = shared.parent
    path = shared / f"{name}-{testrun_uid}"
    with FileLock(str(path) + ".lock"):
        if not (path / ".built").exists():
            path.mkdir(exist_ok=True)
            build(str(path))
            (path / ".built").touch()
    return str(path)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, worker_id, testrun_uid) -> str:
    """A tfds data_dir holding the tiny synthetic dataset, prepared once per test run."""
    return _built_once(tmp_path_factory, worker_id, testrun_uid, "tfds",
                       lambda path: pipeline.prepare(tiny_config(path).data))


@pytest.fixture(scope="session")
def devices():
    assert len(jax.devices()) == 8, "tests expect 8 fake CPU devices (see conftest.py)"
    return jax.devices()


@pytest.fixture(scope="session")
def tiny_pipeline(data_dir, tmp_path_factory, worker_id, testrun_uid) -> str:
    """The whole tiny pipeline (edge, teacher, label, switcher, hybrid, adapt), run once
    per test run; its root. Tests must not write into it (copy it first)."""
    from dmd_jax.jobs import pipeline as pipeline_job

    return _built_once(tmp_path_factory, worker_id, testrun_uid, "pipeline",
                       lambda root: pipeline_job.run(tiny_config(data_dir, "pipeline"), root))
