"""`norm`: BatchNorm with the test batch's statistics (Nado et al. 2020; Tent's
normalisation without its update); nothing is learnt."""

from __future__ import annotations

import jax
import ml_collections

from dmd_jax import parallel
from dmd_jax.tta.adaptable import Adaptable
from dmd_jax.tta.base import BatchResult, Context, nothing


class Method:
    SETTINGS: tuple[str, ...] = ()

    def __init__(self, edge: Adaptable, cfg: ml_collections.ConfigDict, context: Context):
        del cfg
        self.name = context.name
        batch = parallel.batch_sharded(context.mesh)
        self._variables = parallel.put_replicated(
            {"norm_affine": edge.source_norm_affine, "constants": edge.constants()},
            context.mesh)
        self._forward = jax.jit(
            lambda v, clips: edge.logits(v["norm_affine"], v["constants"], clips),
            in_shardings=(parallel.replicated(context.mesh), batch), out_shardings=batch)

    def reset(self) -> None:
        pass

    def process(self, clips: jax.Array) -> BatchResult:
        logits = parallel.fetch(self._forward(self._variables, clips))
        return BatchResult(logits, nothing(len(logits)), nothing(len(logits)))
