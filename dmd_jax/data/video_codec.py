"""Encoded video with PyAV: probing, decoding chosen frames, (re-)encoding.

Videos are kept encoded on disk (a UCF101 clip is ~0.1-0.5 MB as published against
~2.4 MB as one raw 16x224x224 view) and decoded when a batch needs them, so training can
sample a new temporal window, scale and crop of every clip at every step. Decoding runs
in the loader's worker processes (`dmd_jax.data.loader`).

Frame indices are positions in decode order (the n-th frame the decoder yields), so a
variable-frame-rate video is indexed like any other; `probe` counts them by decoding
once, which is also what proves a file decodes before it enters a dataset.
"""

from __future__ import annotations

import dataclasses
import io
from fractions import Fraction
from typing import Sequence

import av
import numpy as np

from dmd_jax.errors import UserError


class VideoDecodeError(UserError, ValueError):
    """Bytes or a file that PyAV cannot decode into at least one frame."""


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    num_frames: int
    fps: float  # frames / duration: the average rate of a variable-frame-rate video
    height: int
    width: int


def probe(data: bytes, name: str) -> VideoInfo:
    """Decodes every frame once (no colour conversion): the frame count, average rate and
    size, and proof that `data` decodes. `name` identifies the video in errors."""
    count, first, last = 0, None, None
    try:
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            for frame in container.decode(stream):
                if count == 0:
                    height, width = frame.height, frame.width
                    first = frame.time
                last = frame.time
                count += 1
            rate = float(stream.average_rate or stream.guessed_rate or 0)
    except (av.error.FFmpegError, IndexError) as err:
        raise VideoDecodeError(f"cannot decode video {name!r}: {err}. Remove or re-encode "
                               "it.") from err
    if count == 0:
        raise VideoDecodeError(f"video {name!r} has no frames. Remove or re-encode it.")
    if first is not None and last is not None and last > first and count > 1:
        rate = (count - 1) / (last - first)
    return VideoInfo(count, rate or 30.0, height, width)


def decode(data: bytes, indices: Sequence[int], short_side: int, name: str) -> np.ndarray:
    """`(len(indices), H, W, 3)` uint8: the frames at `indices` (decode order, repeats
    allowed), resized so the short side is `short_side`. Decoding stops after the last
    frame needed; only the frames kept are converted to RGB."""
    wanted = np.asarray(indices, np.int64)
    needed = set(wanted.tolist())
    last = int(wanted.max())
    frames: dict[int, np.ndarray] = {}
    try:
        with av.open(io.BytesIO(data)) as container:
            for i, frame in enumerate(container.decode(video=0)):
                if i in needed:
                    frames[i] = _rgb(frame, short_side)
                if i >= last:
                    break
    except av.error.FFmpegError as err:
        raise VideoDecodeError(f"cannot decode video {name!r}: {err}") from err
    if not frames:
        raise VideoDecodeError(f"video {name!r} yielded none of frames {sorted(needed)[:4]}...")
    have = np.asarray(sorted(frames))
    # A stream shorter than probed (a truncated tail): the nearest earlier frame stands in.
    nearest = have[np.clip(np.searchsorted(have, wanted, side="right") - 1, 0, None)]
    return np.stack([frames[int(i)] for i in nearest])


def uniform_view(data: bytes, frames: int, size: int, name: str) -> np.ndarray:
    """`(frames, size, size, 3)`: frames spread uniformly over the video, short side
    `size`, centre crop (what `storage='raw'` datasets store)."""
    info = probe(data, name)
    clip = decode(data, np.linspace(0, info.num_frames - 1, frames).round().astype(int),
                  size, name)
    top, left = (clip.shape[1] - size) // 2, (clip.shape[2] - size) // 2
    return clip[:, top:top + size, left:left + size]


def _rgb(frame: av.VideoFrame, short_side: int) -> np.ndarray:
    scale = short_side / min(frame.width, frame.height)
    width = max(short_side, round(frame.width * scale))
    height = max(short_side, round(frame.height * scale))
    return frame.reformat(width=width, height=height, format="rgb24").to_ndarray()


def encode(frames: np.ndarray, fps: float = 30.0, codec: str = "libx264", crf: int | None = 23,
           bitrate: int | None = None, pixel_format: str = "yuv420p") -> bytes:
    """uint8 `(T, H, W, 3)` frames as an mp4 (H.264 by default) in memory: constant quality
    (`crf`) or, with `bitrate` (bits/s), average bitrate. Odd sizes are padded to even
    (yuv420p needs it) by repeating the last row/column."""
    frames = _even(np.asarray(frames, np.uint8))
    out = io.BytesIO()
    with av.open(out, mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=_rate(fps))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = pixel_format
        if bitrate is not None:
            stream.bit_rate = int(bitrate)
        elif crf is not None:
            stream.options = {"crf": str(crf)}
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out.getvalue()


def decode_all(data: bytes, name: str = "clip") -> np.ndarray:
    """Every frame at its own size (what an upload's receiver sees)."""
    try:
        with av.open(io.BytesIO(data)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except av.error.FFmpegError as err:
        raise VideoDecodeError(f"cannot decode video {name!r}: {err}") from err
    if not frames:
        raise VideoDecodeError(f"video {name!r} has no frames")
    return np.stack(frames)


def reencode(data: bytes, short_side: int, name: str, crf: int = 23) -> bytes:
    """A video re-encoded (H.264) at a smaller short side, at its own frame rate; videos
    already at or below `short_side` are kept as they are."""
    info = probe(data, name)
    if min(info.height, info.width) <= short_side:
        return data
    frames = decode(data, range(info.num_frames), short_side, name)
    return encode(frames, info.fps, crf=crf)


def _even(frames: np.ndarray) -> np.ndarray:
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return frames


def _rate(fps: float) -> Fraction:
    return Fraction(fps).limit_denominator(1001)
