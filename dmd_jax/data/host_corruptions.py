"""Corruptions a codec makes, and rain: applied on the host, per clip, with PyAV and PIL.

The video-robustness benchmarks corrupt videos with FFmpeg (Yi et al. 2021, Mini
Kinetics-C / Mini SSV2-C; ViTTA's UCF101-C uses their `h265_abr` and `rain`); these cannot
run inside `jit`, so the jobs apply them to a batch's clips on the host before the clips
go to the devices (`corrupt_rows`). Every clip's randomness is a pure function of
`(seed, name, severity, clip id)`, as for the device corruptions.

A clip's *source* encoding is H.264 at CRF 23 (what a camera or a published dataset
holds): `*_abr` target its bitrate divided by 2, 4, 8, 16, 32 as the benchmarks divide
the source file's, and `bit_error` flips bytes of its packets as FFmpeg's `noise`
bitstream filter does (each byte with probability 1/N, N = 100000 .. 10000); frames that
no longer decode repeat the last one that did. Parameters are the benchmarks' (Newbeeyoung/
Video-Corruption-Robustness, read for this module); rain's drop counts and lengths are
theirs for a 224-pixel frame, scaled to the clip's height.

Every corruption here is bit-exact for its key except the two H.265 ones: x265 gave
slightly different bytes for the same frames from one call to the next in a process with
other threads running, single-threaded, with or without SIMD, cutree, lookahead or
B-frames (PyAV 18.1.0's x265, measured; x264 is exact with `video_codec.encode`'s
settings), so their clips are reproducible only to within that encoder noise
(`NOT_BIT_EXACT`).
"""

from __future__ import annotations

import io
import zlib
from typing import Callable

import av
import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from dmd_jax.data import video_codec

SOURCE_CRF = 23
NOT_BIT_EXACT = ("h265_crf", "h265_abr")
FPS = 25.0


def _severity(values: tuple, severity: int):
    return values[severity - 1]


