"""Procedural action videos: the embedded dataset that the demo and the tests train on.

Each clip shows one *actor* (a textured shape with an off-centre marker, so rotation
is visible) performing one of `CLASSES`, among static clutter, moving distractors,
an occluding bar and sensor noise. A per-clip difficulty `d ~ U(0, 1)` scales the
clutter, the distractors, the occlusion, the noise and the actor's contrast, so some
clips are easy and some hard: the hybrid edge/cloud method needs exactly that spread.

Every class has a twin that differs only in the *order* of its frames (right vs left,
right-then-left vs left-then-right, grow vs shrink, ...): a model that averages frames
cannot tell twins apart, only one that models time can.

Every scene has a floor, darker than the sky above it, so a clip shows which way is up.
A split can hold clips from a second kind of camera, *ceiling cameras*: mounted upside
down (the frame turned 180 degrees) in rooms lit by flickering lamps (brightness
alternating by 20-30% from frame to frame). Their labels stay those of the world
(`move_right` is towards the floor's right), so a model that has only seen upright
cameras reads each move backwards, and confidently; turning and growing look the same
either way up. The flicker is what such a model's features notice of the new camera.

Rendering is pure numpy and deterministic: clip `i` of split `s` under `seed` is the
same array on every machine and for any chunking of the work.
"""

from __future__ import annotations

import dataclasses

import numpy as np

CLASSES: tuple[str, ...] = (
    "move_right", "move_left", "move_up", "move_down",
    "rotate_cw", "rotate_ccw", "grow", "shrink",
    "right_then_left", "left_then_right", "up_then_down", "down_then_up",
)
# The classes a horizontal flip leaves as they are (the others turn into their twin).
MIRROR_INVARIANT = ("move_up", "move_down", "grow", "shrink", "up_then_down", "down_then_up")
# Bump when rendering changes: it is part of the prepared dataset's name, so stale
# files are never reused.
RENDERER_VERSION = 7
# Each split's clips come from their own random stream (`stream`: adapt_long's test clips).
SPLIT_CODES = {"train": 0, "calibration": 1, "test": 2, "unlabelled": 3, "broad": 4,
               "stream": 5}
_SHAPES = ("square", "triangle", "cross", "bar", "diamond")


@dataclasses.dataclass(frozen=True)
class RenderConfig:
    """Clip geometry and difficulty knobs; the defaults are the demo's tuning."""

    frames: int = 8
    height: int = 32
    width: int = 32
    max_distractors: int = 3
    max_clutter: int = 6
    max_noise: float = 0.05
    min_contrast: float = 0.35
    occlusion_prob: float = 0.5
    max_drift: float = 0.25  # of the actor's travel, in a random direction


@dataclasses.dataclass
class _Sprite:
    shape: str
    centre: np.ndarray  # (T, 2) in [0, 1] image units (x, y)
    radius: np.ndarray  # (T,)
    angle: np.ndarray  # (T,) radians
    colour: np.ndarray  # (3,)
    stripe_colour: np.ndarray  # (3,)
    stripe_freq: float
    marker_colour: np.ndarray  # (3,)
    # The marker is a disc fixed to the sprite, off its centre, so turning is visible
    # whatever the shape's symmetry: its distance from the centre and its radius, in radii.
    marker_offset: float = 0.55
    marker_radius: float = 0.38


def clip_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of one clip: independent of every other clip and of chunking."""
    return np.random.default_rng([seed, SPLIT_CODES[split], index])


def render_example(seed: int, split: str, index: int, cfg: RenderConfig,
                   ceiling_fraction: float = 0.0) -> tuple[np.ndarray, int, float, bool]:
    """Clip `index` of `split`: its uint8 frames, label, difficulty and whether a ceiling
    camera filmed it. The scene's draws do not depend on the fraction, so a clip differs
    between two fractions only in the camera's view of it."""
    rng = clip_rng(seed, split, index)
    label = int(rng.integers(len(CLASSES)))
    ceiling = bool(rng.uniform() < ceiling_fraction)
    clip, difficulty = render_clip(rng, label, cfg)
    if ceiling:
        clip = ceiling_view(clip, flicker_gains(rng, cfg.frames))
    return clip, label, difficulty, ceiling


