"""Streaming vocoding: windows, trims, quiet-point splits and thresholds of the released server.

Waveforms use dyadic amplitudes (0.5, 2^-5, 2^-7, 2^-8, 0) so every window sum is exact and the
hand-computed split points do not depend on rounding.
"""

import dataclasses

import numpy as np
import pytest

from fo_jax.errors import ConfigError
from fo_jax.inference import vocoder_stream as vs

SPT = 600
KINDS = {"Q": 2.0 ** -8, "Q7": 2.0 ** -7, "Q6": 2.0 ** -6, "Q5": 2.0 ** -5, "L": 0.5, "S": 0.0, "Z": 0.5}


def token_wave(token):
    """Context-free fake codec: token = 16 * position + kind index; the sign pattern depends on the
    whole id, so each token's samples are recognisable, while |x| only depends on the kind."""
    kind = list(KINDS)[token % 16]
    j = np.arange(SPT)
    sign = np.where((j * 7 + token) % 5 < 2, 1.0, -1.0)
    wave = KINDS[kind] * sign
    if kind == "Z":  # loud, with a single zero sample in the middle
        wave[300] = 0.0
    return wave.astype(np.float32)


def make_tokens(spec):
    """spec: list of (kind, count) -> token ids."""
    kinds = [k for k, n in spec for _ in range(n)]
    return [16 * i + list(KINDS).index(k) for i, k in enumerate(kinds)]


class RecordingDecoder:
    """A ``DecodeWindowFn``: records each window and trim, returns the kept tokens' waves only."""

    def __init__(self):
        self.calls, self.trims = [], []

    def __call__(self, window, trim):
        window = np.asarray(window)
        assert window.dtype == np.int32 and window.ndim == 1
        self.calls.append(window.tolist())
        self.trims.append(trim)
        return np.concatenate([token_wave(t) for t in window[trim[0]:len(window) - trim[1]]])


# The release's server exactly (its first-packet trim keeps nothing before the first loud sample).
SERVER = vs.VocoderStreamConfig(trim_keep_s=0.0)


def expected_wave(tokens):
    return np.concatenate([token_wave(t) for t in tokens])


# Server settings, first segment: windows [0,30) [10,50) [30,70), tail [50,75).
MAIN_SPEC = [("Q", 2), ("L", 8), ("Q", 4), ("Z", 1), ("L", 5),  # emitted by window 1
             ("L", 20),  # window 2: no quiet stretch
             ("L", 10), ("S", 5), ("L", 5),  # window 3: silence at tokens 50..54
             ("L", 15)]  # tail


