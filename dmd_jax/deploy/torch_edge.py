"""The edge and its router as one PyTorch module: what `export` traces into ONNX.

uint8 clips `(B, T, H, W, 3)` go in as the edge stores them; the graph normalises them
with the model's input statistics, runs the family's PyTorch reference (NCDHW) with the
converter's rules run backwards, and the router's exported form on its features and
logits. The normalisation parameters are inputs of the graph, not weights in it, so the
parameters CEMA's cloud sends swap in by feeding other arrays.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import numpy as np
import torch

from dmd_jax import models, plugins, routers
from dmd_jax.convert import family as converter_family, mapping
from dmd_jax.errors import UserError
from dmd_jax.model_store import LoadedModel
from dmd_jax.deploy.runtime import NORMALIZATIONS
from dmd_jax.tta.adaptable import split_norm_affine



class NotExportableError(UserError, ValueError):
    """A model family or router without an exported (PyTorch) form."""


def norm_inputs(model: LoadedModel, normalization: str) -> dict[str, np.ndarray]:
    """The graph's normalisation inputs by name (`norm_affine/<key>` as CEMA's downloads
    key them, `stats/<key>` for running statistics), with the model's values."""
    if normalization not in NORMALIZATIONS:
        raise UserError(f"normalization {normalization!r} is not one of {NORMALIZATIONS}")
    affine, _ = split_norm_affine(model.variables["params"])
    inputs = {f"norm_affine/{k}": np.asarray(v, np.float32) for k, v in sorted(affine.items())}
    if normalization == "running":
        stats = flax.traverse_util.flatten_dict(model.variables.get("batch_stats", {}), sep="/")
        inputs.update({f"stats/{k}": np.asarray(v, np.float32) for k, v in sorted(stats.items())})
    return inputs


def flax_path(input_name: str) -> str:
    """'norm_affine/stem/norm/scale' -> 'params/stem/norm/scale' (the variables' path)."""
    kind, _, key = input_name.partition("/")
    return f"{'params' if kind == 'norm_affine' else 'batch_stats'}/{key}"


class _InputNorm(torch.nn.BatchNorm3d):
    """BatchNorm3d whose parameters (and running statistics) are the graph's inputs, set
    in `given` for one forward; with `batch_statistics` it normalises with the batch's
    own mean and biased variance (as `tta.renorm.batch_statistics`): ONNX's
    BatchNormalization in training mode, one fused kernel in ONNX Runtime."""

    given: dict[str, torch.Tensor]
    batch_statistics: bool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        get = lambda field: self.given.get(field, getattr(self, field))  # noqa: E731
        if self.batch_statistics:  # placeholders for the running statistics, left unchanged
            scale = get("weight")
            return torch.nn.functional.batch_norm(
                x, torch.zeros_like(scale), torch.ones_like(scale), scale, get("bias"), True,
                0.0, self.eps)
        return torch.nn.functional.batch_norm(x, get("running_mean"), get("running_var"),
                                              get("weight"), get("bias"), False, 0.0, self.eps)


class EdgeGraph(torch.nn.Module):
    """`(clips, *norm values) -> (logits, features, scores)`; the norm values in the order
    of `self.inputs`."""

    def __init__(self, model: LoadedModel, router: routers.Router, normalization: str):
        super().__init__()
        family = exportable_family(model)
        self.net = family.torch_model(model.module, model.input_shape)
        self._outputs = family.torch_outputs
        template = {k: v.numpy() for k, v in self.net.state_dict().items()}
        weights = mapping.to_state_dict(jax.device_get(model.variables), template,
                                        family.RULES, family.IGNORE)
        self.net.load_state_dict({k: torch.tensor(v) for k, v in weights.items()},
                                 strict=False)  # num_batches_tracked: not weights
        norms = {}
        for name, module in self.net.named_modules():
            if isinstance(module, torch.nn.BatchNorm3d):
                module.__class__ = _InputNorm
                module.given, module.batch_statistics = {}, normalization == "batch"
                norms[name] = module
        self.inputs = norm_inputs(model, normalization)
        self._targets = []  # per input: (its BatchNorm, the field it sets)
        for input_name in self.inputs:
            module_name, _, field = mapping.source_key(
                flax_path(input_name), family.RULES, template).rpartition(".")
            if module_name not in norms:
                raise NotExportableError(f"{input_name} is not a BatchNorm's parameter in "
                                         f"{type(self.net).__name__} ({module_name})")
            self._targets.append((norms[module_name], field))
        self.score = router_score(router)
        mean, std = models.input_stats(model.model_config)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))
        self.eval()

    def forward(self, clips: torch.Tensor, *norm_values: torch.Tensor):
        x = (clips.float() / 255.0 - self.mean) / self.std
        x = x.permute(0, 4, 1, 2, 3)
        for (module, field), value in zip(self._targets, norm_values):
            module.given[field] = value
        try:
            logits, features = self._outputs(self.net, x)
        finally:
            for module, _ in self._targets:
                module.given = {}
        return logits, features, self.score(features, logits)


def exportable_family(model: LoadedModel):
    family = converter_family(model.model_config.name)
    for name in ("torch_model", "torch_outputs"):
        if not hasattr(family, name):
            raise NotExportableError(
                f"model family {model.model_config.name!r} has no exported form: its "
                f"converter module {family.__name__} lacks `{name}` (see dmd_jax.deploy)")
    return family


def router_score(router: routers.Router) -> torch.nn.Module:
    """The router's exported form, from its module's `torch_score`."""
    name = router.spec.partition(":")[0]
    module = plugins.resolve(name, routers.__name__, f"router {router.spec!r}", ("router",))
    if not hasattr(module, "torch_score"):
        raise NotExportableError(f"router {router.spec!r} has no exported form: its module "
                                 f"{module.__name__} lacks `torch_score(router)` (see "
                                 "dmd_jax.deploy)")
    return module.torch_score(router).eval()


def example_inputs(graph: EdgeGraph, batch: int, input_shape: tuple[int, ...]
                   ) -> tuple[Any, ...]:
    clips = torch.zeros((batch, *input_shape), dtype=torch.uint8)
    return (clips, *(torch.from_numpy(v) for v in graph.inputs.values()))