def flicker_gains(rng: np.random.Generator, frames: int) -> np.ndarray:
    """Per-frame brightness of a flickering lamp: alternately 20-30% up and down."""
    sign = np.where(np.arange(frames) % 2 == 0, 1.0, -1.0)
    return 1.0 + sign * rng.uniform(0.2, 0.3) * rng.uniform(0.7, 1.0, frames)


def ceiling_view(clip: np.ndarray, gains: np.ndarray) -> np.ndarray:
    """What a ceiling camera records of an upright `clip`: turned 180 degrees, each
    frame's brightness scaled by its `gains`."""
    turned = clip[:, ::-1, ::-1].astype(np.float32) * gains[:, None, None, None]
    return (np.clip(turned, 0.0, 255.0) + 0.5).astype(np.uint8)


def render_clip(rng: np.random.Generator, label: int, cfg: RenderConfig) -> tuple[np.ndarray, float]:
    """Renders one upright `(T, H, W, 3)` uint8 clip of class `label`; returns it and its
    difficulty."""
    d = rng.uniform()
    t = np.linspace(0.0, 1.0, cfg.frames)
    background = _background(rng, cfg, d)
    frames = np.broadcast_to(background, (cfg.frames, *background.shape)).copy()

    for _ in range(rng.integers(0, round(d * cfg.max_clutter) + 1)):
        _draw(frames, _static_sprite(rng, cfg), cfg)
    actor = _actor(rng, label, t, background.mean(axis=(0, 1)), cfg, d)
    distractors = [_distractor(rng, t, actor, cfg) for _ in range(round(d * cfg.max_distractors))]
    for sprite in distractors:
        _draw(frames, sprite, cfg)
    _draw(frames, actor, cfg)
    if rng.uniform() < cfg.occlusion_prob * d:
        _occlude(frames, rng, background)

    frames += rng.normal(0.0, d * cfg.max_noise, frames.shape)
    return (np.clip(frames, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), float(d)


def _background(rng: np.random.Generator, cfg: RenderConfig, d: float) -> np.ndarray:
    """A sky (a colour gradient) over a darker floor, plus low-frequency blobs whose
    strength grows with difficulty."""
    yy, xx = np.mgrid[0:cfg.height, 0:cfg.width] / max(cfg.height, cfg.width)
    base = rng.uniform(0.35, 0.85, 3)
    direction = rng.uniform(-0.15, 0.15, (2, 3))
    img = base + xx[..., None] * direction[0] + yy[..., None] * direction[1]
    horizon = int(round(rng.uniform(0.72, 0.84) * cfg.height))
    img[horizon:] *= rng.uniform(0.3, 0.5)
    for _ in range(3):
        cx, cy, s = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.1, 0.3)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * s * s))
        img += blob[..., None] * rng.uniform(-0.25, 0.25, 3) * d
    return np.clip(img, 0.0, 1.0)


def _contrasting_colour(rng: np.random.Generator, reference: np.ndarray, contrast: float) -> np.ndarray:
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction) + 1e-8
    colour = reference + contrast * np.sqrt(3) * direction
    # Keep the contrast when clipping would eat it: flip to the other side.
    if np.abs(np.clip(colour, 0, 1) - reference).sum() < contrast:
        colour = reference - contrast * np.sqrt(3) * direction
    return np.clip(colour, 0.0, 1.0)


