"""A model whose normalisation layers adapt at test time while everything else is frozen.

Test-time adaptation (Tent and everything after it) updates only the affine parameters
(scale and bias) of the normalisation layers and normalises with the statistics of the
test batch itself. In Flax those parameters are exactly the `scale`/`bias` leaves of the
modules that own a `scale` (BatchNorm, LayerNorm, GroupNorm); a Dense or Conv has a
`kernel` instead, so the split needs no list of layer names and works for every family.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from dmd_jax import model_store
from dmd_jax.errors import UserError
from dmd_jax.tta import renorm

Params = dict[str, Any]


def is_norm_affine(path: tuple[str, ...], params_of_module: dict[str, Any]) -> bool:
    """Whether leaf `path[-1]` of a module with these params is a norm layer's scale/bias."""
    return "scale" in params_of_module and path[-1] in ("scale", "bias")


def split_norm_affine(params: Params) -> tuple[Params, Params]:
    """`params` -> `(norm_affine, frozen)`, two flat-keyed dicts that `merge` reverses."""
    flat = flax.traverse_util.flatten_dict(params)
    modules: dict[tuple[str, ...], dict[str, Any]] = {}
    for path, value in flat.items():
        modules.setdefault(path[:-1], {})[path[-1]] = value
    affine = {p: v for p, v in flat.items() if is_norm_affine(p, modules[p[:-1]])}
    frozen = {p: v for p, v in flat.items() if p not in affine}
    return _string_keys(affine), _string_keys(frozen)


def merge(norm_affine: Params, frozen: Params) -> Params:
    return flax.traverse_util.unflatten_dict(
        {tuple(k.split("/")): v for k, v in {**frozen, **norm_affine}.items()})


def _string_keys(flat: dict[tuple[str, ...], Any]) -> Params:
    """'/'-joined keys: a flat dict is an easy pytree to hand to optax and to send."""
    return {"/".join(path): value for path, value in flat.items()}


def num_bytes(tree: Any) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


@dataclasses.dataclass(frozen=True)
class Adaptable:
    """A loaded model with its norm affine parameters split off for adaptation.

    `logits(norm_affine, constants, clips)` runs the model on uint8 clips, normalising
    with the batch's own statistics where the model has BatchNorm (the running averages
    are neither used nor changed) and with dropout off. The frozen weights travel as the
    argument `constants` (`self.constants()` on the mesh) rather than being captured, so a
    large cloud model is not baked into the compiled program as constants.
    """

    model: model_store.LoadedModel
    source_norm_affine: Params  # the parameters before any adaptation: what a reset restores

    @classmethod
    def of(cls, model: model_store.LoadedModel) -> "Adaptable":
        norm_affine, _ = split_norm_affine(model.variables["params"])
        if not norm_affine:
            raise UserError(f"model {model.source} has no normalisation layers to adapt "
                            "(their scale/bias parameters are what test-time adaptation learns)")
        # Host copies: every reset then puts fresh device buffers, which a jitted step
        # may donate without deleting the source parameters themselves.
        return cls(model, jax.device_get(norm_affine))

    @property
    def num_classes(self) -> int:
        return len(self.model.class_names)

    def constants(self) -> dict[str, Any]:
        """Everything adaptation never changes: the frozen params and other collections
        (BatchNorm running averages, X-CLIP's class-prompt embeddings, ...)."""
        _, frozen = split_norm_affine(self.model.variables["params"])
        others = {k: v for k, v in self.model.variables.items() if k != "params"}
        return {"frozen": frozen, "others": others}

    def logits(self, norm_affine: Params, constants: dict[str, Any],
               clips: jnp.ndarray) -> jnp.ndarray:
        return self.outputs(norm_affine, constants, clips)[0]

    def outputs(self, norm_affine: Params, constants: dict[str, Any],
                clips: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        """`(logits, pooled features)`, normalised as `logits` is: what a router reads
        from an adapting edge."""
        x = self.model.prepare(clips)
        variables = {"params": merge(norm_affine, constants["frozen"]), **constants["others"]}
        if "batch_stats" not in variables:  # LayerNorm models: nothing batch-dependent
            return self.model.module.apply(variables, x, train=False)
        with nn.intercept_methods(renorm.batch_statistics()):
            outputs, _ = self.model.module.apply(variables, x, train=False,
                                                 mutable=["batch_stats"])
        return outputs

    @property
    def has_batch_norm(self) -> bool:
        return "batch_stats" in self.model.variables

    def renorm_logits(self, norm_affine: Params, stats: Any, constants: dict[str, Any],
                      clips: jnp.ndarray, mode: str) -> tuple[jnp.ndarray, Any]:
        """`(logits, running statistics)` under test-time batch renormalisation
        (`renorm.interceptor(mode)`); models without BatchNorm run as `logits`."""
        (logits, _), stats = self.renorm_outputs(norm_affine, stats, constants, clips, mode)
        return logits, stats

    def renorm_outputs(self, norm_affine: Params, stats: Any, constants: dict[str, Any],
                       clips: jnp.ndarray, mode: str) -> tuple[tuple[jnp.ndarray, jnp.ndarray], Any]:
        """`((logits, features), running statistics)`, as `renorm_logits`."""
        if not self.has_batch_norm:
            return self.outputs(norm_affine, constants, clips), stats
        x = self.model.prepare(clips)
        variables = {"params": merge(norm_affine, constants["frozen"]), **constants["others"],
                     "batch_stats": stats}
        with nn.intercept_methods(renorm.interceptor(mode)):
            outputs, updated = self.model.module.apply(variables, x, train=False,
                                                       mutable=["batch_stats"])
        return outputs, updated["batch_stats"]
