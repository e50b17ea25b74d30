"""Kaldi fbank vs kaldi-native-fbank on synthesized speech, and the official streaming framing."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import fo_jax.audio.fbank as fb
from fo_jax.audio.fbank import FbankStreamState, chunked_fbank, fbank, fbank_jax, fbank_stream_step_jit
from fo_jax.audio.io import resample

knf = pytest.importorskip("kaldi_native_fbank")

SENTENCE = "What is two plus three? The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module", params=["espeak", "piper"])
def speech16k(request):
    """Real synthesized speech (22050 Hz int16) resampled to 16 kHz float in [-1, 1]."""
    speech = pytest.importorskip("fo_jax.testing.speech")
    pytest.importorskip("espeakng_loader" if request.param == "espeak" else "piper")
    if request.param == "espeak":
        pcm, rate = speech.espeak(SENTENCE)
    else:
        pcm, rate = speech.piper(SENTENCE, noise_scale=0.0, noise_w_scale=0.0)
    assert rate == 22050 and len(pcm) > rate  # > 1 s of audio
    return resample(pcm.astype(np.float32) / 32768.0, rate, 16000)


def knf_fbank(wave: np.ndarray) -> np.ndarray:
    opts = knf.FbankOptions()
    opts.frame_opts.samp_freq = 16000
    opts.frame_opts.dither = 0.0
    opts.mel_opts.num_bins = 80
    online = knf.OnlineFbank(opts)
    online.accept_waveform(16000, (wave * 32768.0).astype(np.float32).tolist())
    online.input_finished()
    return np.stack([online.get_frame(i) for i in range(online.num_frames_ready)])


def test_window_and_mel_banks_match_knf():
    window = np.array(knf.FeatureWindowFunction(knf.FrameExtractionOptions()).window)
    np.testing.assert_allclose(fb.povey_window(), window, rtol=0, atol=1e-7)
    mel_opts = knf.MelBanksOptions()
    mel_opts.num_bins = 80
    banks = np.array(knf.MelBanks(mel_opts, knf.FrameExtractionOptions()).get_matrix())  # (80, 257)
    assert fb.mel_banks().shape == (257, 80)
    # knf builds its triangles in float32 (logf); ours are float64.
    np.testing.assert_allclose(fb.mel_banks().T, banks, rtol=0, atol=2e-5)
    assert np.array_equal(fb.mel_banks().T > 0, banks > 0)  # same support for every bin


def test_fbank_matches_knf_on_speech(speech16k):
    ref = knf_fbank(speech16k)
    ours_np = fbank(speech16k)
    ours_jax = np.asarray(fbank_jax(speech16k))
    assert ours_np.shape == ours_jax.shape == ref.shape == (fb.num_frames(len(speech16k)), 80)
    assert ours_np.dtype == ours_jax.dtype == np.float32
    # knf runs a float32 FFT: in bins whose energy is far below the frame's strongest bin its
    # rounding noise dominates (up to ~4e-3 from the exact float64 value on this clean synthetic
    # speech). Within 80 dB of the frame's peak bin all agree to 1e-3; the rest is bounded.
    depth = ref.max(axis=1, keepdims=True) - ref  # nats below the frame's strongest mel bin
    near = depth < 8 * np.log(10)
    assert near.mean() > 0.99
    for ours in (ours_np, ours_jax):
        err = np.abs(ours - ref)
        assert err[near].max() < 1e-3
        assert err.max() < 1e-2
        assert err.mean() < 2e-5


@pytest.mark.parametrize("num_samples, frames",
                         [(0, 0), (399, 0), (400, 1), (559, 1), (560, 2), (16000, 98)])
def test_snip_edges_frame_count(num_samples, frames):
    wave = np.random.default_rng(0).uniform(-0.5, 0.5, num_samples)
    assert fb.num_frames(num_samples) == frames
    assert fbank(wave).shape == (frames, 80)
    if frames:  # the last frame starts at 160 (F - 1) and ignores the samples after its window
        start = 160 * (frames - 1)
        np.testing.assert_allclose(fbank(wave)[-1], fbank(wave[start:start + 400])[0])


def test_int16_input_is_scaled_like_float():
    pcm = np.random.default_rng(1).integers(-20000, 20000, 3200).astype(np.int16)
    np.testing.assert_array_equal(fbank(pcm), fbank(pcm.astype(np.float32) / 32768.0))
    # log-mel of a*x = log-mel of x + 2 log a (scale=1 is raw int16-range input)
    np.testing.assert_allclose(fbank(pcm, scale=1.0) + 2 * np.log(32768.0), fbank(pcm), atol=1e-4)


def official_streaming(wave: np.ndarray, kernel) -> np.ndarray:
    """bin/inference.py's loop restated: a 2800-sample buffer and a 19-frame buffer, both shifted."""
    padded = np.zeros(-(-len(wave) // 2560) * 2560)
    padded[:len(wave)] = wave
    samples, frames, out = np.zeros(2800), np.zeros((19, 80), np.float32), []
    for i in range(0, len(padded), 2560):
        samples[:240] = samples[-240:].copy()
        samples[240:] = padded[i:i + 2560]
        new = np.asarray(kernel(samples))
        assert new.shape == (16, 80)
        frames[:3] = frames[-3:].copy()
        frames[3:] = new
        out.append(frames.copy())
    return np.stack(out)


@pytest.fixture(scope="module")
def long_speech16k():
    """About 2 s of 16 kHz speech, not a whole number of 2560-sample chunks."""
    speech = pytest.importorskip("fo_jax.testing.speech")
    pytest.importorskip("espeakng_loader")
    wave = speech.synthesize("one two three four five six", "espeak", rate=220)
    return wave[:-1] if len(wave) % 2560 == 0 else wave


def test_chunked_fbank_equals_official_framing(long_speech16k):
    wave = long_speech16k
    chunks = chunked_fbank(wave)
    n_chunks = -(-len(wave) // 2560)
    assert chunks.shape == (n_chunks, 19, 80) and n_chunks >= 8
    np.testing.assert_allclose(chunks, official_streaming(wave, fbank), rtol=0, atol=1e-6)

    # Expected frames built by hand from the official rules: stream frame k covers input samples
    # [160k - 240, 160k + 160), zeros before 0 and after the end (the tail is padded to 2560).
    padded = np.concatenate([np.zeros(240), wave, np.zeros(n_chunks * 2560 - len(wave))])
    full = fbank(padded)
    assert full.shape == (16 * n_chunks, 80)
    np.testing.assert_array_equal(chunks[0, :3], 0.0)  # the first chunk's 3 history frames are zeros
    for c in range(n_chunks):
        np.testing.assert_allclose(chunks[c, 3:], full[16 * c:16 * c + 16], atol=1e-6)
        if c:
            np.testing.assert_allclose(chunks[c, :3], full[16 * c - 3:16 * c], atol=1e-6)
    # Hand-checked sample offsets of single frames, each computed from its own 400 samples.
    one = lambda x: fbank(x)[0]  # noqa: E731
    np.testing.assert_allclose(chunks[0, 3], one(np.concatenate([np.zeros(240), wave[:160]])), atol=1e-6)
    np.testing.assert_allclose(chunks[0, 4], one(np.concatenate([np.zeros(80), wave[:320]])), atol=1e-6)
    np.testing.assert_allclose(chunks[0, 5], one(wave[80:480]), atol=1e-6)  # frame 2
    np.testing.assert_allclose(chunks[1, 0], one(wave[1840:2240]), atol=1e-6)  # frame 13, overlap
    np.testing.assert_allclose(chunks[1, 3], one(wave[2320:2720]), atol=1e-6)  # frame 16
    np.testing.assert_allclose(chunks[2, 3], one(wave[4880:5280]), atol=1e-6)  # frame 32


def test_jax_stream_step_matches_official_loop(long_speech16k):
    wave = long_speech16k
    n_chunks = -(-len(wave) // 2560)
    padded = np.zeros(n_chunks * 2560, np.float32)
    padded[:len(wave)] = wave
    waves = np.stack([padded, padded[::-1]])  # two users step together; user 1 hears it reversed
    kernel = jax.jit(fbank_jax)  # same float32 math, jitted like the step (eager op-by-op rounds differently)
    expected = [official_streaming(w, lambda x: kernel(x.astype(np.float32))) for w in waves]
    state = FbankStreamState.zeros(batch=2)
    assert state.samples.shape == (2, 240) and state.frames.shape == (2, 3, 80)
    prev = None
    for c in range(n_chunks):
        state, feats = fbank_stream_step_jit(state, waves[:, 2560 * c:2560 * (c + 1)])
        feats = np.asarray(feats)
        assert feats.shape == (2, 19, 80)
        for b in range(2):
            np.testing.assert_allclose(feats[b], expected[b][c], rtol=0, atol=1e-5)
        # The carried state is exactly the last 240 samples and the last 3 new frames.
        tail = waves[:, 2560 * (c + 1) - 240:2560 * (c + 1)]
        np.testing.assert_array_equal(np.asarray(state.samples), tail)
        np.testing.assert_array_equal(feats[:, :3], 0.0 if prev is None else prev[:, -3:])
        prev = feats
    # Against the float64 numpy framing: equal to the float32 tolerance of the knf comparison.
    for b in range(2):
        ref = chunked_fbank(waves[b])
        near = ref.max(-1, keepdims=True) - ref < 8 * np.log(10)
        assert np.abs(expected[b] - ref)[near].max() < 1e-3


def test_stream_step_compiles_once():
    state = FbankStreamState.zeros(batch=3)
    rng = np.random.default_rng(0)
    state, _ = fbank_stream_step_jit(state, rng.uniform(-0.3, 0.3, (3, 2560)).astype(np.float32))
    warm = fbank_stream_step_jit._cache_size()
    for _ in range(20):
        state, feats = fbank_stream_step_jit(state, rng.uniform(-0.3, 0.3, (3, 2560)).astype(np.float32))
    assert fbank_stream_step_jit._cache_size() == warm
    assert np.all(np.isfinite(np.asarray(feats)))