def h264_crf(clip: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    del rng
    return _reencode(clip, "libx264", crf=_severity((23, 30, 37, 44, 51), severity))


def h265_crf(clip: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    del rng
    return _reencode(clip, "libx265", crf=_severity((27, 33, 39, 45, 51), severity))


def h264_abr(clip: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    del rng
    return _reencode(clip, "libx264", bitrate=_abr_bitrate(clip, severity))


def h265_abr(clip: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    del rng
    return _reencode(clip, "libx265", bitrate=_abr_bitrate(clip, severity))


def bit_error(clip: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    one_in = _severity((100_000, 50_000, 30_000, 20_000, 10_000), severity)
    data = bytearray(video_codec.encode(clip, FPS, crf=SOURCE_CRF))
    frames = _decode_damaged(_damage_packets(bytes(data), one_in, rng), len(clip))
    return _fit(frames, clip)


def rain(clip: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Per frame: slanted drops drawn, blurred, blended, then the frame darkened."""
    area_per_drop = _severity((770, 770, 770, 500, 400), severity)
    length = _severity((10, 30, 60, 60, 80), severity)
    darken = _severity((0.8, 0.8, 0.7, 0.6, 0.5), severity)
    return np.stack([_rain_frame(f, area_per_drop, length, darken, rng) for f in clip])


HOST_CORRUPTIONS: dict[str, Callable[[np.ndarray, int, np.random.Generator], np.ndarray]] = {
    f.__name__: f for f in (h264_crf, h264_abr, h265_crf, h265_abr, bit_error, rain)}


def corrupt(clip: np.ndarray, name: str, severity: int, seed: int, clip_id: int) -> np.ndarray:
    """One uint8 clip `(T, H, W, 3)` under a host corruption, same shape."""
    key = [seed, zlib.crc32(name.encode()), severity, int(clip_id)]
    out = HOST_CORRUPTIONS[name](np.asarray(clip, np.uint8), severity, np.random.default_rng(key))
    return np.asarray(out, np.uint8)


def corrupt_rows(video: np.ndarray, ids: np.ndarray, names: list[str | None],
                 severities: list[int], seed: int) -> np.ndarray:
    """A host batch with each row whose name is a host corruption corrupted (others
    unchanged: the device corrupts those)."""
    out = np.array(video, copy=True)
    for row, (name, severity) in enumerate(zip(names, severities)):
        if name in HOST_CORRUPTIONS:
            out[row] = corrupt(video[row], name, int(severity), seed, int(ids[row]))
    return out


def _reencode(clip: np.ndarray, codec: str, crf: int | None = None,
              bitrate: int | None = None) -> np.ndarray:
    data = video_codec.encode(clip, FPS, codec=codec, crf=crf, bitrate=bitrate)
    return _fit(video_codec.decode_all(data), clip)


def _abr_bitrate(clip: np.ndarray, severity: int) -> int:
    source = len(video_codec.encode(clip, FPS, crf=SOURCE_CRF)) * 8 * FPS / len(clip)
    return max(int(source / _severity((2, 4, 8, 16, 32), severity)), 1000)


def _damage_packets(data: bytes, one_in: int, rng: np.random.Generator) -> list[bytes]:
    """The mp4's video packets, each byte replaced by a random one with probability
    1/`one_in` (FFmpeg's `noise` filter)."""
    packets = []
    with av.open(io.BytesIO(data)) as container:
        for packet in container.demux(video=0):
            if packet.size == 0:
                continue
            payload = np.frombuffer(bytes(packet), np.uint8).copy()
            hit = rng.uniform(size=payload.size) < 1.0 / one_in
            payload[hit] = rng.integers(0, 256, int(hit.sum()), dtype=np.uint8)
            packets.append((payload.tobytes(), packet.pts, packet.is_keyframe))
        extradata = container.streams.video[0].codec_context.extradata
    return [extradata, *packets]


def _decode_damaged(packets: list, count: int) -> list[np.ndarray | None]:
    """Decodes damaged packets one by one; a packet that fails yields no frame."""
    extradata, *rest = packets
    codec = av.CodecContext.create("h264", "r")
    codec.extradata = extradata
    frames: list[np.ndarray | None] = []
    for payload, pts, _ in rest:
        try:
            for frame in codec.decode(av.Packet(payload)):
                frames.append(frame.to_ndarray(format="rgb24"))
        except av.error.FFmpegError:
            frames.append(None)
    try:
        frames += [f.to_ndarray(format="rgb24") for f in codec.decode(None)]
    except av.error.FFmpegError:
        pass
    return frames[:count]


def _fit(frames, clip: np.ndarray) -> np.ndarray:
    """Decoded frames back to the clip's shape: cropped from even padding; missing frames
    repeat the previous good one (or grey before the first)."""
    t, h, w, _ = clip.shape
    out, last = [], np.full((h, w, 3), 128, np.uint8)
    for i in range(t):
        frame = frames[i] if i < len(frames) else None
        if frame is not None:
            last = np.asarray(frame)[:h, :w]
        out.append(last)
    return np.stack(out)


def _rain_frame(frame: np.ndarray, area_per_drop: int, length: int, darken: float,
                rng: np.random.Generator) -> np.ndarray:
    h, w, _ = frame.shape
    scale = h / 224.0
    length = max(int(round(length * scale)), 1)
    slant = int(round(rng.integers(-10, 10) * scale))
    drops = max(h * w // area_per_drop, 1)
    mask = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(mask)
    xs = rng.integers(min(0, -slant), max(w - max(slant, 0), 1), drops)
    ys = rng.integers(0, max(h - length, 1), drops)
    for x, y in zip(xs.tolist(), ys.tolist()):
        draw.line([(x, y), (x + slant, y + length)], fill=220, width=1)
    rain_mask = np.asarray(mask, np.float32)[..., None] / 255.0
    image = frame.astype(np.float32)
    brightened = image + rain_mask * 255.0 * (1 - image / 255.0) * (1 - image.mean() / 255.0)
    blurred = np.asarray(Image.fromarray(np.clip(brightened, 0, 255).astype(np.uint8))
                         .filter(ImageFilter.BoxBlur(1)), np.float32)
    mixed = (blurred * rain_mask + image * (1 - rain_mask)) / 255.0
    means = mixed.mean(axis=(0, 1), keepdims=True)
    return (np.clip((mixed - means) * darken + means, 0, 1) * 255).astype(np.uint8)
