"""Speech decoder behaviour: prefill + AR decode vs teacher forcing, greedy stop, sampling, penalty, loss."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fo_jax.conversion.official_decoder import convert_state_dict, expected_shapes
from fo_jax.inference import speech_decoder as inf
from fo_jax.models.configs import SpeechDecoderConfig
from fo_jax.models.speech_decoder import SpeechDecoder, decoder_loss, make_targets, to_frames

# GQA (4 heads, 2 KV heads), 2 frames per LLM vector, a small codebook so greedy paths repeat.
TINY = SpeechDecoderConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
                           llm_hidden_size=64, codec_vocab_size=16)
MAX_TOKENS = 200  # AR budget of the tests' generations (first cache: 256 slots)
GREEDY = inf.TokenSampling(top_k=1)


def random_state_dict(cfg: SpeechDecoderConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random official-layout tensors (torch (out, in) layout) with unit-scale activations."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, shape in expected_shapes(cfg).items():
        if key.endswith("norm.weight"):
            out[key] = 1 + 0.2 * rng.standard_normal(shape)
        elif key.endswith("bias"):
            out[key] = 0.5 * rng.standard_normal(shape)
        elif key == "embedding.weight":
            out[key] = rng.standard_normal(shape)
        else:
            out[key] = rng.standard_normal(shape) / np.sqrt(shape[-1])
    return {k: v.astype(np.float32) for k, v in out.items()}


def random_params(cfg: SpeechDecoderConfig = TINY, seed: int = 0) -> dict:
    return jax.tree.map(jnp.asarray, convert_state_dict(random_state_dict(cfg, seed), cfg))


def with_end_bias(params: dict, cfg: SpeechDecoderConfig, value: float) -> dict:
    bias = params["out_fnn"]["bias"].at[cfg.end_id].set(value)
    return {**params, "out_fnn": {**params["out_fnn"], "bias": bias}}


@functools.partial(jax.jit, static_argnames=("cfg",))
def forward(params, text, text_lens, inputs, target_lens, prefix, prefix_lens, *, cfg=TINY):
    return SpeechDecoder(cfg).apply({"params": params}, text, text_lens, inputs, target_lens, prefix, prefix_lens)


def segment(seed: int, n_text: int, n_hidden: int, cfg: SpeechDecoderConfig = TINY):
    """Random LLM-width text embeddings (n_text, C) and hidden states (n_hidden, C)."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n_text, cfg.llm_hidden_size)).astype(np.float32),
            rng.standard_normal((n_hidden, cfg.llm_hidden_size)).astype(np.float32))


def teacher_forced(params, text, hidden, codes, cfg: SpeechDecoderConfig = TINY):
    """Training-forward logits (len(codes) + 1, V) of one segment.

    The prefix and the targets are padded to fixed widths (32 frames, 64 rows) to share one
    compiled forward; the text is not padded.
    """
    t, tl = to_frames(jnp.asarray(text)[None], jnp.array([len(text)]), cfg.hidden_size)
    h = np.zeros((1, 32, cfg.hidden_size), np.float32)
    h[0, : len(hidden) * cfg.frames_per_vector] = np.reshape(hidden, (-1, cfg.hidden_size))
    hl = jnp.array([len(hidden) * cfg.frames_per_vector])
    padded = np.zeros((1, 63), np.int32)
    padded[0, : len(codes)] = codes
    inputs, _ = make_targets(jnp.asarray(padded), jnp.array([len(codes)]), cfg)
    logits = forward(params, t, tl, inputs, jnp.array([len(codes) + 1]), jnp.asarray(h), hl, cfg=cfg)
    return np.asarray(logits)[0, : len(codes) + 1]


def first(n, tokens):
    return list(itertools.islice(tokens, n))


def test_to_frames_splits_each_llm_vector_into_consecutive_frames():
    x = np.arange(2 * 3 * 8, dtype=np.float32).reshape(2, 3, 8)
    frames, lens = to_frames(jnp.asarray(x), jnp.array([3, 1]), 2)
    assert frames.shape == (2, 12, 2) and lens.tolist() == [12, 4]
    np.testing.assert_array_equal(np.asarray(frames)[1, 4:8], x[1, 1].reshape(4, 2))


def test_frame_buckets_pad_at_most_half_and_are_few():
    sizes = [inf.frame_bucket(n) for n in range(1, 1001)]
    assert all(n <= b <= max(16, 1.5 * n) for n, b in zip(range(1, 1001), sizes))
    assert sorted(set(sizes))[:6] == [16, 24, 32, 48, 64, 96] and len(set(sizes)) == 13


