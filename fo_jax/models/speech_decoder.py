"""Freeze-Omni speech decoder: NAR prefix stack, NAR pre-network and shared NAR/AR LLaMA stack.

Sequence layout of the shared stack (one RoPE position index over the block, from 0):

    [prefix K/V (LLM hidden states) ;  context-start, pre-network(text frames)  ;  sequence-start, codes...]
     written by ``layers_prefix``      "context": bidirectional                    "target": causal

Every shared layer i attends to the K/V that prefix layer i wrote into the same cache layer; the
prefix has its own positions from 0. Context rows see the prefix and the valid context; target rows
also see the target causally; context rows never see target rows. LLM vectors (3584 wide) enter
as ``frames_per_vector`` consecutive frames of ``hidden_size`` (a reshape, no projection).

The blocks are LLaMA blocks (HF ``LlamaDecoderLayer``): ``Qwen2Block`` without q/k/v biases.
Param names mirror the official module names (``embedding``, ``layers_pre_nn_{i}``, ``layers_{i}``,
``layers_prefix_{i}``, ``norm``, ``out_fnn``) so ``fo_jax.conversion.official_decoder`` is a table.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fo_jax.layers.kv_cache import KVCache
from fo_jax.layers.linear import DEFAULT_INIT, Linear
from fo_jax.layers.norms import RMSNorm
from fo_jax.models.configs import LLMConfig, SpeechDecoderConfig, to_dtype
from fo_jax.models.qwen2 import Qwen2Block


def block_config(cfg: SpeechDecoderConfig) -> LLMConfig:
    """The LLMConfig that makes ``Qwen2Block`` a LLaMA block of this decoder (no q/k/v bias)."""
    return LLMConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                     intermediate_size=cfg.intermediate_size, num_layers=cfg.num_layers,
                     num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                     rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps, qkv_bias=False,
                     max_position_embeddings=cfg.max_position_embeddings, eos_token_ids=(cfg.end_id,),
                     dtype=cfg.dtype, param_dtype=cfg.param_dtype)


def to_frames(x_btc: jax.Array, lengths_b: jax.Array, hidden_size: int) -> tuple[jax.Array, jax.Array]:
    """LLM vectors -> decoder frames: (B, T, C) -> (B, T * C/D, D); vector t gives frames r*t .. r*t+r-1."""
    b, t, c = x_btc.shape
    r = c // hidden_size
    return x_btc.reshape(b, t * r, hidden_size), lengths_b * r


def decoder_mask(context_lens_b: jax.Array, target_lens_b: jax.Array, context_width: int,
                 target_width: int, prefix_lens_b: jax.Array, num_keys: int) -> jax.Array:
    """Which keys each row of a [context ; target] block may attend to (the official training masks).

    Keys are cache slots: slots [0, prefix_len) hold the prefix, the block sits at
    slots prefix_len + j (j = 0 .. context_width + target_width - 1).

    Args:
      context_lens_b: (B,) valid context rows (context-start + pre-network frames).
      target_lens_b: (B,) valid target rows (sequence-start + codes).
      context_width, target_width: padded widths of the two parts of the block.
      prefix_lens_b: (B,) valid prefix slots (0 without prefix).
      num_keys: number of key slots S.
    Returns:
      (B, context_width + target_width, S) bool.
    """
    t = jnp.arange(context_width + target_width)[None, :]
    j = jnp.arange(num_keys)[None, :] - prefix_lens_b[:, None]
    q_context = t < context_lens_b[:, None]
    q_target = (t >= context_width) & (t < context_width + target_lens_b[:, None])
    k_shared = j < context_lens_b[:, None]  # the prefix (j < 0) and the valid context
    k_target = (j >= context_width) & (j < context_width + target_lens_b[:, None])
    causal = j[:, None, :] <= t[:, :, None]
    return (((q_context | q_target)[:, :, None] & k_shared[:, None, :])
            | (q_target[:, :, None] & k_target[:, None, :] & causal))


def make_targets(codes_by: jax.Array, code_lens_b: jax.Array,
                 cfg: SpeechDecoderConfig) -> tuple[jax.Array, jax.Array]:
    """Teacher-forcing inputs and labels from right-padded codec tokens.

    Args:
      codes_by: (B, Y) codec tokens; entries at or past ``code_lens_b`` are ignored.
      code_lens_b: (B,) number of tokens per row.
    Returns:
      inputs_bt: (B, Y + 1) [sequence-start, codes..., pad...].
      labels_bt: (B, Y + 1) [codes..., end, pad...].
    """
    b, y = codes_by.shape
    codes = jnp.where(jnp.arange(y)[None, :] < code_lens_b[:, None], codes_by, cfg.pad_id).astype(jnp.int32)
    inputs = jnp.concatenate([jnp.full((b, 1), cfg.start_id, jnp.int32), codes], axis=1)
    labels = jnp.concatenate([codes, jnp.full((b, 1), cfg.pad_id, jnp.int32)], axis=1)
    labels = jnp.where(jnp.arange(y + 1)[None, :] == code_lens_b[:, None], cfg.end_id, labels)
    return inputs, labels


def decoder_loss(logits_btv: jax.Array, labels_bt: jax.Array, pad_id: int) -> jax.Array:
    """Summed cross-entropy over labels that are not ``pad_id`` (the official criterion). Scalar f32."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits_btv.astype(jnp.float32), labels_bt)
    return jnp.sum(jnp.where(labels_bt != pad_id, ce, 0.0))


