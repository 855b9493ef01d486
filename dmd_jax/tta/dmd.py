"""`dmd`: offloading alone on the stream (METHODS.md §1), the baseline of one upload, two uses.

The edge answers every clip with the source model and a DMD switcher (any router of an
operating point) sends the clips it doubts to the cloud, whose answers replace the edge's;
nothing adapts. `batch_statistics=True` normalises the edge with the test batch's own
statistics (the `norm` baseline), which is how an adapting edge's features look to the
router, so `dmd_cema` can be compared with and without what adaptation adds.
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np

from dmd_jax import parallel
from dmd_jax.tta import offload
from dmd_jax.tta.adaptable import Adaptable
from dmd_jax.tta.base import BatchResult, Context, nothing


class Method:

    SETTINGS = offload.SETTINGS + ("batch_statistics",)

    def __init__(self, edge: Adaptable, cfg: ml_collections.ConfigDict, context: Context):
        self.name = context.name
        self.offloader = offload.Offloader(edge, context.foundation().model, cfg, context.mesh)
        replicated, batch = parallel.replicated(context.mesh), parallel.batch_sharded(context.mesh)
        if cfg.batch_statistics:
            variables = {"norm_affine": edge.source_norm_affine, "constants": edge.constants()}
            forward = lambda v, clips: edge.outputs(v["norm_affine"], v["constants"], clips)
        else:
            variables = edge.model.variables
            forward = lambda v, clips: edge.model.apply(v, clips)
        self._variables = parallel.put_replicated(variables, context.mesh)
        self._forward = jax.jit(forward, in_shardings=(replicated, batch),
                                out_shardings=(batch, batch))

    def reset(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        del state

    def process(self, clips: jax.Array) -> BatchResult:
        logits, features = self._forward(self._variables, clips)
        logits = np.asarray(parallel.fetch(logits))
        sent = self.offloader.send(clips, self.offloader.route(features, logits))
        return BatchResult(self.offloader.answers(logits, sent), nothing(len(logits)),
                           uploaded=sent.offloaded, bytes_up=sent.bytes_up)
