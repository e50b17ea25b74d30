"""Speech encoder: streaming step vs whole-utterance forward, the official positional quirk, chunk
masks, padding, dropout, compile-once streaming (no PyTorch needed)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fo_jax.config import load_config, model_config
from fo_jax.errors import ConfigError
from fo_jax.models.adapter import SpeechInputState, init_adapter_variables, speech_input_step_jit
from fo_jax.models.encoder import (EncoderStreamState, chunk_mask, encoder_forward, encoder_stream_step,
                                   init_encoder_params, output_lengths, stream_positions)

TINY = model_config(load_config("configs/freeze_omni.py:tiny"))
ENC = TINY.encoder
STRICT = dataclasses.replace(ENC, strict_positions=True)
CHUNKS_10S = 62  # 62 x 160 ms = 9.92 s
step = jax.jit(encoder_stream_step, static_argnums=1)
forward = jax.jit(encoder_forward, static_argnums=1, static_argnames="train")


def draw(init, cfg, seed=0):
    """Random values for ``init(cfg, rng)``'s tree (shapes only: nothing is compiled), scaled for O(1)
    activations everywhere, so positional terms visibly matter."""
    shapes = jax.eval_shape(lambda r: init(cfg, r), jax.random.PRNGKey(0))
    shapes = jax.tree.map(lambda x: x.unbox() if hasattr(x, "unbox") else x, shapes,
                          is_leaf=lambda x: hasattr(x, "unbox"))
    rng = np.random.default_rng(seed)

    def value(path, x):
        name, normal = jax.tree_util.keystr(path), rng.normal(size=x.shape).astype(np.float32)
        if "kernel" in name:  # torch layout (out, in, ...); linear_pos (heads, head_dim, in)
            fan_in = np.prod(x.shape[1:]) if "conv" in name else x.shape[-1]
            return normal / np.sqrt(fan_in)
        if "pos_bias" in name or name.endswith("['mean']"):
            return normal
        if "scale" in name or "istd" in name:
            return 1 + 0.2 * normal
        if name.endswith("['var']"):
            return 0.5 + np.abs(normal)
        return 0.1 * normal

    return jax.tree_util.tree_map_with_path(value, shapes)


def random_params(cfg, seed=0):
    return draw(init_encoder_params, cfg, seed)


PARAMS = random_params(ENC)


def fbank(frames, seed=0, batch=1):
    return np.random.default_rng(seed).normal(3.0, 2.0, (batch, frames, ENC.input_dim)).astype(np.float32)


def stream(cfg, params, padded_bxf, chunks, state=None):
    """Official framing: call n sees padded frames [16 n, 16 n + 19)."""
    state = state or EncoderStreamState.zeros(cfg, padded_bxf.shape[0])
    outs = []
    for n in range(chunks):
        state, out = step(params, cfg, state, jnp.asarray(padded_bxf[:, 16 * n:16 * n + 19]))
        outs.append(np.asarray(out))
    return np.concatenate(outs, 1), state


def chunk_errors(a_btd, b_btd):
    """Max abs difference per 4-frame chunk, (chunks,)."""
    d = np.abs(a_btd - b_btd).max(axis=(0, 2))
    return d.reshape(-1, 4).max(1)


@pytest.fixture(scope="module")
def ten_seconds():
    """2 rows of 10 s of fbank with the official 3 leading zero frames, and their full forward."""
    feats = fbank(16 * CHUNKS_10S, batch=2)
    padded = np.concatenate([np.zeros((2, 3, ENC.input_dim), np.float32), feats], 1)
    full, lengths = forward(PARAMS, ENC, jnp.asarray(padded), jnp.full((2,), padded.shape[1]),
                            positions_t=jnp.arange(4 * CHUNKS_10S))
    assert full.shape == (2, 4 * CHUNKS_10S, ENC.hidden_size)
    np.testing.assert_array_equal(lengths, [4 * CHUNKS_10S] * 2)
    return padded, np.asarray(full)


def test_stream_equals_full_forward_where_positions_coincide(ten_seconds):
    padded, full = ten_seconds
    quirk, _ = stream(ENC, PARAMS, padded, CHUNKS_10S)
    err = chunk_errors(quirk, full)
    # Official positions equal the true ones for the first left_chunks + 1 = 17 calls.
    assert err[:17].max() <= 1e-5, err[:17]
    # From the 18th call on, keys sit one chunk behind: visibly different.
    assert err[17:].min() > 1e-3, err[17:]
    strict, _ = stream(STRICT, PARAMS, padded, CHUNKS_10S)
    assert chunk_errors(strict, full).max() <= 1e-5


def test_narrow_subsampling_channels():
    """``subsampling_channels`` sets the conv widths only (0: the release's, the encoder's width);
    the streaming step still equals the whole forward."""
    assert init_encoder_params(ENC, jax.random.PRNGKey(0))["subsampling"]["conv_1"]["kernel"].value.shape == \
        (ENC.hidden_size, ENC.hidden_size, 3, 3)
    cfg = dataclasses.replace(STRICT, subsampling_channels=8)
    params = random_params(cfg)
    sub = params["subsampling"]
    assert sub["conv_0"]["kernel"].shape == (8, 1, 3, 3) and sub["conv_1"]["kernel"].shape == (8, 8, 3, 3)
    assert sub["out"]["kernel"].shape == (cfg.hidden_size, 8 * 19)  # torch (out, in): 80 bins -> 19
    padded = np.concatenate([np.zeros((1, 3, ENC.input_dim), np.float32), fbank(16 * 6)], 1)
    full, _ = forward(params, cfg, jnp.asarray(padded), jnp.full((1,), padded.shape[1]))
    assert full.shape == (1, 24, cfg.hidden_size)
    streamed, _ = stream(cfg, params, padded, 6)
    np.testing.assert_allclose(streamed, full, atol=1e-5)


def test_official_positions_quirk():
    """Key positions of the valid slots, by call number n (index 4 n before the call)."""
    def valid_positions(cfg, call, frames=None):
        frames = 4 * call if frames is None else frames
        pos, valid, nxt = stream_positions(cfg, jnp.array([4 * call]), jnp.array([frames]))
        return np.asarray(pos[0][valid[0]]), int(nxt[0])

    pos, nxt = valid_positions(ENC, 0)
    np.testing.assert_array_equal(pos, np.arange(4))
    assert nxt == 4
    np.testing.assert_array_equal(valid_positions(ENC, 16)[0], np.arange(68))
    # 18th call: 64 buffered frames are true positions 4..67, the chunk 68..71; official: 0..67.
    np.testing.assert_array_equal(valid_positions(ENC, 17)[0], np.arange(68))
    np.testing.assert_array_equal(valid_positions(STRICT, 17)[0], np.arange(4, 72))
    np.testing.assert_array_equal(valid_positions(ENC, 40)[0], np.arange(92, 160))
    np.testing.assert_array_equal(valid_positions(STRICT, 40)[0], np.arange(96, 164))
    # Wrap: index 4928 -> keys from 4860, next index 4932; index 4932 wraps to 0 -> keys from 0.
    pos, nxt = valid_positions(ENC, 1232)
    np.testing.assert_array_equal(pos, np.arange(4860, 4928))
    assert nxt == 4932
    pos, nxt = valid_positions(ENC, 1233)
    np.testing.assert_array_equal(pos, np.arange(68))
    assert nxt == 4
    np.testing.assert_array_equal(valid_positions(STRICT, 1233)[0], np.arange(4868, 4936))


def test_quirk_stream_equals_shifted_full_forward(ten_seconds):
    """Past the receptive field of the first 17 calls, the official stream equals a forward whose
    key positions are all 4 frames behind (the last layer at call n depends on calls
    n - 16 (L - 1) .. n of the first layer, which lag from call 17 on)."""
    padded, _ = ten_seconds
    quirk, _ = stream(ENC, PARAMS, padded, CHUNKS_10S)
    first = 17 + 16 * (ENC.num_layers - 1)
    assert first + 10 < CHUNKS_10S
    positions = jnp.arange(full_frames := 4 * CHUNKS_10S) - 4
    shifted, _ = forward(PARAMS, ENC, jnp.asarray(padded), jnp.full((2,), padded.shape[1]),
                                 positions_t=positions)
    assert shifted.shape[1] == full_frames
    err = chunk_errors(quirk, np.asarray(shifted))
    assert err[first:].max() <= 1e-5, err[first:]
    assert err[17:first].max() > 1e-4  # in between, both position sets mix


def test_batched_rows_at_different_positions(ten_seconds):
    """One batched step of rows at different stream positions == each row stepped alone."""
    padded, _ = ten_seconds
    _, s0 = stream(ENC, PARAMS, padded[:1], 20)  # row 0 after 20 calls (past the quirk onset)
    _, s1 = stream(ENC, PARAMS, padded[1:], 3)  # row 1 after 3 calls
    both = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), s0, s1)
    x = np.concatenate([padded[:1, 320:339], padded[1:, 48:67]])
    new, out = step(PARAMS, ENC, both, jnp.asarray(x))
    n0, o0 = step(PARAMS, ENC, s0, jnp.asarray(x[:1]))
    n1, o1 = step(PARAMS, ENC, s1, jnp.asarray(x[1:]))
    np.testing.assert_allclose(out, np.concatenate([o0, o1]), atol=1e-6)
    for a, b, c in zip(jax.tree.leaves(new), jax.tree.leaves(n0), jax.tree.leaves(n1)):
        np.testing.assert_allclose(a, np.concatenate([b, c]), atol=1e-6)
    # reset_rows starts row 0 over: identical to a fresh state's first call
    reset = new.reset_rows(jnp.array([True, False]))
    assert int(reset.pe_index[0]) == 0 and int(reset.frames[0]) == 0 and int(reset.frames[1]) == 16
    _, o_reset = step(PARAMS, ENC, reset, jnp.asarray(padded[:, :19]))
    _, o_fresh = step(PARAMS, ENC, EncoderStreamState.zeros(ENC, 1), jnp.asarray(padded[:1, :19]))
    np.testing.assert_allclose(o_reset[0], o_fresh[0], atol=1e-6)


def test_chunk_mask_matches_definition():
    size = 23
    for chunk, left in [(4, 16), (4, 1), (3, 0), (5, -1), (-1, -1)]:
        mask = np.asarray(chunk_mask(size, chunk, left))
        for i in range(size):
            if chunk <= 0:
                allowed = np.ones(size, bool)
            else:
                start = 0 if left < 0 else max((i // chunk - left) * chunk, 0)
                end = min((i // chunk + 1) * chunk, size)
                allowed = (np.arange(size) >= start) & (np.arange(size) < end)
            np.testing.assert_array_equal(mask[i], allowed, err_msg=f"chunk {chunk} left {left} row {i}")


BATCH_FEATS = fbank(200, seed=3, batch=2)
BATCH_LENGTHS = jnp.array([200, 120])


def test_padding_does_not_leak_and_lengths():
    garbage = BATCH_FEATS.copy()
    garbage[1, 120:] = 1e3
    clean, lengths = forward(PARAMS, ENC, jnp.asarray(BATCH_FEATS), BATCH_LENGTHS)
    dirty, _ = forward(PARAMS, ENC, jnp.asarray(garbage), BATCH_LENGTHS)
    np.testing.assert_array_equal(lengths, [(200 - 3) // 4, (120 - 3) // 4])
    np.testing.assert_allclose(dirty[:, :29], clean[:, :29], atol=1e-5)
    assert np.abs(dirty[1, 29:] - clean[1, 29:]).max() > 1  # the padded rows did see it
    np.testing.assert_array_equal(output_lengths(jnp.array([0, 5, 6, 7, 10, 19])), [0, 0, 0, 1, 1, 4])


def test_dropout_only_in_training():
    feats = jnp.asarray(BATCH_FEATS)
    dynamic = dataclasses.replace(ENC, dynamic_chunks=True)
    static, _ = forward(PARAMS, ENC, feats, BATCH_LENGTHS)
    eval_dynamic, _ = forward(PARAMS, dynamic, feats, BATCH_LENGTHS)
    np.testing.assert_array_equal(eval_dynamic, static)  # dynamic chunks never apply at eval
    train_a, _ = forward(PARAMS, dynamic, feats, BATCH_LENGTHS, train=True, rng=jax.random.PRNGKey(1))
    train_b, _ = forward(PARAMS, dynamic, feats, BATCH_LENGTHS, train=True, rng=jax.random.PRNGKey(1))
    train_c, _ = forward(PARAMS, dynamic, feats, BATCH_LENGTHS, train=True, rng=jax.random.PRNGKey(2))
    np.testing.assert_array_equal(train_a, train_b)
    assert np.abs(train_a - static).max() > 1e-2 and np.abs(train_a - train_c).max() > 1e-2


def test_speech_input_step_compiles_once_over_30s():
    """Encoder + adapter streaming step, state donated: 188 calls (30 s), one compilation."""
    ad_vars = draw(init_adapter_variables, TINY.adapter, seed=1)
    state = SpeechInputState.zeros(ENC, TINY.adapter, 2)
    feats = np.concatenate([np.zeros((2, 3, ENC.input_dim), np.float32), fbank(16 * 188, seed=5, batch=2)], 1)
    before = speech_input_step_jit._cache_size()
    for n in range(188):
        state, emb = speech_input_step_jit(PARAMS, ad_vars, ENC, TINY.adapter, state,
                                           jnp.asarray(feats[:, 16 * n:16 * n + 19]))
        if n == 0:
            assert emb.shape == (2, 2, TINY.adapter.output_dim)
    assert speech_input_step_jit._cache_size() - before == 1
    assert int(state.encoder.frames[0]) == 4 * 188
    assert int(state.encoder.pe_index[0]) == 4 * 188  # below the 4932 wrap
    assert np.isfinite(np.asarray(emb)).all()


def test_bfloat16_stream_close_to_float32(ten_seconds):
    padded, _ = ten_seconds
    bf16 = dataclasses.replace(ENC, dtype="bfloat16")
    f32, _ = stream(ENC, PARAMS, padded[:1], 20)
    low, state = stream(bf16, PARAMS, padded[:1], 20)
    assert state.k.dtype == jnp.bfloat16
    assert np.abs(low - f32).max() < 0.15 * np.abs(f32).max()
    # the whole-utterance path runs in bfloat16 too (every matmul has a bf16 x bf16 -> f32 kernel)
    full_f32, _ = forward(PARAMS, ENC, jnp.asarray(BATCH_FEATS), BATCH_LENGTHS)
    full_low, _ = forward(PARAMS, bf16, jnp.asarray(BATCH_FEATS), BATCH_LENGTHS)
    assert np.abs(full_low - full_f32).max() < 0.15 * np.abs(full_f32).max()


def test_stream_state_needs_chunks():
    with pytest.raises(ConfigError, match="chunk_size > 0"):
        EncoderStreamState.zeros(dataclasses.replace(ENC, chunk_size=-1), 1)
