"""Qwen2's training layout: layers scanned over stacked params (with remat) == the per-layer model."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fo_jax.inference.llm import init_cache
from fo_jax.models.qwen2 import Qwen2, init_params, stack_layers, unstack_layers
from tests.conftest import TINY_LLM

SCAN = dataclasses.replace(TINY_LLM, scan_layers=True, remat=True)


def test_scanned_layers_equal_the_per_layer_model():
    params = nn.unbox(init_params(TINY_LLM, jax.random.key(0)))
    stacked = stack_layers(params, TINY_LLM.num_layers)
    assert stacked["layers"]["block"]["mlp"]["up_proj"]["kernel"].shape == (2, 128, 64)
    jax.tree.map(np.testing.assert_array_equal, unstack_layers(stacked), params)
    x = jax.random.normal(jax.random.key(1), (2, 7, TINY_LLM.hidden_size))
    lengths = jnp.array([7, 5])

    def run(cfg, p, x):
        hidden, cache = Qwen2(cfg).apply({"params": p}, x, lengths)
        assert cache is None
        return hidden

    grad = lambda cfg, p: jax.grad(lambda x: jnp.sum(run(cfg, p, x)[:, :5] ** 2))(x)  # noqa: E731
    np.testing.assert_allclose(run(SCAN, stacked, x), run(TINY_LLM, params, x), atol=1e-5)
    np.testing.assert_allclose(grad(SCAN, stacked), grad(TINY_LLM, params), atol=1e-5)


def test_scanned_init_has_a_leading_layer_axis_and_no_cache():
    boxed = jax.eval_shape(lambda r: init_params(SCAN, r), jax.random.key(0))
    kernel = boxed["layers"]["block"]["self_attn"]["q_proj"]["kernel"]
    assert kernel.value.shape == (2, 4, 16, 64) and kernel.names == ("layers", "heads", "head_dim", "embed")
    params = nn.unbox(init_params(SCAN, jax.random.key(0)))
    with pytest.raises(ValueError, match="training layout"):
        Qwen2(SCAN).apply({"params": params}, jnp.zeros((1, 1, 64)), None, init_cache(SCAN, 1, 8))
