"""Evaluations of the trained toy model through the inference pipeline (``Engine``, ``Conversation``),
i.e. the streaming program a user talks to, on the held-out test split.

- ``speech_in_eval``: each spoken test question through the listen path (the whole question, no
  early decision), then a greedy text answer: speech-in -> text-out accuracy; the same on as many
  train questions in a voice heard in training (a pipeline check that does not need generalization).
- ``state_eval``: each test dialogue turn by turn, as stage 3 lays it out (addressed turns followed
  by their reference answers, asides dropped); the state head's decision on each turn's final
  chunk against its label (addressed -> start speaking, aside -> stop listening).
- ``speech_out_eval``: the paper's output-speech check: the reference answer's text is forced, the
  LLM's hidden states and the re-tokenised text drive the speech decoder, the codec speaks; an
  independent recognizer (pocketsphinx) transcribes it, next to its score on the reference TTS audio.
- ``talk``: duplex conversations, one per test question: the question then silence, the state head
  decides when to answer (endpoint delay: ms of input after the user stopped speaking), the greedy
  answer is spoken; wavs, the paper's latency table and speech-in -> speech-out accuracy.

Answers are scored with ``fo_jax.toy.world.answer_matches`` (the whole sentence).
"""

from __future__ import annotations

import json
import os
import random
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from fo_jax.audio.fbank import CHUNK_SAMPLES, CHUNK_SECONDS
from fo_jax.audio.io import load_audio, resample, write_wav
from fo_jax.data.manifest import read_manifest, resolve
from fo_jax.inference.bundle import load_bundle
from fo_jax.inference.dialogue import State
from fo_jax.inference.pipeline import DEFAULT_ROLE, Conversation, Engine, EngineOptions
from fo_jax.inference.sampling import SamplingConfig
from fo_jax.models.audio_llm import HEAD_START_SPEAKING, HEAD_STOP_LISTENING, decide
from fo_jax.toy.build import stratified_subset
from fo_jax.toy.synth import USER_RATE, recognize, wer
from fo_jax.toy.world import answer_matches

MAX_LEN = 512  # LLM positions of a conversation: the longest test dialogue with its answers fits
MAX_SPEECH_TOKENS = 240  # codec tokens per text segment (6 s; the longest answer is ~3.5 s)
SILENCE_SECONDS = 1.0  # silence after a question in duplex mode, for the state head to decide in


def load_engine(model_dir: str | os.PathLike) -> Engine:
    """The bundle in ``model_dir`` ready to talk: greedy text, the bundle's speech-decoder sampling."""
    return Engine(load_bundle(model_dir), EngineOptions(sampling=SamplingConfig(top_k=1),
                                                        max_speech_tokens=MAX_SPEECH_TOKENS))


def whole_chunks(samples: np.ndarray, extra_seconds: float = 0.0) -> np.ndarray:
    """16 kHz samples zero-padded to whole 160 ms chunks, plus ``extra_seconds`` of silence."""
    n = -(-len(samples) // CHUNK_SAMPLES) * CHUNK_SAMPLES + int(round(extra_seconds / CHUNK_SECONDS)) * CHUNK_SAMPLES
    return np.pad(np.asarray(samples, np.float32), (0, n - len(samples)))


def endpoint_delay_ms(chunks_heard: int, speech_end: float) -> float:
    """ms of input between the end of the user's speech (``speech_end``, seconds into the clip) and
    the state head's decision, made at the end of the ``chunks_heard``-th 160 ms chunk (negative:
    it decided to answer before the user stopped)."""
    return 1e3 * (chunks_heard * CHUNK_SECONDS - speech_end)


def _records(manifest: str | os.PathLike) -> tuple[list[dict], Path]:
    return read_manifest(manifest), Path(manifest).resolve().parent


def _user_audio(record: dict, base: Path) -> np.ndarray:
    return load_audio(resolve(record["audio"], base), sample_rate=USER_RATE)[0]


def _bar(items: Sequence, desc: str, progress: bool):
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="utt", disable=not progress)


