"""Which frames and pixels of a video a model sees: training views and evaluation views.

The video kits (PySlowFast, PyTorchVideo) train on a random *view* of each video at each
step: a temporal window of `frames x sampling_rate` frames at a random start, the short
side scaled to a random length in `train_scale x size`, a random `size x size` crop and a
horizontal flip where the class allows it. They test on `temporal x spatial` fixed
views (uniform windows; left/centre/right crops along the long side at short side `size`)
and average the logits. `config.data.views` holds these settings:

    sampling_rate  frames between sampled frames; 0: `frames` spread uniformly over the
                   whole video (one fixed window: the view of the embedded dataset)
    train_scale    (min, max) short side, as multiples of `size`
    flip           horizontal flips in training, for the classes the dataset allows
    temporal       evaluation windows per video
    spatial        evaluation crops per window (1: centre; 3: both ends and centre)

A training view is a pure function of `(seed, step, row)` (`train_view`), so a resumed
run and any number of hosts see the same augmented global batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import numpy as np
from PIL import Image

from dmd_jax.errors import ConfigValueError

KEYS = ("sampling_rate", "train_scale", "flip", "temporal", "spatial")
DEFAULTS = dict(sampling_rate=0, train_scale=(1.0, 1.0), flip=False, temporal=1, spatial=1)


@dataclasses.dataclass(frozen=True)
class ViewConfig:
    frames: int
    size: int
    sampling_rate: int = 0
    train_scale: tuple[float, float] = (1.0, 1.0)
    flip: bool = False
    temporal: int = 1
    spatial: int = 1

    @classmethod
    def from_config(cls, data: Mapping[str, Any]) -> "ViewConfig":
        """From `config.data` (its `views` section, every key optional)."""
        views = dict(data.get("views") or {})
        unknown = sorted(set(views) - set(KEYS))
        if unknown:
            raise ConfigValueError(f"config.data.views has no keys {unknown}; it takes {list(KEYS)}")
        settings = {**DEFAULTS, **views}
        low, high = (float(s) for s in settings["train_scale"])
        config = cls(int(data["frames"]), int(data["size"]), int(settings["sampling_rate"]),
                     (low, high), bool(settings["flip"]), int(settings["temporal"]),
                     int(settings["spatial"]))
        config.check()
        return config

    def check(self) -> None:
        if self.sampling_rate < 0:
            raise ConfigValueError(f"config.data.views.sampling_rate={self.sampling_rate} must "
                                   "be >= 0 (0: frames spread over the whole video)")
        low, high = self.train_scale
        if not 1.0 <= low <= high:
            raise ConfigValueError(f"config.data.views.train_scale={self.train_scale} must be "
                                   "(min, max) with 1 <= min <= max: multiples of data.size")
        if self.temporal < 1 or self.spatial not in (1, 3):
            raise ConfigValueError(f"config.data.views: temporal={self.temporal} must be >= 1 "
                                   f"and spatial={self.spatial} 1 or 3")
        if self.sampling_rate == 0 and self.temporal > 1:
            raise ConfigValueError("config.data.views.temporal > 1 needs a sampling_rate > 0: "
                                   "with 0 every window is the whole video")

    @property
    def num_eval_views(self) -> int:
        return self.temporal * self.spatial

    def identity(self) -> dict[str, Any]:
        """What evaluation outputs depend on (stamps): the clip shape and the test views,
        these only when not the default single whole-video view (so results made before
        views existed keep their stamps)."""
        views = {"sampling_rate": self.sampling_rate, "temporal": self.temporal,
                 "spatial": self.spatial}
        default = {k: DEFAULTS[k] for k in views}
        return {"frames": self.frames, "size": self.size,
                **({"views": views} if views != default else {})}


@dataclasses.dataclass(frozen=True)
class View:
    """One view of one video: frame indices, short side, crop position and flip."""

    indices: np.ndarray
    short_side: int
    top: float  # crop offset, as a fraction of the rows left over by the crop
    left: float
    flip: bool = False


def train_view(config: ViewConfig, num_frames: int, rng: np.random.Generator,
               flippable: bool) -> View:
    """A random window, scale, crop and (where `flippable`) flip."""
    window = config.frames * config.sampling_rate
    start = int(rng.integers(0, max(num_frames - window, 0) + 1)) if window else 0
    low, high = config.train_scale
    short = int(rng.integers(round(low * config.size), round(high * config.size) + 1))
    top, left = rng.uniform(size=2)
    flip = bool(config.flip and flippable and rng.uniform() < 0.5)
    return View(_window(config, num_frames, start), short, float(top), float(left), flip)


def eval_views(config: ViewConfig, num_frames: int) -> list[View]:
    """`temporal x spatial` fixed views, windows first."""
    window = config.frames * config.sampling_rate
    starts = np.linspace(0, max(num_frames - window, 0), config.temporal).round().astype(int)
    positions = (0.5,) if config.spatial == 1 else (0.0, 0.5, 1.0)
    return [View(_window(config, num_frames, int(s)), config.size, p, p)
            for s in starts for p in positions]


def _window(config: ViewConfig, num_frames: int, start: int) -> np.ndarray:
    if config.sampling_rate == 0:
        return np.linspace(0, num_frames - 1, config.frames).round().astype(int)
    indices = start + np.arange(config.frames) * config.sampling_rate
    return np.minimum(indices, num_frames - 1)  # a short video repeats its last frame


def rng_for(seed: int, step: int, row: int) -> np.random.Generator:
    """The training view's randomness for one row of one global batch."""
    return np.random.default_rng([seed, 0x51EE, step, row])


def resize_short_side(frames: np.ndarray, short_side: int) -> np.ndarray:
    """`(T, H, W, 3)` uint8 frames with the short side scaled to `short_side` (bilinear)."""
    height, width = frames.shape[1:3]
    if min(height, width) == short_side:
        return frames
    scale = short_side / min(height, width)
    size = (max(short_side, round(width * scale)), max(short_side, round(height * scale)))
    return np.stack([np.asarray(Image.fromarray(f).resize(size, Image.BILINEAR)) for f in frames])


def crop(frames: np.ndarray, view: View, size: int) -> np.ndarray:
    """The view's `size x size` crop of frames already at its short side, flipped if asked."""
    height, width = frames.shape[1:3]
    top = round(view.top * (height - size))
    left = round(view.left * (width - size))
    out = frames[:, top:top + size, left:left + size]
    return out[:, :, ::-1] if view.flip else out


def average_over_views(apply: Callable[[jax.Array], Any], video: jax.Array) -> Any:
    """`apply` on clips `(B, T, H, W, 3)`, or on every view of `(B, V, T, H, W, 3)` at once
    with each output averaged over a clip's views (logits and features alike)."""
    if video.ndim == 5:
        return apply(video)
    clips, views = video.shape[:2]
    out = apply(video.reshape(clips * views, *video.shape[2:]))
    return jax.tree.map(lambda x: x.reshape(clips, views, *x.shape[1:]).mean(1), out)
