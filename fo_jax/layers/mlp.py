"""The LLaMA/Qwen2 feed-forward layer."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from fo_jax.layers.linear import Linear


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)). Params (torch layout): gate/up (F, D), down (D, F)."""

    hidden_size: int
    intermediate_size: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_btd: jax.Array) -> jax.Array:
        """(B, T, D) -> (B, T, D)."""
        def linear(features, names, name):
            return Linear(features, names=names, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        gate = linear(self.intermediate_size, ("mlp", "embed"), "gate_proj")(x_btd)
        up = linear(self.intermediate_size, ("mlp", "embed"), "up_proj")(x_btd)
        return linear(self.hidden_size, ("embed", "mlp"), "down_proj")(nn.silu(gate) * up)
