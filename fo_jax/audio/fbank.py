"""Kaldi-compatible 80-bin log-mel filterbank, offline (numpy) and streaming (jitted JAX).

The options are those of Freeze-Omni's front end (torchaudio ``compliance.kaldi.fbank`` with its
defaults): 16 kHz, 25 ms povey window, 10 ms shift, snip_edges, per-frame DC removal, pre-emphasis
0.97, 512-point power spectrum, 80 triangular mel bins over 20 Hz .. 8 kHz, no dither, and
``log(max(mel_energy, FLT_EPSILON))``. The waveform is given in [-1, 1] and scaled to the int16
range (x 32768) first, as the official pipeline does.

One implementation of the math, ``_log_mel``, runs on numpy (float64, for data pipelines and as
the accurate reference) and on jax.numpy (float32, jit-able, for the streaming step).
Precision: any float32 pipeline (kaldi-native-fbank's kissfft, torchaudio, our JAX path) carries
FFT rounding noise of ~1e-7 of the frame's energy into every bin, so in bins 80-100 dB below the
frame's strongest mel bin (seen only in noise-free synthetic audio) float32 values are off by up to
~4e-3 in log; within 80 dB of it, numpy, JAX and kaldi-native-fbank agree to < 1e-3 (measured
<= 6e-4 on espeak and Piper speech, tests/test_audio_fbank.py).

Streaming (official ``bin/inference.py`` / ``web/vad.py`` framing): audio arrives in chunks of
2560 samples (160 ms). Each step fbanks the last 240 samples of the previous chunk (zeros before
the first) followed by the new chunk, 2800 samples -> exactly 16 frames. The encoder consumes 19
frames per step: the last 3 frames of the previous step (zeros before the first) + the 16 new.
Stream frame k therefore covers input samples [160 k - 240, 160 k + 160): the streamed frames are
the offline frames of the waveform with 240 zeros prepended, i.e. shifted 1.5 frames against an
offline fbank of the same audio (an official train/inference difference, reproduced as is).
The official server (``web/vad.py``) keeps this state running across turns, resetting it only
per connection; ``bin/inference.py`` resets it per input file.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

SAMPLE_RATE = 16000
FRAME_LENGTH = 400  # 25 ms
FRAME_SHIFT = 160  # 10 ms
FFT_SIZE = 512
NUM_MEL_BINS = 80
LOW_FREQ = 20.0
PREEMPH = 0.97
INT16_SCALE = 32768.0
LOG_FLOOR = float(np.finfo(np.float32).eps)

CHUNK_FRAMES = 16  # new fbank frames per streaming step
CHUNK_OVERLAP = 3  # previous frames repeated at the start of each encoder input chunk
CHUNK_SAMPLES = CHUNK_FRAMES * FRAME_SHIFT  # 2560 samples = 160 ms
CHUNK_SECONDS = CHUNK_SAMPLES / SAMPLE_RATE  # 0.16
STREAM_CONTEXT = FRAME_LENGTH - FRAME_SHIFT  # 240 samples carried between chunks


def num_frames(num_samples: int) -> int:
    """Frames of a snip_edges fbank over ``num_samples`` samples (0 if shorter than one window)."""
    return 0 if num_samples < FRAME_LENGTH else 1 + (num_samples - FRAME_LENGTH) // FRAME_SHIFT


@functools.cache
def povey_window() -> np.ndarray:
    """(400,) float64 Kaldi "povey" window: (0.5 - 0.5 cos(2 pi n / 399)) ** 0.85."""
    n = np.arange(FRAME_LENGTH, dtype=np.float64)
    return (0.5 - 0.5 * np.cos(2 * np.pi * n / (FRAME_LENGTH - 1))) ** 0.85


@functools.cache
def mel_banks(num_bins: int = NUM_MEL_BINS) -> np.ndarray:
    """(257, num_bins) float64 Kaldi mel filters over the rfft bins (the Nyquist bin gets 0).

    Triangles equally spaced on the mel scale 1127 ln(1 + f/700) between 20 Hz and 8 kHz, evaluated
    at the mel value of each FFT bin's centre frequency (Kaldi's rule). kaldi-native-fbank builds the
    same matrix in float32; it differs from this one by < 2e-5.
    """
    mel = lambda f: 1127.0 * np.log1p(np.asarray(f, np.float64) / 700.0)  # noqa: E731
    low, high = mel(LOW_FREQ), mel(SAMPLE_RATE / 2)
    delta = (high - low) / (num_bins + 1)
    m = mel(np.arange(FFT_SIZE // 2) * SAMPLE_RATE / FFT_SIZE)[None, :]  # (1, 256)
    left = low + delta * np.arange(num_bins)[:, None]  # (num_bins, 1)
    center, right = left + delta, left + 2 * delta
    rising, falling = (m - left) / (center - left), (right - m) / (right - center)
    w = np.where((m > left) & (m < right), np.where(m <= center, rising, falling), 0.0)
    return np.pad(w, ((0, 0), (0, 1))).T


def _log_mel(frames: jax.Array | np.ndarray, xp) -> jax.Array | np.ndarray:
    """Log-mel of windows (..., F, 400) in int16 scale -> (..., F, 80), in the frames' dtype."""
    dtype = frames.dtype
    frames = frames - frames.mean(axis=-1, keepdims=True)  # remove DC per frame
    # Pre-emphasis inside the frame; Kaldi's first sample uses itself as its predecessor.
    frames = xp.concatenate([frames[..., :1] * (1.0 - PREEMPH),
                             frames[..., 1:] - PREEMPH * frames[..., :-1]], axis=-1)
    frames = frames * xp.asarray(povey_window(), dtype)
    spec = xp.fft.rfft(frames, n=FFT_SIZE, axis=-1)
    power = spec.real * spec.real + spec.imag * spec.imag
    mel = xp.matmul(power, xp.asarray(mel_banks(), dtype))
    return xp.log(xp.maximum(mel, LOG_FLOOR))


