"""Audio files in and out: float32 mono at 16 kHz, exact rational resampling, int16 WAV writing.

Reading goes through soundfile (WAV, FLAC, OGG, ... whatever libsndfile reads). Multi-channel
audio is downmixed by averaging the channels. Any input rate is resampled with
``scipy.signal.resample_poly`` at the exact ratio target/source reduced by their gcd (for example
22050 -> 16000 is up 320 / down 441); Freeze-Omni's ``bin/inference.py`` uses torchaudio's sinc
resampler instead, so resampled samples differ slightly (the pass band is the same).

``load_audio`` reads a whole file into memory. For long input (hours) use ``stream_audio``: it
reads fixed-size blocks and resamples each with enough context on both sides that the
concatenated output equals ``load_audio``'s (to float rounding), holding O(block) memory.
``Rechunker`` regroups live audio arriving in blocks of any size into the 2560-sample chunks of
the streaming fbank.

Errors caused by the input (missing, unreadable, empty or non-audio files, bad rates) raise
``AudioError`` with one line naming the path.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

import numpy as np
import scipy.signal
import soundfile as sf

from fo_jax.errors import AudioError

TARGET_RATE = 16000
INT16_SCALE = 32768.0

# resample_poly's default filter is 2 * 10 * max(up, down) + 1 taps in the upsampled domain, so
# each output sample depends on inputs within ~10 input samples of its time (when down > up,
# 10 * down / up). Blocks carry this many input samples of context on each side (rounded up to
# a multiple of `down`), with a margin of 4 samples.
_FILTER_HALF_WIDTH = 10


def _check_rate(rate: int, what: str) -> int:
    if int(rate) != rate or rate <= 0:
        raise AudioError(f"{what} sample rate must be a positive integer, got {rate!r}")
    return int(rate)


def resample(audio: np.ndarray, orig_rate: int, target_rate: int = TARGET_RATE) -> np.ndarray:
    """Resamples along axis 0 by the exact ratio target_rate / orig_rate.

    Args:
      audio: (N,) or (N, C) samples.
      orig_rate, target_rate: positive integer rates in Hz.

    Returns:
      float32 (M,) or (M, C) with M = ceil(N * target / orig); the input (as float32) if the rates
      are equal.
    """
    orig_rate, target_rate = _check_rate(orig_rate, "input"), _check_rate(target_rate, "target")
    audio = np.asarray(audio, np.float32)
    if orig_rate == target_rate:
        return audio
    g = math.gcd(orig_rate, target_rate)
    return scipy.signal.resample_poly(audio, target_rate // g, orig_rate // g, axis=0).astype(np.float32)


def to_mono(audio: np.ndarray) -> np.ndarray:
    """(N,) or (N, C) -> (N,) float32, averaging channels."""
    audio = np.asarray(audio, np.float32)
    return audio.mean(axis=1, dtype=np.float32) if audio.ndim == 2 else audio


def _reason(e: Exception) -> str:
    """libsndfile's message without its "Error opening '<path>': " prefix, on one line."""
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text.split("': ", 1)[1] if text.startswith("Error opening '") and "': " in text else text


def _open(path: str | os.PathLike) -> sf.SoundFile:
    if not os.path.exists(path):
        raise AudioError(f"audio file not found: {path}")
    if os.path.isdir(path):
        raise AudioError(f"expected an audio file, got a directory: {path}")
    try:
        f = sf.SoundFile(path)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        raise AudioError(f"cannot read audio file {path}: {_reason(e)}") from None
    if f.frames <= 0:
        f.close()
        raise AudioError(f"audio file {path} has no samples")
    return f


