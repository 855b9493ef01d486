"""`max_prob`: the edge's top softmax probability (confidence deferral, Chow's rule)."""

from dmd_jax import confidence, routers


def score(params, features, logits):
    del params, features
    return confidence.confidence_stats(logits)["max_prob"]


router = routers.stateless("max_prob", score)
