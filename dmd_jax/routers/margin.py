"""`margin`: the gap between the edge's two most probable classes."""

from dmd_jax import confidence, routers


def score(params, features, logits):
    del params, features
    return confidence.confidence_stats(logits)["margin"]


router = routers.stateless("margin", score)