def test_server_first_segment_split_points_by_hand():
    tokens = make_tokens(MAIN_SPEC)
    assert len(tokens) == 75
    dec = RecordingDecoder()
    packets = list(vs.stream_vocode(tokens, dec, SERVER))
    assert [c[0] // 16 for c in dec.calls] == [0, 10, 30, 50]
    assert [len(c) for c in dec.calls] == [30, 40, 40, 25]
    assert dec.trims == [(0, 10), (10, 10), (10, 10), (10, 0)]  # only the kept tokens are decoded
    for call in dec.calls:
        assert call == tokens[call[0] // 16: call[0] // 16 + len(call)]
    wave = expected_wave(tokens)
    # Window 1 emits samples [0, 12000). Search starts at 6000 - 1200 = 4800. Best window: start 5999
    # (one loud sample + 2400 quiet ones of tokens 10..13), mean 9.875 / 2401 < 0.1. The release
    # looks for the quietest sample in [5999, 5999 + 1199 + 2401) = [5999, 9599): token 14's zero at
    # 8700. The first packet then loses its leading quiet tokens 0..1 (|x| = 2^-8 <= 0.03): starts at 1200.
    # Window 2 (tokens 20..39) has no quiet stretch and is buffered whole.
    # Window 3 emits [24000, 36000); silence at local 6000..8999, best window start 6000, cut 30000.
    # Tail: tokens 60..74, [36000, 45000).
    bounds = [(1200, 8700), (8700, 30000), (30000, 45000)]
    assert len(packets) == 3
    for packet, (a, b) in zip(packets, bounds):
        assert packet.dtype == np.float32
        np.testing.assert_array_equal(packet, wave[a:b])
    np.testing.assert_array_equal(np.concatenate(packets), wave[1200:])


@pytest.mark.parametrize("batches", ["one", "all", "random"])
def test_token_batching_does_not_change_output(batches):
    tokens = make_tokens(MAIN_SPEC)
    ref = list(vs.stream_vocode(tokens, RecordingDecoder()))
    if batches == "one":
        items = tokens
    elif batches == "all":
        items = [tokens]
    else:
        cuts = np.sort(np.random.default_rng(3).choice(np.arange(1, 75), 12, replace=False))
        items = [list(part) for part in np.split(np.asarray(tokens), cuts)]
    got = list(vs.stream_vocode(items, RecordingDecoder()))
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        np.testing.assert_array_equal(a, b)


def test_explicit_state_push_and_finish():
    tokens = make_tokens(MAIN_SPEC)
    cfg = vs.VocoderStreamConfig()
    dec = RecordingDecoder()
    state = vs.start_segment(cfg, packets_emitted=1)  # not the first packet: chunk 40, threshold 0.015
    assert (state.chunk_size, state.threshold) == (40, 0.015)
    state, packets = vs.push_tokens(state, tokens[:49], dec, cfg)
    assert packets == [] and dec.calls == [] and state.tokens.shape == (49,)
    state, packets = vs.push_tokens(state, tokens[49:50], dec, cfg)  # 40 + 10 lookahead: first window
    assert [len(c) for c in dec.calls] == [50] and state.left == 10 and state.tokens.tolist() == tokens[30:50]
    wave = expected_wave(tokens)
    # Emitted [0, 24000), searched from 12000 - 1200 = 10800 (token 18): only loud tokens there, so
    # the piece is buffered whole (tokens 10..14, quiet, lie in the first half).
    assert packets == [] and state.buffer.shape == (24000,)
    np.testing.assert_array_equal(state.buffer, wave[:24000])
    state, packets = vs.push_tokens(state, tokens[50:], dec, cfg)  # 45 held < 60: no window
    assert packets == [] and len(dec.calls) == 1
    last = vs.finish_segment(state, dec, cfg)
    assert dec.calls[-1] == tokens[30:75]
    np.testing.assert_array_equal(last, wave)  # no trim outside the reply's first packet


def test_quiet_split_thresholds_and_search_range():
    n = 2401
    loud = np.full(12000, 0.5, np.float32)
    x = loud.copy()
    x[7000:10000] = 2.0 ** -5  # quietest window mean exactly 2^-5 = 0.03125
    assert vs.quiet_split(x, n, 0.1) == 7000  # first-packet threshold: split at the first quiet sample
    assert vs.quiet_split(x, n, 0.015) is None  # later threshold: buffered
    assert vs.quiet_split(x, n, 2.0 ** -5) is None  # strict comparison
    assert vs.quiet_split(x, n, 2.0 ** -5 + 1e-9) == 7000
    # silence in the first half is never a split point
    x = loud.copy()
    x[1000:5000] = 0.0
    assert vs.quiet_split(x, n, 0.1) is None
    # the search starts exactly at L // 2 - N // 2 = 4800 (a window at 4799 would be all zeros)
    x = loud.copy()
    x[4799:7200] = 0.0
    assert vs.quiet_split(x, n, 0.015) == 4800
    # odd length: mid = 6000 still
    x = np.concatenate([loud, [0.5]]).astype(np.float32)
    x[4799:7200] = 0.0
    assert vs.quiet_split(x, n, 0.015) == 4800


def test_trim_leading_silence():
    x = np.array([0.01, -0.03, -0.0300001, 0.5, 0.0], np.float32)
    np.testing.assert_array_equal(vs.trim_leading_silence(x, 0.03), x[2:])
    quiet = np.full(10, 0.02, np.float32)
    np.testing.assert_array_equal(vs.trim_leading_silence(quiet, 0.03), quiet)
    # keep: that many samples before the first loud one stay (a weak onset), never before the start
    np.testing.assert_array_equal(vs.trim_leading_silence(x, 0.03, keep=1), x[1:])
    np.testing.assert_array_equal(vs.trim_leading_silence(x, 0.03, keep=5), x)


def test_first_packet_trim_keeps_a_pre_roll():
    """Only the reply's first packet is trimmed; by default 0.1 s before its first loud sample
    stays (the release's cut, trim_keep_s=0, drops unvoiced onsets)."""
    onset = np.full(2400, 0.01, np.float32)  # 0.1 s of a weak fricative before the voiced part
    packet = np.concatenate([np.zeros(4800, np.float32), onset, np.full(100, 0.5, np.float32)])
    ours = vs.VocoderStreamConfig()
    release = dataclasses.replace(ours, trim_keep_s=0.0)
    np.testing.assert_array_equal(vs.trim_first_packet(packet, 0, ours), packet[4800:])
    np.testing.assert_array_equal(vs.trim_first_packet(packet, 0, release), packet[7200:])
    np.testing.assert_array_equal(vs.trim_first_packet(packet, 1, ours), packet)
    with pytest.raises(ConfigError, match="trim_keep_s"):
        vs.VocoderStreamConfig(trim_keep_s=-0.1)


def test_first_packet_without_loud_sample_is_kept_whole():
    tokens = make_tokens([("Q", 12)])
    (packet,) = vs.stream_vocode(tokens, RecordingDecoder())
    np.testing.assert_array_equal(packet, expected_wave(tokens))


def test_offline_variant():
    cfg = vs.VocoderStreamConfig.offline()
    spec = [("Q", 5), ("L", 20), ("S", 5), ("L", 10),  # window 1 emits tokens 0..39
            ("L", 25), ("Q7", 5), ("L", 10),  # window 2 emits 40..79; 2^-7 < 0.01 splits
            ("L", 30)]  # tail 80..109
    tokens = make_tokens(spec)
    dec = RecordingDecoder()
    packets = list(vs.stream_vocode(tokens, dec, cfg))
    assert [(c[0] // 16, len(c)) for c in dec.calls] == [(0, 50), (30, 60), (70, 40)]
    wave = expected_wave(tokens)
    # Window 1: [0, 24000), search from 10800, silence 15000..17999, cut 15000; no trim offline
    # (leading 2^-8 samples stay). Window 2: [24000, 48000), 2^-7 region from 39000: cut 39000.
    bounds = [(0, 15000), (15000, 39000), (39000, 66000)]
    assert len(packets) == 3
    for packet, (a, b) in zip(packets, bounds):
        np.testing.assert_array_equal(packet, wave[a:b])
    # 2^-6 = 0.015625 is above the offline threshold 0.01: window 2 is then buffered.
    spec[5] = ("Q6", 5)
    tokens = make_tokens(spec)
    packets = list(vs.stream_vocode(tokens, RecordingDecoder(), cfg))
    assert [len(p) for p in packets] == [15000, 66000 - 15000]


def test_reply_switches_settings_after_first_packet():
    seg_a = make_tokens([("Q", 2), ("L", 10)])  # shorter than a first window: tail only
    spec_b = [("Q", 3), ("L", 7), ("Q5", 5), ("L", 10), ("Q5", 5), ("L", 30)]
    seg_b = [t + 16 * 100 for t in make_tokens(spec_b)]
    wave_a, wave_b = expected_wave(seg_a), expected_wave(seg_b)
    dec = RecordingDecoder()
    packets = list(vs.vocode_reply([[], seg_a, seg_b], dec, SERVER))
    # empty segment: nothing, the next one is still "first"; B: chunk 40 -> window of 50, then tail.
    assert [len(c) for c in dec.calls] == [12, 50, 30]
    assert dec.calls[2] == seg_b[30:60]
    np.testing.assert_array_equal(packets[0], wave_a[1200:])  # the reply's first packet is trimmed
    # B's window emits [0, 24000), searched from 10800: the 2^-5 stretch at [15000, 18000) is not
    # quiet enough for 0.015, so B leaves as one packet, leading quiet samples kept.
    assert len(packets) == 2
    np.testing.assert_array_equal(packets[1], wave_b)
    # the same reply with a later threshold of 0.1 cuts B at 15000
    packets = list(vs.vocode_reply([seg_a, seg_b], RecordingDecoder(), dataclasses.replace(SERVER, seg_threshold=0.1)))
    assert [len(p) for p in packets] == [len(wave_a) - 1200, 15000, 36000 - 15000]
    # B as a reply's first segment (chunk 20, threshold 0.1): window 1 emits [0, 12000) and cuts at
    # the 2^-5 stretch at 6000; window 2 ([12000, 24000), searched from 16800) is buffered.
    dec = RecordingDecoder()
    first = list(vs.stream_vocode(seg_b, dec, SERVER))
    assert [len(c) for c in dec.calls] == [30, 40, 30]
    assert len(first) == 2
    np.testing.assert_array_equal(first[0], wave_b[1800:6000])
    np.testing.assert_array_equal(first[1], wave_b[6000:])


def reference_release(tokens, decode, chunk, pad, n, threshold, trim):
    """Straightforward transcription of the release's per-token loop (direct window sums)."""
    out, buf, held, left = [], np.zeros(0), [], 0
    for t in tokens:
        held.append(t)
        if len(held) == left + chunk + pad:
            syn = decode(np.asarray(held, np.int32)).astype(np.float64)
            syn = syn[left * SPT: len(syn) - pad * SPT]
            left, held = pad, held[-2 * pad:]
            sums = np.convolve(np.abs(syn), np.ones(n), "valid")
            s0 = len(syn) // 2 - n // 2
            m = int(np.argmin(sums[s0:]))
            s = max(0, m + s0)
            e = min(len(syn), m + n + s)
            cut = s + int(np.argmin(np.abs(syn[s:e])))
            if sums[s0 + m] / n < threshold:
                out.append(np.concatenate([buf, syn[:cut]]))
                buf = syn[cut:]
            else:
                buf = np.concatenate([buf, syn])
    if held:
        out.append(np.concatenate([buf, decode(np.asarray(held, np.int32))[left * SPT:]]))
    if trim and out:
        loud = np.flatnonzero(np.abs(out[0]) > 0.03)
        out[0] = out[0][loud[0]:] if loud.size else out[0]
    return out


@pytest.mark.parametrize("offline", [False, True])
def test_matches_release_loop_with_context_dependent_codec(offline):
    rng = np.random.default_rng(0)
    amps = np.array([0.0, 2.0 ** -8, 2.0 ** -6, 2.0 ** -3, 0.5])
    # runs of random amplitudes, per-sample dyadic noise: exact sums, both splits and buffering occur
    kinds = np.repeat(rng.choice(5, 80, p=[0.1, 0.1, 0.1, 0.2, 0.5]), rng.integers(1, 6, 80))[:181]
    table = {}
    for i, k in enumerate(kinds):
        table[i] = amps[k] * rng.integers(-4, 5, SPT) / 4.0

    def codec(window):  # each token mixes in its left neighbour within the window
        waves = [table[t] for t in window.tolist()]
        prev = [np.zeros(SPT)] + waves[:-1]
        return np.concatenate([0.5 * w + 0.25 * p for w, p in zip(waves, prev)])

    tokens = list(range(len(kinds)))
    cfg = vs.VocoderStreamConfig.offline() if offline else SERVER
    calls = []
    got = list(vs.stream_vocode(tokens, vs.slicing(lambda w: calls.append(len(w)) or codec(w)), cfg))
    want = reference_release(tokens, codec, 40 if offline else 20, 10, 2401,
                             0.01 if offline else 0.1, trim=not offline)
    assert len(got) == len(want)
    if offline:  # no trim: every token's audio leaves exactly once
        assert sum(len(a) for a in got) == SPT * len(tokens)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b.astype(np.float32))
    windows, splits = len(calls) - 1, len(got) - 1  # the last call and packet are the tail
    assert 0 < splits < windows  # both paths taken: some windows split, some buffered whole


def test_errors():
    with pytest.raises(ConfigError, match="overlap_size"):
        vs.VocoderStreamConfig(overlap_size=0)
    with pytest.raises(ConfigError, match="window_n"):
        vs.VocoderStreamConfig(first_chunk_size=4)
    with pytest.raises(ValueError, match=r"10 samples for 3 kept tokens .* expected 600 per token"):
        list(vs.stream_vocode(range(3), lambda w, trim: np.zeros(10)))
    with pytest.raises(ValueError, match=r"for 20 kept tokens \(a 30-token window, trim \(0, 10\)\)"):
        list(vs.stream_vocode(range(30), lambda w, trim: np.zeros(600 * len(w))))  # ignores the trim


def test_slicing_adapts_a_whole_window_decoder():
    window = np.asarray(make_tokens([("L", 4), ("Q", 3), ("Z", 3)]), np.int32)
    whole = lambda w: expected_wave(w)[None]  # noqa: E731 - (1, 600 T), as a batched codec returns
    np.testing.assert_array_equal(vs.slicing(whole)(window, (2, 3)), expected_wave(window[2:7]))
    np.testing.assert_array_equal(vs.slicing(whole)(window, (0, 0)), expected_wave(window))


def test_decoder_may_return_a_batched_jax_array():
    import jax.numpy as jnp

    tokens = make_tokens(MAIN_SPEC)
    batched = list(vs.stream_vocode(tokens, lambda w, trim: jnp.asarray(RecordingDecoder()(w, trim))[None]))
    plain = list(vs.stream_vocode(tokens, RecordingDecoder()))
    assert len(batched) == len(plain)
    for a, b in zip(batched, plain):
        np.testing.assert_array_equal(a, b)
