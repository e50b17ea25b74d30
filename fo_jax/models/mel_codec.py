"""A fast-training speech codec: k-means vector quantisation of log-mel frames, fixed inverse.

The toy world's stand-in for TiCodec where a GAN vocoder cannot learn in minutes on a CPU. Same
interface (``fo_jax.data.codec_tokens.SpeechCodec``) and token stream shape: 24 kHz audio, one
token per 600 samples (40 Hz) from 1024 codes. ``save`` writes a folder (``codec.json`` +
``codebook.npy``) that ``MelVQCodec.load`` reads back.

Encode: log-mel spectrogram with ``frames_per_token`` STFT frames per token (hop 600 / K,
Hann window of 4 hops: 75 % overlap, which Griffin-Lim needs), the K frames of a token stacked into
one vector, and the index of the nearest of ``n_codes`` centroids (k-means, ``MelVQCodec.fit``).
Decode: centroid -> mel -> linear magnitude through the pseudo-inverse of the mel filterbank
(clipped at 0) -> Griffin-Lim phase. No learned decoder, so nothing to train but the codebook.

Why 4 frames per token: fitted on the full toy world's assistant clips and measured on its 59
held-out answers with pocketsphinx, the round trip has 3.9 % WER (reference audio 3.5 %); with
2 frames per token (hop 300, window 1200) Griffin-Lim smears more: 6.1 %.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from fo_jax.audio.spectral import griffin_lim, mel_filterbank, stft
from fo_jax.errors import FoJaxError, LoadError

LOG_FLOOR = 1e-5


@dataclasses.dataclass(frozen=True)
class MelVQConfig:
    sample_rate: int = 24000
    token_rate: int = 40
    frames_per_token: int = 4  # STFT frames per token (hop 150 samples, window 600: 6.25 ms, 25 ms)
    n_mels: int = 80
    fmin: float = 0.0
    fmax: float | None = None  # None: Nyquist
    n_codes: int = 1024
    griffin_lim_iters: int = 32

    @property
    def samples_per_token(self) -> int:
        return self.sample_rate // self.token_rate

    @property
    def hop(self) -> int:
        return self.samples_per_token // self.frames_per_token

    @property
    def n_fft(self) -> int:
        return 4 * self.hop

    def __post_init__(self):
        if self.sample_rate % self.token_rate or self.samples_per_token % self.frames_per_token:
            raise FoJaxError(f"MelVQConfig: {self.sample_rate} Hz / {self.token_rate} tokens/s / "
                             f"{self.frames_per_token} frames per token is not a whole number of samples")


@jax.jit
def _nearest(x_nd: jax.Array, codebook_kd: jax.Array) -> jax.Array:
    """(N,) index of the nearest centroid (squared Euclidean) of each row."""
    d = jnp.sum(codebook_kd ** 2, axis=1)[None, :] - 2.0 * x_nd @ codebook_kd.T
    return jnp.argmin(d, axis=1).astype(jnp.int32)


def nearest(x_nd: np.ndarray, codebook_kd: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """Nearest-centroid indices in fixed-size chunks (one compilation per chunk size)."""
    out = np.zeros(len(x_nd), np.int32)
    for s in range(0, len(x_nd), chunk):
        part = x_nd[s:s + chunk]
        rows = len(part)
        padded = np.zeros((chunk if len(x_nd) > chunk else rows, x_nd.shape[1]), np.float32)
        padded[:rows] = part
        out[s:s + rows] = np.asarray(_nearest(padded, codebook_kd))[:rows]
    return out


class MelVQCodec:
    """k-means log-mel codec (module doc). ``codebook``: (n_codes, frames_per_token * n_mels) float32."""

    KIND = "mel_vq"

    def __init__(self, config: MelVQConfig, codebook: np.ndarray):
        expected = (config.n_codes, config.frames_per_token * config.n_mels)
        if codebook.shape != expected:
            raise FoJaxError(f"MelVQCodec: codebook shape {codebook.shape}, config implies {expected}")
        self.config = config
        self.codebook = np.asarray(codebook, np.float32)
        self.sample_rate, self.vocab_size = config.sample_rate, config.n_codes
        self.token_rate = float(config.token_rate)
        fb = mel_filterbank(config.sample_rate, config.n_fft, config.n_mels, config.fmin, config.fmax)
        self._mel_basis = fb  # (n_mels, F)
        self._mel_inverse = np.linalg.pinv(fb).astype(np.float32)  # (F, n_mels)

    # --- features --------------------------------------------------------------------------------

    def features(self, wav: np.ndarray) -> np.ndarray:
        """(N,) waveform -> (N // samples_per_token, frames_per_token * n_mels) stacked log-mel vectors."""
        c = self.config
        wav = np.asarray(wav, np.float32)
        if wav.ndim != 1:
            raise FoJaxError(f"mel codec: expected a (samples,) waveform, got shape {wav.shape}")
        n_tokens = len(wav) // c.samples_per_token
        if n_tokens == 0:
            raise FoJaxError(f"mel codec: {len(wav)} samples is shorter than one token ({c.samples_per_token})")
        mag = np.abs(stft(wav[:n_tokens * c.samples_per_token], c.n_fft, c.hop))  # (T * K, F)
        logmel = np.log(np.maximum(mag @ self._mel_basis.T, LOG_FLOOR))
        return logmel.reshape(n_tokens, c.frames_per_token * c.n_mels)

    def log_mel(self, tokens: np.ndarray) -> np.ndarray:
        """(T,) tokens -> (T * frames_per_token, n_mels) log mel frames of their centroids."""
        tokens = np.asarray(tokens)
        if tokens.ndim != 1 or tokens.size == 0:
            raise FoJaxError(f"mel codec: expected (T,) tokens with T > 0, got shape {tokens.shape}")
        if tokens.min() < 0 or tokens.max() >= self.config.n_codes:
            raise FoJaxError(f"mel codec: tokens must lie in [0, {self.config.n_codes}), "
                             f"got [{tokens.min()}, {tokens.max()}]")
        return self.codebook[tokens].reshape(-1, self.config.n_mels)

    # --- the SpeechCodec interface (fo_jax.data.codec_tokens), and saving ----------------------------

    def encode(self, wav: np.ndarray) -> np.ndarray:
        return nearest(self.features(wav), self.codebook)

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        return self.vocode(self.log_mel(tokens))

    def vocode(self, log_mel: np.ndarray) -> np.ndarray:
        """(M, n_mels) log mel frames -> (M * hop,) float32: pseudo-inverse mel, then Griffin-Lim."""
        c = self.config
        magnitude = np.maximum(np.exp(log_mel) @ self._mel_inverse.T, 0.0)
        return griffin_lim(magnitude, c.n_fft, c.hop, c.griffin_lim_iters)

    def save(self, path: str | os.PathLike) -> None:
        """Writes ``path/codec.json`` (kind and config) and ``path/codebook.npy``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        np.save(path / "codebook.npy", self.codebook)
        (path / "codec.json").write_text(json.dumps({"kind": self.KIND, **dataclasses.asdict(self.config)},
                                                    indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "MelVQCodec":
        path = Path(path)
        try:
            meta = json.loads((path / "codec.json").read_text(encoding="utf-8"))
            codebook = np.load(path / "codebook.npy")
        except (OSError, ValueError) as e:
            raise LoadError(f"{path}: cannot load the mel codec ({e})") from None
        if meta.pop("kind", None) != cls.KIND:
            raise LoadError(f"{path / 'codec.json'}: not a {cls.KIND} codec")
        try:
            config = MelVQConfig(**meta)
        except TypeError as e:
            raise LoadError(f"{path / 'codec.json'}: {e}") from None
        return cls(config, codebook)

    # --- training --------------------------------------------------------------------------------

    @classmethod
    def fit(cls, wavs: Iterable[np.ndarray], config: MelVQConfig = MelVQConfig(), iters: int = 20,
            max_vectors: int = 60000, seed: int = 0, progress: bool = False,
            on_iteration: Callable[[int, float], None] | None = None) -> "MelVQCodec":
        """k-means (Lloyd) of the clips' token vectors: seeded random init from the data, empty
        clusters re-seeded with random vectors; at most ``max_vectors`` vectors (a seeded sample).

        ``on_iteration(i, distortion)`` gets each iteration's mean squared error per dimension
        of the vectors to their assigned centroids (before the update).
        """
        from tqdm import tqdm

        probe = cls(config, np.zeros((config.n_codes, config.frames_per_token * config.n_mels), np.float32))
        data = np.concatenate([probe.features(w) for w in wavs if len(w) >= config.samples_per_token])
        rng = np.random.default_rng(seed)
        if len(data) > max_vectors:
            data = data[rng.choice(len(data), max_vectors, replace=False)]
        if len(data) < config.n_codes:
            raise FoJaxError(f"mel codec: {len(data)} token vectors cannot fit {config.n_codes} codes")
        codebook = data[rng.choice(len(data), config.n_codes, replace=False)].copy()
        for i in tqdm(range(iters), desc="k-means", unit="iter", disable=not progress):
            assign = nearest(data, codebook)
            if on_iteration is not None:
                on_iteration(i, float(np.mean(np.square(data - codebook[assign]))))
            counts = np.bincount(assign, minlength=config.n_codes)
            order = np.argsort(assign, kind="stable")
            used = np.flatnonzero(counts)
            sums = np.add.reduceat(data[order], np.concatenate([[0], np.cumsum(counts[used])[:-1]]))
            codebook[used] = sums / counts[used, None]
            empty = counts == 0
            codebook[empty] = data[rng.choice(len(data), int(empty.sum()), replace=False)]
        return cls(config, codebook)
