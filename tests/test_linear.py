"""The projection layer every model uses: torch-layout kernels, float32 accumulation, CPU row padding."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fo_jax.layers.linear import Linear, TorchLinear, project


def test_project_contracts_the_trailing_axes_of_torch_layout_kernels():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)  # (B, T, N, H)
    w = rng.standard_normal((6, 4, 5)).astype(np.float32)  # (D, N, H): an output projection
    np.testing.assert_allclose(project(x, w, in_axes=2), np.einsum("btnh,dnh->btd", x, w), rtol=1e-5, atol=1e-5)
    w1 = rng.standard_normal((7, 2, 5)).astype(np.float32)  # (N, H, D): a head projection
    np.testing.assert_allclose(project(x, w1), np.einsum("btnd,khd->btnkh", x, w1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lead", [(1,), (1, 1), ()])
def test_single_bf16_row_is_padded_and_gives_the_same_numbers(lead):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal(lead + (64,)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((32, 64)), jnp.bfloat16)
    out = project(x, w, dtype=jnp.bfloat16, out_dtype=jnp.float32)
    assert out.shape == lead + (32,) and out.dtype == jnp.float32
    exact = np.asarray(x, np.float32) @ np.asarray(w, np.float32).T  # bf16 inputs, float32 sums
    np.testing.assert_allclose(out, exact, rtol=1e-5, atol=1e-5)
    dots = [e for e in jax.make_jaxpr(lambda a: project(a, w, dtype=jnp.bfloat16))(x).eqns
            if e.primitive.name == "dot_general"]
    padded = jax.default_backend() == "cpu"  # the fast two-row form of XLA:CPU
    assert dots[0].invars[0].aval.shape == ((2, 64) if padded else x.shape)
    # float32 single rows keep the one-row product (the fastest there)
    dots32 = [e for e in jax.make_jaxpr(lambda a: project(a, w.astype(jnp.float32)))(x.astype(jnp.float32)).eqns
              if e.primitive.name == "dot_general"]
    assert dots32[0].invars[0].aval.shape == x.shape


def test_linear_params_follow_the_torch_layout_with_logical_names():
    boxed = Linear((4, 8), names=("heads", "head_dim", "embed"), use_bias=True).init(
        jax.random.key(0), jnp.zeros((2, 16)))["params"]
    assert boxed["kernel"].value.shape == (4, 8, 16) and boxed["kernel"].names == ("heads", "head_dim", "embed")
    assert boxed["bias"].value.shape == (4, 8) and boxed["bias"].names == ("heads", "head_dim")
    params = nn.unbox(boxed)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((3, 16)), jnp.float32)
    y = Linear((4, 8), use_bias=True).apply({"params": params}, x)
    np.testing.assert_allclose(y, np.einsum("bd,nhd->bnh", x, params["kernel"]) + params["bias"], atol=1e-5)
    torch_like = TorchLinear(5, dtype=jnp.bfloat16).init(jax.random.key(0), jnp.zeros((2, 16)))["params"]
    assert set(torch_like) == {"kernel", "bias"}
    assert TorchLinear(5, dtype=jnp.bfloat16).apply({"params": nn.unbox(torch_like)}, x).dtype == jnp.float32
