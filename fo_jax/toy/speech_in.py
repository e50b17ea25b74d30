"""The toy world's speech-in side on top of finished training runs: ASR transcripts and the
speech-input model (encoder, adapter, heads around the frozen LLM) that the bundle carries.

- ``ctc_transcripts``: speech-in stage 1, the encoder + CTC head, greedy best path (no LM).
- ``llm_transcripts``: speech-in stage 2, the frozen LLM asked to transcribe in the stage's own
  layout (``stage.instruction``, then ``[audio] speech [/audio]``), greedy.
- ``speech_llm``: AudioLLM config and params of a stage-2 run (encoder, adapter, task
  embeddings, CMVN) or a stage-3 run (those, prompt embeddings, state head).

The transcribers batch utterances at one padded shape, so each compiles once.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fo_jax.audio.fbank import CHUNK_FRAMES, CHUNK_OVERLAP
from fo_jax.config import model_config
from fo_jax.data.bucketing import pad_to
from fo_jax.data.manifest import read_manifest
from fo_jax.data.speech import load_features, record_frames, stream_chunks, stream_framed
from fo_jax.models.audio_llm import AudioLLM, encode_speech
from fo_jax.models.configs import ModelConfig
from fo_jax.models.ctc import ctc_greedy_decode, ctc_logits
from fo_jax.models.encoder import encoder_forward
from fo_jax.text.ctc_vocab import CtcVocab
from fo_jax.toy.synth import wer
from fo_jax.toy.world import normalize
from fo_jax.training.checkpoint import load_run_meta, load_trained
from fo_jax.training.speech_common import cmvn_params, sequence_forward, start_params
from fo_jax.training.stages import build_stage

BATCH = 16
SPEECH_PARTS = {"encoder": r"^cmvn_", "adapter": None, "task_embeddings": None}  # stage 2's, CMVN aside
DIALOGUE_PARTS = ("prompt_embeddings", "state_head")  # stage 3's


def _run_config(meta: dict, **stage: Any) -> ml_collections.ConfigDict:
    """A run's config (its checkpoint meta) with ``stage`` fields replaced."""
    cfg = ml_collections.ConfigDict(meta["config"])
    cfg.stage.update(stage)
    return cfg


def speech_llm(llm_path: str | os.PathLike, run: str | os.PathLike) -> tuple[Any, ModelConfig, dict]:
    """(stage, model config, AudioLLM params) of a trained speech-in run around the LLM in ``llm_path``.

    ``run`` is a stage-2 or stage-3 run; ``stage`` is its stage object built without data (chat
    template, tokenizer, layouts). Params: the LLM's weights, then the run's encoder, adapter, task
    embeddings and CMVN (each leaf from the latest run that trained it: ``load_lineage``), and a
    stage-3 run's prompt embeddings and state head (random for a stage-2 run).
    """
    meta = load_run_meta(run)
    stage = build_stage(_run_config(meta, manifest="", llm_path=str(llm_path), tokenizer=""))
    dialogue = meta["config"]["stage"]["name"] == "speech_in_dialogue"
    parts = SPEECH_PARTS | (dict.fromkeys(DIALOGUE_PARTS) if dialogue else {})
    params, stats = start_params(stage.llm, stage.model, jax.random.key(0), str(run), parts,
                                 f"speech-in {3 if dialogue else 2} run {run}")
    params["encoder"] = {**params["encoder"], **cmvn_params(stats)}
    return stage, stage.model, params


def _batches(n: int, size: int = BATCH) -> list[np.ndarray]:
    """Index blocks of ``size`` (the last one padded by repeating its first index)."""
    out = []
    for start in range(0, n, size):
        idx = np.arange(start, min(n, start + size))
        out.append(np.concatenate([idx, np.full(size - len(idx), idx[0])]))
    return out


def _bar(items: Sequence, desc: str, progress: bool):
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="batch", disable=not progress)


