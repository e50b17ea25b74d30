"""Qwen2 decoder-only LLM (the frozen backbone of Freeze-Omni) in Flax Linen.

Param names mirror HF (``embed_tokens``, ``layers_{i}/self_attn/q_proj``, ``mlp/gate_proj``,
``input_layernorm``, ``norm``, ``lm_head``) so ``fo_jax.conversion.hf_qwen2`` is a short table.
The KV cache is an explicit argument and return value (``fo_jax.layers.kv_cache.KVCache``).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fo_jax import sharding
from fo_jax.layers.attention import Attention
from fo_jax.layers.kv_cache import KVCache
from fo_jax.layers.linear import DEFAULT_INIT, Linear, project
from fo_jax.layers.mlp import SwiGLU
from fo_jax.layers.norms import RMSNorm
from fo_jax.models.configs import LLMConfig, to_dtype


class Qwen2Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then + mlp(norm(.))."""

    config: LLMConfig

    @nn.compact
    def __call__(self, x_btd, positions_bt, mask_bts, cache, layer):
        cfg = self.config
        dtype, pdtype = to_dtype(cfg.dtype), to_dtype(cfg.param_dtype)
        h = RMSNorm(cfg.rms_norm_eps, pdtype, name="input_layernorm")(x_btd)
        h, cache = Attention(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rope_theta,
                             use_bias=cfg.qkv_bias, dtype=dtype, param_dtype=pdtype,
                             name="self_attn")(h, positions_bt, mask_bts, cache, layer)
        x_btd = x_btd + h
        h = RMSNorm(cfg.rms_norm_eps, pdtype, name="post_attention_layernorm")(x_btd)
        h = SwiGLU(cfg.hidden_size, cfg.intermediate_size, dtype, pdtype, name="mlp")(h)
        return x_btd + h, cache


class ScannedBlock(nn.Module):
    """One step of the ``scan_layers`` stack: (x, positions, mask) -> (x, None); params under ``block``."""

    config: LLMConfig

    @nn.compact
    def __call__(self, x_btd, positions_bt, mask_bts):
        x_btd = sharding.constrain(x_btd, ("act_batch", None, None))
        x_btd, _ = Qwen2Block(self.config, name="block")(x_btd, positions_bt, mask_bts, None, 0)
        return x_btd, None


