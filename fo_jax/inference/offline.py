"""A spoken question from a file -> the spoken answer and a report (``fo-jax infer``).

Input: any rate (resampled to 16 kHz), mono or stereo (channels averaged), anything libsndfile
reads (WAV, FLAC, ...); it is streamed in 160 ms chunks, never loaded whole. Unreadable or
empty files raise ``AudioError`` (one line).

Modes:
  forced  as the release's ``bin/inference.py``: the whole input is one question (the state head
          is read but not obeyed), then the answer. The question must fit in the LLM context with
          the answer: longer inputs are refused up front (from the file header) with the limit.
  duplex  the state head decides after each chunk: "speak" answers at once (the input waits
          while the answer is produced, then the next chunk opens a new turn), "stop listening"
          drops the turn and the next chunk opens a new one. No answer is given if the head never
          says "speak". Answers keep accumulating in the context; if it fills up, ``ContextFull``.

The answers' audio is concatenated (24 kHz float32).
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any

import numpy as np

from fo_jax.audio.fbank import CHUNK_SAMPLES, CHUNK_SECONDS
from fo_jax.audio.io import TARGET_RATE, audio_info, stream_audio
from fo_jax.errors import FoJaxError
from fo_jax.inference.dialogue import State
from fo_jax.inference.llm import round_up
from fo_jax.inference.pipeline import DEFAULT_ROLE, ContextFull, Conversation, Engine, Reply

MODES = ("forced", "duplex")
CONTEXT_BUCKET = 256
DUPLEX_TURNS = 4  # room a duplex run reserves for answered turns, beyond the input itself
PROGRESS_CHUNKS = 200  # show a progress bar from this many chunks (32 s) of input on


def context_plan(engine: Engine, system_role: str | None, seconds: float, mode: str) -> int:
    """KV-cache slots for ``seconds`` of input in ``mode`` (raises FoJaxError when forced mode cannot fit)."""
    template, _ = engine.system(system_role)
    limit = engine.cfg.llm.max_position_embeddings
    chunks = math.ceil(seconds * TARGET_RATE / CHUNK_SAMPLES)
    turn = len(template.listen_ids) + engine.cfg.adapter.prompt_num
    answer = len(template.speak_ids) + engine.options.max_answer_tokens + 1
    fixed = len(template.system_ids) + turn + answer
    if mode == "forced":
        need = fixed + 2 * chunks
        if need > limit:
            most = (limit - fixed) // 2 * CHUNK_SECONDS
            raise FoJaxError(f"the input is {seconds:.1f} s long; forced mode holds at most {most:.1f} s of speech "
                             f"in the LLM context (max_position_embeddings={limit}) with a "
                             f"{engine.options.max_answer_tokens}-token answer: use --mode duplex or a shorter input")
    else:
        need = fixed + 2 * chunks + DUPLEX_TURNS * (turn + answer)
    return min(limit, round_up(need, CONTEXT_BUCKET))


def _turn_report(reply: Reply, start_seconds: float) -> dict[str, Any]:
    latency = reply.latency_ms()
    return {"input_seconds": round(start_seconds, 3), "text": reply.text, "text_token_ids": reply.token_ids,
            "spoken_text": reply.spoken_text, "speech_token_ids": reply.speech_token_ids,
            "segments": [{"text": s.text, "tts_text": s.tts_text, "speech_token_ids": s.speech_token_ids,
                          "skipped_ids": s.skipped} for s in reply.segments],
            "latency_ms": latency, "audio_seconds": reply.audio_seconds, "busy_seconds": reply.busy_seconds,
            "rtf": reply.busy_seconds / reply.audio_seconds if reply.samples else None,
            "interrupted": reply.interrupted, "context_full": reply.context_full}


def infer_file(engine: Engine, path: str | os.PathLike, *, mode: str = "forced",
               system_role: str | None = DEFAULT_ROLE, seed: int = 0, progress: bool = True
               ) -> tuple[np.ndarray, dict[str, Any]]:
    """Answers the speech in ``path``.

    Returns:
      (audio (N,) float32 at the codec rate, report dict: text, token ids, speech token ids,
      per-chunk state probabilities, the paper's latency table, real-time factors, compile counts).
    Raises:
      AudioError, FoJaxError (input too long for forced mode), ContextFull (duplex).
    """
    if mode not in MODES:
        raise FoJaxError(f"unknown mode {mode!r}; expected one of {MODES}")
    frames, rate, channels = audio_info(path)
    seconds = frames / rate
    max_len = context_plan(engine, system_role, seconds, mode)
    started = time.perf_counter()
    warm = engine.warm_up(max_len, system_role)
    warm_seconds = time.perf_counter() - started
    conv = Conversation(engine, system_role=system_role, max_len=max_len, seed=seed, warm_up=False)
    compiled = engine.compiles.count
    n_chunks = math.ceil(frames * TARGET_RATE / rate / CHUNK_SAMPLES)
    bar = None
    if progress and n_chunks >= PROGRESS_CHUNKS:
        from tqdm import tqdm

        bar = tqdm(total=n_chunks, unit="chunk", desc="listening", file=sys.stderr, leave=False)
    probs, replies, packets = [], [], []
    try:
        for i, chunk in enumerate(stream_audio(path, CHUNK_SAMPLES, TARGET_RATE)):
            probs.append(conv.listen(chunk, decide=mode == "duplex"))
            if bar is not None:
                bar.update(1)
            if conv.state == State.SS:  # duplex: the state head chose to speak
                replies.append((conv.respond(), (i + 1) * CHUNK_SECONDS))
                packets += list(replies[-1][0])
        if mode == "forced":
            replies.append((conv.respond(), n_chunks * CHUNK_SECONDS))
            packets += list(replies[-1][0])
    except ContextFull as e:
        raise ContextFull(f"{e} after {conv.chunks_heard * CHUNK_SECONDS:.1f} s of input") from None
    finally:
        if bar is not None:
            bar.close()
    audio = np.concatenate([np.zeros(0, np.float32), *packets])
    turns = [_turn_report(r, t) for r, t in replies]
    speak_busy = sum(r.busy_seconds for r, _ in replies)
    report = {
        "input": {"path": str(path), "sample_rate": rate, "channels": channels, "seconds": seconds,
                  "chunks": conv.chunks_heard},
        "mode": mode,
        "text": "".join(t["text"] for t in turns),
        "text_token_ids": [i for t in turns for i in t["text_token_ids"]],
        "speech_token_ids": [i for t in turns for i in t["speech_token_ids"]],
        "state_probs": np.concatenate(probs or [np.zeros((0, 3))]).round(6).tolist(),
        "latency_ms": turns[0]["latency_ms"] if turns else None,
        "turns": turns,
        "rtf": {"listen": conv.listen_seconds / max(conv.chunks_heard * CHUNK_SECONDS, 1e-9),
                "speak": speak_busy / (len(audio) / engine.vocoder.sample_rate) if len(audio) else None},
        "compiles": {"warm_up": engine.warm_up_compiles[(system_role, max_len)], "warm_up_now": warm,
                     "after_warm_up": engine.compiles.count - compiled,
                     "after_warm_up_programs": engine.compiles.names_since(compiled)},
        "context": {"max_len": max_len, "used": conv.context_length},
        "seconds": {"warm_up": warm_seconds, "listen": conv.listen_seconds, "speak": speak_busy},
        "output": {"sample_rate": engine.vocoder.sample_rate, "seconds": len(audio) / engine.vocoder.sample_rate},
    }
    return audio, report