def _frame_index(num_samples: int) -> np.ndarray:
    """(F, 400) sample indices of the snip_edges frames."""
    starts = np.arange(num_frames(num_samples))[:, None] * FRAME_SHIFT
    return starts + np.arange(FRAME_LENGTH)[None, :]


def _float_wave(wave: np.ndarray) -> np.ndarray:
    wave = np.asarray(wave)
    if np.issubdtype(wave.dtype, np.integer):  # int16 PCM -> [-1, 1], as soundfile reads it
        return wave.astype(np.float64) / INT16_SCALE
    return wave.astype(np.float64)


def fbank(wave: np.ndarray, scale: float = INT16_SCALE) -> np.ndarray:
    """Offline log-mel fbank in numpy (float64 math), for data pipelines and references.

    Args:
      wave: (..., N) 16 kHz waveform in [-1, 1] (float), or int16 PCM (converted by / 32768).
      scale: multiplies the waveform first; 32768 = the official int16-range input.

    Returns:
      (..., F, 80) float32 with F = num_frames(N) (snip_edges: only whole windows). Peak memory
      is ~13 kB per frame (~80 MB per minute of audio): fbank utterances, or stream long
      recordings chunk by chunk.
    """
    wave = _float_wave(wave) * scale
    return _log_mel(wave[..., _frame_index(wave.shape[-1])], np).astype(np.float32)


def fbank_jax(wave: jax.Array, scale: float = INT16_SCALE) -> jax.Array:
    """The same fbank in float32 jax.numpy; jit-able (N is static).

    Args:
      wave: (..., N) float 16 kHz waveform in [-1, 1].
      scale: as in ``fbank``.

    Returns:
      (..., F, 80) float32.
    """
    wave = jnp.asarray(wave, jnp.float32) * scale
    return _log_mel(wave[..., _frame_index(wave.shape[-1])], jnp)


def chunked_fbank(wave: np.ndarray) -> np.ndarray:
    """Encoder input chunks of a whole utterance, framed exactly as the official streaming loop.

    The waveform is zero-padded to whole 2560-sample chunks (as ``bin/inference.py`` does), 240
    zeros are prepended (the zero sample history of the first step), and chunk c is
    [3 previous frames (zeros for c = 0), 16 new frames]. Equal to running ``fbank_stream_step``
    over the chunks, computed in one numpy fbank.

    Args:
      wave: (N,) 16 kHz waveform in [-1, 1], or int16 PCM.

    Returns:
      (C, 19, 80) float32 with C = ceil(N / 2560).
    """
    wave = _float_wave(wave)
    chunks = -(-wave.shape[-1] // CHUNK_SAMPLES)
    padded = np.zeros(STREAM_CONTEXT + chunks * CHUNK_SAMPLES)
    padded[STREAM_CONTEXT:STREAM_CONTEXT + wave.shape[-1]] = wave
    feats = np.concatenate([np.zeros((CHUNK_OVERLAP, NUM_MEL_BINS), np.float32), fbank(padded)])
    idx = np.arange(chunks)[:, None] * CHUNK_FRAMES + np.arange(CHUNK_OVERLAP + CHUNK_FRAMES)[None]
    return feats[idx]


@flax.struct.dataclass
class FbankStreamState:
    """Per-user streaming fbank state; a leading batch axis stacks users.

    Attributes:
      samples: (B, 240) float32, the last 240 input samples (in [-1, 1]); zeros at the start.
      frames: (B, 3, 80) float32, the last 3 fbank frames; zeros at the start.
    """

    samples: jax.Array
    frames: jax.Array

    @classmethod
    def zeros(cls, batch: int = 1) -> "FbankStreamState":
        """The official reset state (all zeros) for ``batch`` users."""
        return cls(samples=jnp.zeros((batch, STREAM_CONTEXT), jnp.float32),
                   frames=jnp.zeros((batch, CHUNK_OVERLAP, NUM_MEL_BINS), jnp.float32))


def fbank_stream_step(state: FbankStreamState, chunk_bn: jax.Array
                      ) -> tuple[FbankStreamState, jax.Array]:
    """One 160 ms streaming step: 2560 new samples -> 19 encoder input frames.

    Args:
      state: the previous step's state (``FbankStreamState.zeros`` before the first chunk).
      chunk_bn: (B, 2560) float waveform in [-1, 1] (zero-pad a final short chunk).

    Returns:
      (new state, feats_btf) with feats_btf (B, 19, 80) float32: the 3 previous frames then the
      16 new ones (before CMVN; the encoder applies global CMVN to all 19).
    """
    chunk_bn = jnp.asarray(chunk_bn, jnp.float32)
    wave_bn = jnp.concatenate([state.samples, chunk_bn], axis=-1)  # (B, 2800) -> 16 frames
    new_btf = fbank_jax(wave_bn)
    feats_btf = jnp.concatenate([state.frames, new_btf], axis=1)
    new_state = FbankStreamState(samples=wave_bn[:, -STREAM_CONTEXT:],
                                 frames=new_btf[:, -CHUNK_OVERLAP:])
    return new_state, feats_btf


# The jitted step: fixed shapes, the state buffers donated (reused in place).
fbank_stream_step_jit = jax.jit(fbank_stream_step, donate_argnames="state")
