"""Speech codecs as tokenizers, and manifests with precomputed codec tokens (speech-out stages 2, 3).

``SpeechCodec`` is the small interface the speech-output side needs from a codec: 24 kHz audio to
40 Hz tokens from a 1024-entry vocabulary and back. ``TiCodecTokens`` implements it over the
Freeze-Omni codec (``fo_jax.models.codec``), whether trained here or converted from the release;
another codec (e.g. a fast-training toy one) plugs in by implementing the same four members.

``prepare_codec_tokens`` encodes every utterance of a manifest and writes a new manifest whose
records carry ``codec_tokens`` (a list of ints, ``floor(duration * token_rate)`` of them).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
from tqdm import tqdm

from fo_jax.audio.io import load_audio
from fo_jax.data.manifest import ManifestError, read_manifest, resolve, write_manifest
from fo_jax.errors import AudioError, FoJaxError
from fo_jax.models import codec as ticodec
from fo_jax.models.configs import CodecConfig

TOKENS_FIELD = "codec_tokens"


class SpeechCodec(Protocol):
    """Waveform <-> discrete tokens."""

    sample_rate: int  # Hz of the waveforms ``encode`` takes and ``decode`` returns
    token_rate: float  # tokens per second
    vocab_size: int  # tokens lie in [0, vocab_size)

    def encode(self, wav: np.ndarray) -> np.ndarray:
        """(S,) float32 in [-1, 1] at ``sample_rate`` -> (floor(S * token_rate / sample_rate),) int32."""

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        """(T,) int tokens -> (T * sample_rate / token_rate,) float32 waveform."""


class TiCodecTokens:
    """``SpeechCodec`` over TiCodec: one 1024-code token per 600 samples at 24 kHz.

    Encoding runs the whole utterance at once (as the release does), trimmed to whole tokens, so
    each distinct token count compiles once. Decoding uses fixed global (timbre) tokens: the
    release's voice unless ``global_tokens`` is given.
    """

    def __init__(self, config: CodecConfig, variables: dict, global_tokens: Sequence[int] | None = None):
        """``variables``: {"params", "batch_stats"} (weight norm folded or not)."""
        self.config = config
        self.variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
        self.sample_rate = config.sample_rate
        self.token_rate = config.sample_rate / config.samples_per_token
        self.vocab_size = config.n_codes
        tokens = config.global_tokens if global_tokens is None else tuple(global_tokens)
        self.global_tokens = np.asarray([tokens], np.int32)

    def encode(self, wav: np.ndarray) -> np.ndarray:
        wav = np.asarray(wav, np.float32)
        if wav.ndim != 1:
            raise FoJaxError(f"codec encode: expected a (samples,) waveform, got shape {wav.shape}")
        n = len(wav) // self.config.samples_per_token
        tokens, _ = ticodec.encode(self.config, self.variables, wav[: n * self.config.samples_per_token])
        return np.asarray(tokens[0], np.int32)

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        wav = ticodec.decode(self.config, self.variables["params"], np.asarray(tokens), self.global_tokens)
        return np.asarray(wav[0], np.float32)


def codec_tokens_problem(record: dict, vocab_size: int) -> str | None:
    """Why a manifest record's ``codec_tokens`` cannot be trained on, or None."""
    tokens = record.get(TOKENS_FIELD)
    if not tokens:
        return f"no {TOKENS_FIELD} (write them with `fo-jax prepare-codec`)"
    if not isinstance(tokens, list) or not all(isinstance(t, int) and 0 <= t < vocab_size for t in tokens):
        return f"{TOKENS_FIELD} must be a list of ints in [0, {vocab_size})"
    return None


def prepare_codec_tokens(manifest: str | os.PathLike, out: str | os.PathLike, codec: SpeechCodec,
                         policy: str = "skip", progress: bool = True) -> tuple[list[dict], list[str]]:
    """Encodes each record's ``audio`` with ``codec`` and writes ``out``. Returns (records, problems).

    Records keep their fields; ``audio`` is rewritten relative to ``out``'s folder, ``duration``
    (seconds at the codec's rate) and ``codec_tokens`` are set. Unreadable audio or audio shorter
    than one token is reported (``policy='skip'``) or raises ManifestError (``'strict'``).
    """
    problems: list[str] = []
    records = read_manifest(manifest, required=["audio"], policy=policy, report=problems)
    base_in, base_out = Path(manifest).resolve().parent, Path(out).resolve().parent
    min_samples = int(np.ceil(codec.sample_rate / codec.token_rate))
    done = []
    for record in tqdm(records, desc="codec tokens", unit="utt", disable=not progress):
        path = resolve(record["audio"], base_in)
        try:
            wav, _ = load_audio(path, codec.sample_rate)
            if len(wav) < min_samples:
                raise AudioError(f"{path}: shorter than one codec token ({len(wav)} samples)")
        except AudioError as e:
            if policy == "strict":
                raise ManifestError(str(e)) from None
            problems.append(str(e))
            continue
        done.append({**record, "audio": os.path.relpath(path, base_out),
                     "duration": round(len(wav) / codec.sample_rate, 3),
                     TOKENS_FIELD: codec.encode(wav).tolist()})
    if not done:
        raise FoJaxError(f"{manifest}: no utterance could be encoded ({len(problems)} problems)")
    write_manifest(out, done)
    return done, problems
