"""The toy world's text LLM: its tokenizer, its training (the shared trainer, ``text_lm`` stage), its
export as a HF Qwen2 directory (then frozen: its fingerprint is recorded), and its text-QA accuracy.

Scoring rule (``fo_jax.toy.world.answer_matches``): an answer is correct when its normalized words
(lower case, punctuation dropped) equal the reference answer's, the whole sentence: "Seven plus
five is twelve." matches "seven plus five is twelve", not "Twelve." nor "... is twelve, yes".
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import ml_collections

from fo_jax.config import load_config
from fo_jax.data.manifest import read_manifest
from fo_jax.text.tokenizer import chatml, load_tokenizer, train_bpe_tokenizer
from fo_jax.toy.world import TRANSCRIBE_PREFIX, answer_matches

CONFIG = "configs/text_llm.py"


def train_tokenizer(manifest: str | os.PathLike, out_dir: str | os.PathLike, vocab_size: int):
    """A byte-level BPE tokenizer trained on the manifest's conversations as ChatML; saved to ``out_dir``."""
    texts = [chatml(r["messages"], add_generation_prompt=False) for r in read_manifest(manifest)]
    tokenizer = train_bpe_tokenizer(texts, vocab_size=vocab_size)
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def run_config(manifest: str | os.PathLike, tokenizer_dir: str | os.PathLike, quick: bool,
               overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """The ``text_lm`` run config of the toy preset (``toy`` or ``toy_quick``) for these files."""
    variant = "toy_quick" if quick else "toy"
    return load_config(f"{CONFIG}:{variant}", [f"stage.manifest={manifest}", f"stage.tokenizer={tokenizer_dir}",
                                               *overrides])


def train_and_freeze(cfg: ml_collections.ConfigDict, run_dir: str | os.PathLike, hf_dir: str | os.PathLike,
                     progress: bool = True) -> dict[str, Any]:
    """Trains (resuming from ``run_dir``), writes the HF Qwen2 directory, reloads it, fingerprints it.

    The fingerprint is taken from the reloaded directory: it is what every later stage freezes.
    """
    import jax
    import numpy as np

    from fo_jax.conversion.hf_qwen2 import load_hf_qwen2, save_hf_qwen2
    from fo_jax.training.freeze import fingerprint, merge
    from fo_jax.training.stages import build_stage
    from fo_jax.training.trainer import train

    summary = train(cfg, str(run_dir), progress=progress)
    llm_cfg = build_stage(cfg).llm  # the vocabulary the stage sized to the tokenizer
    params = jax.device_get(merge(summary["trainable"], summary["frozen"]))
    save_hf_qwen2(hf_dir, llm_cfg, params)
    load_tokenizer(cfg.stage.tokenizer).save_pretrained(str(hf_dir))
    loaded_cfg, loaded = load_hf_qwen2(hf_dir)
    return {"fingerprint": fingerprint(loaded), "steps": summary["step"],
            "final_loss": summary["metrics"].get("loss"),
            "params": int(sum(np.size(x) for x in jax.tree.leaves(loaded))),
            "dims": {k: getattr(loaded_cfg, k) for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                         "num_layers", "num_heads", "num_kv_heads", "head_dim")}}


def greedy_answers(hf_dir: str | os.PathLike, prompts: Sequence[Sequence[int]], max_new_tokens: int = 48,
                   batch_size: int = 64) -> list[str]:
    """Greedy completions (decoded, stripped) of the LLM in ``hf_dir`` for prompts given as token ids."""
    from fo_jax.conversion.hf_qwen2 import load_hf_qwen2
    from fo_jax.inference.llm import generate

    cfg, params = load_hf_qwen2(hf_dir)
    tokenizer = load_tokenizer(hf_dir)
    answers = []
    for start in range(0, len(prompts), batch_size):
        for ids in generate(params, cfg, prompts[start:start + batch_size], max_new_tokens):
            answers.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
    return answers


