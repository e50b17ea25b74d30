"""CTC head over the speech encoder (speech-input stage 1): Linear to the CTC vocabulary, CTC loss,
greedy decoding. Blank id 0 (WeNet convention, which the official encoder code derives from)."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fo_jax.models.configs import EncoderConfig, to_dtype
from fo_jax.layers.linear import TorchLinear as Linear


class CTCHead(nn.Module):
    """Linear(D -> V) named ``ctc_lo`` (WeNet ``ctc.ctc_lo``; kernel (V, D)); logits in float32."""

    vocab_size: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, enc_btd: jax.Array) -> jax.Array:
        """(B, T, D) encoder frames -> (B, T, V) float32 logits."""
        return Linear(self.vocab_size, names=("vocab", "embed"), dtype=self.dtype, param_dtype=self.param_dtype,
                      name="ctc_lo")(enc_btd)


def _head(config: EncoderConfig) -> CTCHead:
    return CTCHead(config.ctc_vocab_size, to_dtype(config.dtype), to_dtype(config.param_dtype))


def init_ctc_params(config: EncoderConfig, rng: jax.Array) -> dict:
    """Random CTC-head params (boxed with logical names)."""
    return _head(config).init(rng, jnp.zeros((1, 1, config.hidden_size)))["params"]


def ctc_logits(params: dict, config: EncoderConfig, enc_btd: jax.Array) -> jax.Array:
    """(B, T, D) -> (B, T, V) float32."""
    return _head(config).apply({"params": params}, enc_btd)


def _paddings(lengths_b: jax.Array, size: int) -> jax.Array:
    return (jnp.arange(size)[None, :] >= lengths_b[:, None]).astype(jnp.float32)


def ctc_loss(logits_btv: jax.Array, lengths_b: jax.Array, labels_bn: jax.Array, label_lengths_b: jax.Array,
             blank_id: int = 0, reduction: str = "mean_batch") -> jax.Array:
    """CTC negative log-likelihood (optax) with padding masks on frames and labels.

    Args:
      logits_btv: (B, T, V) unnormalised logits; lengths_b: (B,) valid frames.
      labels_bn: (B, N) int label ids (padding values are ignored); label_lengths_b: (B,).
      reduction: "none" -> (B,) per-utterance losses; "mean_batch" -> sum / B (WeNet's CTC loss);
        "mean_token" -> sum / total label tokens.
    """
    per_seq = optax.ctc_loss(logits_btv.astype(jnp.float32), _paddings(lengths_b, logits_btv.shape[1]),
                             labels_bn.astype(jnp.int32), _paddings(label_lengths_b, labels_bn.shape[1]),
                             blank_id=blank_id)
    if reduction == "none":
        return per_seq
    if reduction == "mean_batch":
        return per_seq.sum() / per_seq.shape[0]
    if reduction == "mean_token":
        return per_seq.sum() / jnp.maximum(label_lengths_b.sum(), 1)
    raise ValueError(f"unknown reduction {reduction!r}; expected none, mean_batch or mean_token")


def ctc_min_frames(label_ids: Sequence[int]) -> int:
    """Fewest frames a CTC path of ``label_ids`` needs: one per label, plus a blank between
    repeated labels. Shorter inputs have no path (the loss is infinite)."""
    return len(label_ids) + sum(a == b for a, b in zip(label_ids, label_ids[1:]))


def ctc_greedy_decode(logits_btv: jax.Array, lengths_b: jax.Array, blank_id: int = 0
                      ) -> tuple[jax.Array, jax.Array]:
    """Best path: argmax per frame, collapse repeats, drop blanks. Fixed shapes (jit-friendly).

    Returns:
      tokens_bt: (B, T) int32, each row's tokens first, then -1; lengths_b: (B,) int32.
    """
    b, t, _ = logits_btv.shape
    ids = jnp.argmax(logits_btv, axis=-1).astype(jnp.int32)
    valid = jnp.arange(t)[None, :] < lengths_b[:, None]
    prev = jnp.concatenate([jnp.full((b, 1), -1, jnp.int32), ids[:, :-1]], axis=1)
    keep = valid & (ids != blank_id) & (ids != prev)
    slot = jnp.where(keep, jnp.cumsum(keep, axis=1) - 1, t)  # t: dropped by the scatter below
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
    tokens = jnp.full((b, t), -1, jnp.int32).at[rows, slot].set(ids, mode="drop")
    return tokens, keep.sum(axis=1).astype(jnp.int32)
