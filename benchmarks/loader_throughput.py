"""Input pipeline: training clips/s of dmd_jax's loader (grain, PyAV) against PyTorchVideo's
`LabeledVideoDataset` (PyAV backend) on the same files and clip spec, storage per clip,
and the host cores VideoMAE-B fine-tuning needs.

    python -m benchmarks.loader_throughput [--quick]

The videos are written here with PyAV: UCF101's format (320x240 MPEG-4 Part 2 in .avi,
25 fps, 6 s), moving textured content. The clip spec is VideoMAE's fine-tuning view: a
random window of 16 frames x sampling rate 4, short side jittered over 256..320, a random
224 crop and a random horizontal flip, uint8 (`--quick`: 8x2 frames, 128..160, 112).
PyTorchVideo's side is `LabeledVideoDataset` with its random clip sampler and PyAV
decoder, then the same view in torch (temporal subsample, bilinear short-side resize,
crop, flip) in a `DataLoader`; dmd_jax's is `loader.train_batches` on the prepared,
encoded dataset. Both run with 0 (in the process), 1 and 2 worker processes; the first
batch (worker start-up) is not timed. Decoders: PyAV (used) against decord on one clip.
"""

from __future__ import annotations

import io
import os
import tempfile
import time

import numpy as np

from benchmarks import common

# Timed batches: many more than the loaders keep ready (2 per worker), so that the rate
# is the steady state and not the prefetched buffer.
FULL = dict(videos=24, seconds=6, frames=16, rate=4, crop=224, batch=8, batches=40)
QUICK = dict(videos=6, seconds=2, frames=8, rate=2, crop=112, batch=4, batches=12)
SIZE, FPS = (240, 320), 25
WORKERS = (0, 1, 2)
SCALE = (8 / 7, 10 / 7)
# Videos in the published datasets (dataset cards): projected raw storage.
DATASET_VIDEOS = {"UCF101": 13_320, "Kinetics-400": 240_000}


