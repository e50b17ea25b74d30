"""Training stages: each says how to build its params, its loss and its data.

``STAGES`` maps a run config's ``stage.name`` to a builder ``(config) -> Stage``. Importing is lazy
so that a stage's heavy dependencies load only when it runs.
"""

from __future__ import annotations

import importlib
from typing import Any, Iterator, Protocol

import jax
import ml_collections

from fo_jax.errors import ConfigError

# stage name -> "module:builder"
STAGES = {
    "text_lm": "fo_jax.training.stages.text_lm:build",
    "speech_in_ctc": "fo_jax.training.stages.speech_in_ctc:build",
    "speech_in_llm": "fo_jax.training.stages.speech_in_llm:build",
    "speech_in_dialogue": "fo_jax.training.stages.speech_in_dialogue:build",
    "codec": "fo_jax.training.stages.codec:build",
    "speech_decoder": "fo_jax.training.stages.speech_decoder:build",
    "speech_prefix": "fo_jax.training.stages.speech_decoder:build_prefix",
}


class Stage(Protocol):
    """What the trainer needs from a stage.

    Optional: ``make_step(optimizer_config) -> fo_jax.training.step.StageStep`` replaces the generic
    one-optimizer step on ``loss`` (the codec GAN stage: two optimizers, alternating updates);
    ``meta`` (a JSON-able dict the trainer adds to each checkpoint's meta, e.g. frozen but
    data-derived CMVN statistics; set by ``load_params``); ``example_batch()`` (this process's
    batch as ``jax.ShapeDtypeStruct``s, so ``--compile-only`` needs no data or weights).
    """

    trainable: tuple[str, ...]  # path regexes of the params that train; the rest is frozen

    def init_boxed(self, rng: jax.Array) -> dict:
        """Params with logical axis names (``nn.LogicallyPartitioned``); traced by ``eval_shape``."""

    def load_params(self, rng: jax.Array) -> dict:
        """The starting params (random and/or loaded from pretrained sources), plain arrays."""

    def loss(self, params: dict, batch: dict, rng: jax.Array) -> tuple[jax.Array, dict]:
        """Scalar loss and metrics on one global batch."""

    def dataset(self, seed: int) -> Iterator[dict]:
        """This process's batches; the iterator has ``get_state()`` / ``set_state()``."""


def build_stage(cfg: ml_collections.ConfigDict) -> Any:
    name = cfg.stage.name
    if name not in STAGES:
        raise ConfigError(f"unknown stage {name!r}; expected one of {sorted(STAGES)}")
    module, _, fn = STAGES[name].partition(":")
    return getattr(importlib.import_module(module), fn)(cfg)
