"""`entropy`: the edge's predictive entropy; the most uncertain clips go first."""

from dmd_jax import confidence
from dmd_jax.routers import Context, Router, no_argument


def score(params, features, logits):
    del params, features
    return -confidence.entropy(logits)


def router(arg: str, context: Context) -> Router:
    del context
    no_argument('entropy', arg)
    return Router("entropy", score)