def write_videos(root: str, count: int, seconds: int) -> list[tuple[str, int]]:
    """UCF101-like avi files in root/train/<class>/; `(path, label)`."""
    from dmd_jax.data import video_codec

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:SIZE[0], :SIZE[1]]
    out = []
    for i in range(count):
        label = i % 2
        os.makedirs(os.path.join(root, "train", f"c{label}"), exist_ok=True)
        texture = rng.integers(0, 255, (SIZE[0] // 8, SIZE[1] // 8, 3), dtype=np.uint8)
        texture = np.kron(texture, np.ones((8, 8, 1), np.uint8))
        frames = np.stack([np.roll(texture, (2 * t, 3 * t), (0, 1)) // 2
                           + ((xx + 4 * t) % 64 < 32)[..., None].astype(np.uint8) * 100
                           for t in range(seconds * FPS)])
        path = os.path.join(root, "train", f"c{label}", f"v{i}.avi")
        with open(path, "wb") as f:
            f.write(video_codec.encode(frames, FPS, codec="mpeg4", bitrate=1_000_000,
                                       container_format="avi"))
        out.append((path, label))
    return out


def dmd_jax_rate(data_root: str, tfds_dir: str, case: dict, workers: int):
    import ml_collections

    from dmd_jax.data import loader, pipeline

    data = ml_collections.ConfigDict(dict(
        name="video_folder", root=data_root, data_dir=tfds_dir, cache_dir="", prepare=True,
        seed=0, frames=case["frames"], size=case["crop"], split_specs={}, workers=workers,
        storage="encoded", short_side=0,
        views=dict(sampling_rate=case["rate"], train_scale=SCALE, flip=True, temporal=1,
                   spatial=1)))
    builder = pipeline.prepare(data)
    split = pipeline.open_split(builder, data, "train")
    batches = loader.train_batches(split, case["batch"], 0, case["batches"] + 1, 0,
                                   slice(None), workers)
    return _timed(batches, case), pipeline.storage_report(builder, data)


def pytorchvideo_rate(videos: list[tuple[str, int]], case: dict, workers: int) -> float:
    import torch

    from dmd_jax import references

    data = references.pytorchvideo_data()
    window = case["frames"] * case["rate"] / FPS
    dataset = data.LabeledVideoDataset(
        labeled_video_paths=[(p, {"label": l}) for p, l in videos],
        clip_sampler=data.make_clip_sampler("random", window),
        video_sampler=lambda source: torch.utils.data.RandomSampler(
            source, replacement=True, num_samples=10**6),
        transform=TorchView(case["frames"], case["crop"]), decode_audio=False, decoder="pyav")
    # Forked (PyTorch's default on Linux): `run` measures these before JAX starts here.
    batches = torch.utils.data.DataLoader(dataset, batch_size=case["batch"], num_workers=workers)
    return _timed(iter(batches), case)


class TorchView:
    """The same training view in torch: uniform temporal subsample, short-side resize,
    random crop, random flip; uint8 `(T, H, W, 3)` like dmd_jax's."""

    def __init__(self, frames: int, crop: int):
        self.frames, self.crop = frames, crop

    def __call__(self, sample: dict) -> dict:
        import torch

        video = sample["video"]  # (C, T, H, W) float
        picks = torch.linspace(0, video.shape[1] - 1, self.frames).round().long()
        video = video[:, picks]
        short = int(torch.randint(round(SCALE[0] * self.crop), round(SCALE[1] * self.crop) + 1,
                                  ()))
        height, width = video.shape[2:]
        size = (short, round(width * short / height)) if height <= width else (
            round(height * short / width), short)
        video = torch.nn.functional.interpolate(video, size=size, mode="bilinear",
                                                align_corners=False)
        top = int(torch.randint(0, video.shape[2] - self.crop + 1, ()))
        left = int(torch.randint(0, video.shape[3] - self.crop + 1, ()))
        video = video[:, :, top:top + self.crop, left:left + self.crop]
        if torch.rand(()) < 0.5:
            video = video.flip(-1)
        video = video.clamp(0, 255).round().to(torch.uint8).permute(1, 2, 3, 0)
        return {"video": video, "label": sample["label"]}


def _timed(batches, case: dict) -> float:
    next(batches)  # worker start-up and the first batch: not timed
    start = time.perf_counter()
    for _ in range(case["batches"]):
        next(batches)
    return case["batches"] * case["batch"] / (time.perf_counter() - start)


def decoder_rates(path: str, case: dict, iters: int = 5) -> dict[str, float | None]:
    """Clips/s decoding one training window's frames at the short side, per decoder."""
    from dmd_jax.data import video_codec

    data = open(path, "rb").read()
    indices = np.arange(case["frames"]) * case["rate"] + 20
    short = round(SCALE[0] * case["crop"])
    rates = {"pyav": 1 / common.seconds_per_call(
        lambda: video_codec.decode(data, indices, short, path), iters)}
    try:
        import decord
    except ImportError:
        rates["decord"] = None
    else:
        def with_decord():
            width = round(SIZE[1] * short / SIZE[0])
            reader = decord.VideoReader(io.BytesIO(data), width=width, height=short)
            return reader.get_batch(list(indices)).asnumpy()
        rates["decord"] = 1 / common.seconds_per_call(with_decord, iters)
    return rates


def training_gflops(case: dict, quick: bool) -> float:
    """XLA's FLOPs of VideoMAE-B's forward + backward on one clip (ViT-S with --quick)."""
    import jax
    import jax.numpy as jnp

    from dmd_jax import flops
    from dmd_jax.models import videomae

    variant = videomae.VARIANTS["s" if quick else "b"]
    model = videomae.Model(num_classes=400, hidden_size=variant["hidden_size"],
                           num_layers=variant["num_layers"], num_heads=variant["num_heads"],
                           intermediate_size=variant["intermediate_size"])
    clip = jax.ShapeDtypeStruct((1, 16, case["crop"], case["crop"], 3), jnp.float32)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(clip.shape)))

    def loss(variables, x):
        return model.apply(variables, x)[0].sum()

    return flops.gflops(jax.grad(loss), params, clip)