def _conversation(engine: Engine, seed: int = 0) -> Conversation:
    return Conversation(engine, system_role=DEFAULT_ROLE, max_len=MAX_LEN, seed=seed)


def _accuracy(records: list[dict], ok: list[bool]) -> dict[str, Any]:
    by_cat = defaultdict(list)
    for r, good in zip(records, ok):
        by_cat[r.get("category", "all")].append(good)
    return {"accuracy": float(np.mean(ok)) if ok else 0.0, "n": len(ok),
            "by_category": {c: float(np.mean(v)) for c, v in sorted(by_cat.items())}}


def _spoken_answers(engine: Engine, manifest: str | os.PathLike, desc: str, progress: bool) -> dict[str, Any]:
    """Accuracy of the greedy text answers to a manifest's spoken questions (each heard whole)."""
    records, base = _records(manifest)
    answers = []
    for r in _bar(records, desc, progress):
        conv = _conversation(engine)
        conv.listen(whole_chunks(_user_audio(r, base)), decide=False)
        reply = conv.respond(speech=False)
        reply.read()
        answers.append(reply.text.strip())
    ok = [answer_matches(a, r["answer"]) for a, r in zip(answers, records)]
    # Word errors of the answers: a graded signal beside the all-or-nothing accuracy (an answer that
    # repeats the heard question with a wrong result is closer than one to another question).
    return {**_accuracy(records, ok), "answer_wer": wer([r["answer"] for r in records], answers),
            "errors": [{"question": r["text"], "expected": r["answer"], "answer": a}
                       for r, a, good in zip(records, answers, ok) if not good]}


def speech_in_eval(engine: Engine, test_qa: str | os.PathLike, train_qa: str | os.PathLike | None = None,
                   progress: bool = True) -> dict[str, Any]:
    """Speech-in -> text-out accuracy on the spoken test questions (``test_qa.jsonl``).

    With ``train_qa`` (questions and voices heard in training), the same on them under ``"train"``:
    it separates a broken pipeline (seen questions fail too) from one that does not generalize.
    """
    engine.warm_up(MAX_LEN, DEFAULT_ROLE)
    warm = engine.compiles.count
    out = _spoken_answers(engine, test_qa, "speech in -> text out", progress)
    if train_qa is not None:
        out["train"] = _spoken_answers(engine, train_qa, "speech in -> text out (train questions)", progress)
    return {**out, "compiles_after_warm_up": engine.compiles.count - warm}


def state_eval(engine: Engine, dialogues_test: str | os.PathLike, progress: bool = True) -> dict[str, Any]:
    """State-head decisions on the final chunk of every test dialogue turn (``dialogues_test.jsonl``).
    ``final_chunk_after_speech_ms``: how long after the speech the final chunks end (min/avg/max;
    the toy's user clips end ``fo_jax.toy.synth.END_PAUSE`` or more after it, on a whole chunk).
    ``turns_deciding_early``: turns where the head leaves 'listen' before the final chunk (in the
    pause, as stage 3's ``decision_pause`` teaches, or sooner); ``turns_deciding_before_speech_end``:
    those where it does so on a chunk that ends while the user still speaks.

    Each turn is heard whole without deciding (as stage 3 trains: one label per chunk); then, as in
    training, an addressed turn is followed by its reference answer (forced text) and an aside is
    dropped from the context.
    """
    records, base = _records(dialogues_test)
    rows, after_speech = [], []
    for d in _bar(records, "state head", progress):
        conv = _conversation(engine)
        for turn in d["turns"]:
            audio = whole_chunks(_user_audio(turn, base))
            if "speech_end" in turn:
                after_speech.append(1e3 * (len(audio) / USER_RATE - turn["speech_end"]))
            probs = conv.listen(audio, decide=False)
            decisions = np.asarray(decide(probs))
            head, decided = int(decisions[-1]), decisions != 0
            want = HEAD_START_SPEAKING if turn["addressed"] else HEAD_STOP_LISTENING
            ends = CHUNK_SECONDS * np.arange(1, len(probs) + 1)  # each chunk's end, s into the clip
            rows.append({"text": turn["text"], "addressed": turn["addressed"], "head": head, "ok": head == want,
                         "early": int(np.sum(decided[:-1])),
                         "cut_in": int(np.sum(decided & (ends < turn.get("speech_end", 0.0))))})
            if turn["addressed"]:
                ids = engine.tokenizer(turn["answer"], add_special_tokens=False)["input_ids"]
                conv.respond(force_tokens=ids, speech=False).read()
            else:
                conv.ignore()
    addressed = [r["ok"] for r in rows if r["addressed"]]
    asides = [r["ok"] for r in rows if not r["addressed"]]
    return {"final_chunk_accuracy": float(np.mean([r["ok"] for r in rows])), "n": len(rows),
            "addressed_accuracy": float(np.mean(addressed)) if addressed else None,
            "aside_accuracy": float(np.mean(asides)) if asides else None,
            "turns_deciding_early": sum(r["early"] > 0 for r in rows),
            "turns_deciding_before_speech_end": sum(r["cut_in"] > 0 for r in rows),
            "final_chunk_after_speech_ms": ({"min": min(after_speech), "avg": float(np.mean(after_speech)),
                                             "max": max(after_speech)} if after_speech else None),
            "errors": [r for r in rows if not r["ok"]][:10]}


