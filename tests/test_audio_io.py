"""Audio io: resampling and downmix to 16 kHz mono, one-line errors, bounded-memory streaming."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import soundfile as sf

from fo_jax.audio.io import Rechunker, audio_info, load_audio, resample, stream_audio, to_mono, write_wav
from fo_jax.errors import AudioError, FoJaxError


def sine(freq: float, rate: int, seconds: float, amp: float = 0.5) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * freq * np.arange(int(rate * seconds)) / rate)).astype(np.float32)


def peak_hz(x: np.ndarray, rate: int) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.argmax(spec) * rate / len(x)


@pytest.mark.parametrize("rate, freq", [(8000, 440.0), (44100, 1000.0), (22050, 3000.0), (48000, 6000.0)])
def test_resample_preserves_sine(tmp_path, rate, freq):
    x = sine(freq, rate, 1.3)
    write_wav(tmp_path / "s.wav", x, rate)
    y, out_rate = load_audio(tmp_path / "s.wav")
    assert out_rate == 16000 and y.dtype == np.float32
    assert len(y) == -(-len(x) * 16000 // rate)
    assert abs(peak_hz(y, 16000) - freq) <= 16000 / len(y)  # within one FFT bin
    mid = y[2000:-2000]  # away from the filter's edge transients
    np.testing.assert_allclose(np.sqrt(np.mean(mid ** 2)), 0.5 / np.sqrt(2), rtol=5e-3)
    # Sample-exact timing: y(t) = 0.5 sin(2 pi f t) at t = n / 16000.
    t = np.arange(len(y)) / 16000
    np.testing.assert_allclose(mid, (0.5 * np.sin(2 * np.pi * freq * t))[2000:-2000], atol=3e-3)


def test_stereo_downmix(tmp_path):
    left = sine(440.0, 44100, 1.0)
    stereo = np.stack([left, 0.5 * left], axis=1)
    write_wav(tmp_path / "st.wav", stereo, 44100)
    assert audio_info(tmp_path / "st.wav") == (44100, 44100, 2)
    native, rate = load_audio(tmp_path / "st.wav", sample_rate=None)
    assert rate == 44100 and native.shape == (44100,)
    np.testing.assert_allclose(native, 0.75 * left, atol=2 / 32768)  # mean of the channels
    y, _ = load_audio(tmp_path / "st.wav")
    assert y.shape == (16000,) and abs(peak_hz(y, 16000) - 440.0) <= 1.0
    np.testing.assert_allclose(to_mono(stereo), 0.75 * left, atol=1e-7)


def test_write_wav_round_trip(tmp_path):
    pcm = np.array([-32768, -1, 0, 1, 12345, 32767], np.int16)
    write_wav(tmp_path / "a.wav", pcm, 16000)
    x, _ = load_audio(tmp_path / "a.wav")
    np.testing.assert_array_equal(x, pcm / 32768.0)
    write_wav(tmp_path / "b.wav", x, 16000)  # floats back to the same int16
    np.testing.assert_array_equal(sf.read(tmp_path / "b.wav", dtype="int16")[0], pcm)
    write_wav(tmp_path / "c.wav", np.array([1.5, -2.0, 0.25]), 8000)  # clipped
    assert sf.info(tmp_path / "c.wav").subtype == "PCM_16"
    np.testing.assert_array_equal(sf.read(tmp_path / "c.wav", dtype="int16")[0], [32767, -32768, 8192])


def test_flac_input(tmp_path):
    x = sine(700.0, 24000, 0.5)
    sf.write(tmp_path / "x.flac", x, 24000)
    y, _ = load_audio(tmp_path / "x.flac")
    assert len(y) == 8000 and abs(peak_hz(y, 16000) - 700.0) <= 2.0


def bad_files(tmp_path):
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "text.wav").write_text("this is not audio\n")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "noise.flac").write_bytes(np.random.default_rng(0).bytes(4096))
    write_wav(tmp_path / "good.wav", sine(440, 16000, 0.1), 16000)
    raw = (tmp_path / "good.wav").read_bytes()
    (tmp_path / "truncated.wav").write_bytes(raw[:30])  # cut inside the header
    (tmp_path / "badfmt.wav").write_bytes(raw[:20] + b"\xff\xff" + raw[22:])  # unknown format code
    sf.write(tmp_path / "zero.wav", np.zeros(0, np.int16), 16000)  # valid header, no samples
    (tmp_path / "adir").mkdir()
    return ["empty.wav", "text.wav", "notes.txt", "noise.flac", "truncated.wav", "badfmt.wav", "zero.wav",
            "adir", "missing.wav"]


def test_bad_files_give_one_line_errors(tmp_path):
    for name in bad_files(tmp_path):
        path = tmp_path / name
        for read in (lambda p: load_audio(p), lambda p: next(stream_audio(p)), audio_info):
            with pytest.raises(AudioError) as info:
                read(path)
            msg = str(info.value)
            assert isinstance(info.value, FoJaxError)
            assert str(path) in msg and "\n" not in msg, msg


def test_bad_arguments():
    with pytest.raises(AudioError, match="sample rate"):
        resample(np.zeros(10), 0, 16000)
    with pytest.raises(AudioError, match="sample rate"):
        resample(np.zeros(10), 16000, 22050.5)
    with pytest.raises(AudioError, match="chunk_samples"):
        next(stream_audio("whatever.wav", chunk_samples=0))


@pytest.mark.parametrize("rate, channels", [(44100, 2), (8000, 1), (16000, 1)])
def test_stream_equals_load(tmp_path, rate, channels):
    rng = np.random.default_rng(rate)
    x = (0.2 * rng.standard_normal((rate * 2 + 77, channels))).astype(np.float32)
    write_wav(tmp_path / "x.wav", x, rate)
    full, _ = load_audio(tmp_path / "x.wav")
    # Small blocks: many block boundaries inside the file.
    chunks = list(stream_audio(tmp_path / "x.wav", chunk_samples=2560, block_samples=3000))
    assert all(c.shape == (2560,) and c.dtype == np.float32 for c in chunks)
    assert len(chunks) == -(-len(full) // 2560)
    streamed = np.concatenate(chunks)
    np.testing.assert_allclose(streamed[:len(full)], full, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(streamed[len(full):], 0.0)  # zero-padded last chunk
    last = list(stream_audio(tmp_path / "x.wav", chunk_samples=1000, pad_last=False))[-1]
    assert len(last) == len(full) % 1000 or (len(full) % 1000 == 0 and len(last) == 1000)


def test_long_file_streams_in_bounded_memory(tmp_path):
    rate, seconds = 44100, 120
    path = tmp_path / "long.wav"
    with sf.SoundFile(path, "w", samplerate=rate, channels=2, subtype="PCM_16") as f:
        for start in range(0, seconds, 10):  # written in pieces: the test itself stays small
            block = sine(1000.0, rate, 10, amp=0.3)
            f.write(np.stack([block, block], axis=1))
    decoded_bytes = rate * seconds * 4  # the whole file as float32 mono: ~21 MB
    tracemalloc.start()
    count, peak_freqs = 0, set()
    for i, chunk in enumerate(stream_audio(path, chunk_samples=16000)):
        count += 1
        if i % 40 == 5:
            peak_freqs.add(round(peak_hz(chunk, 16000)))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert count == seconds  # 1 s chunks of the 16 kHz output
    with pytest.raises(AudioError, match="120.0 s long, over the 60 s limit") as info:
        load_audio(path, max_seconds=60)
    assert str(path) in str(info.value)
    assert peak_freqs == {1000}
    # ~2 MB with the default 64k-sample blocks, whatever the file length; decoding it all: 21 MB.
    assert peak < 4e6 < decoded_bytes / 5, f"peak {peak} bytes while streaming"


def test_rechunker_regroups_live_blocks():
    rng = np.random.default_rng(3)
    x = rng.uniform(-1, 1, 10000).astype(np.float32)
    chunker, chunks, pos = Rechunker(2560), [], 0
    for size in [1, 511, 2560, 3000, 7, 2000]:  # packets of any size, 8079 samples
        chunks += chunker.push(x[pos:pos + size])
        pos += size
    assert [len(c) for c in chunks] == [2560] * 3 and chunker.pending == 8079 - 3 * 2560
    np.testing.assert_array_equal(np.concatenate(chunks), x[:3 * 2560])
    last = chunker.flush()
    np.testing.assert_array_equal(last, np.pad(x[3 * 2560:8079], (0, 2560 - 399)))
    assert chunker.pending == 0 and chunker.flush() is None
    with pytest.raises(AudioError, match="chunk_samples"):
        Rechunker(2.5)
