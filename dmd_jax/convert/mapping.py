"""Declarative key maps from a PyTorch state dict to a Flax variable tree.

A family's map is a tuple of `Rule`s: a regular expression over the Flax path
(`params/stage1_block0/conv_a/kernel`), the PyTorch key it comes from (with the
regex's groups, `\\1`), and the array transform between the two layouts. `convert`
applies them to every leaf of the Flax tree and insists that it all adds up: every
Flax leaf has a source, every source key is used or explicitly ignored, every shape
fits. Any failure is one error naming the key and both shapes.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import jax
import numpy as np

from dmd_jax.errors import UserError

Transform = Callable[[np.ndarray], np.ndarray]


class ConversionError(UserError, ValueError):
    """The checkpoint does not fit the model it claims to be."""


# Layout transforms: PyTorch (out, in, *kernel) -> Flax (*kernel, in, out).
def identity(x: np.ndarray) -> np.ndarray:
    return x


def linear(x: np.ndarray) -> np.ndarray:
    return x.T


def conv(x: np.ndarray) -> np.ndarray:
    return np.transpose(x, (*range(2, x.ndim), 1, 0))


def pointwise_as_dense(x: np.ndarray) -> np.ndarray:
    """A 1x1x1 Conv3d weight used as a Dense kernel."""
    return x.reshape(x.shape[0], x.shape[1]).T


@dataclasses.dataclass(frozen=True)
class Rule:
    flax: str  # regex over the full Flax path, e.g. r"params/stage(\d+)_block(\d+)/conv_a/kernel"
    torch: str | tuple[str, ...]  # the source key; alternatives are tried in order
    transform: Transform = identity


def batch_norm(flax_module: str, torch_module: str) -> tuple[Rule, ...]:
    """The four tensors of a BatchNorm (scale, bias, running mean and variance)."""
    return (Rule(rf"params/{flax_module}/scale", rf"{torch_module}.weight"),
            Rule(rf"params/{flax_module}/bias", rf"{torch_module}.bias"),
            Rule(rf"batch_stats/{flax_module}/mean", rf"{torch_module}.running_mean"),
            Rule(rf"batch_stats/{flax_module}/var", rf"{torch_module}.running_var"))


def layer_norm(flax_module: str, torch_module: str) -> tuple[Rule, ...]:
    return (Rule(rf"params/{flax_module}/scale", rf"{torch_module}.weight"),
            Rule(rf"params/{flax_module}/bias", rf"{torch_module}.bias"))


def dense(flax_module: str, torch_module: str, bias: bool = True) -> tuple[Rule, ...]:
    rules = (Rule(rf"params/{flax_module}/kernel", rf"{torch_module}.weight", linear),)
    return rules + ((Rule(rf"params/{flax_module}/bias", rf"{torch_module}.bias"),) if bias else ())


def convert(state_dict: dict[str, np.ndarray], target: Any, rules: tuple[Rule, ...],
            ignore: tuple[str, ...] = ()) -> Any:
    """The Flax variables shaped like `target` (arrays or ShapeDtypeStructs), filled from
    `state_dict` by `rules`; source keys matching an `ignore` regex may go unused."""
    used: set[str] = set()

    def fill(path, leaf):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        key, transform = _source(name, rules, state_dict)
        used.add(key)
        value = np.asarray(transform(state_dict[key]))
        if value.shape != tuple(leaf.shape):
            raise ConversionError(
                f"shape mismatch: checkpoint key {key!r} {tuple(state_dict[key].shape)} becomes "
                f"{value.shape} for {name!r}, but the model expects {tuple(leaf.shape)}")
        return value.astype(leaf.dtype)

    variables = jax.tree_util.tree_map_with_path(fill, target)
    unmapped = sorted(k for k in state_dict if k not in used
                      and not any(re.fullmatch(p, k) for p in ignore))
    if unmapped:
        raise ConversionError(
            f"checkpoint key {unmapped[0]!r} {tuple(np.shape(state_dict[unmapped[0]]))} maps to "
            f"nothing in the model ({len(unmapped)} unmapped keys in all: "
            f"{unmapped[:5]}...). The checkpoint is not the architecture its config describes, "
            "or the converter lacks a rule for it.")
    return variables


def source_key(name: str, rules: tuple[Rule, ...], state_dict: dict[str, Any]) -> str:
    """The PyTorch key the Flax leaf `name` (e.g. 'params/stem/norm/scale') maps to."""
    return _source(name, rules, state_dict)[0]


def _source(name: str, rules: tuple[Rule, ...],
            state_dict: dict[str, np.ndarray]) -> tuple[str, Transform]:
    for rule in rules:
        match = re.fullmatch(rule.flax, name)
        if match is None:
            continue
        candidates = (rule.torch,) if isinstance(rule.torch, str) else rule.torch
        keys = [match.expand(c) for c in candidates]
        for key in keys:
            if key in state_dict:
                return key, rule.transform
        raise ConversionError(f"checkpoint is missing key {keys[0]!r} (for the model's "
                              f"{name!r}); is it the architecture its config describes?")
    raise ConversionError(f"no conversion rule for the model's {name!r}")


# The rules run backwards (Flax -> PyTorch), for exporting a model through PyTorch: each
# layout transform's inverse, given the PyTorch shape it must restore.
_INVERSES: dict[Transform, Callable[[np.ndarray, tuple[int, ...]], np.ndarray]] = {
    identity: lambda x, shape: x,
    linear: lambda x, shape: x.T,
    conv: lambda x, shape: np.transpose(x, (x.ndim - 1, x.ndim - 2, *range(x.ndim - 2))),
    pointwise_as_dense: lambda x, shape: x.T.reshape(shape),
}


def to_state_dict(variables: Any, template: dict[str, Any], rules: tuple[Rule, ...],
                  ignore: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """The inverse of `convert`: a PyTorch state dict with the keys and shapes of
    `template` (a module's `state_dict()`), filled from the Flax `variables` by the same
    `rules`. Every template key must be filled or match an `ignore` regex."""
    out: dict[str, np.ndarray] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        key, transform = _source(name, rules, template)
        if transform not in _INVERSES:
            raise ConversionError(f"the rule for {name!r} has no inverse layout transform; "
                                  "add one to mapping._INVERSES")
        shape = tuple(template[key].shape)
        value = np.ascontiguousarray(_INVERSES[transform](np.asarray(leaf), shape))
        if value.shape != shape:
            raise ConversionError(f"shape mismatch: the model's {name!r} {np.shape(leaf)} "
                                  f"becomes {value.shape} for {key!r}, which is {shape}")
        out[key] = value
    unfilled = sorted(k for k in template if k not in out
                      and not any(re.fullmatch(p, k) for p in ignore))
    if unfilled:
        raise ConversionError(f"PyTorch key {unfilled[0]!r} gets no value from the model "
                              f"({len(unfilled)} in all: {unfilled[:5]}); the PyTorch module "
                              "is not the architecture of these variables")
    return out
