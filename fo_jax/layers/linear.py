"""Linear projections whose kernels are stored output axes first, as PyTorch stores them.

Every projection of the models (LLM, speech decoder, speech encoder, adapter, heads) keeps its
kernel in the layout of a torch ``nn.Linear`` weight, ``(*out, *in)``: HF and official
checkpoints convert by a reshape, and on XLA:CPU it is the faster layout for the few-row products
that streaming and decoding are made of (``benchmarks/cpu_probe.py``, BENCHMARKS.md: float32
1.2-1.3x, bfloat16 2x over ``(in, out)`` kernels at 1-4 rows). Accelerators don't care.

``project`` is the one dot they all use: inputs in the compute dtype, float32 accumulation
(``preferred_element_type``), result cast to ``out_dtype``. One exception, on CPU only: a single
row against 16-bit weights is computed as two identical rows, because XLA:CPU runs a one-row
bfloat16 product through a slow generic loop (~2 GB/s of weights) and a two-row one through its
matmul library (~17 GB/s); the extra row costs nothing measurable.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Init = Callable[..., jax.Array]
DEFAULT_INIT = nn.initializers.normal(0.02)


def fan_in_init(in_axes: int = 1) -> Init:
    """LeCun-normal (truncated) for ``(*out, *in)`` kernels: fan-in over the last ``in_axes`` axes.

    The initialisation torch's ``nn.Linear`` approximates; the speech encoder and heads use it."""
    axes = tuple(range(-in_axes, 0))
    return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=axes, out_axis=0)


def _pad_single_row(x: jax.Array, in_axes: int, dtype) -> bool:
    rows = math.prod(x.shape[: x.ndim - in_axes])
    return rows == 1 and jnp.dtype(dtype).itemsize == 2 and jax.default_backend() == "cpu"


def project(x: jax.Array, kernel: jax.Array, in_axes: int = 1, dtype=jnp.float32, out_dtype=None) -> jax.Array:
    """``x (..., *in)`` times ``kernel (*out, *in)`` -> ``(..., *out)``.

    Args:
      x: activations; its last ``in_axes`` axes are contracted.
      kernel: weights, output axes first, then the ``in_axes`` input axes.
      dtype: the dtype both operands are cast to (the compute dtype).
      out_dtype: the result's dtype (default ``dtype``); accumulation is float32 either way.
    """
    out_dtype = out_dtype or dtype
    lead = x.shape[: x.ndim - in_axes]
    x = x.astype(dtype)
    pad = _pad_single_row(x, in_axes, dtype)
    if pad:
        x = jnp.broadcast_to(x.reshape((1,) + x.shape[x.ndim - in_axes:]), (2,) + x.shape[x.ndim - in_axes:])
    contract = (tuple(range(x.ndim - in_axes, x.ndim)), tuple(range(kernel.ndim - in_axes, kernel.ndim)))
    y = jax.lax.dot_general(x, kernel.astype(dtype), (contract, ((), ())), preferred_element_type=jnp.float32)
    if pad:
        y = y[:1].reshape(lead + y.shape[1:])
    return y.astype(out_dtype)


class Linear(nn.Module):
    """A projection with kernel ``(*features, *in)`` and optional bias ``(*features,)``.

    Attributes:
      features: output size, or output axes (e.g. ``(heads, head_dim)``).
      in_axes: how many trailing input axes are contracted (2 for an output projection over
        ``(heads, head_dim)``).
      names: logical axis names of the kernel, ``(*out, *in)``; the bias takes the output ones.
      out_dtype: dtype of the result (default ``dtype``).
    """

    features: int | Sequence[int]
    in_axes: int = 1
    names: Sequence[str | None] = ()
    use_bias: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    out_dtype: jnp.dtype | None = None
    kernel_init: Init = DEFAULT_INIT

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """(..., *in) -> (..., *features)."""
        out = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        shape = out + tuple(x.shape[x.ndim - self.in_axes:])
        names = tuple(self.names) or (None,) * len(shape)
        kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, names), shape,
                            self.param_dtype)
        y = project(x, kernel, self.in_axes, self.dtype, jnp.float32 if self.use_bias else self.out_dtype)
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, names[: len(out)]),
                              out, self.param_dtype)
            y = (y + bias.astype(jnp.float32)).astype(self.out_dtype or self.dtype)
        return y


class TorchLinear(Linear):
    """``Linear`` with torch ``nn.Linear``'s defaults: a bias, fan-in init, float32 result."""

    use_bias: bool = True
    out_dtype: jnp.dtype | None = jnp.float32
    kernel_init: Init = fan_in_init()
