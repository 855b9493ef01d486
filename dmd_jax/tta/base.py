"""What every adaptation method shares: its result per batch, what it may ask the job for,
and the machinery of the gradient-based ones (state, optimiser, one jitted step)."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Protocol

import jax
import ml_collections
import numpy as np
import optax
from flax import serialization

from dmd_jax import parallel
from dmd_jax.tta.adaptable import Adaptable, Params


@dataclasses.dataclass
class BatchResult:
    """What a method did with one stream batch."""

    logits: np.ndarray  # (B, C): the predictions that are scored, made before any update
    learned_from: np.ndarray  # (B,) bool: the clips the adaptation used
    uploaded: np.ndarray  # (B,) bool: the clips that left the edge (CEMA only)
    loss: float = float("nan")  # of the update applied after this batch; nan: none
    updated: bool = False  # whether the model changed after this batch
    bytes_up: int = 0
    bytes_down: int = 0
    cloud_steps: int = 0
    self_resets: int = 0  # resets the method's own rule made (SAR)
    # CEMA: per upload filter, the (B,) mask of clips it turned down; None: no filters ran
    filter_failed: dict[str, np.ndarray] | None = None
    # Per-batch figures a method reports of itself (CEMA: E_max, buffer size, replay-only
    # steps); saved with the stream as `metric_<name>`.
    metrics: dict[str, float] | None = None


@dataclasses.dataclass(frozen=True)
class Context:
    """What the adapt job offers a method besides the edge model and its settings.

    `foundation()` loads the cloud's model (CEMA), `clean_batches(split, count)` yields
    uncorrupted uint8 batches on the mesh (EATA's Fisher information); both are loaded
    only when a method asks."""

    name: str  # the method's name in config.adapt.methods (e.g. 'cema_static_emax')
    mesh: Any
    seed: int
    batch_size: int
    foundation: Callable[[], Adaptable]
    clean_batches: Callable[[str, int], Iterator[jax.Array]]


class Method(Protocol):
    """The adaptation method protocol: a module `dmd_jax.tta.<name>` (or any dotted path)
    exporting `Method`, a class built as `Method(edge, cfg, context)` with `SETTINGS`, the
    keys of its config section (`config.adapt.<name>`)."""

    name: str
    SETTINGS: tuple[str, ...]

    def reset(self) -> None:
        """Back to the source model, with fresh optimiser and filter states."""

    def process(self, clips: jax.Array) -> BatchResult:
        """Predicts a batch of uint8 clips (sharded over the mesh), then adapts on it."""

    def state_dict(self) -> dict[str, Any]:
        """Everything `process` has changed since `reset`, as host values (numpy arrays,
        numbers, strings, nested dicts): what a stream resumed mid-way restores. A method
        without it still works; its streams restart from their first batch."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Back to the moment `state_dict` was taken."""


def nothing(batch_size: int) -> np.ndarray:
    return np.zeros(batch_size, bool)


class ForwardOnly:
    """A method that adapts nothing: its predictions come from one jitted forward pass of
    `variables(edge)` (an argument, not a constant) through `forward(edge, v, clips)`."""

    SETTINGS: tuple[str, ...] = ()

    def __init__(self, edge: Adaptable, cfg: ml_collections.ConfigDict, context: Context):
        del cfg
        self.name = context.name
        batch = parallel.batch_sharded(context.mesh)
        self._variables = parallel.put_replicated(self.variables(edge), context.mesh)
        self._forward = jax.jit(lambda v, clips: self.forward(edge, v, clips),
                                in_shardings=(parallel.replicated(context.mesh), batch),
                                out_shardings=batch)

    def variables(self, edge: Adaptable) -> Any:
        raise NotImplementedError

    def forward(self, edge: Adaptable, variables: Any, clips: jax.Array) -> jax.Array:
        raise NotImplementedError

    def reset(self) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state

    def process(self, clips: jax.Array) -> BatchResult:
        logits = parallel.fetch(self._forward(self._variables, clips))
        return BatchResult(logits, nothing(len(logits)), nothing(len(logits)))


class GradientTTA:
    """Shared machinery of the gradient-based methods: state, SGD, one jitted step.

    Subclasses define `step(state, const, clips) -> (state, logits, aux)`, where `const`
    holds the frozen model (`model`), the source parameters (`source`) and whatever
    `extra_constants()` adds, and `aux` holds `loss` and `learned_from` (and `reset`
    where the method resets itself); and `extra_state()` for their own state. Their
    settings include `learning_rate` and `momentum`.
    """

    SETTINGS: tuple[str, ...] = ("learning_rate", "momentum")

    def __init__(self, edge: Adaptable, cfg: ml_collections.ConfigDict, context: Context):
        self.name, self.model, self.cfg, self._mesh = context.name, edge, cfg, context.mesh
        self.optimizer = self.make_optimizer()
        self.const = parallel.put_replicated(
            {"model": edge.constants(), "source": self.source_params(),
             **self.extra_constants()}, self._mesh)
        replicated, batch = parallel.replicated(self._mesh), parallel.batch_sharded(self._mesh)
        self._step = jax.jit(self.step, donate_argnums=0,
                             in_shardings=(replicated, replicated, batch),
                             out_shardings=(replicated, batch, replicated))
        self.reset()

    def make_optimizer(self) -> optax.GradientTransformation:
        return optax.sgd(self.cfg.learning_rate, momentum=self.cfg.momentum)

    def source_params(self) -> Params:
        """The parameters that adapt, as before any adaptation (the norm layers' scale and
        bias; a method adapting more overrides it)."""
        return self.model.source_norm_affine

    def initial_state(self, source: Params) -> dict[str, Any]:
        return {"params": source, "opt": self.optimizer.init(source), **self.extra_state()}

    def extra_state(self) -> dict[str, Any]:
        return {}

    def extra_constants(self) -> dict[str, Any]:
        return {}

    def reset(self) -> None:
        self.state = parallel.put_replicated(self.initial_state(self.source_params()), self._mesh)

    def state_dict(self) -> dict[str, Any]:
        return {"state": parallel.fetch(self.state)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = parallel.put_replicated(like(self.state, state["state"]), self._mesh)

    def process(self, clips: jax.Array) -> BatchResult:
        self.state, logits, aux = self._step(self.state, self.const, clips)
        logits, aux = parallel.fetch((logits, aux))  # learned_from is batch-sharded
        learned_from = np.asarray(aux["learned_from"], bool)
        return BatchResult(logits, learned_from, nothing(len(logits)),
                           loss=float(aux["loss"]) if learned_from.any() else float("nan"),
                           updated=bool(learned_from.any()),
                           self_resets=int(aux.get("reset", 0)))

    def step(self, state, const, clips):
        raise NotImplementedError

    def logits(self, params: Params, const: dict[str, Any], clips: jax.Array) -> jax.Array:
        return self.model.logits(params, const["model"], clips)

    def sgd(self, state: dict[str, Any], grads: Params) -> dict[str, Any]:
        updates, opt = self.optimizer.update(grads, state["opt"], state["params"])
        return {**state, "params": optax.apply_updates(state["params"], updates), "opt": opt}


def like(template: Any, values: Any) -> Any:
    """`values` (restored from a file: nested dicts, arrays) in `template`'s tree
    structure (optax states are named tuples), each leaf with the template's dtype."""
    dtype = lambda t: t.dtype if hasattr(t, "dtype") else np.asarray(t).dtype
    return jax.tree.map(lambda t, v: np.asarray(v, dtype=dtype(t)),
                        template, serialization.from_state_dict(template, values))
