"""`entropy`: the edge's predictive entropy; the most uncertain clips go first."""

from dmd_jax import confidence, routers


def score(params, features, logits):
    del params, features
    return -confidence.entropy(logits)


router = routers.stateless("entropy", score)


def torch_score(router: routers.Router):
    """The exported form (`dmd_jax.deploy`): the same score in PyTorch."""
    del router
    from dmd_jax.deploy import torch_ops
    return torch_ops.Statistic("entropy", -1.0)
