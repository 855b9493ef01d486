"""Video corruptions (METHODS.md §4): the distribution shift the adaptation methods face.

Every corruption maps a clip `(T, H, W, 3)` (uint8 or float in [0, 255]) and a severity
1-5 to a clip of the same shape and dtype, deterministically for a PRNG key, in pure
`jax.numpy` so it runs inside `jit` and `vmap` on the device; the codec corruptions and
rain need FFmpeg or drawing and run on the host (`host_corruptions`, `on_host`). Severity parameters follow
ImageNet-C / the video-robustness benchmarks in spirit, scaled to small clips; `jpeg`
is approximated on the device by quantising 8x8 block DCT coefficients (the transform
JPEG uses), so it needs no host round trip either.

    corrupt(clip, "fog", severity=5, key=jax.random.key(0))
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dmd_jax.data import host_corruptions
from dmd_jax.errors import ConfigValueError

Corruption = Callable[[jnp.ndarray, int, jax.Array], jnp.ndarray]


def _s(values: tuple[float, ...], severity: int) -> float:
    """The parameter of a severity (1-5)."""
    return values[severity - 1]


# --- spatial, per frame (x: float32 in [0, 1], shape (T, H, W, 3)) -------------------------

def gaussian_noise(x, severity, key):
    return x + jax.random.normal(key, x.shape) * _s((0.08, 0.12, 0.18, 0.26, 0.38), severity)


def shot_noise(x, severity, key):
    photons = _s((60.0, 25.0, 12.0, 5.0, 3.0), severity)
    return jax.random.poisson(key, x * photons, x.shape).astype(jnp.float32) / photons


def impulse_noise(x, severity, key):
    amount = _s((0.03, 0.06, 0.09, 0.17, 0.27), severity)
    k1, k2 = jax.random.split(key)
    hit = jax.random.uniform(k1, x.shape) < amount
    salt = jax.random.bernoulli(k2, 0.5, x.shape).astype(x.dtype)
    return jnp.where(hit, salt, x)


def defocus_blur(x, severity, key):
    del key
    radius = _s((0.6, 1.0, 1.5, 2.0, 3.0), severity)
    size = 2 * int(np.ceil(radius)) + 1
    yy, xx = np.mgrid[:size, :size] - size // 2
    disk = (xx ** 2 + yy ** 2 <= radius ** 2 + 0.5).astype(np.float32)
    return _filter2d(x, disk / disk.sum())


def contrast(x, severity, key):
    del key
    factor = _s((0.4, 0.3, 0.2, 0.1, 0.05), severity)
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    return (x - mean) * factor + mean


def brightness(x, severity, key):
    del key
    return _adjust_hsv(x, value_shift=_s((0.1, 0.2, 0.3, 0.4, 0.5), severity))


def saturate(x, severity, key):
    del key
    return _adjust_hsv(x, saturation_scale=_s((0.3, 0.1, 2.0, 5.0, 20.0), severity))


def pixelate(x, severity, key):
    del key
    factor = _s((0.6, 0.5, 0.4, 0.3, 0.25), severity)
    t, h, w, c = x.shape
    small = (t, max(1, int(h * factor)), max(1, int(w * factor)), c)
    return jax.image.resize(jax.image.resize(x, small, "linear"), x.shape, "nearest")


def jpeg(x, severity, key):
    """JPEG's loss: 8x8 block DCT coefficients quantised, stronger for higher frequencies."""
    del key
    quality = _s((25, 18, 15, 10, 7), severity)
    scale = 50.0 / quality if quality < 50 else 2.0 - quality / 50.0
    t, h, w, c = x.shape
    ph, pw = (-h) % 8, (-w) % 8
    y = jnp.pad(x * 255.0 - 128.0, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")
    blocks = y.reshape(t, (h + ph) // 8, 8, (w + pw) // 8, 8, c)
    d = jnp.asarray(_DCT)
    coeffs = jnp.einsum("ui,tbiwjc,vj->tbuwvc", d, blocks, d)  # 2-D DCT of every block
    step = jnp.maximum(jnp.asarray(_JPEG_LUMA) * scale, 1.0)[None, None, :, None, :, None]
    coeffs = jnp.round(coeffs / step) * step
    y = jnp.einsum("ui,tbuwvc,vj->tbiwjc", d, coeffs, d).reshape(t, h + ph, w + pw, c)
    return (y[:, :h, :w] + 128.0) / 255.0


# --- spatio-temporal ----------------------------------------------------------------------

def motion_blur(x, severity, key):
    """Each frame averaged with its neighbours (3-11 frames, edges repeated)."""
    del key
    width = _s((3, 5, 7, 9, 11), severity)
    pad = width // 2
    padded = jnp.concatenate([jnp.repeat(x[:1], pad, 0), x, jnp.repeat(x[-1:], pad, 0)])
    return sum(padded[i:i + x.shape[0]] for i in range(width)) / width


def fog(x, severity, key):
    """A smooth random haze (upsampled noise), the same for every frame, blended in."""
    strength = _s((0.3, 0.4, 0.5, 0.6, 0.75), severity)
    t, h, w, _ = x.shape
    coarse = jax.random.uniform(key, (4, 4, 1))
    haze = jax.image.resize(coarse, (h, w, 1), "cubic")
    haze = (haze - haze.min()) / (haze.max() - haze.min() + 1e-6)
    return x * (1.0 - strength) + strength * (0.6 + 0.4 * haze)[None]


# --- temporal (frame order and timing) ------------------------------------------------------

def frame_rate(x, severity, key):
    """Frames dropped and the survivors repeated: every k-th frame held for k frames."""
    del key
    k = _s((2, 2, 3, 4, 8), severity)
    index = (jnp.arange(x.shape[0]) // k) * k
    return x[index]


def freeze(x, severity, key):
    """From a random frame on, the picture stops (a stalled camera)."""
    t = x.shape[0]
    frozen = max(1, int(round(t * _s((0.2, 0.35, 0.5, 0.65, 0.8), severity))))
    start = jax.random.randint(key, (), 0, t - frozen + 1)
    index = jnp.where(jnp.arange(t) >= start, start, jnp.arange(t))
    return x[index]


def reverse(x, severity, key):
    """The clip played backwards (severity only sets how much of it: 20%..100%)."""
    del key
    t = x.shape[0]
    span = max(2, int(round(t * _s((0.2, 0.4, 0.6, 0.8, 1.0), severity))))
    index = np.arange(t)
    index[:span] = index[:span][::-1]
    return x[jnp.asarray(index)]


def jumble(x, severity, key):
    """Frames shuffled within segments (segment length grows with severity)."""
    t = x.shape[0]
    segment = max(2, min(t, _s((2, 3, 4, 6, 8), severity)))
    keys = jax.random.split(key, -(-t // segment))
    pieces = [jax.random.permutation(k, jnp.arange(i, min(i + segment, t)))
              for k, i in zip(keys, range(0, t, segment))]
    return x[jnp.concatenate(pieces)]


def salt(x, severity, key):
    """White pixels (ViTTA's UCF101-C `salt`; ImageNet-C's impulse amounts)."""
    hit = jax.random.uniform(key, x.shape[:-1] + (1,)) < _s(IMPULSE_AMOUNTS, severity)
    return jnp.where(hit, 1.0, x)


def pepper(x, severity, key):
    """Black pixels (ViTTA's UCF101-C `pepper`)."""
    hit = jax.random.uniform(key, x.shape[:-1] + (1,)) < _s(IMPULSE_AMOUNTS, severity)
    return jnp.where(hit, 0.0, x)


def zoom_blur(x, severity, key):
    """The mean of the frame zoomed about its centre by each factor (ImageNet-C's)."""
    del key
    top = _s((1.11, 1.16, 1.21, 1.26, 1.31), severity)
    step = _s((0.01, 0.01, 0.02, 0.02, 0.03), severity)
    t, h, w, c = x.shape
    out = x
    factors = np.arange(1.0 + step, top, step)
    for factor in factors:
        zh, zw = int(np.ceil(h * factor)), int(np.ceil(w * factor))
        big = jax.image.resize(x, (t, zh, zw, c), "linear")
        oy, ox = (zh - h) // 2, (zw - w) // 2
        out = out + big[:, oy:oy + h, ox:ox + w]
    return out / (len(factors) + 1)


IMPULSE_AMOUNTS = (0.03, 0.06, 0.09, 0.17, 0.27)
CORRUPTIONS: dict[str, Corruption] = {
    f.__name__: f for f in (
        gaussian_noise, shot_noise, impulse_noise, defocus_blur, contrast, brightness,
        saturate, pixelate, jpeg, motion_blur, fog, frame_rate, freeze, reverse, jumble,
        salt, pepper, zoom_blur)
}
# The 15 of METHODS.md §4 (the demo's streams). Their order fixes each corruption's noise
# code (`_name_code`): corruptions added later get the codes after them, so adding one
# never changes the noise, nor the results, of another.
METHODS_CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur",
                       "contrast", "brightness", "saturate", "pixelate", "jpeg", "motion_blur",
                       "fog", "frame_rate", "freeze", "reverse", "jumble")
TEMPORAL = ("frame_rate", "freeze", "reverse", "jumble")
# With the codec ones and rain, applied on the host (`host_corruptions`): every name a
# stream or a shifted split may use.
ALL_CORRUPTIONS = (*CORRUPTIONS, *host_corruptions.HOST_CORRUPTIONS)


def on_host(name: str) -> bool:
    return name in host_corruptions.HOST_CORRUPTIONS


def parse_shifted(split: str) -> tuple[str, str | None, int | None]:
    """`'test@fog@3'` -> `('test', 'fog', 3)`: a split seen under a corruption (the label
    job's shifted splits); a plain name -> `(name, None, None)`."""
    if "@" not in split:
        return split, None, None
    base, _, rest = split.partition("@")
    name, _, severity = rest.partition("@")
    if name not in ALL_CORRUPTIONS or severity not in ("1", "2", "3", "4", "5"):
        raise ConfigValueError(
            f"split {split!r}: a shifted split is SPLIT@CORRUPTION@SEVERITY with a corruption "
            f"of {sorted(ALL_CORRUPTIONS)} and a severity 1-5, e.g. 'test@fog@3'")
    return base, name, int(severity)


def corrupt(clip: jnp.ndarray, name: str, severity: int, key: jax.Array) -> jnp.ndarray:
    """`clip` under corruption `name` at `severity` (1-5), same shape and dtype.

    `name` and `severity` are static (Python values): jit with them as static arguments.
    """
    if name not in CORRUPTIONS:
        raise ConfigValueError(f"unknown corruption {name!r}; available: {sorted(CORRUPTIONS)}")
    if severity not in (1, 2, 3, 4, 5):
        raise ConfigValueError(f"severity must be 1-5, got {severity}")
    dtype = clip.dtype
    x = clip.astype(jnp.float32) / 255.0
    y = jnp.clip(CORRUPTIONS[name](x, severity, key), 0.0, 1.0) * 255.0
    return jnp.round(y).astype(dtype) if jnp.issubdtype(dtype, jnp.integer) else y.astype(dtype)


def corrupt_batch(clips: jnp.ndarray, name: str, severity: int, key: jax.Array) -> jnp.ndarray:
    """A batch `(B, T, H, W, 3)`, an independent key per clip."""
    keys = jax.random.split(key, clips.shape[0])
    return jax.vmap(lambda c, k: corrupt(c, name, severity, k))(clips, keys)


def corrupt_clips(clips: jnp.ndarray, ids: jnp.ndarray, name: str, severity: int,
                  seed: int) -> jnp.ndarray:
    """A batch in which each clip's randomness depends only on `(seed, name, severity,
    its id)`: the same clip is corrupted the same way in any batch, on any device."""
    base = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _name_code(name)),
                              severity)
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(ids)
    return jax.vmap(lambda c, k: corrupt(c, name, severity, k))(clips, keys)


def _name_code(name: str) -> int:
    first = sorted(METHODS_CORRUPTIONS)
    if name in first:
        return first.index(name)
    return len(first) + [n for n in CORRUPTIONS if n not in first].index(name)


# --- helpers --------------------------------------------------------------------------------

def _filter2d(x: jnp.ndarray, kernel: np.ndarray) -> jnp.ndarray:
    """Per-channel 2-D filtering of every frame, edges repeated."""
    k = kernel.shape[0] // 2
    padded = jnp.pad(x, ((0, 0), (k, k), (k, k), (0, 0)), mode="edge")
    out = jnp.zeros_like(x)
    for i, j in zip(*np.nonzero(kernel)):
        out = out + kernel[i, j] * padded[:, i:i + x.shape[1], j:j + x.shape[2]]
    return out


def _adjust_hsv(x: jnp.ndarray, value_shift: float = 0.0,
                saturation_scale: float = 1.0) -> jnp.ndarray:
    """Brightness / saturation in HSV, as ImageNet-C does (jax has no colour-space op)."""
    maximum, minimum = x.max(-1, keepdims=True), x.min(-1, keepdims=True)
    value = maximum
    saturation = jnp.where(maximum > 0, (maximum - minimum) / jnp.maximum(maximum, 1e-8), 0.0)
    # A pixel = value * (1 - saturation * (1 - hue_shape)); keep the hue shape, move S and V.
    hue_shape = jnp.where(maximum - minimum > 1e-8,
                          (x - minimum) / jnp.maximum(maximum - minimum, 1e-8), 1.0)
    new_value = jnp.clip(value + value_shift, 0.0, 1.0)
    new_saturation = jnp.clip(saturation * saturation_scale, 0.0, 1.0)
    return new_value * (1.0 - new_saturation * (1.0 - hue_shape))


def _dct_matrix(n: int = 8) -> np.ndarray:
    k, i = np.mgrid[:n, :n]
    m = np.cos((2 * i + 1) * k * np.pi / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m.astype(np.float32)


_DCT = _dct_matrix()
_JPEG_LUMA = np.array([  # the standard JPEG luminance quantisation table (quality 50)
    [16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55],
    [14, 13, 16, 24, 40, 57, 69, 56], [14, 17, 22, 29, 51, 87, 80, 62],
    [18, 22, 37, 56, 68, 109, 103, 77], [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101], [72, 92, 95, 98, 112, 100, 103, 99]], np.float32)


def contact_sheet(clip: np.ndarray, key: jax.Array, frames: tuple[int, ...] = (0, 2, 4, 6),
                  gap: int = 2) -> np.ndarray:
    """An image: one row per corruption, one column per severity (plus the clean clip),
    each cell showing `frames` of the clip side by side (temporal corruptions need them)."""
    h, w = clip.shape[1:3]
    cell_w = len(frames) * w
    rows = []
    for name in CORRUPTIONS:
        cells = [clip] + [np.asarray(corrupt(clip, name, s, key)) for s in range(1, 6)]
        row = np.full((h, 6 * (cell_w + gap), 3), 255, np.uint8)
        for i, cell in enumerate(cells):
            row[:, i * (cell_w + gap): i * (cell_w + gap) + cell_w] = np.concatenate(
                [cell[f] for f in frames], axis=1)
        rows.append(np.concatenate([row, np.full((gap, row.shape[1], 3), 255, np.uint8)]))
    return np.concatenate(rows)


def main() -> None:
    """`python -m dmd_jax.data.corruptions [OUT.png]`: the contact sheet of a demo clip."""
    import sys

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dmd_jax.data import synthetic

    out = sys.argv[1] if len(sys.argv) > 1 else "corruptions.png"
    clip = synthetic.render_clip(synthetic.clip_rng(0, "test", 1), 4, synthetic.RenderConfig())[0]
    sheet = contact_sheet(clip, jax.random.key(0), frames=(0, 3, 6))
    fig, ax = plt.subplots(figsize=(sheet.shape[1] / 40, sheet.shape[0] / 40 + 0.6))
    ax.imshow(sheet, interpolation="nearest")
    h = clip.shape[1] + 2
    ax.set_yticks([h * i + h / 2 for i in range(len(CORRUPTIONS))], list(CORRUPTIONS))
    cell = (sheet.shape[1]) / 6
    ax.set_xticks([cell * i + cell / 2 for i in range(6)],
                  ["clean"] + [f"severity {s}" for s in range(1, 6)])
    ax.tick_params(length=0)
    fig.tight_layout()
    fig.savefig(out, dpi=60)
    print(f"wrote {out}: {len(CORRUPTIONS)} corruptions x severities 1-5, frames 0, 3, 6")


if __name__ == "__main__":
    main()
