"""Spectral tools in numpy: Slaney mel filterbank, STFT / inverse STFT, Griffin-Lim phase recovery.

Framing (``stft``): frame j covers samples ``[j * hop - (n_fft - hop) / 2, ...)`` of the input
reflect-padded by ``(n_fft - hop) / 2`` per side, a periodic Hann window of n_fft samples;
``len(x) // hop`` frames, so frame j is centred on the hop-sized slice ``[j * hop, (j + 1) * hop)``
and ``istft`` of M frames returns exactly ``M * hop`` samples.
"""

from __future__ import annotations

import functools

import numpy as np


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney mel scale: linear (3 mel per 200 Hz) below 1 kHz, logarithmic above."""
    f = np.asarray(f, np.float64)
    logstep = np.log(6.4) / 27.0
    return np.where(f < 1000.0, f * 3.0 / 200.0, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / logstep)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, np.float64)
    logstep = np.log(6.4) / 27.0
    return np.where(m < 15.0, m * 200.0 / 3.0, 1000.0 * np.exp(logstep * (m - 15.0)))


@functools.lru_cache(maxsize=16)
def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float | None) -> np.ndarray:
    """(n_mels, n_fft // 2 + 1) Slaney-normalised triangular filters (librosa.filters.mel defaults)."""
    fmax = sample_rate / 2.0 if fmax is None else float(fmax)
    fft_hz = np.linspace(0.0, sample_rate / 2.0, n_fft // 2 + 1)
    mel_hz = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2))
    lo, center, hi = mel_hz[:-2, None], mel_hz[1:-1, None], mel_hz[2:, None]
    rising = (fft_hz - lo) / (center - lo)
    falling = (hi - fft_hz) / (hi - center)
    weights = np.maximum(0.0, np.minimum(rising, falling))
    return (weights * (2.0 / (hi - lo))).astype(np.float32)  # Slaney: each filter has unit area in Hz


@functools.lru_cache(maxsize=8)
def hann(n: int) -> np.ndarray:
    """Periodic Hann window (torch.hann_window's default)."""
    return (0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)).astype(np.float32)


def stft(x: np.ndarray, n_fft: int, hop: int) -> np.ndarray:
    """(N,) float -> (N // hop, n_fft // 2 + 1) complex64 spectrum (framing in the module doc)."""
    if (n_fft - hop) % 2:
        raise ValueError(f"n_fft - hop must be even, got n_fft={n_fft}, hop={hop}")
    n_frames = len(x) // hop
    pad = (n_fft - hop) // 2
    xp = np.pad(np.asarray(x, np.float32), (pad, pad), mode="reflect" if len(x) > pad else "constant")
    idx = np.arange(n_frames)[:, None] * hop + np.arange(n_fft)[None, :]
    return np.fft.rfft(xp[idx] * hann(n_fft), axis=-1).astype(np.complex64)


def istft(spec: np.ndarray, n_fft: int, hop: int) -> np.ndarray:
    """(M, n_fft // 2 + 1) complex -> (M * hop,) float32: windowed overlap-add, window-power normalised."""
    n_frames = spec.shape[0]
    pad = (n_fft - hop) // 2
    frames = np.fft.irfft(spec, n=n_fft, axis=-1).astype(np.float32) * hann(n_fft)
    length = (n_frames - 1) * hop + n_fft
    out = np.zeros(length, np.float32)
    norm = np.zeros(length, np.float32)
    window_sq = hann(n_fft) ** 2
    for j in range(n_frames):  # M adds of n_fft samples: cheap next to the FFTs
        out[j * hop:j * hop + n_fft] += frames[j]
        norm[j * hop:j * hop + n_fft] += window_sq
    out = out / np.maximum(norm, 1e-3 * window_sq.max())
    return out[pad:pad + n_frames * hop]


def griffin_lim(magnitude: np.ndarray, n_fft: int, hop: int, iters: int = 32, momentum: float = 0.99,
                seed: int = 0) -> np.ndarray:
    """(M, n_fft // 2 + 1) magnitudes -> (M * hop,) float32 waveform whose STFT magnitude approximates them.

    Fast Griffin-Lim (Perraudin et al. 2013: GL with momentum ``momentum``), from seeded random
    phases, so the result is deterministic.
    """
    rng = np.random.default_rng(seed)
    phase = np.exp(2j * np.pi * rng.random(magnitude.shape)).astype(np.complex64)
    previous = np.zeros_like(phase)
    for _ in range(iters):
        rebuilt = stft(istft(magnitude * phase, n_fft, hop), n_fft, hop)
        accelerated = rebuilt + momentum * (rebuilt - previous)
        previous = rebuilt
        phase = accelerated / np.maximum(np.abs(accelerated), 1e-8)
    return istft(magnitude * phase, n_fft, hop)
