"""Speech-decoder inference: prefill a text segment, then sample codec tokens one at a time.

``prefill`` writes the prefix K/V (LLM hidden states) and the context block
[context-start, pre-network(text embeddings)] into a fixed-size cache; ``decode_step`` feeds one
token, applies the release's repetition-penalty window and top-k sampling, and returns the next
token. Text and prefix lengths are rounded up to ``frame_bucket`` sizes (each on its own, at most
1.5x) and the cache to ``CACHE_BUCKET``, so new segments reuse compiled steps; ``decode_step``
compiles once per (batch, cache length).

Every AR step attends over the whole fixed-size cache, so the cache starts with room for
``FIRST_TOKENS`` tokens and ``generate`` grows it by ``CACHE_BUCKET`` slots when full, instead of
allocating the release's 1000-token budget up front (most segments need a few hundred tokens).

Streaming (``fo_jax.inference.pipeline``) passes ``SegmentShapes`` instead: a small, fixed set of
programs (power-of-two frame buckets, two cache sizes) that a warm-up compiles once, so no segment
ever compiles a new program.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from fo_jax.inference.sampling import SamplingConfig, sample
from fo_jax.layers.kv_cache import KVCache
from fo_jax.models.configs import SpeechDecoderConfig, to_dtype
from fo_jax.models.speech_decoder import SpeechDecoder, decoder_mask, to_frames

CACHE_BUCKET = 128
FIRST_TOKENS = 128  # AR tokens the first cache of a segment has room for (then it grows)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def frame_bucket(n: int) -> int:
    """The smallest of 16, 24, 32, 48, 64, 96, 128, ... (x1.5 / x1.33 steps) that is >= n."""
    size = 16
    while size < n:
        size = size * 3 // 2 if size & (size - 1) == 0 else size * 4 // 3
    return size


@dataclasses.dataclass(frozen=True)
class SegmentShapes:
    """A bounded set of shapes for segments of at most ``max_frames`` text / prefix frames.

    Text and prefix frames are padded to powers of two from 16 up to ``top`` (``max_frames``
    rounded up; longer inputs are cut there). Every segment prefills into a ``first_len``-slot
    cache with room for ``FIRST_TOKENS`` AR tokens after the largest buckets, and grows once to
    ``full_len`` (room for ``max_tokens``) when it needs more. Programs: one ``write_prefix`` and
    one ``write_context`` per bucket, ``decode_step`` at both cache sizes, one ``grow``.
    """

    max_frames: int
    max_tokens: int

    def __post_init__(self):
        if self.max_frames < 1 or self.max_tokens < 1:
            raise ValueError(f"invalid segment shapes: {self}")

    @property
    def top(self) -> int:
        return max(16, 1 << (self.max_frames - 1).bit_length())

    @property
    def buckets(self) -> tuple[int, ...]:
        sizes, n = [], 16
        while n <= self.top:
            sizes.append(n)
            n *= 2
        return tuple(sizes)

    def bucket(self, n: int) -> int:
        """The smallest bucket >= n (``top`` for larger n, which is then cut)."""
        return next((b for b in self.buckets if b >= n), self.top)

    @property
    def first_len(self) -> int:
        return round_up(2 * self.top + 1 + min(self.max_tokens, FIRST_TOKENS), CACHE_BUCKET)

    @property
    def full_len(self) -> int:
        return max(self.first_len, round_up(2 * self.top + 1 + self.max_tokens, CACHE_BUCKET))


@dataclasses.dataclass(frozen=True)
class TokenSampling:
    """Sampler of the release (static jit argument).

    Attributes:
      top_k: sample among the k most likely ids (softmax renormalised over them); 1 is greedy.
      penalty_window: logits of the ids among the last ``penalty_window`` tokens (sequence-start
        included) are divided by ``penalty``, once per occurrence; <= 0 disables it.
      penalty: the divisor.
    """

    top_k: int = 2
    penalty_window: int = -1
    penalty: float = 1.1

    def __post_init__(self):
        if self.top_k < 1 or self.penalty <= 0:
            raise ValueError(f"invalid sampling settings: {self}")

    @classmethod
    def from_config(cls, cfg: SpeechDecoderConfig) -> "TokenSampling":
        return cls(cfg.top_k, cfg.penalty_window, cfg.penalty)


@flax.struct.dataclass
class DecoderState:
    """What one AR step carries (all rows of a batch decode in lockstep).

    Attributes:
      cache: KVCache holding prefix, context and fed tokens.
      prefix_lens: (B,) int32 cache slots held by the prefix (AR positions = lengths - prefix_lens).
      token: (B,) int32 next token to feed (sequence-start first, then the last sampled one).
      window: (B, W) int32 ring buffer of the last W tokens (-1: empty) for the repetition penalty.
      count: () int32 tokens appended to the window so far.
      done: (B,) bool rows that produced the end token.
      rng: PRNG key.
    """

    cache: KVCache
    prefix_lens: jax.Array
    token: jax.Array
    window: jax.Array
    count: jax.Array
    done: jax.Array
    rng: jax.Array


def init_cache(cfg: SpeechDecoderConfig, batch: int, max_len: int) -> KVCache:
    """An empty ``KVCache`` in the compute dtype."""
    return KVCache.zeros(cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim, to_dtype(cfg.dtype))


@functools.partial(jax.jit, static_argnames=("cfg", "max_len"))
def write_prefix(params: dict, prefix_bpd: jax.Array, prefix_lens_b: jax.Array, *, cfg: SpeechDecoderConfig,
                 max_len: int) -> KVCache:
    """A new ``max_len``-slot cache holding the prefix stack's K/V of (B, P, D) hidden-state frames.

    Frames at or past ``prefix_lens_b`` are ignored; without a prefix stack (``cfg.use_prefix``
    false) the cache is empty. Allocating inside the step saves separate dispatches.
    """
    cache = init_cache(cfg, prefix_bpd.shape[0], max_len)
    if not cfg.use_prefix:
        return cache
    return SpeechDecoder(cfg).apply({"params": params}, prefix_bpd, prefix_lens_b, cache,
                                    method=SpeechDecoder.write_prefix)


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def write_context(params: dict, text_bnd: jax.Array, text_lens_b: jax.Array, cache: KVCache, *,
                  cfg: SpeechDecoderConfig) -> KVCache:
    """Appends [context-start, pre-network(text)] through the shared stack; cache.lengths = the prefix lengths.

    Context rows attend to the prefix slots and, bidirectionally, to the valid context.
    """
    model = SpeechDecoder(cfg)
    variables = {"params": params}
    ctx, ctx_lens = model.apply(variables, text_bnd, text_lens_b, method=SpeechDecoder.context)
    b, t, _ = ctx.shape
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    mask = decoder_mask(ctx_lens, jnp.zeros_like(ctx_lens), t, 0, cache.lengths, cache.max_len)
    _, cache = model.apply(variables, ctx, positions, mask, cache, ctx_lens, method=SpeechDecoder.shared)
    return cache


def prefill(params: dict, text_bnd: jax.Array, text_lens_b: jax.Array, prefix_bpd: jax.Array,
            prefix_lens_b: jax.Array, *, cfg: SpeechDecoderConfig, max_len: int) -> KVCache:
    """A new cache holding prefix K/V and the context block.

    Two jitted steps, so prefix and text lengths are bucketed (and compiled) independently.

    Args:
      text_bnd: (B, N, D) text-embedding frames, valid up to ``text_lens_b`` (>= 1).
      prefix_bpd: (B, P, D) LLM hidden-state frames, valid up to ``prefix_lens_b`` (0: no prefix).
      max_len: cache slots, at least P + 1 + N.
    Returns:
      KVCache of ``max_len`` slots, lengths = prefix_lens + 1 + text_lens.
    """
    cache = write_prefix(params, prefix_bpd, prefix_lens_b, cfg=cfg, max_len=max_len)
    return write_context(params, text_bnd, text_lens_b, cache, cfg=cfg)


def _logits(params, tokens_b, prefix_lens_b, cache, cfg):
    model = SpeechDecoder(cfg)
    variables = {"params": params}
    x = model.apply(variables, tokens_b[:, None], method=SpeechDecoder.embed)
    positions = (cache.lengths - prefix_lens_b)[:, None]
    mask = (jnp.arange(cache.max_len)[None, :] <= cache.lengths[:, None])[:, None, :]
    hidden, cache = model.apply(variables, x, positions, mask, cache, method=SpeechDecoder.shared)
    return model.apply(variables, hidden[:, 0], method=SpeechDecoder.logits), cache


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def decode_logits(params: dict, tokens_b: jax.Array, prefix_lens_b: jax.Array, cache: KVCache, *,
                  cfg: SpeechDecoderConfig) -> tuple[jax.Array, KVCache]:
    """Feeds one token per row (teacher forcing). Returns (B, vocab_size) float32 logits and the cache."""
    return _logits(params, tokens_b, prefix_lens_b, cache, cfg)


def penalize(logits_bv: jax.Array, window_bw: jax.Array, penalty: float) -> jax.Array:
    """Divides each id's logit by ``penalty`` once per occurrence in the window (-1 entries: empty).

    The release divides inside a loop over the window's entries without de-duplicating them, so
    an id seen twice is divided twice; negative logits move up, as there.
    """
    counts = jnp.sum(window_bw[:, :, None] == jnp.arange(logits_bv.shape[-1]), axis=1)
    return logits_bv / jnp.power(jnp.float32(penalty), counts.astype(jnp.float32))


@functools.partial(jax.jit, static_argnames=("cfg", "sampling"), donate_argnames=("state",))
def decode_step(params: dict, state: DecoderState, *, cfg: SpeechDecoderConfig,
                sampling: TokenSampling) -> tuple[DecoderState, jax.Array]:
    """Feeds ``state.token`` and samples the next one.

    Returns the new state (donated in, so call as ``state, token = decode_step(params, state, ...)``)
    and the (B,) int32 sampled tokens (rows already done keep their last token).
    """
    logits, cache = _logits(params, state.token, state.prefix_lens, state.cache, cfg)
    if sampling.penalty_window > 0:
        logits = penalize(logits, state.window, sampling.penalty)
    rng, key = jax.random.split(state.rng)
    token = sample(logits, key, SamplingConfig(top_k=sampling.top_k))
    token = jnp.where(state.done, state.token, token)
    window = state.window.at[:, state.count % state.window.shape[1]].set(token)
    done = state.done | (token == cfg.end_id)
    return DecoderState(cache, state.prefix_lens, token, window, state.count + 1, done, rng), token


@functools.partial(jax.jit, static_argnames=("max_len",))
def grow(state: DecoderState, *, max_len: int) -> DecoderState:
    """The same state with ``max_len`` cache slots (>= the current size); one compile per size."""
    extra = (0, max_len - state.cache.max_len)
    cache = state.cache.replace(k=jnp.pad(state.cache.k, ((0, 0),) * 3 + (extra, (0, 0))),  # (L, B, K, S, H)
                                v=jnp.pad(state.cache.v, ((0, 0),) * 4 + (extra,)))  # (L, B, K, H, S)
    return state.replace(cache=cache)


def _frames(x: np.ndarray, cfg: SpeechDecoderConfig, name: str) -> np.ndarray:
    """(T, llm_hidden_size) or (T * r, hidden_size) -> (T * r, hidden_size) frames."""
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[-1] not in (cfg.llm_hidden_size, cfg.hidden_size):
        raise ValueError(f"{name}: expected shape (T, {cfg.llm_hidden_size}) LLM vectors or "
                         f"(T, {cfg.hidden_size}) frames, got {x.shape}")
    if x.shape[-1] != cfg.hidden_size:
        frames, _ = to_frames(x[None], np.array([x.shape[0]]), cfg.hidden_size)
        x = np.asarray(frames)[0]
    return x


def start(params: dict, cfg: SpeechDecoderConfig, text_embeds: np.ndarray,
          hidden_states: np.ndarray | None = None, *, max_tokens: int | None = None,
          sampling: TokenSampling | None = None, seed: int = 0,
          shapes: SegmentShapes | None = None) -> DecoderState:
    """Prefills one segment (batch 1) into a bucketed cache; the first ``decode_step`` feeds sequence-start.

    Args:
      text_embeds: (T_text, llm_hidden_size) LLM input-embedding vectors of the segment's tokens,
        or already-reshaped (T_text * r, hidden_size) frames.
      hidden_states: (T_hid, llm_hidden_size) LLM final hidden states (or frames), or None.
      max_tokens: AR tokens the cache gets room for, at most ``FIRST_TOKENS`` (default
        ``cfg.max_tokens``); ``grow`` adds room.
      shapes: fixed buckets and cache size (frames past ``shapes.top`` are cut); None: the
        1.5x frame buckets and a cache sized to the segment.
    """
    sampling = sampling or TokenSampling.from_config(cfg)
    max_tokens = cfg.max_tokens if max_tokens is None else max_tokens
    text = _frames(text_embeds, cfg, "text_embeds")
    if len(text) == 0:
        raise ValueError("text_embeds: the segment has no tokens")
    prefix = (np.zeros((0, cfg.hidden_size), text.dtype) if hidden_states is None or not cfg.use_prefix
              else _frames(hidden_states, cfg, "hidden_states"))
    if shapes is not None:
        text, prefix = text[:shapes.top], prefix[:shapes.top]
    n, p = len(text), len(prefix)
    bucket = frame_bucket if shapes is None else shapes.bucket
    nb, pb = bucket(n), bucket(p)
    text_pad = np.zeros((1, nb, cfg.hidden_size), np.float32)
    text_pad[0, :n] = text
    prefix_pad = np.zeros((1, pb, cfg.hidden_size), np.float32)
    prefix_pad[0, :p] = prefix
    dtype = to_dtype(cfg.dtype)
    prefix_lens = jnp.array([p], jnp.int32)
    max_len = (round_up(pb + 1 + nb + min(max_tokens, FIRST_TOKENS), CACHE_BUCKET) if shapes is None
               else shapes.first_len)
    cache = prefill(params, jnp.asarray(text_pad, dtype), jnp.array([n], jnp.int32),
                    jnp.asarray(prefix_pad, dtype), prefix_lens, cfg=cfg, max_len=max_len)
    window = np.full((1, max(sampling.penalty_window, 1)), -1, np.int32)
    window[:, 0] = cfg.start_id
    return DecoderState(cache, prefix_lens, jnp.array([cfg.start_id], jnp.int32), jnp.asarray(window),
                        jnp.array(1, jnp.int32), jnp.zeros((1,), bool), jax.random.key(seed))


def decode_tokens(params: dict, cfg: SpeechDecoderConfig, state: DecoderState, *, max_tokens: int,
                  sampling: TokenSampling, shapes: SegmentShapes | None = None) -> Iterator[int]:
    """Yields the codec tokens of a started segment until the end token (not yielded) or ``max_tokens``.

    The cache grows when full: by ``CACHE_BUCKET`` slots, or once to ``shapes.full_len``.
    """
    filled = int(state.cache.lengths[0])
    for _ in range(max_tokens):
        if filled == state.cache.max_len:  # this step writes slot ``filled``
            size = filled + CACHE_BUCKET if shapes is None else shapes.full_len
            if size <= filled:
                return  # the fixed-shape cache is full: the segment ends here
            state = grow(state, max_len=size)
        state, token = decode_step(params, state, cfg=cfg, sampling=sampling)
        filled += 1
        token = int(np.asarray(token)[0])  # a host read: indexing the device array would dispatch an op
        if token == cfg.end_id:
            return
        yield token


def generate(params: dict, cfg: SpeechDecoderConfig, text_embeds: np.ndarray,
             hidden_states: np.ndarray | None = None, *, max_tokens: int | None = None,
             sampling: TokenSampling | None = None, seed: int = 0,
             shapes: SegmentShapes | None = None) -> Iterator[int]:
    """Yields codec tokens of one segment until the end token (not yielded) or ``max_tokens``.

    Inputs as for ``start``. Greedy with ``TokenSampling(top_k=1)``.
    """
    sampling = sampling or TokenSampling.from_config(cfg)
    max_tokens = cfg.max_tokens if max_tokens is None else max_tokens
    state = start(params, cfg, text_embeds, hidden_states, max_tokens=max_tokens, sampling=sampling,
                  seed=seed, shapes=shapes)
    yield from decode_tokens(params, cfg, state, max_tokens=max_tokens, sampling=sampling, shapes=shapes)
