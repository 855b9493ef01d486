"""BatchNorm at test time, by method interceptors, so models need no adaptation code.

`batch_statistics()`: every `nn.BatchNorm` normalises with the statistics of the batch it
is given (Tent's test-time BatchNorm) whatever the model's `train` flag, dropout staying
off.

`interceptor(mode)`: test-time batch renormalisation (TBR), the BatchNorm of the official
CEMA code.

Plain test-time BatchNorm normalises with the statistics of whatever batch passes. In
CEMA that differs between the two sides: the edge sees 64 clips of the stream, the
cloud trains the edge's copy on the few clips the edge chose to upload (its confident
ones) plus replayed older clips. The affine parameters the cloud learns then meet other
statistics at the edge. TBR gives both sides the same statistics: each BatchNorm keeps
running averages, initialised from the first batch it sees and updated (momentum 0.1,
as PyTorch) only by the cloud's training steps, and normalises with them; the gradient
still flows as if through the batch's statistics (Ioffe's batch renormalisation):

    y = scale * ((x - mu_B) / sigma_B * sg(sigma_B / sigma) + sg((mu_B - mu) / sigma)) + bias

whose value is `scale * (x - mu) / sigma + bias`. Implemented as a Flax method
interceptor around every `nn.BatchNorm`, so the models need no TTA-specific layer;
the running averages live in the models' own `batch_stats` collection.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

MOMENTUM = 0.1  # PyTorch's: running += 0.1 * (batch - running)


def batch_statistics():
    """An interceptor making every BatchNorm normalise with the batch's own statistics
    (mean and biased variance over every axis but the channels, computed in float32 in
    two passes), then its scale and bias; the running averages are neither read nor
    changed."""

    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if not isinstance(module, nn.BatchNorm) or context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        x = args[0]
        wide = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        axes = tuple(range(x.ndim - 1))
        y = (wide - jnp.mean(wide, axes)) * jax.lax.rsqrt(jnp.var(wide, axes) + module.epsilon)
        return _affine(module, y).astype(module.dtype or x.dtype)

    return intercept


def _affine(module: nn.BatchNorm, y: jnp.ndarray) -> jnp.ndarray:
    if module.use_scale:
        y = y * module.get_variable("params", "scale")
    if module.use_bias:
        y = y + module.get_variable("params", "bias")
    return y


def interceptor(mode: str):
    """`mode`: 'init' sets the running averages to this batch's statistics; 'update'
    normalises with them and then moves them towards the batch's (a training step);
    'use' only normalises with them (the edge, and the cloud's teacher targets)."""
    if mode not in ("init", "update", "use"):
        raise ValueError(f"unknown renormalisation mode {mode!r}")

    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if not isinstance(module, nn.BatchNorm) or context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        x = args[0]
        axes = tuple(range(x.ndim - 1))
        # The unbiased variance, as the authors' code (torch.var_mean): for normalising
        # the batch and for the running average alike.
        mean, var = jnp.mean(x, axes), jnp.var(x, axes, ddof=1)
        if mode == "init":
            run_mean, run_var = jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)
        else:
            run_mean = module.get_variable("batch_stats", "mean")
            run_var = module.get_variable("batch_stats", "var")
        std, run_std = jnp.sqrt(var + module.epsilon), jnp.sqrt(run_var + module.epsilon)
        sg = jax.lax.stop_gradient
        y = (x - mean) / std * sg(std / run_std) + sg((mean - run_mean) / run_std)
        if mode == "init":
            module.put_variable("batch_stats", "mean", run_mean)
            module.put_variable("batch_stats", "var", run_var)
        elif mode == "update":
            module.put_variable("batch_stats", "mean", run_mean + MOMENTUM * (sg(mean) - run_mean))
            module.put_variable("batch_stats", "var", run_var + MOMENTUM * (sg(var) - run_var))
        return _affine(module, y)

    return intercept
