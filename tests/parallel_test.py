"""The mesh and host-local -> global batches."""

import jax
import numpy as np
import pytest

from dmd_jax import parallel


def test_mesh_over_all_or_some_devices(devices):
    assert parallel.make_mesh().size == 8
    assert parallel.make_mesh(2).size == 2


def test_asking_for_more_devices_than_exist_is_clear(devices):
    with pytest.raises(ValueError, match="num_devices=16"):
        parallel.make_mesh(16)


def test_batch_must_divide_over_devices(devices):
    with pytest.raises(ValueError, match="multiple of 8"):
        parallel.check_global_batch(12, parallel.make_mesh())


def test_global_batch_is_sharded_and_round_trips(devices):
    mesh = parallel.make_mesh()
    local = {"x": np.arange(16 * 3, dtype=np.float32).reshape(16, 3), "y": np.arange(16)}
    batch = parallel.to_global(local, mesh)
    assert batch["x"].sharding.spec == parallel.batch_sharded(mesh).spec
    assert len(batch["x"].addressable_shards) == 8
    back = parallel.fetch(batch)
    np.testing.assert_array_equal(back["x"], local["x"])
    # A jitted reduction over the sharded batch sees every row.
    assert float(jax.jit(lambda b: b["x"].sum())(batch)) == local["x"].sum()


def test_host_slice_single_process():
    assert parallel.host_slice(32) == slice(0, 32)
