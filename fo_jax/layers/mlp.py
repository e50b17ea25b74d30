"""Feed-forward layers."""

import flax.linen as nn
import jax
import jax.numpy as jnp

DEFAULT_INIT = nn.initializers.normal(0.02)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), the LLaMA/Qwen2 MLP. Params: gate/up (D, F), down (F, D)."""

    hidden_size: int
    intermediate_size: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_btd: jax.Array) -> jax.Array:
        """(B, T, D) -> (B, T, D)."""
        def dense(features, names, name):
            return nn.Dense(features, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                            kernel_init=nn.with_logical_partitioning(DEFAULT_INIT, names), name=name)
        gate = dense(self.intermediate_size, ("embed", "mlp"), "gate_proj")(x_btd)
        up = dense(self.intermediate_size, ("embed", "mlp"), "up_proj")(x_btd)
        return dense(self.hidden_size, ("mlp", "embed"), "down_proj")(nn.silu(gate) * up)
