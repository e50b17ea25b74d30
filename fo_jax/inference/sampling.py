"""Token sampling in pure JAX: repetition penalty, temperature, top-k, top-p.

Order follows the official Freeze-Omni sampler: penalty, temperature, top-k, top-p, then a
categorical draw. ``top_k == 1`` or ``temperature == 0`` is greedy (argmax).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Static sampling settings (hashable: a static argument of jitted steps).

    Attributes:
      temperature: divides the logits; 0 means greedy.
      top_k: keep the k most likely tokens; 0 keeps all, 1 is greedy.
      top_p: keep the smallest prefix of the sorted distribution with mass >= top_p (1.0: off).
      repetition_penalty: HF-style penalty (>1 discourages) on tokens already seen (1.0: off).
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1 or self.repetition_penalty <= 0:
            raise ValueError(f"invalid sampling settings: {self}")

    @property
    def greedy(self) -> bool:
        return self.top_k == 1 or self.temperature == 0


def apply_repetition_penalty(logits_bv: jax.Array, seen_bv: jax.Array, penalty: float) -> jax.Array:
    """Divides positive / multiplies negative logits of seen tokens by ``penalty`` (HF convention)."""
    penalised = jnp.where(logits_bv > 0, logits_bv / penalty, logits_bv * penalty)
    return jnp.where(seen_bv, penalised, logits_bv)


def sample(logits_bv: jax.Array, rng: jax.Array, cfg: SamplingConfig,
           seen_bv: jax.Array | None = None) -> jax.Array:
    """Draws one token per row.

    Args:
      logits_bv: (B, V) float logits.
      rng: PRNG key.
      cfg: sampling settings.
      seen_bv: (B, V) bool, tokens the repetition penalty applies to (prompt + generated).
    Returns:
      (B,) int32 token ids.
    """
    logits = logits_bv.astype(jnp.float32)
    if cfg.repetition_penalty != 1.0 and seen_bv is not None:
        logits = apply_repetition_penalty(logits, seen_bv, cfg.repetition_penalty)
    if cfg.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / cfg.temperature
    if cfg.top_k:
        vals, idx = jax.lax.top_k(logits, min(cfg.top_k, logits.shape[-1]))
    else:
        idx = jnp.argsort(-logits, axis=-1)
        vals = jnp.take_along_axis(logits, idx, axis=-1)
    if cfg.top_p < 1.0:
        probs = jax.nn.softmax(vals, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # keeps the token that crosses top_p
        vals = jnp.where(mass_before < cfg.top_p, vals, -jnp.inf)
    choice = jax.random.categorical(rng, vals, axis=-1)
    return jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
