"""The generic train step of a stage: gradients and optimizer updates for the trainable tree only.

``loss_fn(params, batch, rng) -> (loss, metrics)`` sees the merged tree; the frozen part enters it
under ``jax.lax.stop_gradient`` (no weight gradients are formed for it), while activations still
carry gradients *through* frozen layers to upstream trainables (speech-in stages 2 and 3).
The trainable tree and optimizer state are donated; the frozen tree never is.

A stage whose update is not "one loss, one optimizer" (the codec GAN: two optimizers, alternating
discriminator and generator updates, running statistics) provides ``make_step(optimizer_config) ->
StageStep`` instead, with the same contract; the trainer checkpoints whatever ``opt_state`` it keeps.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable

import jax
import optax
from jax.sharding import Mesh

from fo_jax import sharding
from fo_jax.training.freeze import merge

LossFn = Callable[[dict, Any, jax.Array], tuple[jax.Array, dict]]


@dataclasses.dataclass(frozen=True)
class StageStep:
    """How a stage updates its trainable tree.

    Attributes:
      init: ``trainable -> opt_state`` (any pytree: one optimizer's state, or several).
      step: jitted ``(trainable, opt_state, frozen, batch, rng) -> (trainable, opt_state, metrics)``
        that donates the first two arguments; ``metrics`` holds at least ``loss``.
    """

    init: Callable[[dict], Any]
    step: Callable[..., tuple[dict, Any, dict]]


def frozen_objective(loss_fn: LossFn, mesh: Mesh | None = None) -> Callable[..., tuple[jax.Array, dict]]:
    """``(trainable, frozen, batch, rng) -> (loss, metrics)``: what the step differentiates with
    respect to ``trainable``. The frozen tree enters under ``stop_gradient``, so even a gradient
    taken with respect to it is zero; with a ``mesh``, traced under its activation rules."""

    def objective(trainable, frozen, batch, rng):
        with contextlib.nullcontext() if mesh is None else sharding.activation_rules(mesh):
            return loss_fn(merge(trainable, jax.tree.map(jax.lax.stop_gradient, frozen)), batch, rng)

    return objective


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation,
                    in_shardings: Any = None, out_shardings: Any = None, mesh: Mesh | None = None):
    """Returns jitted ``step(trainable, opt_state, frozen, batch, rng) -> (trainable, opt_state, metrics)``.

    With a ``mesh``, the loss is traced under the sharding rules (``sharding.activation_rules``):
    the models' activation constraints apply.

    ``metrics`` holds the loss_fn's metrics plus ``loss`` and ``grad_norm`` (before clipping).
    Shardings, when given, are passed to ``jax.jit`` for the five inputs / three outputs.
    """

    objective = frozen_objective(loss_fn, mesh)

    def step(trainable, opt_state, frozen, batch, rng):
        (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(trainable, frozen, batch, rng)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        return trainable, opt_state, dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))

    kwargs = {}
    if in_shardings is not None:
        kwargs["in_shardings"] = in_shardings
    if out_shardings is not None:
        kwargs["out_shardings"] = out_shardings
    return jax.jit(step, donate_argnums=(0, 1), **kwargs)
