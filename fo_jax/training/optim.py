"""Optimizers and learning-rate schedules for every stage (AdamW + warm-up + decay + clipping)."""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

from fo_jax.errors import ConfigError
from fo_jax.models.configs import dataclass_from_dict


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW settings. Defaults: the released speech-in stage-3 run (lr 6e-4, betas 0.9/0.99,
    eps 1e-6, weight decay 0.01, warm-up 200, clip 5).

    schedule: 'warmuplr' (ESPnet/WeNet inverse-sqrt after linear warm-up, peak ``lr`` at
    ``warmup_steps``), 'cosine' (linear warm-up, cosine decay to ``end_lr_ratio * lr`` at
    ``total_steps``), 'constant' (linear warm-up, then flat) or 'exponential' (HiFi-GAN's per-epoch
    ExponentialLR: ``lr * decay_rate ** (step // decay_steps)``, no warm-up).
    ``clip_norm`` <= 0 disables gradient clipping (HiFi-GAN does not clip).
    ``lr_scales``: (regex, factor) pairs; a param whose path (``encoder/layers_0/...``) matches a
    regex (re.search, first match wins) steps with ``factor`` times the learning rate (and weight
    decay), e.g. a new adapter at full rate beside a pretrained encoder at half; a regex that matches
    no param changes nothing. Not in the release.
    """

    lr: float = 6e-4
    schedule: str = "warmuplr"
    warmup_steps: int = 200
    total_steps: int = 10_000
    end_lr_ratio: float = 0.05
    b1: float = 0.9
    b2: float = 0.99
    eps: float = 1e-6
    weight_decay: float = 0.01
    clip_norm: float = 5.0
    decay_rate: float = 1.0  # 'exponential' only
    decay_steps: int = 1000  # 'exponential' only: steps per decay (one epoch)
    lr_scales: tuple[tuple[str, float], ...] = ()

    def __post_init__(self):
        try:  # hashable pairs whatever the config gave (lists from JSON / ConfigDict)
            scales = tuple((str(p), float(f)) for p, f in self.lr_scales)
            for pattern, _ in scales:
                re.compile(pattern)
        except (TypeError, ValueError, re.error) as e:
            raise ConfigError(f"optimizer.lr_scales: expected (regex, factor) pairs, got {self.lr_scales!r} ({e})")
        object.__setattr__(self, "lr_scales", scales)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "OptimizerConfig":
        return dataclass_from_dict(cls, values)


def learning_rate(cfg: OptimizerConfig) -> optax.Schedule:
    warmup = max(cfg.warmup_steps, 1)
    if cfg.schedule == "warmuplr":
        def schedule(step):
            step = jnp.asarray(step, jnp.float32) + 1.0
            return cfg.lr * jnp.minimum(step / warmup, jnp.sqrt(warmup / step))
        return schedule
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, min(warmup, max(cfg.total_steps - 1, 1)),
                                                  max(cfg.total_steps, 2), end_value=cfg.lr * cfg.end_lr_ratio)
    if cfg.schedule == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), optax.constant_schedule(cfg.lr)],
                                    [warmup])
    if cfg.schedule == "exponential":
        if cfg.decay_steps < 1:
            raise ConfigError(f"exponential schedule: decay_steps must be >= 1, got {cfg.decay_steps}")
        return optax.exponential_decay(cfg.lr, cfg.decay_steps, cfg.decay_rate, staircase=True)
    raise ConfigError(f"unknown schedule {cfg.schedule!r}; expected warmuplr, cosine, constant or exponential")


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """Gradient clipping by global norm (unless ``clip_norm`` <= 0), then AdamW on the given schedule,
    then the per-param ``lr_scales`` (if any)."""
    parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
    parts.append(optax.adamw(learning_rate(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay))
    if cfg.lr_scales:
        parts.append(scale_by_path(cfg.lr_scales))
    return parts[0] if len(parts) == 1 else optax.chain(*parts)


def scale_by_path(scales: tuple[tuple[str, float], ...]) -> optax.GradientTransformation:
    """Multiplies each leaf's update by the factor of the first regex of ``scales`` that its path
    matches (static Python floats: no state; a regex that matches no leaf changes nothing)."""
    compiled = [(re.compile(p), f) for p, f in scales]

    def factor(path, _):
        name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
        return next((f for p, f in compiled if p.search(name)), 1.0)

    def update(updates, state, params=None):
        del params
        factors = jax.tree_util.tree_map_with_path(factor, updates)
        return jax.tree.map(lambda u, f: u if f == 1.0 else u * f, updates, factors), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)
