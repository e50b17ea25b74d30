"""Adapters (subsampling / cnn / linear): streaming == whole sequence, masks, the released layout
against a direct numpy computation, BatchNorm statistics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from fo_jax.models.adapter import (AdapterStreamState, adapter_forward, adapter_stream_step,
                                   init_adapter_variables, output_frames, Adapter)
from fo_jax.models.configs import AdapterConfig
from tests.test_encoder import draw

D, E = 16, 40
VARIANTS = {
    "released": AdapterConfig(input_dim=D, output_dim=E),  # one conv, LayerNorm, GELU
    "batch_relu": AdapterConfig(input_dim=D, output_dim=E, norm="batch", activation="relu"),
    "two_convs": AdapterConfig(input_dim=D, output_dim=5 * D),  # 4 D < E: two convs + BatchNorm
    "cnn": AdapterConfig(kind="cnn", input_dim=D, output_dim=E, kernel_size=3),
    "linear": AdapterConfig(kind="linear", input_dim=D, output_dim=E),
}


def variables(cfg, seed=0):
    return draw(init_adapter_variables, cfg, seed)


STEP = jax.jit(adapter_stream_step, static_argnums=1, donate_argnums=2)
forward = jax.jit(adapter_forward, static_argnums=1)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_stream_equals_whole_sequence(name):
    cfg = VARIANTS[name]
    v = variables(cfg)
    x = np.random.default_rng(1).normal(size=(2, 40, D)).astype(np.float32)
    full, mask = forward(v, cfg, jnp.asarray(x), jnp.ones((2, 40), bool))
    assert full.shape == (2, output_frames(cfg, 40), cfg.output_dim) and mask.shape == full.shape[:2]
    state = AdapterStreamState.zeros(cfg, 2)
    before = STEP._cache_size()  # the jit cache is shared by all parametrizations
    outs = []
    for n in range(10):
        state, out = STEP(v, cfg, state, jnp.asarray(x[:, 4 * n:4 * n + 4]))
        assert out.shape[1] == output_frames(cfg, 4)
        outs.append(out)
    np.testing.assert_allclose(np.concatenate(outs, 1), full, atol=1e-5)
    assert STEP._cache_size() - before == 1


def test_released_layout_against_numpy():
    """Left pad 4, Conv1d(k5, stride 2), LayerNorm(eps 1e-3), exact GELU, Linear."""
    cfg = VARIANTS["released"]
    v = variables(cfg, seed=2)["params"]
    x = np.random.default_rng(3).normal(size=(1, 9, D)).astype(np.float32)
    ours, mask = forward({"params": v}, cfg, jnp.asarray(x), jnp.ones((1, 9), bool))
    xp = np.concatenate([np.zeros((4, D), np.float32), x[0]])
    k = v["conv1d2"]["kernel"]  # (2D, D, K), torch layout
    ref = []
    for t in range(5):  # ceil(9 / 2)
        h = sum(k[:, :, i] @ xp[2 * t + i] for i in range(5)) + v["conv1d2"]["bias"]
        h = (h - h.mean()) / np.sqrt(h.var() + 1e-3) * v["bn2"]["scale"] + v["bn2"]["bias"]
        h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
        ref.append(v["project"]["kernel"] @ h + v["project"]["bias"])
    np.testing.assert_allclose(ours[0], np.stack(ref), atol=1e-4, rtol=1e-4)
    assert mask.shape == (1, 5)


def test_padding_is_zeroed_and_mask_decimated():
    cfg = VARIANTS["released"]
    v = variables(cfg)
    x = np.random.default_rng(4).normal(size=(2, 12, D)).astype(np.float32)
    mask = np.ones((2, 12), bool)
    mask[1, 7:] = False
    dirty = x.copy()
    dirty[1, 7:] = 1e4
    a, out_mask = forward(v, cfg, jnp.asarray(x), jnp.asarray(mask))
    b, _ = forward(v, cfg, jnp.asarray(dirty), jnp.asarray(mask))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(out_mask, mask[:, ::2])
    zeroed = x.copy()
    zeroed[1, 7:] = 0.0
    c, _ = forward(v, cfg, jnp.asarray(zeroed), jnp.ones((2, 12), bool))
    np.testing.assert_allclose(a, c, atol=1e-6)


def test_batch_norm_training_statistics():
    """Torch BatchNorm1d(momentum=0.99): running = 0.01 running + 0.99 batch statistic."""
    cfg = VARIANTS["batch_relu"]
    v = variables(cfg)
    x = np.random.default_rng(5).normal(size=(3, 8, D)).astype(np.float32)
    _, updated = Adapter(cfg).apply(v, jnp.asarray(x), jnp.ones((3, 8), bool), train=True,
                                    mutable=["batch_stats"])
    xp = np.concatenate([np.zeros((3, 4, D), np.float32), x], 1)
    k = v["params"]["conv1d2"]["kernel"]
    h = np.stack([sum(xp[:, 2 * t + i] @ k[:, :, i].T for i in range(5)) for t in range(4)], 1)
    h = h + v["params"]["conv1d2"]["bias"]
    mean = h.reshape(-1, 2 * D).mean(0)
    np.testing.assert_allclose(updated["batch_stats"]["bn2"]["mean"],
                               0.01 * v["batch_stats"]["bn2"]["mean"] + 0.99 * mean, atol=1e-4)


def test_param_names_mirror_official():
    names = {k: sorted(variables(c)["params"]) for k, c in VARIANTS.items()}
    assert names["released"] == ["bn2", "conv1d2", "project"]
    assert names["two_convs"] == names["cnn"] == ["bn1", "bn2", "conv1d1", "conv1d2", "project"]
    assert names["linear"] == ["adpter"]
    assert sorted(variables(VARIANTS["two_convs"])["batch_stats"]) == ["bn1", "bn2"]
    state = AdapterStreamState.zeros(VARIANTS["two_convs"], 3)
    assert state.conv1d1.shape == (3, 4, D) and state.conv1d2.shape == (3, 4, 2 * D)
    reset = AdapterStreamState(conv1d1=None, conv1d2=jnp.ones((2, 4, D))).reset_rows(jnp.array([True, False]))
    np.testing.assert_array_equal(reset.conv1d2[:, 0, 0], [0.0, 1.0])
