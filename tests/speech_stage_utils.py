"""Shared data for the speech-in stage 2 / 3 tests (no tests here): tone "speech", a small BPE
tokenizer, manifests with bad lines, and a stand-in for an earlier run's checkpoint."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fo_jax.audio.io import write_wav
from fo_jax.data.manifest import write_manifest
from fo_jax.models.configs import ModelConfig
from fo_jax.text.tokenizer import chatml, train_bpe_tokenizer
from fo_jax.training import trainer
from fo_jax.training.checkpoint import TrainCheckpointer
from fo_jax.training.freeze import flatten, merge, split_trainable
from fo_jax.training.speech_common import init_speech_llm
from fo_jax.training.stages import build_stage

TRANSCRIPTS = ["what is two plus three", "the sky is blue", "count from one to four", "hello there",
               "paris is in france", "grass is green", "seven minus two", "good morning"]
ANSWERS = {0: "Two plus three is five.", 2: "One, two, three, four.", 4: "Yes.", 6: "Seven minus two is five."}


def _tone(path: Path, seconds: float, hz: float, seed: int) -> None:
    """A noisy tone: content the tests do not need, lengths they do."""
    n = int(16000 * seconds)
    t = np.arange(n) / 16000
    noise = 0.01 * np.random.default_rng(seed).normal(size=n)
    write_wav(path, (0.3 * np.sin(2 * np.pi * hz * t) + noise).astype(np.float32), 16000)


def speech_world(root: Path) -> None:
    """Writes under ``root``: ``{i}.wav`` (one per transcript), ``tok/`` (BPE + ChatML),
    ``asr.jsonl`` (8 good lines + a missing file + an empty transcript) and ``dialogues.jsonl``
    (4 good dialogues, then 5 bad lines: missing audio, addressed without answer, no turns,
    broken JSON, too many turns)."""
    for i in range(len(TRANSCRIPTS)):
        _tone(root / f"{i}.wav", 0.4 + 0.1 * i, 180 + 40 * i, i)
    asr = [{"audio": f"{i}.wav", "text": t} for i, t in enumerate(TRANSCRIPTS)]
    write_manifest(root / "asr.jsonl", asr + [{"audio": "missing.wav", "text": "never used"},
                                              {"audio": "0.wav", "text": ""}])

    def turn(i):
        return {"audio": f"{i}.wav", "text": TRANSCRIPTS[i], "addressed": i in ANSWERS, "answer": ANSWERS.get(i, "")}

    good = [[0], [1, 2], [3, 4, 5], [6, 7]]
    lines = [json.dumps({"turns": [turn(i) for i in d]}) for d in good]
    lines += [json.dumps({"turns": [turn(0), {"audio": "missing.wav", "addressed": False}]}),
              json.dumps({"turns": [{"audio": "0.wav", "addressed": True, "answer": " "}]}),
              json.dumps({"turns": []}),
              "{broken",
              json.dumps({"turns": [turn(i) for i in (0, 1, 2, 3, 4)]})]
    (root / "dialogues.jsonl").write_text("\n".join(lines) + "\n")
    chats = [chatml([{"role": "user", "content": "Transcribe: " + t}, {"role": "assistant", "content": t}])
             for t in TRANSCRIPTS] + [chatml([{"role": "user", "content": TRANSCRIPTS[i]},
                                              {"role": "assistant", "content": a}]) for i, a in ANSWERS.items()]
    train_bpe_tokenizer(chats, vocab_size=300).save_pretrained(root / "tok")


def fake_speech_run(workdir: Path, model: ModelConfig, parts=("encoder", "adapter", "task_embeddings"),
                    seed: int = 7) -> dict:
    """A checkpoint shaped like a finished speech-in run of ``model`` (random trained ``parts``,
    CMVN statistics in its meta), written without training. Returns its trainable tree."""
    params = init_speech_llm(model, jax.random.key(seed), with_llm=False)
    params["encoder"] = {k: v for k, v in params["encoder"].items() if not k.startswith("cmvn_")}
    params["ctc"] = {"kernel": np.ones((3, 2), np.float32)}  # stage 1's head, not used later
    trainable = {part: params[part] for part in parts}
    rng = np.random.default_rng(seed)
    frames = 1000
    mean = rng.normal(5.0, 1.0, 80)
    stats = {"mean_stat": (mean * frames).tolist(), "var_stat": ((mean ** 2 + 4.0) * frames).tolist(),
             "frame_num": frames}
    meta = {"config": {"model": {"encoder": dataclasses.asdict(model.encoder),
                                 "adapter": dataclasses.asdict(model.adapter)}},
            "frozen_fingerprint": "not checked", "cmvn_stats": stats}
    ckpt = TrainCheckpointer(workdir, save_every=1, async_save=False)
    ckpt.save(1, trainable, {"count": np.zeros((), np.int32)}, jax.random.key(0), {}, meta, force=True)
    ckpt.close()
    return trainable


def train_run(cfg, workdir: Path) -> tuple[dict, dict, list[dict]]:
    """(summary before any step, summary after ``stage.steps``, per-step metrics) of a fresh run."""
    before = trainer.train(cfg, workdir / "before", max_steps=0, progress=False)
    summary = trainer.train(cfg, workdir / "run", progress=False)
    metrics = [json.loads(line) for line in (workdir / "run" / "metrics.jsonl").read_text().splitlines()]
    return before, summary, metrics


def stage_gradients(cfg) -> tuple[dict, dict]:
    """(gradients, trainable params) of a stage's loss on its first batch, both as flat
    {path: array}, with the frozen params under stop_gradient as the train step has them."""
    stage = build_stage(cfg)
    trainable, frozen = split_trainable(stage.load_params(jax.random.key(0)), stage.trainable)
    batch = jax.tree.map(jnp.asarray, next(iter(stage.dataset(0))))

    def objective(t):
        return stage.loss(merge(t, jax.tree.map(jax.lax.stop_gradient, frozen)), batch, jax.random.key(0))[0]

    return flatten(jax.jit(jax.grad(objective))(trainable)), flatten(trainable)