def _recognized(audio_24k: np.ndarray, rate: int, lm: str | os.PathLike) -> str:
    return recognize(resample(audio_24k, rate, USER_RATE), lm) if len(audio_24k) else ""


def speech_scores(answers: list[str], heard: list[str], reference_heard: list[str]) -> dict[str, Any]:
    def score(hyps: list[str]) -> dict[str, float]:
        return {"wer": wer(answers, hyps),
                "accuracy": float(np.mean([answer_matches(h, a) for h, a in zip(hyps, answers)]))}

    generated, reference = score(heard), score(reference_heard)
    return {"accuracy": generated["accuracy"], "wer": generated["wer"],
            "reference_accuracy": reference["accuracy"], "reference_wer": reference["wer"]}


def speech_out_eval(engine: Engine, test_qa: str | os.PathLike, lm: str | os.PathLike, wav_dir: str | os.PathLike,
                    n_wavs: int = 4, n_errors: int = 10, progress: bool = True) -> dict[str, Any]:
    """pocketsphinx on the spoken reference answers (text forced) vs on their reference TTS audio.

    Returns the scores (``speech_scores``), ``n``, ``by_category`` (answers recognized), the first
    ``n_wavs`` answers as ``examples`` (their wavs written to ``wav_dir``) and the first ``n_errors``
    unrecognized ones as ``errors``."""
    records, base = _records(test_qa)
    wav_dir = Path(wav_dir)
    wav_dir.mkdir(parents=True, exist_ok=True)
    rate = engine.vocoder.sample_rate
    heard, reference_heard, examples = [], [], []
    for i, r in enumerate(_bar(records, "speech out (forced answers)", progress)):
        conv = _conversation(engine, seed=i)
        conv.listen(whole_chunks(_user_audio(r, base)), decide=False)
        ids = engine.tokenizer(r["answer"], add_special_tokens=False)["input_ids"]
        audio = conv.respond(force_tokens=ids).read()
        reference = load_audio(resolve(r["answer_audio"], base), sample_rate=rate)[0]
        heard.append(_recognized(audio, rate, lm))
        reference_heard.append(_recognized(reference, rate, lm))
        if i < n_wavs:
            write_wav(wav_dir / f"{i:02d}_generated.wav", audio, rate)
            write_wav(wav_dir / f"{i:02d}_reference.wav", reference, rate)
            examples.append({"answer": r["answer"], "heard": heard[-1], "reference_heard": reference_heard[-1]})
    answers = [r["answer"] for r in records]
    ok = [answer_matches(h, a) for h, a in zip(heard, answers)]
    return {**speech_scores(answers, heard, reference_heard), "n": len(records), "examples": examples,
            "by_category": _accuracy(records, ok)["by_category"],
            "errors": [{"answer": a, "heard": h, "reference_heard": rh}
                       for a, h, rh, good in zip(answers, heard, reference_heard, ok) if not good][:n_errors]}