def run(quick: bool) -> common.Section:
    import torch

    case = QUICK if quick else FULL
    torch.set_num_threads(1)  # one core per loader process, as the workers get
    rows, notes = [], []
    with tempfile.TemporaryDirectory() as tmp:
        videos = write_videos(os.path.join(tmp, "videos"), case["videos"], case["seconds"])
        file_bytes = np.mean([os.path.getsize(p) for p, _ in videos])
        references = {w: pytorchvideo_rate(videos, case, w) for w in WORKERS}  # before JAX
        report = None
        for workers in WORKERS:
            ours, report = dmd_jax_rate(os.path.join(tmp, "videos"), os.path.join(tmp, "tfds"),
                                        case, workers)
            reference = references[workers]
            case_name = (f"{workers} worker process(es)" if workers else
                         "in the job's process (dmd_jax: 2 threads)")
            rows.append([case_name, ours, reference, common.ratio(ours, reference)])
        decoders = decoder_rates(videos[0][0], case)
    stored = report["splits"]["train"]["bytes_per_clip"]
    raw = case["frames"] * case["crop"] ** 2 * 3
    notes.append(f"Storage per clip: {stored / 1e6:.3f} MB encoded in the prepared dataset "
                 f"(the files average {file_bytes / 1e6:.3f} MB; array_record's "
                 f"compression changes that by {stored / file_bytes - 1:+.1%}) against {raw / 1e6:.2f} MB for one raw uint8 "
                 f"{case['frames']}x{case['crop']}x{case['crop']} view (the format before "
                 "encoded storage). Raw at that view would take " + ", ".join(
                     f"{name} {n * raw / 1e9:,.0f} GB" for name, n in DATASET_VIDEOS.items())
                 + "; encoded takes the published videos' own size (stored as published, "
                 "or smaller with `data.short_side`).")
    notes.append(f"Decoding one training window ({case['frames']} frames, short side "
                 "resized) of one video, in this process: "
                 + ", ".join(f"{k} {v:.1f} clips/s" if v else f"{k} not installed"
                             for k, v in decoders.items())
                 + "; torchcodec was not measured (its wheels need the FFmpeg libraries and "
                 "the torch build they were compiled for).")
    gflops = training_gflops(case, quick)
    per_core = rows[1][1]  # one worker process: clips/s one core decodes
    for chip, peak in (("one H100 (989 bf16 TFLOP/s)", 989.0),
                       ("a v5e-8 (8 x 197 bf16 TFLOP/s)", 8 * 197.0)):
        clips = 0.5 * peak * 1e12 / (gflops * 1e9)
        notes.append(f"On paper, VideoMAE-{'S' if quick else 'B'} fine-tuning on {chip} at 50% "
                     f"MFU ({gflops:,.0f} GFLOPs per clip forward + backward, XLA's count) runs "
                     f"{clips:,.0f} clips/s, which takes {clips / per_core:,.0f} host cores "
                     f"at this machine's {per_core:.1f} clips/s per loader process.")
    return common.Section(
        title="Input pipeline: decoding training views",
        command="python -m benchmarks.loader_throughput",
        setup=(f"{case['videos']} videos written with PyAV (320x240 MPEG-4 .avi, 25 fps, "
               f"{case['seconds']} s); clip spec {case['frames']} frames x rate {case['rate']}, "
               f"short side {round(SCALE[0] * case['crop'])}..{round(SCALE[1] * case['crop'])}, "
               f"crop {case['crop']}, flip; batch {case['batch']}, {case['batches']} timed "
               "batches after the first. Goal: >= 1.0x per core."),
        columns=["case", "dmd_jax clips/s", "pytorchvideo clips/s", "ratio"],
        rows=rows, notes=notes, devices=_devices())


def _devices() -> dict:
    from dmd_jax import parallel  # JAX only after the PyTorch loaders have forked
    return parallel.describe()


if __name__ == "__main__":
    common.main(run, __doc__)
