"""The modern step (jit over a mesh) computes what the classic pmap data-parallel step does.

The reference is written the way pmap code always was: parameters replicated per
device, each device runs its shard, gradients and BatchNorm statistics are averaged
with `pmean` over the named axis.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from conftest import tiny_config
from dmd_jax import models, parallel
from dmd_jax.data import pipeline
from dmd_jax.jobs import train


def _pmap_step(state, batch, *, model, tx):
    x = pipeline.normalize(batch["video"])

    def loss_fn(params):
        (logits, _), updates = model.apply(
            {"params": params, "batch_stats": state.batch_stats}, x, train=True,
            mutable=["batch_stats"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        return loss, updates

    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grads = jax.lax.pmean(grads, "batch")
    deltas, opt_state = tx.update(grads, state.opt_state, state.params)
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, deltas),
                         batch_stats=updates["batch_stats"], opt_state=opt_state), \
        jax.lax.pmean(loss, "batch")


def test_one_step_equals_pmap_reference(data_dir, devices):
    config = tiny_config(data_dir, **{"model.dropout_rate": 0.0, "train.batch_size": 16})
    split = pipeline.Split(pipeline.make_builder(config.data), "train", 8, 32)
    batch = split.rows(pipeline.train_indices(len(split), 16, 0, 0, slice(None)))
    # The tiny config's runtime (lax depthwise convolutions): half the compile time.
    model = models.build(config.model, split.num_classes, config.runtime)
    tx = train.make_optimizer(config.train)
    state = train.init_state(model, tx, (8, 32, 32, 3), 0)
    state = jax.tree.map(lambda x: x + 0.0, state)  # a copy: the jit step donates nothing here

    mesh = parallel.make_mesh(8)
    jit_step = jax.jit(functools.partial(train.train_step, model=model, tx=tx,
                                         label_smoothing=0.0, seed=0),
                       in_shardings=(parallel.replicated(mesh), parallel.batch_sharded(mesh)))
    new_jit, metrics = jit_step(state, parallel.to_global(batch, mesh))

    synced_model = model.clone(axis_name="batch")  # BatchNorm statistics over all devices
    pmapped = jax.pmap(functools.partial(_pmap_step, model=synced_model, tx=tx),
                       axis_name="batch", devices=devices)
    replicate = lambda tree: jax.tree.map(lambda x: jnp.stack([x] * 8), tree)
    shard = lambda tree: jax.tree.map(lambda x: x.reshape(8, -1, *x.shape[1:]), tree)
    new_pmap, loss = pmapped(replicate(state), shard({"video": batch["video"],
                                                      "label": batch["label"]}))

    np.testing.assert_allclose(float(metrics.compute()["loss"]), float(loss[0]), rtol=1e-5)
    first = jax.tree.map(lambda x: np.asarray(x[0]), new_pmap)
    for name in ("params", "batch_stats"):
        flat_jit = jax.tree_util.tree_leaves_with_path(getattr(new_jit, name))
        flat_pmap = dict(jax.tree_util.tree_leaves_with_path(getattr(first, name)))
        for path, leaf in flat_jit:
            np.testing.assert_allclose(np.asarray(leaf), flat_pmap[path], rtol=2e-5, atol=1e-6,
                                       err_msg=f"{name}{jax.tree_util.keystr(path)}")
