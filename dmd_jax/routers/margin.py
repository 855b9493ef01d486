"""`margin`: the gap between the edge's two most probable classes."""

from dmd_jax import confidence, routers


def score(params, features, logits):
    del params, features
    return confidence.confidence_stats(logits)["margin"]


router = routers.stateless("margin", score)


def torch_score(router: routers.Router):
    """The exported form (`dmd_jax.deploy`): the same score in PyTorch."""
    del router
    from dmd_jax.deploy import torch_ops
    return torch_ops.Statistic("margin", 1.0)
