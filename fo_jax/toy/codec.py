"""The toy's speech codecs: training the fast mel VQ codec, and any codec's round-trip intelligibility.

Intelligibility is measured as the report's speech-out target is: pocketsphinx (with the world's
bigram LM) transcribes the assistant-voice reference audio of the held-out answers, and the same
audio after ``codec.decode(codec.encode(.))``; each is scored by WER and by answer accuracy
(``answer_matches``, the whole sentence).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from fo_jax.audio.io import load_audio, resample, write_wav
from fo_jax.data.codec_tokens import SpeechCodec
from fo_jax.data.manifest import read_manifest, resolve
from fo_jax.models.mel_codec import MelVQCodec, MelVQConfig
from fo_jax.toy.synth import USER_RATE, recognize, wer
from fo_jax.toy.world import answer_matches


def load_clips(manifest: str | os.PathLike, field: str = "audio", rate: int | None = None) -> list[np.ndarray]:
    """Every record's ``field`` audio of a manifest (at its own rate unless ``rate``)."""
    base = Path(manifest).parent
    return [load_audio(resolve(r[field], base), sample_rate=rate)[0] for r in read_manifest(manifest)]


def train_fast_codec(speech_out_manifest: str | os.PathLike, config: MelVQConfig, iters: int, max_vectors: int,
                     seed: int = 0, progress: bool = True,
                     on_iteration: Callable[[int, float], None] | None = None) -> tuple[MelVQCodec, int]:
    """k-means of the assistant-voice clips' token vectors (``MelVQCodec.fit``). Returns (codec,
    number of token vectors in the clips)."""
    clips = load_clips(speech_out_manifest, rate=config.sample_rate)
    codec = MelVQCodec.fit(clips, config, iters=iters, max_vectors=max_vectors, seed=seed, progress=progress,
                           on_iteration=on_iteration)
    return codec, sum(len(c) // config.samples_per_token for c in clips)


def roundtrip(codec: SpeechCodec, wav: np.ndarray, pad_tokens: int = 1) -> np.ndarray:
    """``decode(encode(wav))``, the input zero-padded to a multiple of ``pad_tokens`` tokens and the
    padding cut from the output (a jitted codec then compiles once per padded length, not per clip)."""
    per_token = round(codec.sample_rate / codec.token_rate)
    n = len(wav) // per_token
    padded = np.zeros(-(-n // pad_tokens) * pad_tokens * per_token, np.float32)
    padded[:n * per_token] = wav[:n * per_token]
    return codec.decode(codec.encode(padded))[:n * per_token]


def roundtrip_intelligibility(codec: SpeechCodec, test_manifest: str | os.PathLike, lm: str | os.PathLike,
                              wav_dir: str | os.PathLike | None = None, n_wavs: int = 4, pad_tokens: int = 1,
                              progress: bool = True) -> dict[str, Any]:
    """Recognizer scores of the reference answers and of their codec round trips (``roundtrip``).

    ``test_manifest`` records have ``answer`` and ``answer_audio`` (the toy's test_qa.jsonl). The
    first ``n_wavs`` round trips (and their references) are written to ``wav_dir`` for listening.
    Returns {"n", "reference": {"wer", "accuracy"}, "roundtrip": {...}, "examples": [...]}.
    """
    from tqdm import tqdm

    records = read_manifest(test_manifest)
    base = Path(test_manifest).parent
    if wav_dir is not None:
        Path(wav_dir).mkdir(parents=True, exist_ok=True)
    answers, ref_hyps, rt_hyps = [], [], []
    for i, r in enumerate(tqdm(records, desc="codec round trip", unit="clip", disable=not progress)):
        reference = load_audio(resolve(r["answer_audio"], base), sample_rate=codec.sample_rate)[0]
        rebuilt = roundtrip(codec, reference, pad_tokens)
        answers.append(r["answer"])
        ref_hyps.append(recognize(resample(reference, codec.sample_rate, USER_RATE), lm))
        rt_hyps.append(recognize(resample(rebuilt, codec.sample_rate, USER_RATE), lm))
        if wav_dir is not None and i < n_wavs:
            write_wav(Path(wav_dir) / f"{i:02d}_reference.wav", reference, codec.sample_rate)
            write_wav(Path(wav_dir) / f"{i:02d}_roundtrip.wav", rebuilt, codec.sample_rate)

    def scores(hyps: list[str]) -> dict[str, float]:
        return {"wer": wer(answers, hyps), "accuracy": float(np.mean([answer_matches(h, a)
                                                                      for h, a in zip(hyps, answers)]))}

    return {"n": len(records), "reference": scores(ref_hyps), "roundtrip": scores(rt_hyps),
            "examples": [{"answer": a, "reference_heard": h0, "roundtrip_heard": h1}
                         for a, h0, h1 in list(zip(answers, ref_hyps, rt_hyps))[:n_wavs]]}
