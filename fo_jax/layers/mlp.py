"""Feed-forward layers, and the dot product the model's projections use."""

import flax.linen as nn
import jax
import jax.numpy as jnp

DEFAULT_INIT = nn.initializers.normal(0.02)

# Low-precision weights that XLA:CPU cannot multiply natively (it upcasts them to float32).
_UPCAST_ON_CPU = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# Up to this many activation rows (decode / streaming steps) the upcast is done per weight, just
# before its use; prefill and training blocks keep XLA's own handling.
_JIT_UPCAST_MAX_ROWS = 64
# Largest float32 copy of a weight piece made at once: stays in cache, and under glibc's mmap
# threshold so it is not page-faulted in again every step.
_UPCAST_CHUNK_BYTES = 8 << 20


def _rows(x: jax.Array, contracting) -> int:
    rows = 1
    for d in range(x.ndim):
        if d not in contracting:
            rows *= x.shape[d]
    return rows


def _jit_upcast(rows: int, weight_dtype) -> bool:
    """Whether a ``rows``-row product against ``weight_dtype`` weights takes the upcast-per-use path."""
    return (jnp.dtype(weight_dtype) in _UPCAST_ON_CPU and rows <= _JIT_UPCAST_MAX_ROWS
            and jax.default_backend() == "cpu")


def after(x: jax.Array, dep: jax.Array) -> jax.Array:
    """``x`` unchanged, but computed only once ``dep`` exists (an exact ``x * 1``).

    XLA:CPU upcasts low-precision weights to float32 before every dot, and its scheduler is free
    to hoist all those upcasts to the start of the step: a bfloat16 decode step then holds a
    float32 copy of every weight at once (2 GB for Qwen2-0.5B), in fresh pages each call. Making
    an upcast depend on the activation it multiplies keeps one or two weights' copies alive, in
    cache. The factor is 1 unless ``dep``'s first element is NaN (then 0: the NaN still reaches
    the result through ``dep``).
    """
    one = jnp.where(jnp.isnan(dep.reshape(-1)[0]), 0, 1).astype(x.dtype)
    return x * one


def matvec_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """``lax.dot_general`` for projections (a drop-in ``dot_general`` for ``nn.Dense``).

    Identical to ``lax.dot_general`` except for few-row products against bfloat16/float16
    weights on CPU: there the weight is upcast to float32 right before the dot (see ``after``),
    in pieces of at most ``_UPCAST_CHUNK_BYTES`` along its leading axis, with the same float32
    math XLA uses for it anyway, and the result is cast back.
    """
    (lhs_contract, rhs_contract), (lhs_batch, _) = dimension_numbers
    lhs_contract, rhs_contract = tuple(lhs_contract), tuple(rhs_contract)
    if lhs_batch or not _jit_upcast(_rows(lhs, lhs_contract), rhs.dtype):
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type)
    out_dtype = preferred_element_type or jnp.result_type(lhs.dtype, rhs.dtype)
    lhs = lhs.astype(jnp.float32)
    dims = ((lhs_contract, rhs_contract), ((), ()))
    n = rhs.shape[0]
    step = max(1, min(n, _UPCAST_CHUNK_BYTES // (4 * (rhs.size // max(n, 1)))))
    step = -(-n // -(-n // step))  # equal pieces
    if 0 in rhs_contract:  # leading axis is contracted: sum partial products
        lhs_axis = lhs_contract[rhs_contract.index(0)]
        out = None
        for s in range(0, n, step):
            w = after(jax.lax.slice_in_dim(rhs, s, min(n, s + step)).astype(jnp.float32),
                      lhs if out is None else out)
            part = jax.lax.dot_general(jax.lax.slice_in_dim(lhs, s, min(n, s + step), axis=lhs_axis),
                                       w, dims, precision=precision)
            out = part if out is None else out + part
    else:  # leading axis is an output axis: concatenate
        out_axis = lhs.ndim - len(lhs_contract)
        parts = []
        for s in range(0, n, step):
            w = after(jax.lax.slice_in_dim(rhs, s, min(n, s + step)).astype(jnp.float32),
                      lhs if not parts else parts[-1])
            parts.append(jax.lax.dot_general(lhs, w, dims, precision=precision))
        out = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=out_axis)
    return out.astype(out_dtype)


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
                            kernel_init=nn.with_logical_partitioning(DEFAULT_INIT, names), name=name,
                            dot_general=matvec_dot_general)
        gate = dense(self.intermediate_size, ("embed", "mlp"), "gate_proj")(x_btd)
        x_up = x_btd
        if _jit_upcast(_rows(x_btd, (x_btd.ndim - 1,)), self.dtype):
            x_up = after(x_btd, gate)  # upcast gate's and up's weights one after the other
        up = dense(self.intermediate_size, ("embed", "mlp"), "up_proj")(x_up)
        return dense(self.hidden_size, ("mlp", "embed"), "down_proj")(nn.silu(gate) * up)
