"""The fast mel k-means codec (fo_jax.models.mel_codec) and the spectral tools under it."""

from __future__ import annotations

import numpy as np
import pytest

from fo_jax.audio.spectral import griffin_lim, istft, stft
from fo_jax.errors import FoJaxError, LoadError
from fo_jax.models.mel_codec import MelVQCodec, MelVQConfig

RATE = 24000


def voiced(seed: int, seconds: float = 1.5) -> np.ndarray:
    """A voice-like test signal: 19 harmonics of a gliding pitch under a syllable-rate envelope."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    f0 = 110 + 40 * np.sin(2 * np.pi * rng.uniform(0.5, 2) * t)
    phase = 2 * np.pi * np.cumsum(f0) / RATE
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(1, 4) * t) ** 2
    x = sum(np.sin(k * phase) / k for k in range(1, 20)) * envelope
    return (0.2 * x / np.abs(x).max()).astype(np.float32)


@pytest.fixture(scope="module")
def codec() -> MelVQCodec:
    return MelVQCodec.fit([voiced(s) for s in range(5)], MelVQConfig(n_codes=64, griffin_lim_iters=16), iters=8)


def test_stft_istft_round_trip_is_exact_and_sized_by_hop():
    x = np.random.default_rng(0).standard_normal(3000).astype(np.float32)
    spec = stft(x, n_fft=600, hop=150)
    assert spec.shape == (20, 301)
    y = istft(spec, n_fft=600, hop=150)
    assert y.shape == (3000,)
    np.testing.assert_allclose(y, x, atol=1e-4)
    # Griffin-Lim from the magnitude alone gets close to it again (consistency of the result).
    z = griffin_lim(np.abs(spec), 600, 150, iters=32)
    err = np.abs(np.abs(stft(z, 600, 150)) - np.abs(spec)).mean() / np.abs(spec).mean()
    assert z.shape == (3000,) and err < 0.35


def test_encode_decode_shapes_at_40_hz(codec):
    assert (codec.sample_rate, codec.token_rate, codec.vocab_size) == (24000, 40.0, 64)
    x = voiced(7, seconds=1.234)
    tokens = codec.encode(x)
    assert tokens.dtype == np.int32 and tokens.shape == (int(1.234 * 40),)  # 29616 samples // 600
    assert tokens.min() >= 0 and tokens.max() < 64
    wav = codec.decode(tokens)
    assert wav.dtype == np.float32 and wav.shape == (len(tokens) * 600,)
    with pytest.raises(FoJaxError, match="shorter than one token"):
        codec.encode(np.zeros(599, np.float32))
    with pytest.raises(FoJaxError, match=r"\[0, 64\)"):
        codec.decode(np.array([3, 64]))


def test_codec_is_deterministic(codec):
    x = voiced(8)
    np.testing.assert_array_equal(codec.encode(x), codec.encode(x))
    tokens = codec.encode(x)
    np.testing.assert_array_equal(codec.decode(tokens), codec.decode(tokens))
    again = MelVQCodec.fit([voiced(s) for s in range(5)], codec.config, iters=8)
    np.testing.assert_array_equal(again.codebook, codec.codebook)


def test_round_trip_log_mel_error_is_small(codec):
    x = voiced(9)  # not in the k-means data
    target = codec.features(x)
    roundtrip = codec.features(codec.decode(codec.encode(x)))
    error = np.abs(roundtrip - target).mean()
    baseline = np.abs(target - target.mean(0)).mean()  # the error of knowing only the average spectrum
    assert error < 0.4 and error < 0.5 * baseline, (error, baseline)


def test_save_load_round_trip(codec, tmp_path):
    codec.save(tmp_path / "c")
    loaded = MelVQCodec.load(tmp_path / "c")
    assert loaded.config == codec.config
    np.testing.assert_array_equal(loaded.codebook, codec.codebook)
    x = voiced(10)
    np.testing.assert_array_equal(loaded.encode(x), codec.encode(x))
    with pytest.raises(LoadError, match="cannot load the mel codec"):
        MelVQCodec.load(tmp_path / "nothing")
    (tmp_path / "c" / "codec.json").write_text('{"kind": "wavenet"}')
    with pytest.raises(LoadError, match="not a mel_vq codec"):
        MelVQCodec.load(tmp_path / "c")


def test_prepare_codec_tokens_takes_the_mel_codec(codec, tmp_path):
    from fo_jax.audio.io import write_wav
    from fo_jax.data.codec_tokens import prepare_codec_tokens
    from fo_jax.data.manifest import write_manifest
    from fo_jax.training.stages.codec import load_speech_codec

    codec.save(tmp_path / "codec")
    loaded = load_speech_codec(tmp_path / "codec")  # what `fo-jax prepare-codec --codec DIR` loads
    assert isinstance(loaded, MelVQCodec)
    write_wav(tmp_path / "a.wav", voiced(11, seconds=1.0), RATE)
    write_manifest(tmp_path / "in.jsonl", [{"audio": "a.wav", "text": "hi"}])
    records, problems = prepare_codec_tokens(tmp_path / "in.jsonl", tmp_path / "out.jsonl", loaded, progress=False)
    assert not problems and records[0]["codec_tokens"] == codec.encode(voiced(11, seconds=1.0)).tolist()
    assert len(records[0]["codec_tokens"]) == 40
