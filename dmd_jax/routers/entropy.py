"""`entropy`: the edge's predictive entropy; the most uncertain clips go first."""

from dmd_jax import confidence, routers


def score(params, features, logits):
    del params, features
    return -confidence.entropy(logits)


router = routers.stateless("entropy", score)
