"""X3D (Feichtenhofer, CVPR 2020) in Flax Linen, laid out like pytorchvideo's builder.

The module tree mirrors `pytorchvideo.models.x3d.create_x3d` block for block (stem,
four residual stages of bottleneck blocks, projected-pool head) so that a pytorchvideo
state dict maps onto these parameters by a flat, declarative key table.

Numerics follow PyTorch: BatchNorm eps 1e-5 and momentum 0.1 (Flax momentum 0.9),
explicit symmetric padding for strided convolutions, depthwise convolutions through
`feature_group_count`. Two known differences, both irrelevant in eval mode:
Flax tracks the biased batch variance (PyTorch the unbiased one), and the head pools
globally (pytorchvideo's fixed-size `AvgPool3d` equals a global pool at the input size
the model was built for).

Inputs are channels-last `(batch, time, height, width, 3)` floats, already normalised.
This module follows the classifier protocol of `dmd_jax.models` (`Model`, `INPUT_STATS`).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dmd_jax import parallel
from dmd_jax.errors import ConfigValueError

# pytorchvideo's Kinetics recipe, which its X3D checkpoints were trained with.
INPUT_STATS = ((0.45, 0.45, 0.45), (0.225, 0.225, 0.225))

# Stage depths and widths of the X3D paper before the depth/width multipliers.
_BASE_DEPTHS = (1, 2, 5, 3)
_STAGE_EXPANSION = 2.0


def round_width(width: float, multiplier: float, min_width: int = 8, divisor: int = 8) -> int:
    """Channel rounding of pytorchvideo's `round_width` (needed to reproduce its shapes)."""
    if not multiplier:
        return int(width)
    width *= multiplier
    width_out = max(min_width, int(width + divisor / 2) // divisor * divisor)
    if width_out < 0.9 * width:
        width_out += divisor
    return int(width_out)


def round_repeats(repeats: int, multiplier: float) -> int:
    """Block-count rounding of pytorchvideo's `round_repeats`."""
    return int(math.ceil(multiplier * repeats)) if multiplier else repeats


@dataclasses.dataclass(frozen=True)
class X3DArch:
    """The resolved architecture: every width and depth, computed once."""

    stem_dim: int
    stage_dims: tuple[int, ...]
    stage_inner_dims: tuple[int, ...]
    stage_depths: tuple[int, ...]
    head_inner_dim: int
    head_dim: int


def x3d_arch(
    width_factor: float = 2.0,
    depth_factor: float = 2.2,
    stem_dim_in: int = 12,
    bottleneck_factor: float = 2.25,
    head_dim: int = 2048,
) -> X3DArch:
    """Widths and depths exactly as `create_x3d` computes them."""
    base = [stem_dim_in]
    for _ in range(3):
        base.append(round_width(base[-1], _STAGE_EXPANSION))
    stage_dims = tuple(round_width(d, width_factor) for d in base)
    inner = tuple(int(bottleneck_factor * d) for d in stage_dims)
    return X3DArch(
        stem_dim=round_width(stem_dim_in, width_factor),
        stage_dims=stage_dims,
        stage_inner_dims=inner,
        stage_depths=tuple(round_repeats(d, depth_factor) for d in _BASE_DEPTHS),
        head_inner_dim=inner[-1],
        head_dim=head_dim,
    )


# The X3D paper's variants. XS, S and M share one network and differ only in the
# input they were trained on (frames, crop); L is deeper.
VARIANTS: dict[str, dict[str, Any]] = {
    "xs": dict(width_factor=2.0, depth_factor=2.2, frames=4, crop=160),
    "s": dict(width_factor=2.0, depth_factor=2.2, frames=13, crop=160),
    "m": dict(width_factor=2.0, depth_factor=2.2, frames=16, crop=224),
    "l": dict(width_factor=2.0, depth_factor=5.0, frames=16, crop=312),
}

_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _pad(kernel: tuple[int, ...]) -> list[tuple[int, int]]:
    """PyTorch's symmetric `padding=k // 2`, explicit so strided convs match."""
    return [(k // 2, k // 2) for k in kernel]


class DepthwiseConv3D(nn.Module):
    """Depthwise 3D convolution (one filter per channel), PyTorch-style symmetric padding.

    The kernel has the layout of a grouped `nn.Conv` (`(kt, kh, kw, 1, C)`), so
    checkpoints do not depend on `impl`. `"shifted"` computes the convolution as a sum
    of `kt*kh*kw` shifted, scaled copies of the input: XLA fuses that into one
    elementwise loop, which on CPU is 10-20x faster (forward + backward) than its
    grouped-convolution kernel (see BENCHMARKS.md). `"xla"` uses `lax.conv`.
    """

    kernel_size: tuple[int, int, int]
    strides: tuple[int, int, int] = (1, 1, 1)
    impl: str = "shifted"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        channels = x.shape[-1]
        kernel = self.param("kernel", _conv_init, (*self.kernel_size, 1, channels))
        kernel = kernel.astype(self.dtype)
        impl = self.impl
        if impl == "auto":
            impl = "shifted" if parallel.platform() == "cpu" else "xla"
        if impl == "xla":
            return jax.lax.conv_general_dilated(
                x, kernel, self.strides, _pad(self.kernel_size),
                dimension_numbers=("NDHWC", "DHWIO", "NDHWC"), feature_group_count=channels)
        if impl != "shifted":
            raise ConfigValueError("config.runtime.depthwise_impl must be 'auto', 'shifted' or "
                                   f"'xla', got {impl!r}")
        return _shifted_depthwise(x, kernel, self.strides)


def _shifted_depthwise(x: jnp.ndarray, kernel: jnp.ndarray,
                       strides: tuple[int, int, int]) -> jnp.ndarray:
    """Sum over kernel taps of a strided window of the padded input times that tap."""
    kt, kh, kw = kernel.shape[:3]
    padded = jnp.pad(x, [(0, 0), *_pad((kt, kh, kw)), (0, 0)])
    out_shape = [(n - 1) // s + 1 for n, s in zip(x.shape[1:4], strides)]
    out = jnp.zeros((x.shape[0], *out_shape, x.shape[-1]), x.dtype)
    for a, b, c in itertools.product(range(kt), range(kh), range(kw)):
        window = padded[:, a:, b:, c:][:, :: strides[0], :: strides[1], :: strides[2]]
        window = window[:, : out_shape[0], : out_shape[1], : out_shape[2]]
        out = out + window * kernel[a, b, c, 0]
    return out


def _batch_norm(train: bool, axis_name: str | None, dtype: Any, name: str) -> nn.BatchNorm:
    """BatchNorm with PyTorch's eps/momentum; `axis_name` syncs statistics under pmap."""
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                        axis_name=axis_name if train else None, dtype=dtype, name=name)


class SqueezeExcitation(nn.Module):
    """fvcore's 3D squeeze-excitation: global pool, 1x1 conv, ReLU, 1x1 conv, sigmoid."""

    reduced: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        s = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
        s = nn.relu(nn.Dense(self.reduced, dtype=self.dtype, name="fc1")(s))
        s = nn.sigmoid(nn.Dense(x.shape[-1], dtype=self.dtype, name="fc2")(s))
        return x * s


class Stem(nn.Module):
    """(1x3x3, stride 2 spatial) conv, then a depthwise (5x1x1) temporal conv, BN, ReLU."""

    dim: int
    temporal_kernel: int = 5
    depthwise_impl: str = "auto"
    axis_name: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        x = nn.Conv(self.dim, (1, 3, 3), strides=(1, 2, 2), padding=_pad((1, 3, 3)),
                    use_bias=False, kernel_init=_conv_init, dtype=self.dtype, name="conv_xy")(x)
        x = DepthwiseConv3D((self.temporal_kernel, 1, 1), impl=self.depthwise_impl,
                            dtype=self.dtype, name="conv_t")(x)
        x = _batch_norm(train, self.axis_name, self.dtype, "norm")(x)
        return nn.relu(x)


class Bottleneck(nn.Module):
    """1x1x1 expand, depthwise 3x3x3 (+SE, swish), 1x1x1 project; residual add, ReLU."""

    inner_dim: int
    out_dim: int
    stride: int
    use_se: bool
    se_ratio: float = 0.0625
    depthwise_impl: str = "auto"
    axis_name: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        norm = lambda name: _batch_norm(train, self.axis_name, self.dtype, name)
        conv = lambda *a, **k: nn.Conv(*a, use_bias=False, kernel_init=_conv_init,
                                       dtype=self.dtype, **k)
        strides = (1, self.stride, self.stride)

        # As pytorchvideo: a 1x1x1 projection when the shape changes, normalised only
        # when the channel count changes (a stride-only shortcut has no BatchNorm).
        shortcut = x
        if x.shape[-1] != self.out_dim or self.stride > 1:
            shortcut = conv(self.out_dim, (1, 1, 1), strides=strides, padding="VALID",
                            name="branch1_conv")(x)
        if x.shape[-1] != self.out_dim:
            shortcut = norm("branch1_norm")(shortcut)

        y = nn.relu(norm("norm_a")(conv(self.inner_dim, (1, 1, 1), name="conv_a")(x)))
        y = DepthwiseConv3D((3, 3, 3), strides, impl=self.depthwise_impl,
                            dtype=self.dtype, name="conv_b")(y)
        y = norm("norm_b")(y)
        if self.use_se:
            y = SqueezeExcitation(round_width(self.inner_dim, self.se_ratio),
                                  dtype=self.dtype, name="se")(y)
        y = nn.swish(y)
        y = norm("norm_c")(conv(self.out_dim, (1, 1, 1), name="conv_c")(y))
        return nn.relu(shortcut + y)


class Model(nn.Module):
    """X3D classifier returning `(logits, features)`.

    `features` are the pooled penultimate activations (after the head's 2048-d
    projection and ReLU, before dropout): what the DMD switcher reads, so the edge
    computes them anyway and the switcher costs almost nothing.
    """

    num_classes: int
    width_factor: float = 2.0
    depth_factor: float = 2.2
    stem_dim_in: int = 12
    bottleneck_factor: float = 2.25
    se_ratio: float = 0.0625
    head_dim: int = 2048
    dropout_rate: float = 0.5
    depthwise_impl: str = "auto"  # see DepthwiseConv3D; a runtime setting
    axis_name: str | None = None  # set only for pmap-style code; jit needs none
    dtype: Any = jnp.float32  # compute dtype; parameters stay float32

    @property
    def arch(self) -> X3DArch:
        return x3d_arch(self.width_factor, self.depth_factor, self.stem_dim_in,
                        self.bottleneck_factor, self.head_dim)

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> tuple[jnp.ndarray, jnp.ndarray]:
        """`train` turns dropout on and normalises with the batch's statistics (updating
        the running averages in `batch_stats`, which must then be mutable)."""
        arch = self.arch
        x = x.astype(self.dtype)
        x = Stem(arch.stem_dim, depthwise_impl=self.depthwise_impl, axis_name=self.axis_name,
                 dtype=self.dtype, name="stem")(x, train)
        for s, (depth, inner, out) in enumerate(
                zip(arch.stage_depths, arch.stage_inner_dims, arch.stage_dims)):
            for b in range(depth):
                x = Bottleneck(inner, out, stride=2 if b == 0 else 1, use_se=b % 2 == 0,
                               se_ratio=self.se_ratio, depthwise_impl=self.depthwise_impl,
                               axis_name=self.axis_name,
                               dtype=self.dtype, name=f"stage{s + 1}_block{b}")(x, train)
        features = self._head_features(x, train)
        y = nn.Dropout(self.dropout_rate, deterministic=not train)(features)
        logits = nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(0.01),
                          dtype=self.dtype, name="head_proj")(y)
        return logits.astype(jnp.float32), features.astype(jnp.float32)

    def _head_features(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        arch = self.arch
        x = nn.Conv(arch.head_inner_dim, (1, 1, 1), use_bias=False, kernel_init=_conv_init,
                    dtype=self.dtype, name="head_pre_conv")(x)
        x = nn.relu(_batch_norm(train, self.axis_name, self.dtype, "head_pre_norm")(x))
        x = jnp.mean(x, axis=(1, 2, 3))
        x = nn.Dense(arch.head_dim, use_bias=False, kernel_init=_conv_init,
                     dtype=self.dtype, name="head_post_conv")(x)
        return nn.relu(x)


X3D = Model  # the name the architecture is known by
