"""X3D: architecture matches pytorchvideo's builder; the depthwise implementations agree."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmd_jax.models import x3d
from dmd_jax.references import pytorchvideo_create_x3d


def _count(tree) -> int:
    return sum(np.size(x) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("kwargs", [
    dict(width_factor=2.0, depth_factor=2.2, head_dim=2048),  # X3D-XS/S/M
    dict(width_factor=0.5, depth_factor=1.0, head_dim=128),   # the demo edge
    dict(width_factor=1.0, depth_factor=2.2, head_dim=512),   # the demo teacher
])
def test_parameter_count_matches_pytorchvideo(kwargs):
    torch = pytest.importorskip("torch")
    ref = pytorchvideo_create_x3d()(
        input_clip_length=4, input_crop_size=64, model_num_class=400,
        width_factor=kwargs["width_factor"], depth_factor=kwargs["depth_factor"],
        head_dim_out=kwargs["head_dim"])
    # BatchNorm running statistics are buffers in torch and batch_stats in Flax.
    ref_params = sum(p.numel() for p in ref.parameters())
    model = x3d.X3D(num_classes=400, **kwargs)
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4, 64, 64, 3)))
    assert _count(variables["params"]) == ref_params
    assert torch.is_tensor(next(ref.parameters()))


def test_x3d_m_has_the_published_size():
    model = x3d.X3D(num_classes=400)
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 224, 224, 3)))
    assert 3.7e6 < _count(variables["params"]) < 3.9e6  # the X3D paper: 3.8M
    assert model.arch.stage_depths == (3, 5, 11, 7)
    assert model.arch.stage_dims == (24, 48, 96, 192)


def test_outputs_logits_and_pooled_features():
    model = x3d.X3D(num_classes=7, width_factor=0.5, depth_factor=1.0, head_dim=64,
                    depthwise_impl="xla")  # compiles faster; the impls are tested equal below
    x = jnp.ones((2, 4, 32, 32, 3))
    variables = jax.jit(model.init)(jax.random.key(0), x)
    logits, features = jax.jit(model.apply)(variables, x)
    assert logits.shape == (2, 7) and features.shape == (2, 64)
    assert logits.dtype == jnp.float32
    assert bool(jnp.all(features >= 0))  # after the head's ReLU


@pytest.mark.parametrize("kernel,strides", [((3, 3, 3), (1, 1, 1)), ((3, 3, 3), (1, 2, 2)),
                                            ((5, 1, 1), (1, 1, 1)), ((3, 3, 3), (2, 2, 2))])
def test_shifted_depthwise_equals_xla_convolution(kernel, strides):
    x = jax.random.normal(jax.random.key(1), (2, 5, 9, 8, 6))
    layers = {impl: x3d.DepthwiseConv3D(kernel, strides, impl=impl) for impl in ("shifted", "xla")}
    params = layers["xla"].init(jax.random.key(2), x)
    out = {impl: layer.apply(params, x) for impl, layer in layers.items()}
    np.testing.assert_allclose(out["shifted"], out["xla"], rtol=1e-5, atol=1e-5)
    grads = {impl: jax.grad(lambda p, l=layer: jnp.sum(l.apply(p, x) ** 2))(params)
             for impl, layer in layers.items()}
    np.testing.assert_allclose(grads["shifted"]["params"]["kernel"],
                               grads["xla"]["params"]["kernel"], rtol=1e-4, atol=1e-4)


def test_unknown_depthwise_impl_is_refused():
    with pytest.raises(ValueError, match="impl"):
        x3d.DepthwiseConv3D((3, 3, 3), impl="fast").init(jax.random.key(0), jnp.ones((1, 3, 3, 3, 2)))
