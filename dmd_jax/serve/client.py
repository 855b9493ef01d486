"""The edge's side of the link: the cloud behind a gRPC channel, never waited on for long.

`RemoteCloud` is a `hybrid.CloudFn`: offloaded clips in, logits out, or
`CloudUnavailable` when the cloud is down, slow past the deadline, refusing (queue full,
bad request) or in back-off after such a failure. `hybrid.HybridClassifier` then answers
those clips with the edge's own prediction, so no clip is ever left without an answer.
After a failure the client waits `backoff` (doubling up to its maximum) before trying
again, so a dead cloud costs the edge no deadline per batch; gRPC reconnects by itself.
CEMA uploads that cannot be sent wait in a bounded local queue (oldest dropped, counted)
and go up with the next upload that gets through.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Any

import flax.serialization
import grpc
import numpy as np

from dmd_jax import hybrid
from dmd_jax.serve import cloud_pb2, cloud_pb2_grpc, messages


class CloudUnavailable(hybrid.CloudUnavailable):
    """The cloud did not answer (down, late, refusing, or the client is backing off)."""


@dataclasses.dataclass
class LinkStats:
    calls: int = 0
    answered: int = 0
    failed: dict[str, int] = dataclasses.field(default_factory=dict)  # by gRPC status
    skipped: int = 0  # calls not made: backing off
    bytes_up: int = 0
    uploads_dropped: int = 0  # CEMA clips dropped from the full local queue


class RemoteCloud:
    """The cloud at `address` ('127.0.0.1:50051'), with a per-call deadline."""

    def __init__(self, address: str, deadline_s: float = 1.0, crf: int = 0, edge: str = "edge",
                 backoff_s: tuple[float, float] = (0.05, 2.0), upload_queue_clips: int = 256,
                 max_message_mb: int = 64, adapt_deadline_s: float | None = None):
        limit = max_message_mb * 2 ** 20
        # gRPC's own reconnection back-off (1 s growing to 120 s by default) would keep a
        # restarted cloud unused for minutes: it follows this client's back-off instead.
        reconnect_ms = [int(1e3 * backoff_s[0]), int(1e3 * backoff_s[1])]
        self._channel = grpc.insecure_channel(address, options=[
            ("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit),
            ("grpc.initial_reconnect_backoff_ms", reconnect_ms[0]),
            ("grpc.min_reconnect_backoff_ms", reconnect_ms[0]),
            ("grpc.max_reconnect_backoff_ms", reconnect_ms[1])])
        self._stub = cloud_pb2_grpc.CloudStub(self._channel)
        self.address, self.deadline_s, self.crf, self.edge = address, deadline_s, crf, edge
        # Uploads for adaptation wait for no answer: they may take longer than a Classify.
        self.adapt_deadline_s = adapt_deadline_s or deadline_s
        self._backoff_min, self._backoff_max = backoff_s
        self._backoff, self._retry_at = backoff_s[0], 0.0
        self._waiting: collections.deque[np.ndarray] = collections.deque(maxlen=upload_queue_clips)
        self.stats = LinkStats()
        self.last_timing: dict[str, float] = {}
        self.last_parameters: tuple[int, Any] | None = None  # (version, norm_affine bytes)

    def __call__(self, clips: np.ndarray) -> np.ndarray:
        """Logits `(n, C)` for `clips`, or `CloudUnavailable`."""
        return self.classify(clips)[0]

    def classify(self, clips: np.ndarray, adapt: np.ndarray | None = None,
                 adapted_answer: bool = False) -> tuple[np.ndarray, bytes | None]:
        """`(logits (n, C), new normalisation parameters or None)`, or `CloudUnavailable`.
        `adapt`: (n,) bool, the clips that also join this edge's CEMA buffer (one upload,
        two uses); parameters come back once a cloud step has made new ones.
        `adapted_answer`: answered by this edge's adapted cloud model, not as trained."""
        started = time.perf_counter()
        message, size = messages.encode_clips(clips, self.crf)
        encoded = time.perf_counter()
        request = cloud_pb2.ClassifyRequest(edge=self.edge, clips=message,
                                            adapted_answer=adapted_answer)
        if adapt is not None and adapt.any():
            request.adapt.extend(bool(a) for a in adapt)
        reply = self._call(self._stub.Classify, request, size)
        call_ms = (time.perf_counter() - encoded) * 1e3
        server_ms = reply.timing.queue_ms + reply.timing.decode_ms + reply.timing.forward_ms
        self.last_timing = {"encode_ms": (encoded - started) * 1e3, "call_ms": call_ms,
                            "transfer_ms": max(call_ms - server_ms, 0.0),
                            "queue_ms": reply.timing.queue_ms, "decode_ms": reply.timing.decode_ms,
                            "forward_ms": reply.timing.forward_ms,
                            "batch_clips": reply.timing.batch_clips, "bytes": size}
        logits = np.asarray(reply.logits, np.float32).reshape(len(clips), reply.num_classes)
        return logits, self._parameters_of(reply)

    def adapt(self, clips: np.ndarray) -> bytes | None:
        """Sends CEMA's uploads (with those waiting from earlier failures; none: only asks);
        the new normalisation parameters (flax msgpack bytes) when a cloud step has made
        some since this edge last received any. The cloud steps on its own time, so
        parameters come back with a later call than the uploads behind them. Clips that
        cannot go up now wait in the local queue."""
        self.stats.uploads_dropped += max(len(self._waiting) + len(clips) - self._waiting.maxlen, 0)
        self._waiting.extend(clips)
        request, size = cloud_pb2.AdaptRequest(edge=self.edge), 0
        if self._waiting:
            message, size = messages.encode_clips(np.stack(self._waiting), self.crf)
            request.clips.CopyFrom(message)
        try:
            reply = self._call(self._stub.Adapt, request, size, self.adapt_deadline_s)
        except CloudUnavailable:
            return None
        self._waiting.clear()
        return self._parameters_of(reply)

    def _parameters_of(self, reply) -> bytes | None:
        if not reply.HasField("parameters"):
            return None
        self.last_parameters = (reply.parameters.version, reply.parameters.norm_affine)
        return reply.parameters.norm_affine

    @property
    def waiting_uploads(self) -> int:
        return len(self._waiting)

    def health(self, timeout_s: float = 1.0) -> cloud_pb2.HealthReply:
        return self._stub.Health(cloud_pb2.HealthRequest(), timeout=timeout_s)

    def close(self) -> None:
        self._channel.close()

    def _call(self, method, request, size: int, deadline_s: float | None = None):
        now = time.monotonic()
        if now < self._retry_at:
            self.stats.skipped += 1
            raise CloudUnavailable(f"backing off until the cloud at {self.address} is tried again")
        self.stats.calls += 1
        try:
            reply = method(request, timeout=deadline_s or self.deadline_s)
        except grpc.RpcError as err:
            code = err.code().name if err.code() else "UNKNOWN"
            self.stats.failed[code] = self.stats.failed.get(code, 0) + 1
            self._retry_at = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, self._backoff_max)
            raise CloudUnavailable(f"{code}: {err.details()}") from err
        self._backoff, self._retry_at = self._backoff_min, 0.0
        self.stats.answered += 1
        self.stats.bytes_up += size
        return reply


def norm_affine_from(data: bytes, template: Any) -> Any:
    """Downloaded parameters as the edge's normalisation tree (`template`'s structure)."""
    return flax.serialization.from_bytes(template, data)