def test_make_targets_ids():
    inputs, labels = make_targets(jnp.array([[3, 4, 5], [7, 99, 99]]), jnp.array([3, 1]), TINY)
    s, e, p = TINY.start_id, TINY.end_id, TINY.pad_id
    assert (s, e, p, TINY.context_start_id, TINY.vocab_size) == (17, 18, 19, 16, 20)
    assert inputs.tolist() == [[s, 3, 4, 5], [s, 7, p, p]]
    assert labels.tolist() == [[3, 4, 5, e], [7, e, p, p]]


@pytest.mark.parametrize("with_prefix", [True, False])
def test_prefill_and_decode_match_teacher_forcing(with_prefix):
    """Rows of different lengths prefilled as one padded batch, then fed the targets one by one."""
    params = random_params()
    rows = [segment(1, 5, 9), segment(2, 3, 4)]
    codes = np.random.default_rng(3).integers(0, TINY.codec_vocab_size, (2, 12))
    nb, pb = 32, 32
    text = np.zeros((2, nb, TINY.hidden_size), np.float32)
    prefix = np.zeros((2, pb, TINY.hidden_size), np.float32)
    for b, (t, h) in enumerate(rows):
        text[b, : 2 * len(t)] = t.reshape(-1, TINY.hidden_size)
        prefix[b, : 2 * len(h)] = h.reshape(-1, TINY.hidden_size)
    text_lens = np.array([10, 6], np.int32)
    prefix_lens = np.array([18, 8] if with_prefix else [0, 0], np.int32)
    cache = inf.prefill(params, jnp.asarray(text), jnp.asarray(text_lens), jnp.asarray(prefix),
                        jnp.asarray(prefix_lens), cfg=TINY, max_len=512)
    assert cache.lengths.tolist() == (prefix_lens + 1 + text_lens).tolist()
    feed = np.concatenate([np.full((2, 1), TINY.start_id), codes], axis=1)
    got = []
    for k in range(feed.shape[1]):
        logits, cache = inf.decode_logits(params, jnp.asarray(feed[:, k], jnp.int32), jnp.asarray(prefix_lens),
                                          cache, cfg=TINY)
        got.append(np.asarray(logits))
    got = np.stack(got, axis=1)
    for b, (t, h) in enumerate(rows):
        ref = teacher_forced(params, t, h if with_prefix else h[:0], codes[b])
        assert ref.shape == got[b].shape == (13, TINY.vocab_size)
        assert np.abs(got[b] - ref).max() <= 1e-5
    # The training forward on the same padded batch (text padded to 32 frames, as a stage pads to
    # max_text_len): its targets sit where inference puts them, so the logits agree row by row.
    inputs, _ = make_targets(jnp.asarray(codes), jnp.full((2,), codes.shape[1]), TINY)
    trained = forward(params, jnp.asarray(text), jnp.asarray(text_lens), inputs, jnp.full((2,), codes.shape[1] + 1),
                      jnp.asarray(prefix), jnp.asarray(prefix_lens))
    assert np.abs(np.asarray(trained) - got).max() <= 1e-5
    # The release's forward (one position index over the padded block) does not: the shift.
    shifted = SpeechDecoder(TINY).apply({"params": params}, jnp.asarray(text), jnp.asarray(text_lens), inputs,
                                        jnp.full((2,), codes.shape[1] + 1), jnp.asarray(prefix),
                                        jnp.asarray(prefix_lens), release_positions=True)
    assert np.abs(np.asarray(shifted) - got).max() > 1e-2


def test_prefix_changes_the_logits():
    params = random_params()
    text, hidden = segment(1, 5, 9)
    codes = [1, 2, 3]
    without = teacher_forced(params, text, hidden[:0], codes)
    assert np.abs(teacher_forced(params, text, hidden, codes) - without).max() > 1e-2


def test_greedy_is_deterministic_and_stops_on_end_token():
    text, hidden = segment(9, 5, 7)
    base = random_params()
    m = 24
    # 1. Greedy path with the end token suppressed, and the end token's margin at every step.
    path = first(m, inf.generate(with_end_bias(base, TINY, -1e4), TINY, text, hidden, max_tokens=MAX_TOKENS,
                                 sampling=GREEDY))
    assert len(path) == m and TINY.end_id not in path
    logits = teacher_forced(with_end_bias(base, TINY, 0.0), text, hidden, path)[:m]
    others = np.delete(logits, TINY.end_id, axis=1)
    margin = others.max(1) - logits[:, TINY.end_id]
    # 2. An end bias between margin[j] and all earlier margins makes step j the first end token.
    gaps = [margin[:k].min() - margin[k] for k in range(3, m)]
    j = 3 + int(np.argmax(gaps))
    assert gaps[j - 3] > 0.05  # a clear gap, so float noise cannot move the stop
    bias = 0.5 * (margin[j] + margin[:j].min())
    params = with_end_bias(base, TINY, bias)
    runs = [list(inf.generate(params, TINY, text, hidden, max_tokens=MAX_TOKENS, sampling=GREEDY))
            for _ in range(2)]
    assert runs[0] == runs[1] == path[:j]
    # The step after the last yielded token produced the end token and marked the row done.
    state = inf.start(params, TINY, text, hidden, max_tokens=MAX_TOKENS, sampling=GREEDY)
    tokens = []
    for _ in range(j + 1):
        state, token = inf.decode_step(params, state, cfg=TINY, sampling=GREEDY)
        tokens.append(int(token[0]))
    assert tokens == path[:j] + [TINY.end_id] and bool(state.done[0])


