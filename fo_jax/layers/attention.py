"""Grouped-query self-attention with rotary positions and an optional explicit KV cache."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from fo_jax.layers.kv_cache import KVCache
from fo_jax.layers.linear import Linear
from fo_jax.layers.rope import apply_rope


def dot_product_attention(q_btnh: jax.Array, k_bksh: jax.Array, v_bkhs: jax.Array,
                          mask_bts: jax.Array) -> jax.Array:
    """Softmax attention where N query heads share K = N / G key/value heads.

    Args:
      q_btnh: (B, T, N, H) queries.
      k_bksh: (B, K, S, H) keys; v_bkhs: (B, K, H, S) values (the ``KVCache`` layouts).
      mask_bts: (B, T, S) bool, True where query t may attend to key s.
    Returns:
      (B, T, N, H). Scores and softmax are computed in float32.
    """
    b, t, n, h = q_btnh.shape
    kv = k_bksh.shape[1]
    q = q_btnh.reshape(b, t, kv, n // kv, h)
    scores = jnp.einsum("btkgh,bksh->bkgts", q, k_bksh, preferred_element_type=jnp.float32)
    scores = scores * (h ** -0.5)
    scores = jnp.where(mask_bts[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_bkhs.dtype)
    out = jnp.einsum("bkgts,bkhs->btkgh", probs, v_bkhs)
    return out.reshape(b, t, n, h)


class Attention(nn.Module):
    """Multi-head attention, GQA-capable, with params named as in HF LLaMA/Qwen2.

    Params (torch layout, output axes first): q_proj (N, H, D), k_proj / v_proj (K, H, D),
    optional biases (N, H) / (K, H), o_proj (D, N, H).
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    use_bias: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def _proj(self, heads: int, head_axis: str, name: str) -> Linear:
        return Linear((heads, self.head_dim), names=(head_axis, "head_dim", "embed"), use_bias=self.use_bias,
                      dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    @nn.compact
    def __call__(self, x_btd: jax.Array, positions_bt: jax.Array, mask_bts: jax.Array,
                 cache: KVCache | None = None, layer: int = 0) -> tuple[jax.Array, KVCache | None]:
        """Attends over this block (cache=None) or over the cache after writing this block into it.

        Args:
          x_btd: (B, T, D) inputs.
          positions_bt: (B, T) rotary positions.
          mask_bts: (B, T, S) bool; S = T without cache, S = cache.max_len with one.
          cache: written at slots ``cache.lengths[b] + t`` for ``layer``.
        Returns:
          (B, T, D) outputs and the updated cache (None without cache).
        """
        q = self._proj(self.num_heads, "heads", "q_proj")(x_btd)
        k = self._proj(self.num_kv_heads, "kv_heads", "k_proj")(x_btd)
        v = self._proj(self.num_kv_heads, "kv_heads", "v_proj")(x_btd)
        q = apply_rope(q, positions_bt, self.rope_theta)
        k = apply_rope(k, positions_bt, self.rope_theta)
        if cache is not None:
            cache = cache.write(layer, k, v)
            k, v = cache.k[layer].astype(self.dtype), cache.v[layer].astype(self.dtype)
        else:
            k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 3, 1)
        out = dot_product_attention(q, k, v, mask_bts)
        out = Linear(x_btd.shape[-1], in_axes=2, names=("embed", "heads", "head_dim"), dtype=self.dtype,
                     param_dtype=self.param_dtype, name="o_proj")(out)
        return out, cache
