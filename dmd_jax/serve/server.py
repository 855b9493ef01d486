"""The cloud as its own process: a gRPC server for offloading (DMD) and adaptation (CEMA).

`Classify` answers offloaded clips with the cloud model's logits. Requests from every
edge wait in one bounded queue; a batching thread takes what is there, up to
`max_batch` clips or `max_wait_ms` after the first, and runs one forward (padded to a
power-of-two bucket, so a handful of shapes is ever compiled). A full queue refuses with
RESOURCE_EXHAUSTED at once rather than letting latency grow without bound; a request
whose deadline passes while it waits gets DEADLINE_EXCEEDED; a malformed one gets
INVALID_ARGUMENT. None of these stops the server.

`Adapt` feeds CEMA's cloud (`dmd_jax.tta.cema.Cloud`, one per edge name, stepping on its
own thread so that no call waits for a step): the uploads join that edge's replay buffer,
and a reply carries the edge's new normalisation parameters once a step has made them. `Classify`'s clips marked `adapt` serve both (one upload, two
uses): answered, and added to that edge's buffer. `Health` reports the model and the queue. The message schema is `cloud.proto`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time
from typing import Any, Callable

import flax.serialization
import grpc
import jax
import numpy as np

from dmd_jax import hybrid
from dmd_jax.serve import cloud_pb2, cloud_pb2_grpc, messages


@dataclasses.dataclass(frozen=True)
class Settings:
    """`config.serve`: where it listens and how it batches."""

    host: str = "127.0.0.1"
    port: int = 50051  # 0: any free port (written to WORKDIR/port)
    max_batch: int = 32  # clips per forward
    max_wait_ms: float = 5.0  # how long the first request of a batch waits for others
    queue_capacity: int = 64  # requests waiting before new ones are refused
    max_message_mb: int = 64  # larger requests are refused by gRPC
    workers: int = 16  # gRPC handler threads
    delay_ms: float = 0.0  # added to every forward: a slow cloud, for fault and latency studies


@dataclasses.dataclass
class _Pending:
    clips: np.ndarray
    future: concurrent.futures.Future
    enqueued: float


class Batcher:
    """Clips from many requests through one forward; results back to each request."""

    def __init__(self, forward: Callable[[np.ndarray], np.ndarray], settings: Settings):
        self._forward, self._settings = forward, settings
        self._queue: queue.Queue[_Pending] = queue.Queue(settings.queue_capacity)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="batcher", daemon=True)
        self._thread.start()

    def submit(self, clips: np.ndarray) -> concurrent.futures.Future:
        """Queues the clips; raises `queue.Full` when the queue is at capacity."""
        pending = _Pending(clips, concurrent.futures.Future(), time.perf_counter())
        self._queue.put_nowait(pending)
        return pending.future

    def queued(self) -> int:
        return self._queue.qsize()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                first = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            batch, clips = [first], len(first.clips)
            until = time.perf_counter() + self._settings.max_wait_ms / 1e3
            while clips < self._settings.max_batch:
                try:
                    item = self._queue.get(timeout=max(until - time.perf_counter(), 0))
                except queue.Empty:
                    break
                batch.append(item)
                clips += len(item.clips)
            self._run(batch)

    def _run(self, batch: list[_Pending]) -> None:
        # Requests whose caller gave up (deadline passed) are dropped, not computed.
        batch = [p for p in batch if p.future.set_running_or_notify_cancel()]
        if not batch:
            return
        started = time.perf_counter()
        try:
            logits = self._forward(np.concatenate([p.clips for p in batch]))
            if self._settings.delay_ms:
                time.sleep(self._settings.delay_ms / 1e3)
        except Exception as err:  # noqa: BLE001 - every waiting request learns of it
            for pending in batch:
                pending.future.set_exception(err)
            return
        forward_ms = (time.perf_counter() - started) * 1e3
        total = sum(len(p.clips) for p in batch)
        start = 0
        for pending in batch:
            stop = start + len(pending.clips)
            timing = {"queue_ms": (started - pending.enqueued) * 1e3, "forward_ms": forward_ms,
                      "batch_clips": total}
            pending.future.set_result((logits[start:stop], timing))
            start = stop


class Adapter:
    """CEMA's clouds, one per edge name, stepping on a thread of their own.

    A call that brings uploads never waits for a cloud step (seconds on a CPU: past any
    deadline worth setting for an answer); the clips join that edge's pending uploads and
    the newest parameters a step has made since that edge last received some go back with
    its next reply (`Adapt` without clips just asks)."""

    def __init__(self, adapters: Callable[[str], Any]):
        self._adapters = adapters
        self._pending: dict[str, list[np.ndarray]] = {}
        self._latest: dict[str, tuple[int, bytes]] = {}  # per edge: (version, parameters)
        self._sent: dict[str, int] = {}  # per edge: the version it has received
        self._buffer: dict[str, int] = {}
        self._busy = False
        self._wake = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="adapter", daemon=True)
        self._thread.start()

    def submit(self, edge: str, clips: np.ndarray) -> tuple[cloud_pb2.Parameters | None, int]:
        """Queues the clips; `(parameters this edge has not received yet or None, its
        buffer's size)`."""
        with self._wake:
            if len(clips):
                self._pending.setdefault(edge, []).append(clips)
                self._wake.notify()
            version, data = self._latest.get(edge, (0, b""))
            buffer = self._buffer.get(edge, 0)
            if version <= self._sent.get(edge, 0):
                return None, buffer
            self._sent[edge] = version
        return cloud_pb2.Parameters(norm_affine=data, version=version), buffer

    def classify(self, edge: str, clips: np.ndarray) -> np.ndarray:
        """Logits of this edge's adapted foundation model (`cema.Cloud.classify`), read
        while its steps go on: a step replaces the state it reads in one assignment."""
        cloud = self._adapters(edge)
        return cloud.classify(clips, cloud.cfg.new_per_step)

    def idle(self) -> bool:
        """Whether every upload received so far has been through its cloud."""
        with self._wake:
            return not self._pending and not self._busy

    def close(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            with self._wake:
                self._wake.wait_for(lambda: self._pending or self._stop)
                if self._stop:
                    return
                edge, clips = self._pending.popitem()
                self._busy = True
            try:
                cloud = self._adapters(edge)
                download, _ = cloud.receive(messages.upload(np.concatenate(clips)))
                data = (None if download is None else
                        flax.serialization.msgpack_serialize(jax.device_get(download.norm_affine)))
            except Exception as err:  # noqa: BLE001 - one edge's failure stops no other
                logging.error("CEMA step for edge %r failed: %s", edge, err)
                data, cloud = None, None
            with self._wake:
                if cloud is not None:
                    self._buffer[edge] = len(cloud.buffer)
                if data is not None:
                    self._latest[edge] = (self._latest.get(edge, (0, b""))[0] + 1, data)
                self._busy = False


class Servicer(cloud_pb2_grpc.CloudServicer):
    """The three calls; `adapters(edge_name)` gives that edge's CEMA cloud (or None when
    the server was started without an edge model)."""

    def __init__(self, batcher: Batcher, num_classes: int, fingerprint: str,
                 adapter: Adapter | None, settings: Settings):
        self._batcher, self._num_classes = batcher, num_classes
        self._fingerprint, self._adapter, self._settings = fingerprint, adapter, settings

    def Classify(self, request, context):
        started = time.perf_counter()
        clips = self._clips(request.clips, context)
        decode_ms = (time.perf_counter() - started) * 1e3
        if request.adapted_answer:
            return self._adapted_answer(request, clips, decode_ms, context)
        try:
            future = self._batcher.submit(clips)
        except queue.Full:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"the cloud's queue is full ({self._settings.queue_capacity} "
                          "requests waiting): answer at the edge and retry later")
        remaining = context.time_remaining()
        try:
            logits, timing = future.result(timeout=remaining)
        except concurrent.futures.TimeoutError:
            future.cancel()
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                          "the deadline passed while the clips waited for the cloud")
        reply = cloud_pb2.ClassifyReply(
            num_classes=self._num_classes, logits=np.asarray(logits, np.float32).ravel(),
            timing=cloud_pb2.Timing(decode_ms=decode_ms, **timing))
        return self._with_adaptation(request, clips, reply, context)

    def _adapted_answer(self, request, clips, decode_ms: float, context):
        """`Classify` answered by the edge's adapted cloud model, outside the shared batches."""
        if self._adapter is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          "adapted_answer: this cloud was started without an edge model "
                          "(config.edge.path), so it has no adapted model")
        started = time.perf_counter()
        logits = self._adapter.classify(request.edge or "edge", clips)
        reply = cloud_pb2.ClassifyReply(
            num_classes=self._num_classes, logits=np.asarray(logits, np.float32).ravel(),
            timing=cloud_pb2.Timing(decode_ms=decode_ms, batch_clips=len(clips),
                                    forward_ms=(time.perf_counter() - started) * 1e3))
        return self._with_adaptation(request, clips, reply, context)

    def _with_adaptation(self, request, clips, reply, context):
        """The clips marked `adapt` join the edge's buffer; new parameters go with the reply."""
        if request.adapt:
            if len(request.adapt) != len(clips):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"{len(request.adapt)} adapt flags for {len(clips)} clips: give "
                              "one per clip, or none")
            keep = np.asarray(request.adapt, bool)
            if keep.any():
                parameters, _ = self._adapt(request.edge, clips[keep], context)
                if parameters is not None:
                    reply.parameters.CopyFrom(parameters)
        return reply

    def Adapt(self, request, context):
        clips = (self._clips(request.clips, context) if request.HasField("clips")
                 else np.zeros((0,), np.uint8))  # no clips: a request for new parameters
        parameters, buffer = self._adapt(request.edge, clips, context)
        reply = cloud_pb2.AdaptReply(buffer=buffer)
        if parameters is not None:
            reply.parameters.CopyFrom(parameters)
        return reply

    def Health(self, request, context):
        return cloud_pb2.HealthReply(model=self._fingerprint, queued=self._batcher.queued(),
                                     capacity=self._settings.queue_capacity,
                                     num_classes=self._num_classes)

    def _clips(self, message, context) -> np.ndarray:
        try:
            return messages.decode_clips(message)
        except messages.MalformedMessage as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))

    def _adapt(self, edge: str, clips: np.ndarray, context):
        if self._adapter is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          "this cloud was started without an edge model (config.edge.path): "
                          "it classifies but cannot adapt")
        return self._adapter.submit(edge or "edge", clips)


def serve(forward: Callable[[np.ndarray], np.ndarray], num_classes: int, fingerprint: str,
          settings: Settings, adapters: Callable[[str], Any] | None = None
          ) -> tuple[grpc.Server, int, Batcher]:
    """Starts the server on `settings.host`; `(server, port, batcher)`."""
    batcher = Batcher(hybrid.bucketed(forward, settings.max_batch), settings)
    limit = settings.max_message_mb * 2 ** 20
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(settings.workers),
                         options=[("grpc.max_receive_message_length", limit),
                                  ("grpc.max_send_message_length", limit)])
    adapter = Adapter(adapters) if adapters is not None else None
    cloud_pb2_grpc.add_CloudServicer_to_server(
        Servicer(batcher, num_classes, fingerprint, adapter, settings), server)
    port = server.add_insecure_port(f"{settings.host}:{settings.port}")
    if port == 0:
        raise OSError(f"cannot listen on {settings.host}:{settings.port} (in use?)")
    server.start()
    return server, port, batcher
