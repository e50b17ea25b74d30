"""CTC head: loss against brute-force path enumeration (with padding), greedy decoding."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fo_jax.models.configs import EncoderConfig
from fo_jax.models.ctc import ctc_greedy_decode, ctc_logits, ctc_loss, ctc_min_frames, init_ctc_params


def brute_force_nll(logits_tv, label):
    """-log sum over all frame paths that collapse (repeats, then blanks 0) to ``label``."""
    logp = jax.nn.log_softmax(jnp.asarray(logits_tv, jnp.float64 if jax.config.jax_enable_x64 else jnp.float32))
    logp = np.asarray(logp, np.float64)
    total = 0.0
    for path in itertools.product(range(logp.shape[1]), repeat=logp.shape[0]):
        collapsed = [p for i, p in enumerate(path) if p != 0 and (i == 0 or p != path[i - 1])]
        if collapsed == list(label):
            total += np.exp(sum(logp[t, p] for t, p in enumerate(path)))
    return -np.log(total)


def test_ctc_loss_matches_enumeration_with_padding():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 3)).astype(np.float32)
    lengths = np.array([5, 4, 3])
    labels = np.array([[1, 2, 9], [1, 1, 9], [2, 9, 9]])  # 9: padding, never read
    label_lengths = np.array([2, 2, 1])
    logits[1, 4:] = 50.0  # garbage in padded frames
    losses = ctc_loss(jnp.asarray(logits), jnp.asarray(lengths), jnp.asarray(labels), jnp.asarray(label_lengths),
                      reduction="none")
    ref = [brute_force_nll(logits[b, :lengths[b]], labels[b, :label_lengths[b]]) for b in range(3)]
    np.testing.assert_allclose(losses, ref, rtol=1e-5)
    mean = ctc_loss(jnp.asarray(logits), jnp.asarray(lengths), jnp.asarray(labels), jnp.asarray(label_lengths))
    np.testing.assert_allclose(mean, np.sum(ref) / 3, rtol=1e-5)
    per_token = ctc_loss(jnp.asarray(logits), jnp.asarray(lengths), jnp.asarray(labels),
                         jnp.asarray(label_lengths), reduction="mean_token")
    np.testing.assert_allclose(per_token, np.sum(ref) / 5, rtol=1e-5)
    with pytest.raises(ValueError, match="reduction"):
        ctc_loss(jnp.asarray(logits), jnp.asarray(lengths), jnp.asarray(labels), jnp.asarray(label_lengths),
                 reduction="sum")


def test_ctc_min_frames_is_where_a_path_exists():
    assert ctc_min_frames([1, 2, 2, 3, 3, 3]) == 9 and ctc_min_frames([]) == 0
    logits = jnp.zeros((1, 6, 4))
    for label, feasible in (([1, 2, 3, 2, 1, 2], True), ([1, 1, 2, 2, 3, 3], False), ([1, 1, 2, 2, 3], False),
                            ([1, 1, 2, 3], True)):
        assert (ctc_min_frames(label) <= 6) == feasible
        loss = ctc_loss(logits, jnp.array([6]), jnp.array([label]), jnp.array([len(label)]), reduction="none")
        # optax gives a huge finite value where no path exists; a feasible one is a few nats
        assert (float(loss[0]) < 100) == feasible, (label, loss)


def test_greedy_decode_collapses_repeats_and_drops_blanks():
    frames = np.array([[0, 1, 1, 0, 1, 2, 2, 0, 3, 3], [2, 2, 2, 0, 0, 2, 1, 1, 3, 3]])
    logits = np.eye(4, dtype=np.float32)[frames] * 5
    tokens, lengths = ctc_greedy_decode(jnp.asarray(logits), jnp.array([10, 7]))
    np.testing.assert_array_equal(lengths, [4, 3])
    np.testing.assert_array_equal(tokens[0, :4], [1, 1, 2, 3])
    np.testing.assert_array_equal(tokens[1, :3], [2, 2, 1])  # frames 7.. are padding
    assert (np.asarray(tokens[0, 4:]) == -1).all() and (np.asarray(tokens[1, 3:]) == -1).all()


def test_ctc_head():
    cfg = EncoderConfig(hidden_size=8, num_heads=2, ctc_vocab_size=11)
    shapes = jax.eval_shape(lambda r: init_ctc_params(cfg, r), jax.random.PRNGKey(0))
    assert shapes["ctc_lo"]["kernel"].value.shape == (11, 8)  # torch layout (out, in)
    rng = np.random.default_rng(0)
    params = {"ctc_lo": {"kernel": rng.normal(size=(11, 8)).astype(np.float32),
                         "bias": rng.normal(size=11).astype(np.float32)}}
    enc = rng.normal(size=(2, 5, 8)).astype(np.float32)
    logits = jax.jit(ctc_logits, static_argnums=1)(params, cfg, jnp.asarray(enc))
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, enc @ params["ctc_lo"]["kernel"].T + params["ctc_lo"]["bias"], atol=1e-5)
