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
           bitrate: int | None = None, pixel_format: str = "yuv420p",
           container_format: str = "mp4") -> bytes:
    """uint8 `(T, H, W, 3)` frames as a video file in memory (H.264 in mp4 by default):
    constant quality (`crf`, x264/x265 only) or, with `bitrate` (bits/s), average bitrate.
    Frames are padded at the bottom and right by repeating the last row and column to an
    even size (x265: of at least `X265_MIN_SIDE`); decoders return the padded frames.

    Encoding is deterministic: one thread (rate control fed back across frame threads
    depends on their timing) and, for x264, no macroblock-tree rate control (its SIMD
    lookahead gave other bytes for the same frames from one call to the next: 16 of 64
    encodes of 32x32 clips, none with `mbtree=0` or `asm=0`; PyAV 18.1.0, measured), so a
    corruption or an upload's size is a function of the clip alone."""
    frames = _pad(np.asarray(frames, np.uint8), X265_MIN_SIDE if codec == "libx265" else 2)
    out = io.BytesIO()
    with av.open(out, mode="w", format=container_format) as container:
        stream = container.add_stream(codec, rate=_rate(fps))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = pixel_format
        options = {"threads": "1"}  # the loader's parallelism is across clips, not within one
        if codec == "libx264":
            options["x264-params"] = "mbtree=0"
        if codec == "libx265":
            options["x265-params"] = "log-level=none:frame-threads=1:cutree=0"
        if bitrate is not None:  # average bitrate, capped as the benchmarks' -maxrate/-bufsize
            stream.bit_rate = int(bitrate)
            options.update(maxrate=str(int(bitrate)), bufsize=str(int(bitrate)))
        elif crf is not None and codec in ("libx264", "libx265"):
            options["crf"] = str(crf)
        stream.options = options
        for i, image in enumerate(frames):
            # Explicit timestamps: without them x264's rate control read undefined ones and
            # the same frames gave other bytes from one call to the next (measured).
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = i, 1 / stream.average_rate
            for packet in stream.encode(frame):
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


# x265 corrupted the heap (the process aborted) on 48x48 frames, smaller than its 64-pixel
# coding tree unit; never at 64 (PyAV 18.1.0, measured): smaller frames are padded.
X265_MIN_SIDE = 64


def _pad(frames: np.ndarray, minimum: int) -> np.ndarray:
    """Even sizes (yuv420p), at least `minimum`, by repeating the last row and column."""
    height, width = frames.shape[1:3]
    pad_h = max(minimum, height + height % 2) - height
    pad_w = max(minimum, width + width % 2) - width
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return frames


def _rate(fps: float) -> Fraction:
    return Fraction(fps).limit_denominator(1001)
