"""Real video files the tests write with PyAV (no dataset is ever downloaded)."""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np


def write_video(path: str, frames: np.ndarray, fps: int = 10, codec: str = "mpeg4",
                pts_ms: list[int] | None = None) -> None:
    """`frames` (T, H, W, 3) uint8 as a video file; with `pts_ms`, each frame's
    presentation time in milliseconds (a variable frame rate)."""
    with av.open(path, "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        if pts_ms is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            if pts_ms is not None:
                frame.pts, frame.time_base = pts_ms[i], Fraction(1, 1000)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def ramp(num_frames: int, height: int, width: int, step: int = 10) -> np.ndarray:
    """Frame i is grey level `step * i`, with its left half brighter than its right (so
    the frame's index and a horizontal flip can both be read back from decoded pixels)."""
    frames = np.stack([np.full((height, width, 3), step * i, np.uint8)
                       for i in range(num_frames)])
    frames[:, :, : width // 2] = np.minimum(frames[:, :, : width // 2].astype(int) + 60, 255)
    return frames