def ctc_transcripts(run_dir: str | os.PathLike, manifest: str | os.PathLike, progress: bool = True) -> list[str]:
    """Greedy CTC transcripts of every record of ``manifest`` by a ``speech_in_ctc`` run."""
    trained, meta = load_trained(run_dir)
    vocab = CtcVocab(tuple(meta["vocab"]))
    encoder = dataclasses.replace(model_config(_run_config(meta)).encoder, ctc_vocab_size=len(vocab))
    params = {"encoder": {**trained["encoder"], **cmvn_params(meta["cmvn_stats"])}, "ctc": trained["ctc"]}
    records = read_manifest(manifest)
    base = Path(manifest).resolve().parent
    frames = max(record_frames(r, base) for r in records)

    @jax.jit
    def decode(p, feats, lengths):
        enc, enc_lengths = encoder_forward(p["encoder"], encoder, feats, lengths)
        return ctc_greedy_decode(ctc_logits(p["ctc"], encoder, enc), enc_lengths)

    out = [""] * len(records)
    for idx in _bar(_batches(len(records)), "CTC transcripts", progress):
        feats = [load_features(records[i], base)[:frames] for i in idx]
        tokens, lengths = decode(params, np.stack([pad_to(f, frames) for f in feats]),
                                 np.asarray([len(f) for f in feats], np.int32))
        for row, i in enumerate(idx):
            out[i] = vocab.decode(np.asarray(tokens[row, :lengths[row]]).tolist())
    return out


def llm_transcripts(run_dir: str | os.PathLike, llm_path: str | os.PathLike, manifest: str | os.PathLike,
                    progress: bool = True) -> list[str]:
    """Greedy transcripts of every record of ``manifest`` by the frozen LLM with a ``speech_in_llm``
    run's speech input, laid out as the stage trains (whole-utterance encoder forward)."""
    stage, model, params = speech_llm(llm_path, run_dir)
    records = read_manifest(manifest)
    base = Path(manifest).resolve().parent
    chunks = [stream_chunks(record_frames(r, base)) for r in records]
    bucket = max(chunks) * CHUNK_FRAMES
    seq_len, end_id = stage.seq_len(bucket), stage.template.end_id

    @jax.jit
    def speech(p, feats, lengths):
        return encode_speech(p, model, feats, lengths)[0]

    @jax.jit
    def next_token(p, batch, audio):  # greedy, from the whole sequence (no cache: a few dozen steps)
        hidden = sequence_forward(p, model, batch, audio)["hidden"]
        last = jnp.take_along_axis(hidden, (batch["lengths"] - 1)[:, None, None], axis=1)[:, 0]
        return jnp.argmax(AudioLLM(model).apply({"params": p}, last, method=AudioLLM.logits), -1)

    out = [""] * len(records)
    for idx in _bar(_batches(len(records)), "LLM transcripts", progress):
        feats = [pad_to(stream_framed(load_features(records[i], base)[:chunks[i] * CHUNK_FRAMES], chunks[i]),
                        CHUNK_OVERLAP + bucket) for i in idx]
        lengths = np.asarray([CHUNK_OVERLAP + chunks[i] * CHUNK_FRAMES for i in idx], np.int32)
        audio = speech(params, np.stack(feats), lengths)
        rows = [stage.layout(chunks[i] * stage.per_chunk, []).arrays(seq_len, stage.max_label) for i in idx]
        batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
        generated: list[list[int]] = [[] for _ in idx]
        live = np.ones(len(idx), bool)
        for _ in range(stage.max_label):
            tokens = np.asarray(next_token(params, batch, audio))
            live &= (tokens != end_id) & (batch["lengths"] < seq_len)
            if not live.any():
                break
            for row in np.flatnonzero(live):
                n = batch["lengths"][row]
                batch["tokens"][row, n], batch["positions"][row, n] = tokens[row], n
                batch["lengths"][row] = n + 1
                generated[row].append(int(tokens[row]))
        for row, i in enumerate(idx):
            out[i] = stage.llm.tokenizer.decode(generated[row], skip_special_tokens=True).strip()
    return out


def asr_scores(references: Sequence[str], hypotheses: Sequence[str], n_examples: int = 8) -> dict[str, Any]:
    """Corpus WER, sentence accuracy (normalized words equal) and the first wrong transcripts."""
    right = [normalize(r) == normalize(h) for r, h in zip(references, hypotheses)]
    return {"wer": wer(list(references), list(hypotheses)), "sentence_accuracy": float(np.mean(right)),
            "n": len(references),
            "errors": [{"text": r, "heard": h} for r, h, ok in zip(references, hypotheses, right) if not ok
                       ][:n_examples]}