def answer_questions(hf_dir: str | os.PathLike, questions: Sequence[str], max_new_tokens: int = 48,
                     batch_size: int = 64) -> list[str]:
    """Greedy answers of the LLM in ``hf_dir`` to single-turn ChatML questions."""
    tokenizer = load_tokenizer(hf_dir)
    prompts = [tokenizer(chatml([{"role": "user", "content": q}]), add_special_tokens=False)["input_ids"]
               for q in questions]
    return greedy_answers(hf_dir, prompts, max_new_tokens, batch_size)


def stretched_prompt(tokenizer, prefix: str, stretched: str, repeat: int) -> list[int]:
    """Token ids of a single-turn ChatML prompt (default system turn, generation prompt) whose user
    content is ``prefix + stretched``, each token of ``stretched`` standing ``repeat`` times in a row,
    the way speech gives the LLM several embeddings per word piece (``repeat=1``: the plain prompt).
    """
    content = prefix + stretched
    full = chatml([{"role": "user", "content": content}])
    start = full.rindex(content)

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    return (ids(full[:start]) + ids(prefix) + [i for i in ids(stretched) for _ in range(repeat)]
            + ids(full[start + len(content):]))


def stretched_reading(hf_dir: str | os.PathLike, test_manifest: str | os.PathLike,
                      repeats: Sequence[int] = (1, 2, 3)) -> dict[str, Any]:
    """How well the LLM reads stretched input: for each ``k`` in ``repeats``, its exact-answer accuracy
    on the test questions with every question token repeated k times, and how often it transcribes
    the question exactly ("Transcribe:" + the stretched question, speech-in 2's task).

    Returns {"n", "qa": {k: accuracy}, "transcribe": {k: accuracy}}.
    """
    records = read_manifest(test_manifest)
    questions = [r["messages"][0]["content"] for r in records]
    expected = [r["messages"][1]["content"] for r in records]
    tokenizer = load_tokenizer(hf_dir)
    prompts = []  # per k: the questions, then "Transcribe:" + the questions; one generation pass for all
    for k in repeats:
        prompts += [stretched_prompt(tokenizer, "", q, k) for q in questions]
        # "Transcribe:" | " What ...": the space stays with the word, as BPE splits it
        prompts += [stretched_prompt(tokenizer, TRANSCRIBE_PREFIX.rstrip(), " " + q, k) for q in questions]
    got = greedy_answers(hf_dir, prompts)
    n = len(questions)
    out: dict[str, Any] = {"n": n, "qa": {}, "transcribe": {}}
    for i, k in enumerate(repeats):
        qa, heard = got[2 * i * n:(2 * i + 1) * n], got[(2 * i + 1) * n:(2 * i + 2) * n]
        out["qa"][k] = sum(map(answer_matches, qa, expected)) / n
        out["transcribe"][k] = sum(map(answer_matches, heard, questions)) / n
    return out


def text_qa_accuracy(hf_dir: str | os.PathLike, test_manifest: str | os.PathLike) -> dict[str, Any]:
    """Exact-match accuracy (``answer_matches``) of greedy answers on the held-out test questions.

    ``test_manifest`` records: {"id", "category", "messages": [user question, assistant answer]}.
    Returns {"accuracy", "n", "by_category": {cat: accuracy}, "errors": [{question, expected, answer}]}.
    """
    records = read_manifest(test_manifest)
    questions = [r["messages"][0]["content"] for r in records]
    expected = [r["messages"][1]["content"] for r in records]
    answers = answer_questions(hf_dir, questions)
    ok = [answer_matches(a, e) for a, e in zip(answers, expected)]
    by_cat = defaultdict(list)
    for r, good in zip(records, ok):
        by_cat[r["category"]].append(good)
    return {"accuracy": sum(ok) / len(ok) if ok else 0.0, "n": len(ok),
            "by_category": {c: sum(v) / len(v) for c, v in sorted(by_cat.items())},
            "errors": [{"question": q, "expected": e, "answer": a}
                       for q, e, a, good in zip(questions, expected, answers, ok) if not good]}