def _actor(rng: np.random.Generator, label: int, t: np.ndarray, bg: np.ndarray,
           cfg: RenderConfig, d: float) -> _Sprite:
    """The sprite that performs the action; its trajectory defines the class."""
    name = CLASSES[label]
    radius0 = rng.uniform(0.13, 0.18)
    travel = rng.uniform(0.50, 0.65)
    centre0 = rng.uniform(0.5 - 0.08, 0.5 + 0.08, 2)
    tri = 1.0 - np.abs(2.0 * t - 1.0)  # 0 -> 1 -> 0
    offset = np.zeros((len(t), 2))
    radius = np.full(len(t), radius0)
    angle = np.full(len(t), rng.uniform(0, 2 * np.pi))
    # Rotation is about a pivot beside the actor, which turns with it (like a moon): the
    # actor sweeps 216-270 degrees of a circle, ~3 pixels a frame at 32x32 and T=8, so
    # the direction of its motion turns one way or the other over the clip. (A turn in
    # place moves a few pixels at most; X3D did not learn its direction in 600 steps.)
    spin = rng.uniform(1.2, 1.5) * np.pi
    orbit = rng.uniform(0.14, 0.2)

    axis, sign = {"right": (0, 1), "left": (0, -1), "down": (1, 1), "up": (1, -1)}.get(
        name.split("_")[1] if name.startswith("move") else name.split("_")[0], (0, 0))
    if name.startswith("move"):
        offset[:, axis] = sign * travel * (t - 0.5)
    elif "_then_" in name:
        offset[:, axis] = sign * travel * (tri - 0.5)
    elif name.startswith("rotate"):
        # Screen y points down, so a growing angle turns clockwise on screen.
        turn = (1.0 if name == "rotate_cw" else -1.0) * spin * (t - 0.5)
        phase = rng.uniform(0, 2 * np.pi) + turn
        offset = orbit * np.stack([np.cos(phase), np.sin(phase)], axis=-1)
        angle = angle + turn
    elif name in ("grow", "shrink"):
        ratio = rng.uniform(2.2, 2.8)
        exponent = (t - 0.5) if name == "grow" else (0.5 - t)
        radius = radius0 * ratio ** exponent

    theta = rng.uniform(0, 2 * np.pi)
    drift = d * cfg.max_drift * travel * np.stack([np.cos(theta), np.sin(theta)])
    centre = centre0 + offset + (t[:, None] - 0.5) * drift
    contrast = 0.6 - (0.6 - cfg.min_contrast) * d
    colour = _contrasting_colour(rng, bg, contrast)
    return _Sprite(
        shape=_SHAPES[rng.integers(len(_SHAPES))],
        centre=centre, radius=radius, angle=angle,
        colour=colour,
        stripe_colour=_contrasting_colour(rng, bg, contrast * 0.7),
        stripe_freq=float(rng.choice([0.0, 3.0, 5.0])),
        # The marker shows which way the actor turns: it must stand out from the actor.
        marker_colour=_contrasting_colour(rng, colour, 0.5),
        marker_offset=0.75, marker_radius=0.33,
    )


def _distractor(rng: np.random.Generator, t: np.ndarray, actor: _Sprite, cfg: RenderConfig) -> _Sprite:
    """A smaller sprite moving straight in a random direction: motion that is not the action."""
    speed = rng.uniform(0.15, 0.35)
    theta = rng.uniform(0, 2 * np.pi)
    start = rng.uniform(0.1, 0.9, 2)
    centre = start + (t[:, None] - 0.5) * speed * np.array([np.cos(theta), np.sin(theta)])
    return _Sprite(
        shape=_SHAPES[rng.integers(len(_SHAPES))],
        centre=centre,
        radius=np.full(len(t), actor.radius.mean() * rng.uniform(0.35, 0.55)),
        angle=rng.uniform(0, 2 * np.pi) + rng.uniform(-1, 1) * t,
        colour=rng.uniform(0, 1, 3), stripe_colour=rng.uniform(0, 1, 3),
        stripe_freq=float(rng.choice([0.0, 4.0])), marker_colour=rng.uniform(0, 1, 3),
    )


def _static_sprite(rng: np.random.Generator, cfg: RenderConfig) -> _Sprite:
    n = cfg.frames
    return _Sprite(
        shape=_SHAPES[rng.integers(len(_SHAPES))],
        centre=np.broadcast_to(rng.uniform(0, 1, 2), (n, 2)),
        radius=np.full(n, rng.uniform(0.04, 0.1)),
        angle=np.full(n, rng.uniform(0, 2 * np.pi)),
        colour=rng.uniform(0, 1, 3), stripe_colour=rng.uniform(0, 1, 3),
        stripe_freq=0.0, marker_colour=rng.uniform(0, 1, 3),
    )


def _shape_distance(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """A normalised distance: < 1 inside the unit shape, in the sprite's own frame."""
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) * 1.15
    if shape == "diamond":
        return np.abs(u) + np.abs(v) * 1.6
    if shape == "bar":
        return np.sqrt(u ** 2 + (v / 0.45) ** 2)
    if shape == "cross":
        return np.minimum(np.maximum(np.abs(u), np.abs(v) / 0.38),
                          np.maximum(np.abs(u) / 0.38, np.abs(v)))
    # Triangle: the largest of three half-plane distances.
    angles = np.array([np.pi / 2, np.pi / 2 + 2 * np.pi / 3, np.pi / 2 + 4 * np.pi / 3])
    proj = u[..., None] * np.cos(angles) + v[..., None] * np.sin(angles)
    return proj.max(axis=-1) * 2.0


