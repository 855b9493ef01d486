"""`dmd_jax.confidence` in PyTorch, for the routers' exported forms (same definitions)."""

from __future__ import annotations

import torch


def entropy(logits: torch.Tensor) -> torch.Tensor:
    log_p = torch.log_softmax(logits.float(), -1)
    return -(log_p.exp() * log_p).sum(-1)


def confidence_stats(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Max probability, entropy and top-2 margin of `softmax(logits)`, per row."""
    p = torch.softmax(logits.float(), -1)
    top2 = torch.topk(p, 2, dim=-1).values
    return {"max_prob": top2[..., 0], "entropy": entropy(logits),
            "margin": top2[..., 0] - top2[..., 1]}


class Statistic(torch.nn.Module):
    """A confidence router's score: one statistic of the logits, signed (higher: keep)."""

    def __init__(self, name: str, sign: float = 1.0):
        super().__init__()
        self.name, self.sign = name, sign

    def forward(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        del features
        return self.sign * confidence_stats(logits)[self.name]


class SwitcherScore(torch.nn.Module):
    """`routers.switcher.Switcher` in PyTorch: `sigmoid(MLP(LayerNorm(features) ⊕
    (max_prob, entropy, margin)))` with tanh-GELU between the layers (Flax's `nn.gelu`),
    holding the trained parameters (Flax layouts: `kernel` is (in, out))."""

    def __init__(self, params: dict, epsilon: float = 1e-6):
        super().__init__()
        norm = params["feature_norm"]
        self.norm = torch.nn.LayerNorm(len(norm["scale"]), eps=epsilon)
        self.norm.weight.data, self.norm.bias.data = _tensor(norm["scale"]), _tensor(norm["bias"])
        names = sorted((k for k in params if k.startswith("dense")), key=lambda k: int(k[5:]))
        self.layers = torch.nn.ModuleList(_linear(params[k]) for k in (*names, "out"))

    def forward(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        stats = confidence_stats(logits)
        x = torch.cat([self.norm(features.float()),
                       torch.stack([stats["max_prob"], stats["entropy"], stats["margin"]], -1)],
                      -1)
        for layer in self.layers[:-1]:
            x = torch.nn.functional.gelu(layer(x), approximate="tanh")
        return torch.sigmoid(self.layers[-1](x)[..., 0])


def _tensor(x) -> torch.Tensor:
    import numpy as np
    return torch.from_numpy(np.array(x, np.float32))


def _linear(params: dict) -> torch.nn.Linear:
    kernel = _tensor(params["kernel"])
    layer = torch.nn.Linear(kernel.shape[0], kernel.shape[1])
    layer.weight.data, layer.bias.data = kernel.T.contiguous(), _tensor(params["bias"])
    return layer
