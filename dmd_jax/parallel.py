"""Devices, the mesh and shardings: the only module of dmd_jax that knows about devices.

Data parallelism, big_vision style: one 1-D mesh axis `data`; batches are sharded along
it, parameters and optimiser state are replicated, and `jax.jit` inserts the
collectives (gradient all-reduce, BatchNorm statistics over the global batch). The same
code runs on one CPU, on fake CPU devices, on a GPU and on a multi-host TPU pod, where
each host feeds its own slice of the global batch.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from dmd_jax.errors import ConfigValueError

DATA_AXIS = "data"


def maybe_initialize_distributed() -> None:
    """Joins a multi-process job when the environment describes one.

    Cloud TPU VMs (and SLURM/Open MPI on GPUs) are detected by
    `jax.distributed.initialize()` itself; `DMD_COORDINATOR`, `DMD_NUM_PROCESSES`
    and `DMD_PROCESS_ID` describe a job by hand (e.g. several processes on one CPU).
    """
    coordinator = os.environ.get("DMD_COORDINATOR")
    if coordinator:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU stand-in pods
        jax.distributed.initialize(
            coordinator,
            num_processes=int(os.environ["DMD_NUM_PROCESSES"]),
            process_id=int(os.environ["DMD_PROCESS_ID"]),
        )
    elif os.environ.get("DMD_DISTRIBUTED") == "auto":
        jax.distributed.initialize()


def make_mesh(num_devices: int = 0) -> Mesh:
    """A 1-D `data` mesh over the first `num_devices` devices (0: all of them).

    Auto axis types: jit chooses the layouts of intermediates, so model code needs no
    sharding annotations.
    """
    devices = jax.devices()
    if num_devices:
        if num_devices > len(devices):
            raise ConfigValueError(
                f"config.num_devices={num_devices} but only {len(devices)} devices exist; "
                "set --config.num_devices=0 to use all of them")
        if jax.process_count() > 1 and num_devices != len(devices):
            raise ConfigValueError("config.num_devices must be 0 (all devices) in a multi-host job")
        devices = devices[:num_devices]
    return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,),
                         devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def check_global_batch(global_batch_size: int, mesh: Mesh) -> None:
    """Fails early, and clearly, on a batch that cannot be split evenly."""
    if global_batch_size % mesh.size:
        raise ConfigValueError(
            f"global batch size {global_batch_size} is not divisible by the {mesh.size} "
            f"devices of the mesh; choose a multiple of {mesh.size}")


def host_slice(global_batch_size: int) -> slice:
    """The rows of each global batch that this host loads."""
    count, index = jax.process_count(), jax.process_index()
    if global_batch_size % count:
        raise ConfigValueError(f"global batch {global_batch_size} does not split over {count} hosts")
    per_host = global_batch_size // count
    return slice(index * per_host, (index + 1) * per_host)


def to_global(local_batch: Any, mesh: Mesh) -> Any:
    """Host-local numpy rows -> one global array sharded along `data`, per leaf."""
    sharding = batch_sharded(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def put_rows(array: np.ndarray, mesh: Mesh) -> jax.Array:
    """A batch that every host holds whole (e.g. clips uploaded to the cloud) -> one array
    sharded along `data`; each host puts the rows of its own devices."""
    array = np.asarray(array)
    return jax.make_array_from_callback(array.shape, batch_sharded(mesh), lambda index: array[index])


def submesh_dividing(mesh: Mesh, *batch_sizes: int) -> Mesh:
    """The largest part of `mesh` whose device count divides every batch size, with as
    many devices from each host: a 32-clip batch then runs on 4 of 6 GPUs, not on none.
    (A 1-D data mesh needs each batch to split evenly over its devices.)"""
    devices = list(mesh.devices.flat)
    hosts = sorted({d.process_index for d in devices})
    per_host = {h: [d for d in devices if d.process_index == h] for h in hosts}
    for count in range(len(devices), 0, -1):
        if count % len(hosts) == 0 and all(b % count == 0 for b in batch_sizes):
            if count == len(devices):
                return mesh
            chosen = [d for h in hosts for d in per_host[h][:count // len(hosts)]]
            return jax.make_mesh((count,), (DATA_AXIS,), axis_types=(AxisType.Auto,),
                                 devices=chosen)
    raise ConfigValueError(f"batches of {sorted(set(batch_sizes))} rows cannot be split evenly over "
                     f"the {len(hosts)} hosts; choose batch sizes that are multiples of "
                     f"{len(hosts)}")


def put_replicated(tree: Any, mesh: Mesh) -> Any:
    return jax.device_put(tree, replicated(mesh))


def fetch(tree: Any) -> Any:
    """Device arrays -> numpy on every host (gathers batch-sharded arrays across hosts)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def gather_host_rows(tree: Any) -> Any:
    """Host-local numpy rows -> the global rows, in host order, on every host."""
    if jax.process_count() == 1:
        return tree
    return multihost_utils.process_allgather(tree, tiled=True)


def broadcast_from_main(value: Any) -> Any:
    """The main host's `value` on every host: decisions that all hosts must share (e.g.
    which work is left), taken where the files are written."""
    if jax.process_count() == 1:
        return value
    return multihost_utils.broadcast_one_to_all(value)


def all_hosts_agree(flag: bool) -> bool:
    """True on every host iff `flag` is true on every host (e.g. each read a file)."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(np.all(multihost_utils.process_allgather(np.asarray(flag))))


def barrier(name: str) -> None:
    """Waits until every host reaches this point (a no-op on one host)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def is_main_process() -> bool:
    """Only the first host writes summaries, logs and files other hosts would duplicate."""
    return jax.process_index() == 0


def platform() -> str:
    """'cpu', 'gpu' or 'tpu': for the few choices that depend on the hardware (e.g. which
    depthwise-convolution implementation is fastest)."""
    return jax.default_backend()


def describe() -> dict[str, Any]:
    """What the job ran on, for summaries and benchmark reports."""
    devices = jax.devices()
    return {
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "process_count": jax.process_count(),
    }
