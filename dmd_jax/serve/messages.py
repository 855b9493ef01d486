"""Clips to and from `cloud.proto`'s `Clips` message, checked on the way in.

A message that does not describe a whole batch of uint8 clips (wrong encoding, a shape
that is not `(n, T, H, W, 3)`, bytes that do not fill it, an mp4 that does not decode)
raises `MalformedMessage`, which the server turns into INVALID_ARGUMENT."""

from __future__ import annotations

import numpy as np

from dmd_jax import uploads
from dmd_jax.data import video_codec
from dmd_jax.serve import cloud_pb2
from dmd_jax.tta import cema

MAX_SIDE = 4096  # a clip dimension beyond this is an error, not an allocation


class MalformedMessage(ValueError):
    """A `Clips` message that is not a batch of clips."""


def encode_clips(clips: np.ndarray, crf: int = 0) -> tuple[cloud_pb2.Clips, int]:
    """`(message, bytes of clip data)`: raw uint8 (`crf=0`) or one H.264 mp4 per clip."""
    clips = np.ascontiguousarray(clips, np.uint8)
    if crf:
        mp4s = [video_codec.encode(clip, uploads.FPS, crf=crf) for clip in clips]
        return (cloud_pb2.Clips(shape=clips.shape, encoding="h264", encoded=mp4s),
                sum(len(m) for m in mp4s))
    return cloud_pb2.Clips(shape=clips.shape, encoding="raw", raw=clips.tobytes()), clips.nbytes


def decode_clips(message: cloud_pb2.Clips) -> np.ndarray:
    """uint8 `(n, T, H, W, 3)`; raises `MalformedMessage` naming what is wrong."""
    shape = tuple(message.shape)
    if len(shape) != 5 or shape[-1] != 3 or min(shape) < 1 or max(shape[1:4]) > MAX_SIDE:
        raise MalformedMessage(f"clips of shape {shape}: expected (n, T, H, W, 3), n >= 1, "
                               f"sides <= {MAX_SIDE}")
    if message.encoding == "raw":
        if len(message.raw) != int(np.prod(shape)):
            raise MalformedMessage(f"{len(message.raw)} bytes of raw clips do not fill shape "
                                   f"{shape} ({int(np.prod(shape))} bytes)")
        return np.frombuffer(message.raw, np.uint8).reshape(shape)
    if message.encoding == "h264":
        if len(message.encoded) != shape[0]:
            raise MalformedMessage(f"{len(message.encoded)} encoded clips for shape {shape}")
        out = np.empty(shape, np.uint8)
        for i, data in enumerate(message.encoded):
            try:
                frames = video_codec.decode_all(data, f"clip {i} of the request")
            except video_codec.VideoDecodeError as err:
                raise MalformedMessage(str(err)) from err
            frames = frames[:, :shape[2], :shape[3]]
            if frames.shape[1:3] != shape[2:4]:
                raise MalformedMessage(f"clip {i} decodes to {frames.shape[1:3]} frames, not "
                                       f"{shape[2:4]}")
            out[i] = frames[np.minimum(np.arange(shape[1]), len(frames) - 1)]
        return out
    raise MalformedMessage(f"clip encoding {message.encoding!r}: expected 'raw' or 'h264'")


def upload(clips: np.ndarray) -> cema.Upload:
    """Received clips as CEMA's cloud takes them."""
    return cema.Upload(np.ascontiguousarray(clips))