def test_greedy_tokens_are_argmax_of_teacher_forced_logits():
    params = with_end_bias(random_params(seed=5), TINY, -1e4)
    text, hidden = segment(6, 3, 5)
    path = first(30, inf.generate(params, TINY, text, hidden, max_tokens=MAX_TOKENS, sampling=GREEDY))
    logits = teacher_forced(params, text, hidden, path)[:30]
    assert np.argmax(logits, 1).tolist() == path


def test_top_k_sampling_stays_in_top_k_and_depends_on_seed():
    params = with_end_bias(random_params(seed=7), TINY, -1e4)
    text, hidden = segment(8, 3, 5)
    top2 = inf.TokenSampling(top_k=2)
    runs = [first(60, inf.generate(params, TINY, text, hidden, max_tokens=MAX_TOKENS, sampling=top2, seed=s))
            for s in (0, 1)]
    assert runs[0] != runs[1]
    for path in runs:
        logits = teacher_forced(params, text, hidden, path)[:60]
        ranks = (logits > logits[np.arange(60), path][:, None]).sum(1)
        assert ranks.max() <= 1  # each token is the best or second best at its step
        assert ranks.sum() > 0  # and not always the best: this is sampling, not argmax


def _penalized_reference(logits, history, window, penalty):
    """The release's rule, written out: divide once per entry of the last ``window`` tokens."""
    out = logits.copy()
    for token in history[-window:]:
        out[token] /= penalty
    return out


def test_penalize_divides_once_per_occurrence():
    logits = np.array([[2.0, -1.0, 0.5, 3.0]], np.float32)
    got = inf.penalize(jnp.asarray(logits), jnp.array([[3, 3, 1, -1]]), 2.0)
    np.testing.assert_allclose(np.asarray(got), [[2.0, -0.5, 0.5, 0.75]])


def test_repetition_penalty_window_in_decode_step():
    params = with_end_bias(random_params(seed=9), TINY, -1e4)
    text, hidden = segment(10, 5, 5)
    window, penalty, n = 3, 1.5, 40
    sampling = inf.TokenSampling(top_k=1, penalty_window=window, penalty=penalty)
    path = first(n, inf.generate(params, TINY, text, hidden, max_tokens=MAX_TOKENS, sampling=sampling))
    assert path != first(n, inf.generate(params, TINY, text, hidden, max_tokens=MAX_TOKENS, sampling=GREEDY))
    logits = teacher_forced(params, text, hidden, path)[:n]
    history = [TINY.start_id]
    for k in range(n):
        expected = int(np.argmax(_penalized_reference(logits[k], history, window, penalty)))
        assert path[k] == expected, k
        history.append(path[k])


def test_decode_step_compiles_once_over_200_tokens():
    params = with_end_bias(random_params(seed=11), TINY, -1e4)
    text, hidden = segment(12, 6, 7)
    state = inf.start(params, TINY, text, hidden, max_tokens=MAX_TOKENS, sampling=GREEDY)
    state, _ = inf.decode_step(params, state, cfg=TINY, sampling=GREEDY)  # warm-up
    sizes = [f._cache_size() for f in (inf.decode_step, inf.write_prefix, inf.write_context)]
    for _ in range(MAX_TOKENS - 1):
        state, token = inf.decode_step(params, state, cfg=TINY, sampling=GREEDY)
    assert int(token[0]) != TINY.end_id
    # A new segment of other lengths (same buckets) reuses both compiled steps.
    text, hidden = segment(13, 7, 5)
    tokens = list(inf.generate(params, TINY, text, hidden, max_tokens=MAX_TOKENS, sampling=GREEDY))
    assert len(tokens) == MAX_TOKENS
    assert [f._cache_size() for f in (inf.decode_step, inf.write_prefix, inf.write_context)] == sizes