class Qwen2(nn.Module):
    """Qwen2 causal LM.

    Methods (call through ``apply(..., method=...)``):
      embed: token ids -> input embeddings.
      __call__: input embeddings -> final-norm hidden states (+ updated cache).
      logits: hidden states -> vocabulary logits (tied or untied head).
      forward: token ids -> logits over a whole sequence.
    """

    config: LLMConfig

    def setup(self):
        cfg = self.config
        dtype, pdtype = to_dtype(cfg.dtype), to_dtype(cfg.param_dtype)
        self.embed_tokens = nn.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=pdtype,
            embedding_init=nn.with_logical_partitioning(DEFAULT_INIT, ("vocab", "embed")))
        if cfg.scan_layers:
            # One block scanned over stacked params (layers/block/..., leading layer axis): each
            # iteration gathers its own sharded weights and reuses the buffers of the last.
            step = nn.remat(ScannedBlock, prevent_cse=False) if cfg.remat else ScannedBlock
            self.layers = nn.scan(step, variable_axes={"params": 0}, split_rngs={"params": True},
                                  in_axes=(nn.broadcast, nn.broadcast), length=cfg.num_layers,
                                  metadata_params={nn.PARTITION_NAME: "layers"})(cfg)
        else:
            block = nn.remat(Qwen2Block, static_argnums=(5,)) if cfg.remat else Qwen2Block
            self.layers = [block(cfg) for _ in range(cfg.num_layers)]
        self.norm = RMSNorm(cfg.rms_norm_eps, pdtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg.vocab_size, names=("vocab", "embed"), dtype=dtype, param_dtype=pdtype,
                                  out_dtype=jnp.float32)

    def embed(self, tokens_bt: jax.Array) -> jax.Array:
        """(B, T) int -> (B, T, D) in the compute dtype."""
        return self.embed_tokens(tokens_bt)

    def logits(self, hidden_btd: jax.Array) -> jax.Array:
        """(..., D) final-norm hidden states -> (..., V) float32 logits."""
        if self.config.tie_word_embeddings:  # the (V, D) table is a torch-layout kernel
            return project(hidden_btd, self.embed_tokens.embedding, 1, to_dtype(self.config.dtype), jnp.float32)
        return self.lm_head(hidden_btd)

    def __call__(self, x_btd: jax.Array, lengths_b: jax.Array | None = None,
                 cache: KVCache | None = None, positions_bt: jax.Array | None = None,
                 mask_bts: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
        """Runs the decoder over a right-padded block of input embeddings.

        Without a cache, the block is a whole sequence (training / parity forward): positions are
        0..T-1 and keys at or past ``lengths_b`` are masked. With a cache, the block is appended at
        each row's ``cache.lengths``: positions continue from there, it attends causally to the
        cache, and the returned cache's lengths grow by ``lengths_b`` (the row's number of valid
        new entries; default T). Callers keep ``cache.lengths + T <= cache.max_len``.

        A whole sequence may instead bring its own rotary positions and attention mask (training
        on a conversation whose dropped turns later positions must not see, as if never cached).

        Args:
          x_btd: (B, T, D) input embeddings (``embed`` of token ids, or speech embeddings).
          lengths_b: (B,) int, valid entries per row (default: all T).
          cache: optional KVCache.
          positions_bt: (B, T) int rotary positions (no cache; default 0..T-1).
          mask_bts: (B, T, T) bool, True where query t may attend to key s (no cache; replaces
            the causal + padding mask).
        Returns:
          hidden_btd: (B, T, D) final-norm hidden states, and the updated cache (or None).
        """
        b, t, _ = x_btd.shape
        steps = jnp.arange(t)
        if lengths_b is None:
            lengths_b = jnp.full((b,), t, jnp.int32)
        if cache is None:
            positions = jnp.broadcast_to(steps, (b, t)) if positions_bt is None else positions_bt
            if mask_bts is None:
                mask = (steps[None, :, None] >= steps[None, None, :]) & (steps < lengths_b[:, None])[:, None, :]
            else:
                mask = mask_bts
        elif positions_bt is not None or mask_bts is not None:
            raise ValueError("positions_bt / mask_bts are for whole sequences, not with a cache")
        else:
            positions = cache.lengths[:, None] + steps[None, :]
            slots = jnp.arange(cache.max_len)
            mask = slots[None, None, :] <= positions[:, :, None]
        x = x_btd.astype(to_dtype(self.config.dtype))
        if self.config.scan_layers:
            if cache is not None:
                raise ValueError("scan_layers is the training layout (no KV cache); unstack_layers gives per-layer params")
            x, _ = self.layers(x, positions, mask)
            return self.norm(x), None
        for i, layer in enumerate(self.layers):
            # Under activation rules (training), activations stay split by batch between blocks (FSDP:
            # the weights are gathered, not the activations); a no-op without rules.
            x = sharding.constrain(x, ("act_batch", None, None))
            x, cache = layer(x, positions, mask, cache, i)
        if cache is not None:
            cache = cache.replace(lengths=cache.lengths + lengths_b.astype(jnp.int32))
        return self.norm(x), cache


    def forward(self, tokens_bt: jax.Array, lengths_b: jax.Array | None = None) -> jax.Array:
        """Full-sequence logits (training, parity): (B, T) ids -> (B, T, V) float32."""
        hidden, _ = self(self.embed(tokens_bt), lengths_b)
        return self.logits(hidden)


def stack_layers(params: dict, num_layers: int) -> dict:
    """Per-layer params (``layers_{i}/...``, the HF-mapped layout) -> the ``scan_layers`` layout
    (``layers/block/...`` with a leading layer axis). Host (numpy) or device arrays."""
    layers = [params[f"layers_{i}"] for i in range(num_layers)]
    stack = np.stack if isinstance(jax.tree.leaves(layers[0])[0], np.ndarray) else jnp.stack
    rest = {k: v for k, v in params.items() if not k.startswith("layers_")}
    return rest | {"layers": {"block": jax.tree.map(lambda *xs: stack(xs), *layers)}}


def unstack_layers(params: dict) -> dict:
    """Inverse of ``stack_layers``."""
    block = params["layers"]["block"]
    n = jax.tree.leaves(block)[0].shape[0]
    rest = {k: v for k, v in params.items() if k != "layers"}
    return rest | {f"layers_{i}": jax.tree.map(lambda x: x[i], block) for i in range(n)}


def init_params(config: LLMConfig, rng: jax.Array) -> dict:
    """Random params, boxed with logical axis names (``nn.unbox`` gives plain arrays)."""
    return Qwen2(config).init(rng, jnp.zeros((1, 1), jnp.int32), method=Qwen2.forward)["params"]