class SpeechDecoder(nn.Module):
    """Methods (through ``apply(..., method=...)``):

      embed: token ids -> embeddings.
      pre_network: text frames -> NAR pre-network output.
      context: text frames -> [context-start, pre-network(text)] block.
      write_prefix: LLM hidden-state frames -> prefix K/V appended to a cache.
      shared: a block through the shared stack (+ final norm), optionally over a cache.
      logits: final-norm hidden states -> logits over ``vocab_size`` ids.
      __call__: teacher-forced logits of the target part (training).
    """

    config: SpeechDecoderConfig

    def setup(self):
        cfg = self.config
        dtype, pdtype = to_dtype(cfg.dtype), to_dtype(cfg.param_dtype)
        bcfg = block_config(cfg)
        self.embedding = nn.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=pdtype,
            embedding_init=nn.with_logical_partitioning(DEFAULT_INIT, ("vocab", "embed")))
        self.layers_pre_nn = [Qwen2Block(bcfg) for _ in range(cfg.num_layers // 2)]
        self.layers = [Qwen2Block(bcfg) for _ in range(cfg.num_layers)]
        if cfg.use_prefix:
            self.layers_prefix = [Qwen2Block(bcfg) for _ in range(cfg.num_layers)]
        self.norm = RMSNorm(cfg.rms_norm_eps, pdtype)
        self.out_fnn = Linear(cfg.vocab_size, names=("vocab", "embed"), use_bias=True, dtype=dtype,
                              param_dtype=pdtype, out_dtype=jnp.float32)

    def _dtype(self):
        return to_dtype(self.config.dtype)

    def embed(self, tokens_bt: jax.Array) -> jax.Array:
        """(B, T) int ids -> (B, T, D)."""
        return self.embedding(tokens_bt)

    def pre_network(self, x_bnd: jax.Array, lengths_b: jax.Array) -> jax.Array:
        """NAR pre-network, bidirectional over the first ``lengths_b`` frames. (B, N, D) -> (B, N, D)."""
        b, n, _ = x_bnd.shape
        steps = jnp.arange(n)
        positions = jnp.broadcast_to(steps, (b, n))
        valid = steps[None, :] < lengths_b[:, None]
        mask = valid[:, :, None] & valid[:, None, :]
        x = x_bnd.astype(self._dtype())
        for layer in self.layers_pre_nn:
            x, _ = layer(x, positions, mask, None, 0)
        return x

    def context(self, text_bnd: jax.Array, text_lens_b: jax.Array) -> tuple[jax.Array, jax.Array]:
        """[context-start, pre-network(text)]: (B, N, D) -> (B, 1 + N, D) and valid lengths (B,)."""
        b = text_bnd.shape[0]
        start = self.embed(jnp.full((b, 1), self.config.context_start_id, jnp.int32))
        return jnp.concatenate([start, self.pre_network(text_bnd, text_lens_b)], axis=1), text_lens_b + 1

    def write_prefix(self, x_bpd: jax.Array, lengths_b: jax.Array, cache: KVCache) -> KVCache:
        """Runs the prefix stack over LLM hidden-state frames; its layer-i K/V go into cache layer i.

        Rows attend bidirectionally to the first ``lengths_b`` frames, positions from 0. The frames
        are written at slots ``cache.lengths + p``; the returned lengths grow by ``lengths_b``.
        Args: x_bpd (B, P, D); lengths_b (B,) int; cache: a KVCache.
        """
        b, p, _ = x_bpd.shape
        steps = jnp.arange(p)
        positions = jnp.broadcast_to(steps, (b, p))
        rel = jnp.arange(cache.max_len)[None, :] - cache.lengths[:, None]
        keys = (rel >= 0) & (rel < lengths_b[:, None])
        mask = (steps[None, :] < lengths_b[:, None])[:, :, None] & keys[:, None, :]
        x = x_bpd.astype(self._dtype())
        for i, layer in enumerate(self.layers_prefix):
            x, cache = layer(x, positions, mask, cache, i)
        return cache.replace(lengths=cache.lengths + lengths_b.astype(jnp.int32))

    def shared(self, x_btd: jax.Array, positions_bt: jax.Array, mask_bts: jax.Array,
               cache: KVCache | None = None,
               lengths_b: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
        """The shared NAR/AR stack and the final norm.

        Args:
          x_btd: (B, T, D) input block.
          positions_bt: (B, T) RoPE positions.
          mask_bts: (B, T, S) bool; S = T without cache, the cache length with one.
          cache: written at slots ``cache.lengths + t``; lengths then grow by ``lengths_b`` (default T).
        Returns:
          (B, T, D) final-norm hidden states and the updated cache (None without cache).
        """
        x = x_btd.astype(self._dtype())
        for i, layer in enumerate(self.layers):
            x, cache = layer(x, positions_bt, mask_bts, cache, i)
        if cache is not None:
            grow = x.shape[1] if lengths_b is None else lengths_b.astype(jnp.int32)
            cache = cache.replace(lengths=cache.lengths + grow)
        return self.norm(x), cache

    def logits(self, hidden_btd: jax.Array) -> jax.Array:
        """(..., D) -> (..., vocab_size) float32."""
        return self.out_fnn(hidden_btd)

    def __call__(self, text_bnd: jax.Array, text_lens_b: jax.Array, inputs_bt: jax.Array,
                 target_lens_b: jax.Array, prefix_bpd: jax.Array | None = None,
                 prefix_lens_b: jax.Array | None = None, release_positions: bool = False) -> jax.Array:
        """Teacher-forced training forward.

        Target rows take the positions inference gives them: each row's targets continue right
        after its own valid context (``1 + text_lens_b``), whatever the padded width. The
        release's forward runs one position index over the padded block instead
        (``release_positions=True``, kept for parity), which shifts every padded row's targets
        away from where inference puts them: trained that way on text padded to a fixed width, a
        decoder reached 100 % teacher-forced accuracy yet greedy decoding of the same utterances
        matched 1-11 % of their tokens.

        Args:
          text_bnd: (B, N, D) text-embedding frames (``to_frames`` of the LLM's token embeddings).
          text_lens_b: (B,) valid frames.
          inputs_bt: (B, Y + 1) target-part inputs [sequence-start, codes..., pad] (``make_targets``).
          target_lens_b: (B,) valid target rows = number of codes + 1.
          prefix_bpd: (B, P, D) LLM hidden-state frames for the prefix stack (or None).
          prefix_lens_b: (B,) valid prefix frames.
        Returns:
          (B, Y + 1, vocab_size) float32 logits; row t predicts label t of ``make_targets``.
        """
        b = text_bnd.shape[0]
        ctx, ctx_lens = self.context(text_bnd, text_lens_b)
        x = jnp.concatenate([ctx, self.embed(inputs_bt)], axis=1)
        wc, t = ctx.shape[1], x.shape[1]
        steps = jnp.broadcast_to(jnp.arange(t), (b, t))
        positions = steps if release_positions else jnp.where(steps < wc, steps, steps - wc + ctx_lens[:, None])
        cache = None
        prefix_lens = jnp.zeros((b,), jnp.int32)
        if prefix_bpd is not None and self.config.use_prefix:
            prefix_lens = prefix_lens_b.astype(jnp.int32)
            p = prefix_bpd.shape[1]
            cfg = self.config
            cache = KVCache.zeros(cfg.num_layers, b, p + t, cfg.num_kv_heads, cfg.head_dim, self._dtype())
            cache = self.write_prefix(prefix_bpd, prefix_lens, cache)
        num_keys = t if cache is None else cache.max_len
        mask = decoder_mask(ctx_lens, target_lens_b, wc, t - wc, prefix_lens, num_keys)
        hidden, _ = self.shared(x, positions, mask, cache)
        return self.logits(hidden[:, wc:])


@functools.partial(jax.jit, static_argnames=("config",))
def init_params(config: SpeechDecoderConfig, rng: jax.Array) -> dict:
    """Random params, boxed with logical axis names (``nn.unbox`` gives plain arrays). Jitted: one compile."""
    d = config.hidden_size
    ones = jnp.ones((1,), jnp.int32)
    return SpeechDecoder(config).init(
        rng, jnp.zeros((1, 1, d)), ones, jnp.zeros((1, 2), jnp.int32), ones * 2, jnp.zeros((1, 1, d)),
        ones)["params"]
