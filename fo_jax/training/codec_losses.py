"""TiCodec training losses: HiFi-GAN LSGAN adversarial + feature matching, mel L1, VQ terms.

Discriminator outputs come as lists (one entry per sub-discriminator) from
``fo_jax.models.discriminators``; feature maps as lists of lists. The mel spectrogram is HiFi-GAN's:
reflect-pad (n_fft - hop) / 2 per side, Hann-windowed STFT without centring, magnitude
sqrt(re^2 + im^2 + 1e-9), Slaney mel filterbank (librosa's default), log(max(mel, 1e-5)).
The VQ loss itself is computed by the quantiser (``fo_jax.models.codec.quantizer_loss``).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fo_jax.audio.spectral import mel_filterbank
from fo_jax.models.codec import quantizer_loss  # noqa: F401  (re-exported: one place per concept)
from fo_jax.models.configs import CodecConfig

# Weights of the generator objective in TiCodec's recipe (train.py): mel x45 (+ 2 coarser mels,
# not included here), adversarial and feature matching x1, VQ x10, global-feature consistency x5.
GENERATOR_WEIGHTS = {"mel": 45.0, "adv": 1.0, "fm": 1.0, "vq": 10.0, "global": 5.0}


def feature_loss(fmap_r: Sequence[Sequence[jax.Array]], fmap_g: Sequence[Sequence[jax.Array]]) -> jax.Array:
    """Feature matching: 2 * sum over discriminators and layers of mean |real - generated|."""
    return 2.0 * sum(jnp.mean(jnp.abs(r - g)) for dr, dg in zip(fmap_r, fmap_g) for r, g in zip(dr, dg))


def discriminator_loss(real: Sequence[jax.Array], generated: Sequence[jax.Array]
                       ) -> tuple[jax.Array, list[jax.Array], list[jax.Array]]:
    """LSGAN discriminator loss: sum of mean (1 - D(real))^2 + mean D(gen)^2. Returns (total, real terms, gen terms)."""
    r_losses = [jnp.mean(jnp.square(1.0 - dr)) for dr in real]
    g_losses = [jnp.mean(jnp.square(dg)) for dg in generated]
    return sum(r_losses) + sum(g_losses), r_losses, g_losses


def generator_loss(generated: Sequence[jax.Array]) -> tuple[jax.Array, list[jax.Array]]:
    """LSGAN generator loss: sum of mean (1 - D(gen))^2. Returns (total, per discriminator)."""
    losses = [jnp.mean(jnp.square(1.0 - dg)) for dg in generated]
    return sum(losses), losses


def mel_spectrogram(wav_bs: jax.Array, n_fft: int, n_mels: int, sample_rate: int, hop_size: int,
                    win_size: int, fmin: float, fmax: float | None) -> jax.Array:
    """(B, S) waveform -> (B, frames, n_mels) log mel spectrogram, frames = S // hop_size for HiFi-GAN sizes."""
    pad = (n_fft - hop_size) // 2
    x = jnp.pad(wav_bs.astype(jnp.float32), ((0, 0), (pad, pad)), mode="reflect")
    n_frames = 1 + (x.shape[1] - n_fft) // hop_size
    idx = np.arange(n_frames)[:, None] * hop_size + np.arange(n_fft)[None, :]
    # torch.hann_window is periodic; a shorter window is centred in the n_fft frame.
    window = np.zeros(n_fft, np.float32)
    offset = (n_fft - win_size) // 2
    window[offset:offset + win_size] = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(win_size) / win_size)
    spec = jnp.fft.rfft(x[:, idx] * window, axis=-1)
    mag = jnp.sqrt(jnp.real(spec) ** 2 + jnp.imag(spec) ** 2 + 1e-9)
    mel = mag @ jnp.asarray(mel_filterbank(sample_rate, n_fft, n_mels, fmin, fmax).T)
    return jnp.log(jnp.maximum(mel, 1e-5))


def codec_mel(config: CodecConfig, wav_bs: jax.Array, fmax: float | None = None) -> jax.Array:
    """Log mel with the codec's params (n_fft 1024, hop 240, win 1024, 80 mels); fmax defaults to config.fmax."""
    return mel_spectrogram(wav_bs, config.n_fft, config.n_mels, config.sample_rate, config.hop_size,
                           config.win_size, config.fmin, config.fmax if fmax is None else fmax)


def mel_l1_loss(config: CodecConfig, wav_bs: jax.Array, wav_hat_bs: jax.Array) -> jax.Array:
    """mean |mel(y) - mel(y_hat)| with the mel-loss fmax (``fmax_for_loss``; None = Nyquist, as HiFi-GAN)."""
    fmax = config.sample_rate / 2.0 if config.fmax_for_loss is None else config.fmax_for_loss
    return jnp.mean(jnp.abs(codec_mel(config, wav_bs, fmax) - codec_mel(config, wav_hat_bs, fmax)))


def global_consistency_loss(global_a_bd: jax.Array, global_b_bd: jax.Array) -> jax.Array:
    """1 - mean cosine similarity of two clips' global vectors (TiCodec; b is usually stop-gradient)."""
    dot = jnp.sum(global_a_bd * global_b_bd, axis=-1)
    norms = jnp.maximum(jnp.linalg.norm(global_a_bd, axis=-1) * jnp.linalg.norm(global_b_bd, axis=-1), 1e-8)
    return 1.0 - jnp.mean(dot / norms)


def generator_objective(terms: Mapping[str, jax.Array],
                        weights: Mapping[str, float] = GENERATOR_WEIGHTS) -> jax.Array:
    """Weighted sum of the generator-side terms present in ``terms`` (keys of GENERATOR_WEIGHTS)."""
    unknown = set(terms) - set(weights)
    if unknown:
        raise KeyError(f"no weight for loss term(s) {sorted(unknown)}")
    return sum(weights[k] * v for k, v in terms.items())
