"""`norm`: BatchNorm with the test batch's statistics (Nado et al. 2020; Tent's
normalisation without its update); nothing is learnt."""

from __future__ import annotations

from dmd_jax.tta.base import ForwardOnly


class Method(ForwardOnly):

    def variables(self, edge):
        return {"norm_affine": edge.source_norm_affine, "constants": edge.constants()}

    def forward(self, edge, variables, clips):
        return edge.logits(variables["norm_affine"], variables["constants"], clips)