def test_loss_on_padded_batch_matches_reference():
    rng = np.random.default_rng(14)
    params = random_params(seed=15)
    text_lens, prefix_lens, code_lens = np.array([8, 3, 5]), np.array([4, 9, 2]), np.array([7, 2, 5])
    d = TINY.hidden_size
    text = rng.standard_normal((3, 8, d)).astype(np.float32)
    prefix = rng.standard_normal((3, 9, d)).astype(np.float32)
    codes = rng.integers(0, TINY.codec_vocab_size, (3, 7))

    def loss_of(text, prefix, codes):
        inputs, labels = make_targets(jnp.asarray(codes), jnp.asarray(code_lens), TINY)
        logits = forward(params, jnp.asarray(text), jnp.asarray(text_lens), inputs, jnp.asarray(code_lens + 1),
                         jnp.asarray(prefix), jnp.asarray(prefix_lens))
        return float(decoder_loss(logits, labels, TINY.pad_id)), np.asarray(logits)

    loss, logits = loss_of(text, prefix, codes)
    ref = 0.0
    for b in range(3):
        for t in range(code_lens[b] + 1):
            label = codes[b, t] if t < code_lens[b] else TINY.end_id
            row = logits[b, t].astype(np.float64)
            ref += np.log(np.exp(row - row.max()).sum()) + row.max() - row[label]
    assert abs(loss - ref) <= 1e-5 * abs(ref)
    # Padding does not leak: changing padded frames and codes leaves the loss unchanged.
    text2, prefix2, codes2 = text.copy(), prefix.copy(), codes.copy()
    for b in range(3):
        text2[b, text_lens[b]:] = 7.0
        prefix2[b, prefix_lens[b]:] = -3.0
        codes2[b, code_lens[b]:] = 1
    assert abs(loss_of(text2, prefix2, codes2)[0] - loss) <= 1e-5 * abs(loss)


def test_cache_grows_when_full_without_changing_tokens(monkeypatch):
    params = with_end_bias(random_params(seed=16), TINY, -1e4)
    text, hidden = segment(17, 5, 7)
    steady = first(220, inf.generate(params, TINY, text, hidden, max_tokens=MAX_TOKENS + 100, sampling=GREEDY))
    monkeypatch.setattr(inf, "FIRST_TOKENS", 16)  # a 128-slot first cache: it grows after 103 tokens
    state = inf.start(params, TINY, text, hidden, max_tokens=300, sampling=GREEDY)
    assert state.cache.max_len == 128 and int(state.cache.lengths[0]) == 14 + 1 + 10
    grown = first(220, inf.generate(params, TINY, text, hidden, max_tokens=MAX_TOKENS + 100, sampling=GREEDY))
    assert len(steady) == 220 and grown == steady


def test_segment_shapes_give_the_same_tokens_with_a_bounded_set_of_programs():
    params = with_end_bias(random_params(seed=18), TINY, -1e4)
    shapes = inf.SegmentShapes(max_frames=30, max_tokens=300)
    assert shapes.buckets == (16, 32) and shapes.bucket(17) == 32 and shapes.bucket(500) == 32
    assert shapes.first_len == 256 and shapes.full_len == 384  # 2 * 32 + 1 + 128 / + 300, rounded up
    for n_text, n_hidden in ((3, 4), (9, 14)):  # 16- and 32-frame buckets
        text, hidden = segment(19 + n_text, n_text, n_hidden)
        ref = first(250, inf.generate(params, TINY, text, hidden, max_tokens=250, sampling=GREEDY))
        got = first(250, inf.generate(params, TINY, text, hidden, max_tokens=250, sampling=GREEDY, shapes=shapes))
        assert got == ref and len(got) == 250  # (9, 14): 47 slots + 250 tokens: grew to full_len
    sizes = inf.write_prefix._cache_size(), inf.write_context._cache_size(), inf.decode_step._cache_size()
    for n_text, n_hidden in ((2, 2), (12, 7), (15, 16), (5, 11)):  # other lengths, same buckets
        text, hidden = segment(n_text, n_text, n_hidden)
        first(250, inf.generate(params, TINY, text, hidden, max_tokens=250, sampling=GREEDY, shapes=shapes))
    assert (inf.write_prefix._cache_size(), inf.write_context._cache_size(), inf.decode_step._cache_size()) == sizes
    # Frames past the top bucket are cut: 40 vectors = 80 frames -> 32.
    text, hidden = segment(3, 40, 40)
    state = inf.start(params, TINY, text, hidden, max_tokens=10, sampling=GREEDY, shapes=shapes)
    assert int(state.cache.lengths[0]) == 32 + 1 + 32
