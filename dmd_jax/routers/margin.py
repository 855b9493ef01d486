"""`margin`: the gap between the edge's two most probable classes."""

from dmd_jax import confidence
from dmd_jax.routers import Context, Router, no_argument


def score(params, features, logits):
    del params, features
    return confidence.confidence_stats(logits)["margin"]


def router(arg: str, context: Context) -> Router:
    del context
    no_argument('margin', arg)
    return Router("margin", score)
