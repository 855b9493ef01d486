"""`max_prob`: the edge's top softmax probability (confidence deferral, Chow's rule)."""

from dmd_jax import confidence, routers


def score(params, features, logits):
    del params, features
    return confidence.confidence_stats(logits)["max_prob"]


router = routers.stateless("max_prob", score)


def torch_score(router: routers.Router):
    """The exported form (`dmd_jax.deploy`): the same score in PyTorch."""
    del router
    from dmd_jax.deploy import torch_ops
    return torch_ops.Statistic("max_prob", 1.0)
