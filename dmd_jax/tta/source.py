"""`source`: the model as trained, with its running BatchNorm statistics; nothing adapts."""

from __future__ import annotations

from dmd_jax.tta.base import ForwardOnly


class Method(ForwardOnly):

    def variables(self, edge):
        return edge.model.variables

    def forward(self, edge, variables, clips):
        return edge.model.apply(variables, clips)[0]
