"""The DMD switcher: a tiny MLP that reads what the edge already computed.

Input: the edge's pooled penultimate features, concatenated with three statistics of
its logits (max probability, entropy, top-2 margin). Output: the logit of
`P(aligned)`, the probability that the edge's answer agrees with the cloud's (or, for
the ground-truth ablation, that it is right). A clip goes to the cloud when that
probability is low. It costs a few thousand FLOPs next to the edge's millions.

`save`/`load` are its on-disk format (orbax params + `switcher.json`, written last), and
`router('hard', context)` the trained switcher of a target as a `dmd_jax.routers.Router`.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from etils import epath

from dmd_jax import checkpoint, confidence, files, reporting
from dmd_jax.errors import UserError
from dmd_jax.routers import Context, Router

INFO_FILE = "switcher.json"


class SwitcherNotFoundError(UserError, FileNotFoundError):
    """No trained switcher where the config points."""


class Switcher(nn.Module):
    """MLP over `LayerNorm(features) ⊕ (max_prob, entropy, margin)` -> one logit."""

    hidden: Sequence[int] = (128, 64)
    dropout_rate: float = 0.1

    @nn.compact
    def __call__(self, features: jnp.ndarray, edge_logits: jnp.ndarray, *,
                 train: bool = False) -> jnp.ndarray:
        stats = confidence.confidence_stats(edge_logits)
        # Features are unbounded post-activation values; the statistics are already O(1).
        x = jnp.concatenate([nn.LayerNorm(name="feature_norm")(features.astype(jnp.float32)),
                             jnp.stack([stats["max_prob"], stats["entropy"], stats["margin"]],
                                       axis=-1)], axis=-1)
        for i, width in enumerate(self.hidden):
            x = nn.gelu(nn.Dense(width, name=f"dense{i}")(x))
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return nn.Dense(1, name="out")(x)[..., 0]


def save(directory: str, module: Switcher, target: str, params: Any,
         stamp: dict[str, Any]) -> None:
    """The trained switcher: params (orbax) + what rebuilds it (JSON, written last, so a
    directory without it is incomplete)."""
    info_path = epath.Path(directory) / INFO_FILE
    files.remove(info_path)
    checkpoint.save_tree(str(epath.Path(directory) / "params"), params)
    files.write_json(info_path, {
        "hidden": list(module.hidden), "dropout_rate": module.dropout_rate, "target": target,
        "feature_dim": int(params["feature_norm"]["scale"].shape[0]),
        "fingerprint": reporting.fingerprint(params), "stamp": stamp})


def load(directory: str) -> tuple[Switcher, Any, dict[str, Any]]:
    """`(module, params, info)` of a switcher saved by `save`; restored onto this job's
    devices whatever topology saved it."""
    info_path = epath.Path(directory) / INFO_FILE
    if not info_path.exists():
        raise SwitcherNotFoundError(
            f"no trained switcher in {directory!r} ({INFO_FILE} missing): run the "
            "train_switcher job first and point config.hybrid.switcher_dir at its workdir")
    info = files.read_json(info_path)
    module = Switcher(hidden=tuple(info["hidden"]), dropout_rate=info["dropout_rate"])
    abstract = jax.eval_shape(module.init, jax.random.key(0),
                              jnp.zeros((1, info["feature_dim"])), jnp.zeros((1, 2)))
    params = checkpoint.restore_everywhere(os.path.join(directory, "params"),
                                           abstract["params"])
    return module, params, info


def probability(module: Switcher, params: Any, features: jnp.ndarray,
                edge_logits: jnp.ndarray) -> jnp.ndarray:
    """`P(aligned)` per clip (pure: jit it with `module` static)."""
    return jax.nn.sigmoid(module.apply({"params": params}, features, edge_logits))


def router(arg: str, context: Context) -> Router:
    """`switcher:TARGET`: the switcher trained on TARGET in `context.switcher_dir`."""
    if not arg:
        raise UserError("router 'switcher' needs the target it was trained on: "
                        "'switcher:hard', 'switcher:soft' or 'switcher:ground_truth'")
    module, params, info = load(os.path.join(context.switcher_dir, arg, "switcher"))
    score = _score_functions(module)
    return Router(f"switcher:{arg}", score, params, learned=True,
                  fingerprint=info.get("fingerprint", ""),
                  trained_on=info.get("stamp", {}).get("inputs", {}).get("labels", ""))


def _score_functions(module: Switcher):
    def score(params, features, logits):
        return probability(module, params, features, logits)
    return score


def torch_score(router: Router):
    """The exported form (`dmd_jax.deploy`): the same MLP in PyTorch, with the trained
    parameters."""
    from dmd_jax.deploy import torch_ops
    return torch_ops.SwitcherScore(jax.device_get(router.params))
