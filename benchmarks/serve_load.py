"""The cloud server under load: N edge clients against one `serve` job on 127.0.0.1.

    python -m benchmarks.serve_load [--quick]

The server (a subprocess, the demo teacher from `runs/demo/teacher/model`, or a random
model of its architecture where that is missing) batches up to 32 clips, waiting at most
5 ms. Each of N client threads sends a bounded number of requests of 4 raw 8x32x32 clips,
each clip's content tagged with its own (client, request, row) so that an answer can be
matched to exactly one request: the row checks that nothing is lost or duplicated (every
reply's logits equal the cloud's on those very clips, computed here). Reported per N:
clips/s through the server, p50/p99 request latency, and the mean clips per forward
(batching efficiency: 4 means no two requests shared a forward).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from benchmarks import common
from benchmarks.demo_models import CLOUD_DIR, demo_or_random

FULL = dict(clients=(1, 2, 4, 8), requests=60, clips=4)
QUICK = dict(clients=(1, 4), requests=8, clips=4)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_server(model_dir: str, workdir: str) -> tuple[subprocess.Popen, str]:
    args = [sys.executable, "-m", "dmd_jax.main", f"--config={REPO}/configs/demo.py:serve",
            f"--workdir={workdir}", f"--config.cloud.path={model_dir}", "--config.edge.path=",
            "--config.serve.port=0"]
    log = open(os.path.join(workdir, "log.txt"), "wb")
    proc = subprocess.Popen(args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    info = os.path.join(workdir, "server.json")
    deadline = time.monotonic() + 300
    while not os.path.exists(info):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(open(os.path.join(workdir, "log.txt")).read()[-2000:])
        time.sleep(0.1)
    return proc, json.load(open(info))["address"]


def tagged_clips(client_id: int, request: int, count: int) -> np.ndarray:
    rng = np.random.default_rng([client_id, request])
    return rng.integers(0, 256, (count, 8, 32, 32, 3), dtype=np.uint8)


def load(address: str, clients: int, case: dict, cloud) -> dict:
    from dmd_jax.serve import client

    latencies, batch_sizes, mismatched, answered = [], [], [0], [0]
    lock = threading.Lock()

    def one_client(cid: int):
        remote = client.RemoteCloud(address, deadline_s=60)
        for r in range(case["requests"]):
            clips = tagged_clips(cid, r, case["clips"])
            start = time.perf_counter()
            logits = remote(clips)
            elapsed = (time.perf_counter() - start) * 1e3
            ok = np.allclose(logits, cloud(clips), rtol=1e-4, atol=1e-4)
            with lock:
                latencies.append(elapsed)
                batch_sizes.append(remote.last_timing["batch_clips"])
                answered[0] += 1
                mismatched[0] += 0 if ok else 1
        remote.close()

    threads = [threading.Thread(target=one_client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    seconds = time.perf_counter() - start
    expected = clients * case["requests"]
    return {"clients": clients, "requests": expected, "answered": answered[0],
            "mismatched": mismatched[0],
            "clips_per_s": answered[0] * case["clips"] / seconds,
            "p50_ms": float(np.percentile(latencies, 50)),
            "p99_ms": float(np.percentile(latencies, 99)),
            "clips_per_forward": float(np.mean(batch_sizes))}


def run(quick: bool) -> common.Section:
    import jax

    from dmd_jax import hybrid

    case = QUICK if quick else FULL
    from configs import demo

    model = demo_or_random(CLOUD_DIR, demo.TEACHER, seed=1)
    source = model.source if model.source != "random" else "random weights (no runs/demo)"
    forward = jax.jit(hybrid.cloud_forward(model))
    # The reference: the same model in this process, on the same clips (a cache, so the
    # check does not compete with the server for the cores while the load runs).
    expected: dict[bytes, np.ndarray] = {}
    for clients in case["clients"]:
        for cid in range(clients):
            for r in range(case["requests"]):
                clips = tagged_clips(cid, r, case["clips"])
                expected.setdefault(clips.tobytes(), np.asarray(forward(model.variables, clips)))
    cloud = lambda clips: expected[clips.tobytes()]
    rows, notes = [], []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = model.directory or _export(model, tmp)
        proc, address = start_server(model_dir, tmp)
        try:
            for clients in case["clients"]:
                r = load(address, clients, case, cloud)
                rows.append([clients, r["requests"], r["answered"], r["mismatched"],
                             r["clips_per_s"], r["p50_ms"], r["p99_ms"], r["clips_per_forward"]])
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    notes.append(f"Cloud model: {source}. Every request was answered exactly once with the "
                 "logits of its own clips where 'answered' equals 'requests' and 'mismatched' "
                 "is 0.")
    return common.Section(
        title="Cloud server under load",
        command="python -m benchmarks.serve_load",
        setup=(f"One serve job (max batch 32, max wait 5 ms) and N client threads on the same "
               f"machine, each sending {case['requests']} requests of {case['clips']} raw "
               "8x32x32 clips, one after another."),
        columns=["clients", "requests", "answered", "mismatched", "clips/s", "p50 ms",
                 "p99 ms", "clips per forward"],
        rows=rows, notes=notes, devices=_devices())


def _export(model, tmp: str) -> str:
    from dmd_jax import model_store
    path = os.path.join(tmp, "cloud")
    model_store.save(path, model.model_config, model.class_names, model.variables,
                     model.input_shape, model.source)
    return path


def _devices() -> dict:
    from dmd_jax import parallel
    return parallel.describe()


if __name__ == "__main__":
    common.main(run, __doc__)
