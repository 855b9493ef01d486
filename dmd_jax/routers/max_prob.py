"""`max_prob`: the edge's top softmax probability (confidence deferral, Chow's rule)."""

from dmd_jax import confidence
from dmd_jax.routers import Context, Router, no_argument


def score(params, features, logits):
    del params, features
    return confidence.confidence_stats(logits)["max_prob"]


def router(arg: str, context: Context) -> Router:
    del context
    no_argument('max_prob', arg)
    return Router("max_prob", score)
