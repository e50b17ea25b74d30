"""Cached prefill/decode equals the full forward; steps compile once; sampling behaves."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fo_jax.inference import llm
from fo_jax.inference.sampling import SamplingConfig, apply_repetition_penalty, sample
from fo_jax.models.qwen2 import Qwen2, init_params
from tests.conftest import TINY_LLM


@pytest.fixture(scope="module")
def params():
    return nn.unbox(init_params(TINY_LLM, jax.random.key(0)))


def test_prefill_then_decode_equals_full_forward(params):
    cfg = TINY_LLM
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (3, 20)).astype(np.int32)
    full_logits = np.asarray(Qwen2(cfg).apply({"params": params}, jnp.asarray(tokens), method=Qwen2.forward))
    full_hidden, _ = Qwen2(cfg).apply({"params": params},
                                      Qwen2(cfg).apply({"params": params}, jnp.asarray(tokens), method=Qwen2.embed))
    prompt = np.array([4, 9, 1], np.int32)  # rows at different lengths, right-padded block
    block = np.where(np.arange(9)[None] < prompt[:, None], tokens[:, :9], 0)
    cache = llm.init_cache(cfg, 3, 64)
    logits, hidden, cache = llm.prefill(params, jnp.asarray(block), jnp.asarray(prompt), cache, cfg=cfg)
    for row, n in enumerate(prompt):
        np.testing.assert_allclose(logits[row], full_logits[row, n - 1], atol=1e-5)
        np.testing.assert_allclose(hidden[row, :n], full_hidden[row, :n], atol=1e-5)
    pos = prompt.copy()
    while pos.min() < 20:
        feed = tokens[np.arange(3), np.minimum(pos, 19)]
        logits, hidden, cache = llm.decode_step(params, jnp.asarray(feed), cache, cfg=cfg)
        for row in range(3):
            if pos[row] < 20:
                np.testing.assert_allclose(logits[row], full_logits[row, pos[row]], atol=1e-5)
                np.testing.assert_allclose(hidden[row], full_hidden[row, pos[row]], atol=1e-5)
        pos += 1
    np.testing.assert_array_equal(cache.lengths, pos)


def test_decode_steps_compile_once(params):
    cfg = TINY_LLM
    cache = llm.init_cache(cfg, 2, 128)
    token = jnp.array([3, 4], jnp.int32)
    _, _, cache = llm.decode_step(params, token, cache, cfg=cfg)  # warm-up
    compiled = llm.decode_step._cache_size()
    for i in range(50):
        logits, _, cache = llm.decode_step(params, token + i, cache, cfg=cfg)
    assert llm.decode_step._cache_size() == compiled
    assert int(cache.lengths[0]) == 51

    eos = jnp.array([2], jnp.int32)
    state = llm.DecodeState(llm.init_cache(cfg, 2, 128), token, jnp.zeros((2, cfg.vocab_size), bool),
                            jnp.zeros(2, bool), jax.random.key(0))
    sampling = SamplingConfig(temperature=0.7, top_k=5, top_p=0.8)
    state, _ = llm.sample_step(params, state, eos, cfg=cfg, sampling=sampling)
    compiled = llm.sample_step._cache_size()
    for _ in range(50):
        state, hidden = llm.sample_step(params, state, eos, cfg=cfg, sampling=sampling)
    assert llm.sample_step._cache_size() == compiled
    assert hidden.shape == (2, cfg.hidden_size)


def test_generate_reuses_compiled_steps_across_prompts(params):
    llm.generate(params, TINY_LLM, [[5, 6, 7]], 8)
    sizes = llm.prefill._cache_size(), llm.sample_step._cache_size()
    llm.generate(params, TINY_LLM, [[9, 1, 1, 2, 3, 4]], 8)  # same prompt bucket and cache bucket
    assert (llm.prefill._cache_size(), llm.sample_step._cache_size()) == sizes


def test_generate_stops_at_end_token_and_is_deterministic(params):
    cfg = TINY_LLM
    greedy = llm.generate(params, cfg, [[5, 6, 7]], 12)[0]
    # Declare the 4th greedy token an end token: generation must stop right after it.
    stopped = llm.generate(params, cfg, [[5, 6, 7]], 12, eos_ids=[greedy[3]])[0]
    assert stopped == greedy[: greedy.index(greedy[3]) + 1]
    s = SamplingConfig(temperature=1.0, top_k=50, top_p=0.9)
    a = llm.generate(params, cfg, [[5, 6, 7]], 12, s, seed=3)
    assert a == llm.generate(params, cfg, [[5, 6, 7]], 12, s, seed=3)
    assert all(0 <= t < cfg.vocab_size for t in a[0])


def test_sampling_filters():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    draws = lambda cfg: {int(sample(logits, jax.random.key(i), cfg)[0]) for i in range(200)}
    assert draws(SamplingConfig(top_k=1)) == {0}
    assert draws(SamplingConfig(temperature=0.0)) == {0}
    assert draws(SamplingConfig(top_k=2)) == {0, 1}
    assert draws(SamplingConfig(top_p=0.7)) == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 crosses it
    assert draws(SamplingConfig(top_p=0.4)) == {0}
    assert draws(SamplingConfig()) == {0, 1, 2, 3}
    # Low temperature concentrates mass on the argmax.
    counts = np.bincount([int(sample(logits, jax.random.key(i), SamplingConfig(temperature=0.1))[0])
                          for i in range(100)], minlength=4)
    assert counts[0] >= 95


def test_repetition_penalty_follows_hf_convention():
    logits = jnp.array([[2.0, -2.0, 1.0]])
    seen = jnp.array([[True, True, False]])
    np.testing.assert_allclose(apply_repetition_penalty(logits, seen, 2.0), [[1.0, -4.0, 1.0]])
    # Greedy with a strong penalty avoids the seen argmax.
    assert int(sample(logits, jax.random.key(0), SamplingConfig(top_k=1, repetition_penalty=4.0), seen)[0]) == 2


def test_invalid_sampling_settings():
    with pytest.raises(ValueError):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError):
        SamplingConfig(temperature=-1)
