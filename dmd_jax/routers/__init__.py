"""Routers: which clips the edge sends to the cloud.

**The router protocol.** A router scores every clip from what the edge already computed,
its pooled features and its logits; the clips with the *lowest* scores go to the cloud
first (a score is the router's confidence that the edge's answer can stand). It is a pure,
jittable function of its parameters, so the edge runs it fused with its own forward pass
(`dmd_jax.hybrid.HybridClassifier`) and `evaluate_hybrid` sweeps it over offload rates.

A router is named in `config.hybrid.routers` by a spec `NAME[:ARG]`; `NAME` is a module,
`dmd_jax.routers.<NAME>` or any importable dotted path, exporting

    def router(arg: str, context: Context) -> Router

where `arg` is the text after the colon ('' if none) and `context` says where trained
routers live. `max_prob`, `entropy` and `margin` read the edge's confidence;
`switcher:TARGET` is the switcher the `train_switcher` job trained on TARGET (DMD's
`hard` agreement, or the `ground_truth` ablation).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from dmd_jax import plugins

ScoreFn = Callable[[Any, jnp.ndarray, jnp.ndarray], jnp.ndarray]


@dataclasses.dataclass(frozen=True)
class Context:
    """What building a router may need: where the switcher job wrote its switchers."""

    switcher_dir: str = ""


@dataclasses.dataclass(frozen=True)
class Router:
    """`score(params, features, logits) -> (B,)`, higher: keep the edge's answer.

    `params` is a pytree (empty for routers that learn nothing), passed to `score` as an
    argument so that compiled functions never hold weights as constants; `spec` is how
    a config names this router (kept with an operating point, to rebuild it)."""

    spec: str
    score: ScoreFn
    params: Any = dataclasses.field(default_factory=dict)
    learned: bool = False
    fingerprint: str = ""  # of the trained parameters ('' if none)
    trained_on: str = ""  # the identity of the labels it learnt from ('' if none)

    def scores(self, features: np.ndarray, logits: np.ndarray) -> np.ndarray:
        """Scores of a labelled split's clips, on the host."""
        # jit caches by function: each router's score compiles once per shape.
        return np.asarray(jax.jit(self.score)(self.params, jnp.asarray(features),
                                              jnp.asarray(logits)))


class RouterSpecError(plugins.PluginNotFoundError):
    """A router spec that its module cannot take."""


def no_argument(name: str, arg: str) -> None:
    """For routers that take no `:ARG`: an argument given anyway is refused, not ignored."""
    if arg:
        raise RouterSpecError(f"router {name!r} takes no argument, but the spec gives "
                              f"{name}:{arg}; write {name!r}")


def stateless(name: str, score: ScoreFn) -> Callable[[str, Context], Router]:
    """The `router` function of a module whose router learns nothing and takes no `:ARG`
    (the confidence routers): `router = routers.stateless("max_prob", score)`."""
    def router(arg: str, context: Context) -> Router:
        del context
        no_argument(name, arg)
        return Router(name, score)
    return router


def load(spec: str, context: Context) -> Router:
    """The router a `NAME[:ARG]` spec names."""
    name, _, arg = spec.partition(":")
    module = plugins.resolve(name, __name__, f"router {spec!r}", ("router",))
    return module.router(arg, context)

