"""What the edge sends the cloud: clips as raw uint8, or H.264 at a constant quality.

A deployed edge does not upload raw pixels: it encodes. `encode_decode` gives what the
cloud then sees (the decoded clips, so compression shows in the cloud's accuracy) and
what the link carries (the encoded bytes, per clip). The DMD offloads (`label.upload_crfs`,
reported by the hybrid job) and CEMA's uploads (`adapt.cema.upload_crf`) both use it.
"""

from __future__ import annotations

import numpy as np

from dmd_jax.data import video_codec
from dmd_jax.errors import ConfigValueError

FPS = 25.0  # the rate the clips are encoded at (bytes scale with it only through GOP timing)


def check_crf(crf: int, where: str) -> None:
    if not 0 <= int(crf) <= 51:
        raise ConfigValueError(f"{where}={crf}: an H.264 CRF is 0 (lossless) to 51 (worst); "
                               "0 here means raw uint8 where the setting allows it")


def encode_decode(clips: np.ndarray, crf: int) -> tuple[np.ndarray, np.ndarray]:
    """`(decoded clips, encoded bytes per clip)` for uint8 clips `(n, [V,] T, H, W, 3)`:
    each clip (each view of it) encoded as H.264 at `crf`, decoded as the cloud would."""
    clips = np.asarray(clips, np.uint8)
    flat = clips.reshape(-1, *clips.shape[-4:])
    decoded = np.empty_like(flat)
    sizes = np.empty(len(flat), np.int64)
    height, width = flat.shape[2:4]
    for i, clip in enumerate(flat):
        data = video_codec.encode(clip, FPS, crf=int(crf))
        sizes[i] = len(data)
        frames = video_codec.decode_all(data, f"upload {i}")[:, :height, :width]
        decoded[i] = frames[np.minimum(np.arange(len(clip)), len(frames) - 1)]
    per_clip = sizes.reshape(clips.shape[0], -1).sum(1)
    return decoded.reshape(clips.shape), per_clip


def raw_bytes(clips: np.ndarray) -> np.ndarray:
    """Bytes per clip of the uint8 clips as they are."""
    return np.full(len(clips), int(np.prod(clips.shape[1:])), np.int64)