def _draw(frames: np.ndarray, sprite: _Sprite, cfg: RenderConfig) -> None:
    """Alpha-composites the sprite onto `frames` in place, with 1-pixel anti-aliasing.

    Only the rows and columns the sprite can touch are computed: outside them its alpha
    is exactly 0, so the result is the same as computing every pixel (and ~2x faster)."""
    size = max(cfg.height, cfg.width)
    rows, cols = _reach(sprite, size, cfg.height, cfg.width)
    if rows.start >= rows.stop or cols.start >= cols.stop:
        return
    yy, xx = np.mgrid[rows, cols] / size
    dx = xx[None] - sprite.centre[:, 0, None, None]
    dy = yy[None] - sprite.centre[:, 1, None, None]
    cos, sin = np.cos(sprite.angle)[:, None, None], np.sin(sprite.angle)[:, None, None]
    r = sprite.radius[:, None, None]
    u, v = (cos * dx + sin * dy) / r, (-sin * dx + cos * dy) / r
    dist = _shape_distance(sprite.shape, u, v)
    alpha = np.clip((1.0 - dist) * r * size + 0.5, 0.0, 1.0)[..., None]

    stripes = 0.5 + 0.5 * np.sin(u * sprite.stripe_freq * np.pi) if sprite.stripe_freq else 0.0
    colour = sprite.colour + (sprite.stripe_colour - sprite.colour) * np.asarray(stripes)[..., None]
    window = frames[:, rows, cols]  # a view: compositing writes through to `frames`
    _composite(window, alpha, colour)
    # The marker is drawn over the body, not clipped by it: thin shapes would hide it.
    marker_dist = np.hypot(u - sprite.marker_offset, v) / sprite.marker_radius
    marker_alpha = np.clip((1.0 - marker_dist) * sprite.marker_radius * r * size + 0.5, 0.0, 1.0)
    _composite(window, marker_alpha[..., None], sprite.marker_colour)


def _reach(sprite: _Sprite, size: int, height: int, width: int) -> tuple[slice, slice]:
    """The rows and columns outside which the sprite's alpha is 0 in every frame.

    Alpha is > 0 only where `_shape_distance < 1 + 0.5 / (r * size)`, and every shape's
    distance is at least `|(u, v)| / sqrt(2)` (the cross is the loosest), so nothing is
    drawn beyond `sqrt(2) * (r * size + 0.5)` pixels from the centre; the marker ends
    `(offset + radius) * r * size + 0.5` pixels out. One pixel more for rounding."""
    extent = max(np.sqrt(2.0), sprite.marker_offset + sprite.marker_radius)
    reach = extent * (sprite.radius * size + 0.5) + 1.0
    x, y = sprite.centre[:, 0] * size, sprite.centre[:, 1] * size
    return _span(y, reach, height), _span(x, reach, width)


def _span(centre: np.ndarray, reach: np.ndarray, limit: int) -> slice:
    """Pixels within `reach` of `centre` in any frame, clipped to `[0, limit)`."""
    return slice(max(0, int(np.floor(np.min(centre - reach)))),
                 min(limit, int(np.ceil(np.max(centre + reach))) + 1))


def _composite(frames: np.ndarray, alpha: np.ndarray, colour: np.ndarray) -> None:
    frames *= 1.0 - alpha
    frames += alpha * colour


def _occlude(frames: np.ndarray, rng: np.random.Generator, background: np.ndarray) -> None:
    """A static bar in background colours across the middle of the frame."""
    h, w = background.shape[:2]
    thickness = int(rng.uniform(0.12, 0.22) * min(h, w))
    start = int(rng.uniform(0.3, 0.6) * min(h, w))
    if rng.uniform() < 0.5:
        frames[:, start:start + thickness] = background[start:start + thickness] * 0.7 + 0.15
    else:
        frames[:, :, start:start + thickness] = background[:, start:start + thickness] * 0.7 + 0.15


def generate(seed: int, split: str, num_clips: int, cfg: RenderConfig,
             ceiling_fraction: float = 0.0):
    """Yields `(index, clip, label, difficulty, ceiling)`; labels are uniform."""
    for i in range(num_clips):
        yield i, *render_example(seed, split, i, cfg, ceiling_fraction)
