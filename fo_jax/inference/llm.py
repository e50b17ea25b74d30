"""Text generation with the Qwen2 LLM alone: jitted prefill / decode steps over a donated cache.

These are the small fixed-shape step functions streaming code is built from: ``prefill`` appends a
right-padded block to the cache, ``decode_step`` appends one token, ``sample_step`` fuses a decode
step with sampling. Prompt and cache lengths are rounded up to buckets so that new prompts reuse
compiled steps; ``decode_step`` / ``sample_step`` compile once per (batch, cache length).
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from fo_jax.inference.sampling import SamplingConfig, sample
from fo_jax.layers.kv_cache import KVCache
from fo_jax.models.configs import LLMConfig, to_dtype
from fo_jax.models.qwen2 import Qwen2

PROMPT_BUCKET = 32
CACHE_BUCKET = 128


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def init_cache(cfg: LLMConfig, batch: int, max_len: int) -> KVCache:
    """An empty ``KVCache`` in the compute dtype."""
    return KVCache.zeros(cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim, to_dtype(cfg.dtype))


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def prefill(params: dict, tokens_bt: jax.Array, lengths_b: jax.Array, cache: KVCache, *,
            cfg: LLMConfig) -> tuple[jax.Array, jax.Array, KVCache]:
    """Appends a right-padded block of tokens to the cache.

    Args:
      params: Qwen2 params.
      tokens_bt: (B, T) token ids, row b valid up to ``lengths_b[b]``.
      lengths_b: (B,) int32, >= 1.
      cache: KVCache with room for T more entries per row (donated).
    Returns:
      logits_bv: (B, V) float32 logits at each row's last valid position.
      hidden_btd: (B, T, D) final-norm hidden states.
      cache: the updated cache.
    """
    model = Qwen2(cfg)
    x = model.apply({"params": params}, tokens_bt, method=Qwen2.embed)
    hidden, cache = model.apply({"params": params}, x, lengths_b, cache)
    last = jnp.take_along_axis(hidden, (lengths_b - 1)[:, None, None], axis=1)[:, 0]
    return model.apply({"params": params}, last, method=Qwen2.logits), hidden, cache


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def decode_step(params: dict, tokens_b: jax.Array, cache: KVCache, *,
                cfg: LLMConfig) -> tuple[jax.Array, jax.Array, KVCache]:
    """Appends one token per row. (B,) ids -> logits (B, V) float32, hidden (B, D), cache."""
    logits, hidden, cache = _decode(params, tokens_b, cache, cfg)
    return logits, hidden, cache


def _decode(params, tokens_b, cache, cfg):
    model = Qwen2(cfg)
    x = model.apply({"params": params}, tokens_b[:, None], method=Qwen2.embed)
    hidden, cache = model.apply({"params": params}, x, None, cache)
    return model.apply({"params": params}, hidden[:, 0], method=Qwen2.logits), hidden[:, 0], cache


@flax.struct.dataclass
class DecodeState:
    """Everything one generation step carries.

    Attributes:
      cache: the LLM KV cache.
      token: (B,) int32, the last sampled token (next input).
      seen: (B, V) bool, tokens the repetition penalty applies to.
      done: (B,) bool, rows that produced an end token.
      rng: PRNG key.
    """

    cache: KVCache
    token: jax.Array
    seen: jax.Array
    done: jax.Array
    rng: jax.Array


@functools.partial(jax.jit, static_argnames=("cfg", "sampling"), donate_argnames=("state",))
def sample_step(params: dict, state: DecodeState, eos_ids: jax.Array, *, cfg: LLMConfig,
                sampling: SamplingConfig) -> tuple[DecodeState, jax.Array]:
    """Feeds ``state.token``, samples the next one. Returns (new state, (B, D) hidden of the fed token)."""
    logits, hidden, cache = _decode(params, state.token, state.cache, cfg)
    rng, key = jax.random.split(state.rng)
    token = sample(logits, key, sampling, state.seen)
    token = jnp.where(state.done, state.token, token)
    seen = state.seen.at[jnp.arange(token.shape[0]), token].set(True)
    done = state.done | jnp.isin(token, eos_ids)
    return DecodeState(cache, token, seen, done, rng), hidden


@functools.partial(jax.jit, static_argnames=("sampling",))
def _first_token(logits_bv, prompt_bt, lengths_b, eos_ids, rng, sampling):
    b, t = prompt_bt.shape
    valid = jnp.arange(t)[None, :] < lengths_b[:, None]
    seen = jnp.zeros(logits_bv.shape, bool).at[jnp.arange(b)[:, None], prompt_bt].max(valid)
    rng, key = jax.random.split(rng)
    token = sample(logits_bv, key, sampling, seen)
    seen = seen.at[jnp.arange(b), token].set(True)
    return token, seen, jnp.isin(token, eos_ids), rng


def generate(params: dict, cfg: LLMConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             sampling: SamplingConfig = SamplingConfig(top_k=1), seed: int = 0,
             eos_ids: Sequence[int] | None = None) -> list[list[int]]:
    """Generates up to ``max_new_tokens`` per prompt; each row stops after its first end token.

    Args:
      params: Qwen2 params (device arrays or numpy).
      cfg: the LLM config (``cfg.eos_token_ids`` unless ``eos_ids`` is given).
      prompts: B lists of token ids (non-empty).
      max_new_tokens: generation budget per row.
      sampling: sampler settings (default greedy).
      seed: PRNG seed.
    Returns:
      B lists of generated ids; the end token, when produced, is the last id of its row.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 1:
        return [[] for _ in prompts]
    lengths = np.array([len(p) for p in prompts], np.int32)
    t = round_up(int(lengths.max()), PROMPT_BUCKET)
    if t + max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(f"prompt ({lengths.max()}) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"max_position_embeddings ({cfg.max_position_embeddings})")
    tokens = np.zeros((len(prompts), t), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    eos = jnp.asarray(list(cfg.eos_token_ids if eos_ids is None else eos_ids) or [-1], jnp.int32)
    cache = init_cache(cfg, len(prompts), round_up(t + max_new_tokens, CACHE_BUCKET))
    logits, _, cache = prefill(params, jnp.asarray(tokens), jnp.asarray(lengths), cache, cfg=cfg)
    token, seen, done, rng = _first_token(logits, jnp.asarray(tokens), jnp.asarray(lengths), eos,
                                          jax.random.key(seed), sampling)
    state = DecodeState(cache, token, seen, done, rng)
    out = [np.asarray(token)]
    for _ in range(max_new_tokens - 1):
        if bool(np.all(np.asarray(state.done))):
            break
        state, _ = sample_step(params, state, eos, cfg=cfg, sampling=sampling)
        out.append(np.asarray(state.token))
    steps = np.stack(out, axis=1)
    eos_set = set(np.asarray(eos).tolist())
    result = []
    for row in steps.tolist():
        ends = [i for i, tok in enumerate(row) if tok in eos_set]
        result.append(row[: ends[0] + 1] if ends else row)
    return result
