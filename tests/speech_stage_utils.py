"""Shared data for the speech-in stage 2 / 3 tests (no tests here): tone "speech", a small BPE
tokenizer, manifests with bad lines, and a stand-in for an earlier run's checkpoint."""

from __future__ import annotations

import collections
import dataclasses
import json
import re
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
from fo_jax.training.freeze import flatten, merge, split_trainable, unflatten
from fo_jax.training.speech_common import init_speech_llm
from fo_jax.training.stages import build_stage
from fo_jax.training.step import frozen_objective

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
        _tone(root / f"{i}.wav", 1.2 + 0.1 * i, 180 + 40 * i, i)
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
                    seed: int = 7, frozen: str | None = None, stage: dict | None = None) -> dict:
    """A checkpoint shaped like a finished speech-in run of ``model`` (random trained ``parts``
    less the leaves matching ``frozen``, CMVN statistics and ``stage`` config fields in its meta),
    written without training. Returns its trainable tree."""
    params = init_speech_llm(model, jax.random.key(seed), with_llm=False)
    params["encoder"] = {k: v for k, v in params["encoder"].items() if not k.startswith("cmvn_")}
    params["ctc"] = {"kernel": np.full((3, 2), seed, np.float32)}  # stage 1's head, not used later
    trainable = {part: params[part] for part in parts}
    if frozen:
        trainable = unflatten({k: v for k, v in flatten(trainable).items() if not re.search(frozen, k)})
    rng = np.random.default_rng(seed)
    frames = 1000
    mean = rng.normal(5.0, 1.0, 80)
    stats = {"mean_stat": (mean * frames).tolist(), "var_stat": ((mean ** 2 + 4.0) * frames).tolist(),
             "frame_num": frames}
    meta = {"config": {"model": {"encoder": dataclasses.asdict(model.encoder),
                                 "adapter": dataclasses.asdict(model.adapter)}, "stage": stage or {}},
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


def stage_gradients(cfg) -> tuple[dict, dict, dict, dict]:
    """Gradients of a stage's loss on its first batch, all as flat {path: array}: (trainable
    grads, trainable params, frozen grads, LLM grads without stop_gradient). The first and third
    come from the train step's own objective (``frozen_objective``) taken with respect to both
    trees; the last is what the LLM would get if it were not frozen (it must be non-zero for the
    zero frozen gradients to mean anything)."""
    stage = build_stage(cfg)
    trainable, frozen = split_trainable(stage.load_params(jax.random.key(0)), stage.trainable)
    batch = jax.tree.map(jnp.asarray, next(iter(stage.dataset(0))))
    rng = jax.random.key(0)
    objective = lambda t, f: frozen_objective(stage.loss)(t, f, batch, rng)[0]
    grads, frozen_grads = jax.jit(jax.grad(objective, argnums=(0, 1)))(trainable, frozen)
    open_grads = jax.jit(jax.grad(lambda f: stage.loss(merge(trainable, f), batch, rng)[0]))(frozen)
    return flatten(grads), flatten(trainable), flatten(frozen_grads), flatten({"llm": open_grads["llm"]})


def moment_paths(opt_state) -> list[str]:
    """The param path ('/'-joined trailing dict keys) of every array leaf of an optimizer state:
    Adam's mu and nu name each param they keep moments for (scalar counters are left out)."""
    paths = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(opt_state):
        if np.ndim(leaf) == 0:
            continue
        keys = []
        for key in reversed(path):
            if not isinstance(key, jax.tree_util.DictKey):
                break
            keys.append(str(key.key))
        paths.append("/".join(reversed(keys)))
    return paths


def assert_moments_only_for(opt_state, trainable: dict) -> None:
    """The optimizer state holds two moments for each trainable leaf and nothing else."""
    counts = collections.Counter(moment_paths(opt_state))
    assert counts == {p: 2 for p in flatten(trainable)}, sorted(set(counts) ^ set(flatten(trainable)))
