"""What the speech-out side needs from a codec, whichever it is (TiCodec, the toy's mel VQ codec).

A codec turns a waveform at ``sample_rate`` into discrete tokens at ``token_rate`` per second
from a vocabulary of ``vocab_size``, and back. The speech decoder predicts these tokens; the
codec-token preparation and the vocoder go through this interface only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from fo_jax.errors import LoadError

CODEC_FILE = "codec.json"  # in a saved codec's folder: {"kind": ..., ...}


@runtime_checkable
class SpeechCodec(Protocol):
    sample_rate: int  # Hz of the waveforms encode takes and decode returns
    token_rate: int  # tokens per second; samples per token = sample_rate // token_rate
    vocab_size: int

    def encode(self, wav: np.ndarray) -> np.ndarray:
        """(N,) float waveform in [-1, 1] at sample_rate -> (N // samples_per_token,) int32 tokens."""

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        """(T,) int tokens in [0, vocab_size) -> (T * samples_per_token,) float32 waveform."""

    def save(self, path: str | os.PathLike) -> None:
        """Writes the codec's state to the folder ``path`` (with a CODEC_FILE naming its kind)."""


def load_speech_codec(path: str | os.PathLike) -> SpeechCodec:
    """A codec saved with ``save`` (the kind is read from ``path/codec.json``)."""
    from fo_jax.models.mel_codec import MelVQCodec

    kinds = {MelVQCodec.KIND: MelVQCodec.load}
    file = Path(path) / CODEC_FILE
    try:
        kind = json.loads(file.read_text(encoding="utf-8"))["kind"]
    except FileNotFoundError:
        raise LoadError(f"{file}: not found (not a saved codec)") from None
    except (json.JSONDecodeError, KeyError, TypeError):
        raise LoadError(f"{file}: not a codec description (no 'kind')") from None
    if kind not in kinds:
        raise LoadError(f"{file}: unknown codec kind {kind!r}; expected one of {sorted(kinds)}")
    return kinds[kind](path)