def _read(f: sf.SoundFile, path, frames: int) -> np.ndarray:
    """Next ``frames`` frames as float32 mono, with read errors reported against ``path``."""
    try:
        block = f.read(frames, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as e:
        raise AudioError(f"cannot read audio file {path}: {_reason(e)}") from None
    mono = to_mono(block)
    if not np.all(np.isfinite(mono)):
        raise AudioError(f"audio file {path} contains NaN or infinite samples")
    return mono


def audio_info(path: str | os.PathLike) -> tuple[int, int, int]:
    """(num_frames, sample_rate, channels) of an audio file, without reading its samples."""
    with _open(path) as f:
        return f.frames, f.samplerate, f.channels


def load_audio(path: str | os.PathLike, sample_rate: int | None = TARGET_RATE,
               max_seconds: float | None = None) -> tuple[np.ndarray, int]:
    """Reads a whole audio file as float32 mono in [-1, 1].

    Args:
      path: a WAV/FLAC/... file.
      sample_rate: resample to this rate; None keeps the file's rate.
      max_seconds: refuse (AudioError) longer files instead of loading them; None: no limit.
        Decoding needs 4 bytes x channels per input sample (a 3 h 44.1 kHz stereo file: 3.8 GB);
        stream long files with ``stream_audio``.

    Returns:
      (audio (N,) float32, rate). int16 files give samples / 32768, as soundfile reads them.
    """
    with _open(path) as f:
        rate = f.samplerate
        if max_seconds is not None and f.frames > max_seconds * rate:
            raise AudioError(f"audio file {path} is {f.frames / rate:.1f} s long, over the "
                             f"{max_seconds:g} s limit; stream it with stream_audio")
        audio = _read(f, path, -1)
    if audio.size == 0:
        raise AudioError(f"audio file {path} has no samples")
    if sample_rate is None:
        return audio, rate
    return resample(audio, rate, sample_rate), int(sample_rate)


def stream_audio(path: str | os.PathLike, chunk_samples: int = 2560,
                 sample_rate: int = TARGET_RATE, *, pad_last: bool = True,
                 block_samples: int = 1 << 16) -> Iterator[np.ndarray]:
    """Yields a long file as consecutive float32 mono chunks at ``sample_rate``, in bounded memory.

    Args:
      path: an audio file of any length.
      chunk_samples: samples per yielded chunk at ``sample_rate`` (2560 = one 160 ms fbank chunk).
      sample_rate: output rate.
      pad_last: zero-pad the last chunk to ``chunk_samples`` (as the official streaming loop does);
        otherwise the last chunk may be shorter.
      block_samples: input samples read per block (memory ~ a few blocks, whatever the file length).

    Yields:
      (chunk_samples,) float32 arrays; concatenated they equal ``load_audio(path, sample_rate)``
      (to float rounding), zero-padded at the end when ``pad_last``.
    """
    sample_rate = _check_rate(sample_rate, "target")
    chunker = Rechunker(chunk_samples)
    with _open(path) as f:
        for block in _resampled_blocks(f, path, sample_rate, block_samples):
            yield from chunker.push(block)
    last = chunker.flush(pad=pad_last)
    if last is not None:
        yield last


class Rechunker:
    """Regroups sample blocks of any size (e.g. live audio packets) into fixed-size chunks.

    Host-side numpy; one per audio stream. ``push`` returns the chunks completed so far, the rest
    waits for the next block; ``flush`` returns the remainder at the end of the stream.
    """

    def __init__(self, chunk_samples: int = 2560):
        if int(chunk_samples) != chunk_samples or chunk_samples <= 0:
            raise AudioError(f"chunk_samples must be a positive integer, got {chunk_samples!r}")
        self.chunk_samples = int(chunk_samples)
        self._pending = np.zeros(0, np.float32)

    @property
    def pending(self) -> int:
        """Samples waiting for a complete chunk."""
        return len(self._pending)

    def push(self, samples: np.ndarray) -> list[np.ndarray]:
        """Adds (N,) samples; returns the completed (chunk_samples,) float32 chunks, oldest first."""
        self._pending = np.concatenate([self._pending, np.asarray(samples, np.float32).reshape(-1)])
        n = len(self._pending) // self.chunk_samples * self.chunk_samples
        chunks = [self._pending[i:i + self.chunk_samples] for i in range(0, n, self.chunk_samples)]
        self._pending = self._pending[n:].copy()
        return chunks

    def flush(self, pad: bool = True) -> np.ndarray | None:
        """The remainder (zero-padded to a whole chunk if ``pad``), or None if nothing is pending."""
        if not len(self._pending):
            return None
        last, self._pending = self._pending, np.zeros(0, np.float32)
        return np.pad(last, (0, self.chunk_samples - len(last))) if pad else last


def _resampled_blocks(f: sf.SoundFile, path, target_rate: int, block_samples: int
                      ) -> Iterator[np.ndarray]:
    """Resamples a file block by block; each block gets `ctx` input samples of context per side.

    Block starts are multiples of `down`, so each block's first output sample falls on an exact
    output index and the blocks' outputs tile the whole-file output without gaps or overlap.
    """
    g = math.gcd(f.samplerate, target_rate)
    up, down = target_rate // g, f.samplerate // g
    if up == down:
        while len(block := _read(f, path, block_samples)):
            yield block
        return
    ctx_in = _FILTER_HALF_WIDTH * max(1, math.ceil(down / up)) + 4
    ctx = -(-ctx_in // down) * down
    block_samples = max(ctx, -(-block_samples // down) * down)
    prev = np.zeros(ctx, np.float32)  # zeros before the start, as resample_poly pads
    cur = _read(f, path, block_samples)
    while len(cur):
        nxt = _read(f, path, block_samples)
        ahead = np.pad(nxt[:ctx], (0, ctx - min(ctx, len(nxt))))
        out = scipy.signal.resample_poly(np.concatenate([prev, cur, ahead]), up, down)
        start = ctx * up // down
        count = len(cur) * up // down if len(nxt) else -(-len(cur) * up // down)
        yield out[start:start + count].astype(np.float32)
        prev = np.concatenate([prev, cur])[-ctx:]
        cur = nxt


def write_wav(path: str | os.PathLike, audio: np.ndarray, sample_rate: int) -> None:
    """Writes 16-bit PCM WAV.

    Args:
      audio: (N,) or (N, C); int16 is written as is, floats in [-1, 1] as round(x * 32768) clipped
        to int16 (so ``load_audio`` gives back int16-representable floats exactly).
      sample_rate: positive integer rate in Hz.
    """
    sample_rate = _check_rate(sample_rate, "output")
    audio = np.asarray(audio)
    if audio.dtype != np.int16:
        audio = np.clip(np.round(audio.astype(np.float64) * INT16_SCALE), -32768, 32767).astype(np.int16)
    sf.write(path, audio, sample_rate, subtype="PCM_16", format="WAV")
