"""Test setup: 8 fake CPU devices, a shared compilation cache, one tiny prepared dataset.

The device count must be fixed before JAX initialises, hence at import time here.
Tests that need one device build a one-device mesh; everything else runs sharded
over 8, the same code path as a TPU slice.
"""

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
_CACHE = os.path.join(os.path.dirname(__file__), "..", ".jax_cache")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.abspath(_CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402  (after XLA_FLAGS)
import pytest  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, REPO)

from dmd_jax.config_utils import load_config  # noqa: E402
from dmd_jax.data import pipeline  # noqa: E402


def tiny_config(data_dir: str, variant: str = "tiny", **overrides):
    """configs/demo.py:tiny (or another variant) on a tfds data_dir, with dotted-key overrides."""
    config = load_config(os.path.join(REPO, "configs", "demo.py") + f":{variant}")
    config.data.data_dir = data_dir
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
    """A tfds data_dir holding the tiny synthetic dataset, prepared once per session."""
    path = str(tmp_path_factory.mktemp("tfds"))
    pipeline.prepare(tiny_config(path).data)
    return path


@pytest.fixture(scope="session")
def devices():
    assert len(jax.devices()) == 8, "tests expect 8 fake CPU devices (see conftest.py)"
    return jax.devices()


@pytest.fixture(scope="session")
def tiny_pipeline(data_dir, tmp_path_factory) -> str:
    """The whole tiny pipeline (edge, teacher, label, switcher, hybrid), run once; its root."""
    from dmd_jax.jobs import pipeline as pipeline_job

    root = str(tmp_path_factory.mktemp("pipeline"))
    pipeline_job.run(tiny_config(data_dir, "tiny_pipeline"), root)
    return root
