"""Rotary position embeddings (the "rotate half" layout used by HF LLaMA/Qwen2 checkpoints)."""

import jax
import jax.numpy as jnp


def apply_rope(x_btnh: jax.Array, positions_bt: jax.Array, theta: float) -> jax.Array:
    """Rotates query/key heads by their positions.

    Args:
      x_btnh: (B, T, N, H) queries or keys, H even.
      positions_bt: (B, T) integer positions.
      theta: RoPE base (10000 for LLaMA, 1e6 for Qwen2).
    Returns:
      (B, T, N, H) in x's dtype; angles are computed in float32.
    """
    half = x_btnh.shape[-1] // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(0, half, dtype=jnp.float32) * 2.0 / (2 * half)))
    angles = positions_bt.astype(jnp.float32)[..., None] * inv_freq  # (B, T, H/2)
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x_btnh.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_btnh.dtype)