def latency_stats(latencies: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """{component: {"avg", "p50", "p90"}} over replies (the paper's table; cumulative ``at_*`` dropped)."""
    names = [k for k in latencies[0] if not k.startswith("at_")] if latencies else []
    return {k: {"avg": float(np.mean(v)), "p50": float(np.percentile(v, 50)), "p90": float(np.percentile(v, 90))}
            for k in names for v in [[lat[k] for lat in latencies]]}


def talk(engine: Engine, test_qa: str | os.PathLike, lm: str | os.PathLike, wav_dir: str | os.PathLike,
         limit: int | None = None, progress: bool = True,
         on_turn: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Duplex conversations on the spoken test questions (``limit`` of them, taken round-robin over
    the categories: the manifest lists the arithmetic first): the state head decides when to answer;
    answers are spoken. Writes ``NN_question.wav`` (16 kHz) and ``NN_answer.wav`` (24 kHz) per
    question and ``turns.jsonl``."""
    records, base = _records(test_qa)
    records = stratified_subset(records, limit, random.Random("talk"), lambda r: r["category"])
    wav_dir = Path(wav_dir)
    wav_dir.mkdir(parents=True, exist_ok=True)
    rate = engine.vocoder.sample_rate
    turns = []
    engine.warm_up(MAX_LEN, DEFAULT_ROLE)
    warm = engine.compiles.count
    for i, r in enumerate(_bar(records, "talk (duplex)", progress)):
        question = _user_audio(r, base)
        conv = _conversation(engine, seed=i)
        conv.listen(whole_chunks(question, SILENCE_SECONDS), decide=True)
        turn = {"question": r["text"], "expected": r["answer"], "speech_end": r["speech_end"],
                "decision": conv.state.name, "chunks_heard": conv.chunks_heard}
        turn["endpoint_delay_ms"] = endpoint_delay_ms(conv.chunks_heard, r["speech_end"])
        audio = np.zeros(0, np.float32)
        if conv.state == State.SS:
            reply = conv.respond()
            audio = reply.read()
            turn.update(answer=reply.text.strip(), latency_ms=reply.latency_ms(), audio_seconds=reply.audio_seconds,
                        rtf=reply.busy_seconds / reply.audio_seconds if reply.samples else None)
        turn["heard"] = _recognized(audio, rate, lm)
        turn["reference_heard"] = _recognized(load_audio(resolve(r["answer_audio"], base), sample_rate=rate)[0],
                                              rate, lm)
        write_wav(wav_dir / f"{i:02d}_question.wav", question, USER_RATE)
        write_wav(wav_dir / f"{i:02d}_answer.wav", audio, rate)
        turns.append(turn)
        if on_turn is not None:
            on_turn(turn)
    (wav_dir / "turns.jsonl").write_text("".join(json.dumps(t) + "\n" for t in turns), encoding="utf-8")
    answered = [t for t in turns if t["decision"] == "SS"]
    delays = [t["endpoint_delay_ms"] for t in answered]
    latencies = [t["latency_ms"] for t in answered if t.get("latency_ms")]
    scores = speech_scores([t["expected"] for t in turns], [t["heard"] for t in turns],
                            [t["reference_heard"] for t in turns])
    return {"n": len(turns), "answered": len(answered),
            "dropped": sum(t["decision"] == "EL" for t in turns),
            "undecided": sum(t["decision"] not in ("SS", "EL") for t in turns),
            "text_accuracy": float(np.mean([answer_matches(t.get("answer", ""), t["expected"]) for t in turns])),
            "speech_accuracy": scores["accuracy"], "speech_wer": scores["wer"],
            "reference_accuracy": scores["reference_accuracy"],
            "endpoint_delay_ms": float(np.mean(delays)) if delays else None,
            "endpoint_delay_p90_ms": float(np.percentile(delays, 90)) if delays else None,
            "answered_before_speech_end": sum(d < 0 for d in delays),
            "latency_ms": latency_stats(latencies),
            "rtf": float(np.mean([t["rtf"] for t in answered if t.get("rtf")])) if answered else None,
            "compiles_after_warm_up": engine.compiles.count - warm}
