"""The `serve` job: the cloud model behind gRPC (`dmd_jax.serve.server`), until stopped.

    python -m dmd_jax.main --config configs/demo.py:serve --workdir runs/demo/serve

It loads the cloud model (and, with `config.edge.path`, the edge model CEMA adapts for
each edge that calls `Adapt`), compiles the forward for every batch bucket and each kind
of CEMA step before it accepts a call, then writes `WORKDIR/server.json` (address, port, pid: `serve.port=0`
picks a free port) and serves until SIGINT or SIGTERM. Weights are arguments of the
compiled forward, never constants in it.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import threading
from typing import Any

import jax
import ml_collections
import numpy as np

from dmd_jax import files, hybrid, jobs, model_store, parallel, reporting
from dmd_jax.serve import server
from dmd_jax.tta import cema
from dmd_jax.tta.adaptable import Adaptable

SECTIONS = ("cloud", "edge", "serve", "cema", "runtime")
KEYS = {"cloud": ("path",), "edge": ("path",), "cema": cema.SETTINGS,
        "serve": tuple(f.name for f in dataclasses.fields(server.Settings))}
SERVER_FILE = "server.json"


@jobs.entry("serve", SECTIONS, KEYS)
def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    settings = server.Settings(**config.serve.to_dict())
    cloud = model_store.load(config.cloud.path, "cloud", config.runtime)
    forward = jax.jit(hybrid.cloud_forward(cloud))
    weights = jax.device_put(cloud.variables)
    run_forward = lambda clips: np.asarray(forward(weights, clips))
    _warm_up(run_forward, cloud.input_shape, settings.max_batch)
    adapters = _adapters(config, cloud) if config.edge.path else None
    grpc_server, port, batcher = server.serve(run_forward, len(cloud.class_names),
                                              cloud.fingerprint, settings, adapters)
    info = {"address": f"{settings.host}:{port}", "port": port, "pid": os.getpid(),
            "model": cloud.fingerprint, "adapts": adapters is not None}
    files.remove(files.path(workdir) / SERVER_FILE)
    files.write_json(files.path(workdir) / SERVER_FILE, info)
    reporting.log(f"[serve] {cloud.source} on {info['address']} (batches of up to "
                  f"{settings.max_batch}, wait {settings.max_wait_ms} ms, queue "
                  f"{settings.queue_capacity}); adaptation {'on' if adapters else 'off'}")
    stopped = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopped.set())
    stopped.wait()
    grpc_server.stop(grace=1).wait()
    batcher.close()
    files.remove(files.path(workdir) / SERVER_FILE)
    reporting.log("[serve] stopped")
    return info


def _warm_up(forward, input_shape: tuple[int, ...], max_batch: int) -> None:
    """Compiles every bucket the batcher can send, so no call waits for a compilation."""
    size = 1
    while True:
        forward(np.zeros((min(size, max_batch), *input_shape), np.uint8))
        if size >= max_batch:
            return
        size *= 2


def _adapters(config: ml_collections.ConfigDict, cloud: model_store.LoadedModel):
    """Per edge name, a CEMA cloud adapting a copy of the edge model (made on first use
    from one compiled and warmed-up template, so a new edge waits for no compilation)."""
    edge = Adaptable.of(model_store.load(config.edge.path, "edge", config.runtime,
                                         class_names=cloud.class_names))
    foundation = Adaptable.of(cloud)
    mesh = parallel.make_mesh(config.get("num_devices", 0))
    template = cema.Cloud(edge, foundation, mesh, config.cema, config.seed)
    template.warm_up(edge.model.input_shape)
    clouds: dict[str, cema.Cloud] = {}

    @functools.wraps(_adapters)
    def for_edge(name: str) -> cema.Cloud:
        if name not in clouds:
            clouds[name] = template.spawn(config.seed)
        return clouds[name]
    return for_edge
