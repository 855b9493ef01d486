"""`source`: the model as trained, with its running BatchNorm statistics; nothing adapts."""

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
        self._variables = parallel.put_replicated(edge.model.variables, context.mesh)
        self._forward = jax.jit(lambda variables, clips: edge.model.apply(variables, clips)[0],
                                in_shardings=(parallel.replicated(context.mesh), batch),
                                out_shardings=batch)

    def reset(self) -> None:
        pass

    def process(self, clips: jax.Array) -> BatchResult:
        logits = parallel.fetch(self._forward(self._variables, clips))
        return BatchResult(logits, nothing(len(logits)), nothing(len(logits)))
