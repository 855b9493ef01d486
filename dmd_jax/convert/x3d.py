"""pytorchvideo X3D (`create_x3d`, its model zoo's `.pyth` files) -> `models.x3d.X3D`.

The architecture is read from the checkpoint's shapes: channel widths, blocks per stage,
head size and class count determine the width and depth multipliers uniquely.
"""

from __future__ import annotations

import itertools
import re

import ml_collections
import numpy as np

from dmd_jax.convert.mapping import (ConversionError, Rule, batch_norm, conv, linear,
                                     pointwise_as_dense)
from dmd_jax.models import x3d

_BLOCK = r"stage(\d+)_block(\d+)"
_RES = r"blocks.\1.res_blocks.\2"
RULES: tuple[Rule, ...] = (
    # pytorchvideo calls the stem's spatial conv `conv_t` and its temporal one `conv_xy`.
    Rule(r"params/stem/conv_xy/kernel", "blocks.0.conv.conv_t.weight", conv),
    Rule(r"params/stem/conv_t/kernel", "blocks.0.conv.conv_xy.weight", conv),
    *batch_norm("stem/norm", "blocks.0.norm"),
    Rule(rf"params/{_BLOCK}/branch1_conv/kernel", rf"{_RES}.branch1_conv.weight", conv),
    *batch_norm(rf"{_BLOCK}/branch1_norm", rf"{_RES}.branch1_norm"),
    Rule(rf"params/{_BLOCK}/conv_([abc])/kernel", rf"{_RES}.branch2.conv_\3.weight", conv),
    *batch_norm(rf"{_BLOCK}/norm_([ac])", rf"{_RES}.branch2.norm_\3"),
    # With squeeze-excitation, norm_b is a Sequential(BatchNorm, SE).
    *(Rule(r.flax, (r.torch.replace("norm_b", "norm_b.0"), r.torch), r.transform)
      for r in batch_norm(rf"{_BLOCK}/norm_b", rf"{_RES}.branch2.norm_b")),
    Rule(rf"params/{_BLOCK}/se/fc1/kernel", rf"{_RES}.branch2.norm_b.1.block.0.weight",
         pointwise_as_dense),
    Rule(rf"params/{_BLOCK}/se/fc1/bias", rf"{_RES}.branch2.norm_b.1.block.0.bias"),
    Rule(rf"params/{_BLOCK}/se/fc2/kernel", rf"{_RES}.branch2.norm_b.1.block.2.weight",
         pointwise_as_dense),
    Rule(rf"params/{_BLOCK}/se/fc2/bias", rf"{_RES}.branch2.norm_b.1.block.2.bias"),
    Rule(r"params/head_pre_conv/kernel", "blocks.5.pool.pre_conv.weight", conv),
    *batch_norm("head_pre_norm", "blocks.5.pool.pre_norm"),
    Rule(r"params/head_post_conv/kernel", "blocks.5.pool.post_conv.weight", pointwise_as_dense),
    Rule(r"params/head_proj/kernel", "blocks.5.proj.weight", linear),
    Rule(r"params/head_proj/bias", "blocks.5.proj.bias"),
)
IGNORE = (r".*num_batches_tracked",)
USES_CONFIG = False  # pytorchvideo checkpoints carry no config: the shapes say it all

# The multipliers real checkpoints use come first: several depths give the same blocks.
_WIDTHS = (2.0, *np.round(np.arange(0.1, 4.001, 0.05), 2))
_DEPTHS = (2.2, 5.0, 1.0, *np.round(np.arange(0.1, 6.001, 0.1), 2))


def model_config(state_dict: dict[str, np.ndarray],
                 hf: None = None) -> tuple[ml_collections.ConfigDict, int, tuple[int, int]]:
    """`(config.model, num_classes, (frames, size))` of the X3D whose weights these are
    (read from the shapes: pytorchvideo checkpoints carry no config). XS, S and M share
    one network; the clip shape defaults to X3D-M's 16 x 224 (--frames/--size for others)."""
    del hf
    try:
        num_classes, head_dim = state_dict["blocks.5.proj.weight"].shape
        stem_dim = state_dict["blocks.0.conv.conv_t.weight"].shape[0]
        depths = tuple(len({m.group(1) for k in state_dict
                            if (m := re.match(rf"blocks\.{s}\.res_blocks\.(\d+)\.", k))})
                       for s in range(1, 5))
        dims = tuple(state_dict[f"blocks.{s}.res_blocks.0.branch2.conv_c.weight"].shape[0]
                     for s in range(1, 5))
        inner = state_dict["blocks.1.res_blocks.0.branch2.conv_a.weight"].shape[0]
    except KeyError as err:
        raise ConversionError(f"not a pytorchvideo X3D state dict: key {err} is missing") from err
    observed = (stem_dim, dims, depths)
    for width, depth in itertools.product(_WIDTHS, _DEPTHS):
        arch = x3d.x3d_arch(float(width), float(depth), head_dim=int(head_dim))
        if (arch.stem_dim, arch.stage_dims, arch.stage_depths) == observed:
            break
    else:
        raise ConversionError(f"no X3D width/depth multiplier gives stem {stem_dim}, stage "
                              f"widths {dims} and depths {depths}")
    config = ml_collections.ConfigDict(dict(
        name="x3d", width_factor=float(width), depth_factor=float(depth), stem_dim_in=12,
        bottleneck_factor=inner / dims[0], se_ratio=0.0625, head_dim=int(head_dim),
        dropout_rate=0.5))
    return config, int(num_classes), (16, 224)


def torch_model(module: x3d.Model, input_shape: tuple[int, ...]):
    """pytorchvideo's X3D of `module`'s architecture for clips of `input_shape` (random
    weights, eval mode, no softmax): what `mapping.to_state_dict` fills to run a dmd_jax
    X3D through PyTorch (the deployed edge). Imports torch and pytorchvideo."""
    from dmd_jax.references import pytorchvideo_create_x3d
    frames, size = int(input_shape[0]), int(input_shape[1])
    return pytorchvideo_create_x3d()(
        input_clip_length=frames, input_crop_size=size, model_num_class=module.num_classes,
        dropout_rate=0.0, width_factor=module.width_factor, depth_factor=module.depth_factor,
        stem_dim_in=module.stem_dim_in, bottleneck_factor=module.bottleneck_factor,
        se_ratio=module.se_ratio, head_dim_out=module.head_dim, head_activation=None).eval()


def torch_outputs(net, x):
    """`(logits, features)` of pytorchvideo's X3D on normalised NCDHW clips, `features`
    being what `models.x3d.Model` returns: the pooled head after its projection and ReLU."""
    for block in net.blocks[:-1]:
        x = block(x)
    head = net.blocks[-1]
    features = head.pool(x).flatten(1)
    return head.proj(features), features
