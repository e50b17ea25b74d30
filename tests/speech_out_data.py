"""Tiny speech-out data for the stage tests: synthetic 24 kHz clips, Q&A text, a random HF Qwen2 dir."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fo_jax.audio.io import write_wav
from fo_jax.data.manifest import write_manifest
from fo_jax.testing.llm import write_random_llm_dir
from fo_jax.text.tokenizer import chatml

QA = [("What is two plus two?", "Two plus two is four."), ("What colour is the sky?", "The sky is blue."),
      ("Name a fruit.", "An apple is a fruit."), ("How many legs has a cat?", "A cat has four legs.")]


def write_clips(root: Path, durations: list[float], rate: int = 24000, seed: int = 0) -> list[str]:
    """Voiced-like clips (a gliding harmonic tone + noise), one per duration; returns file names."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    names = []
    for i, seconds in enumerate(durations):
        t = np.arange(int(seconds * rate)) / rate
        f0 = 110 + 25 * i + 15 * np.sin(2 * np.pi * 2 * t)
        phase = 2 * np.pi * np.cumsum(f0) / rate
        wav = 0.25 * np.sin(phase) + 0.1 * np.sin(2 * phase) + 0.01 * rng.standard_normal(len(t))
        names.append(f"clip{i}.wav")
        write_wav(root / names[-1], wav.astype(np.float32), rate)
    return names


def write_llm_dir(path: Path, seed: int = 0) -> Path:
    """A random tiny Qwen2 saved the HF way, with a BPE tokenizer trained on the Q&A texts."""
    texts = [chatml([{"role": "user", "content": q}, {"role": "assistant", "content": a}]) for q, a in QA]
    return write_random_llm_dir(path, texts * 4, seed)


def write_answers_manifest(path: Path, codes_per_answer: list[int], vocab: int = 1024, seed: int = 0) -> Path:
    """{"question", "text", "codec_tokens"} records (random fixed codes of the given counts)."""
    rng = np.random.default_rng(seed)
    records = [{"question": q, "text": a, "codec_tokens": rng.integers(0, vocab, n).tolist()}
               for (q, a), n in zip(QA, codes_per_answer)]
    write_manifest(path, records)
    return path
