"""Causal-LM training of a Qwen2 text model (the toy world's LLM before it is frozen; smoke runs).

A plain, fully trainable loop: AdamW with warm-up + cosine decay, gradient clipping, loss on
masked next-token targets. The frozen-LLM speech stages use ``fo_jax.training`` stage steps instead.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fo_jax.models.configs import LLMConfig
from fo_jax.models.qwen2 import Qwen2
from fo_jax.training import optim


def fit_vocab(llm: LLMConfig, tokenizer: Any) -> LLMConfig:
    """A random LLM's config grown to hold the tokenizer (vocab rounded up to 64), its eos = the
    tokenizer's."""
    vocab = -(-len(tokenizer) // 64) * 64
    return dataclasses.replace(llm, vocab_size=max(llm.vocab_size, vocab), eos_token_ids=(tokenizer.eos_token_id,))


def next_token_loss(params: dict, cfg: LLMConfig, tokens_bt: jax.Array, mask_bt: jax.Array,
                    embed_noise: float = 0.0, rng: jax.Array | None = None) -> jax.Array:
    """Mean cross-entropy of predicting token t+1 at t, over targets where ``mask_bt[:, t+1]`` is set.

    Args:
      tokens_bt: (B, T) int ids (right-padded).
      mask_bt: (B, T) float/bool, 1 on tokens that count as targets.
      embed_noise: > 0 adds Gaussian noise to every input embedding, its std this fraction of the
        embedding's RMS (needs ``rng``): the LLM learns to read inputs that only lie near a token's
        embedding, as the speech embeddings a frozen LLM is later given do.
    """
    model = Qwen2(cfg)
    x = model.apply({"params": params}, tokens_bt, method=Qwen2.embed)
    if embed_noise:
        rms = jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True))
        x = (x + embed_noise * rms * jax.random.normal(rng, x.shape)).astype(x.dtype)
    hidden, _ = model.apply({"params": params}, x)
    logits = model.apply({"params": params}, hidden, method=Qwen2.logits)[:, :-1]
    targets, weights = tokens_bt[:, 1:], mask_bt[:, 1:].astype(jnp.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def make_optimizer(lr: float, steps: int, warmup: int = 50) -> optax.GradientTransformation:
    """AdamW with warm-up + cosine decay for a short from-scratch LM run."""
    return optim.make_optimizer(optim.OptimizerConfig(lr=lr, schedule="cosine", warmup_steps=warmup,
                                                      total_steps=steps, b2=0.98, eps=1e-8, clip_norm=1.0))


@functools.partial(jax.jit, static_argnames=("cfg", "optimizer"), donate_argnames=("params", "opt_state"))
def train_step(params: dict, opt_state: optax.OptState, tokens_bt: jax.Array, mask_bt: jax.Array, *,
               cfg: LLMConfig, optimizer: optax.GradientTransformation):
    """One AdamW step. Returns (params, opt_state, loss)."""
    loss, grads = jax.value_and_grad(next_token_loss)(params, cfg, tokens_bt, mask_bt)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def batches(examples: list[tuple[list[int], list[int]]], batch_size: int, seq_len: int,
            seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Endless shuffled fixed-shape batches of (tokens, target mask) from (ids, mask) examples."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(examples))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            tokens = np.zeros((batch_size, seq_len), np.int32)
            mask = np.zeros((batch_size, seq_len), np.float32)
            for row, i in enumerate(order[start:start + batch_size]):
                ids, m = examples[i]
                n = min(len(ids), seq_len)
                tokens[row, :n], mask[row, :n] = ids[:n], m[:n]
            yield tokens, mask
