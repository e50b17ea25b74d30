"""Builds the toy world's data: synthesized speech and one JSONL manifest per training stage.

``build_world(workdir, quick, seed)`` writes, under ``workdir`` (for ``fo-jax toy`` pass its
``WORKDIR/data``):

    audio/user/..         16 kHz user clips, audio/assistant/.. 24 kHz assistant clips (cache)
    manifests/text_llm.jsonl            {"kind", "messages"}: ALL Q&A, multi-turn, skill tasks
    manifests/text_test.jsonl           {"id", "category", "messages"}: held-out questions, as text
    manifests/asr_train.jsonl           {"audio", "text", "kind", "voice", ...}: speech-in 1/2
    manifests/asr_test.jsonl            the same for held-out questions and asides
    manifests/dialogues_train.jsonl     {"turns": [{"audio", "text", "addressed", "answer", ...}]}
    manifests/dialogues_test.jsonl        speech-in 3 / state evaluation (answer "" if not addressed)
    manifests/speech_out.jsonl          {"audio", "text"}: assistant voice, codec + decoder stage 2
                                          (answers, questions, entity sentences: assistant_texts)
    manifests/speech_out_answers.jsonl  {"audio", "text", "question"}: train answers, decoder stage 3
    manifests/test_qa.jsonl             {"audio", "text", "answer", "answer_audio", ...}: evaluation
    manifests/train_qa.jsonl            {"audio", "text", "answer", ...}: as many train questions, each in
                                          one of its training voices (seen speech: a pipeline check)
    build_info.json                     sizes, counts, clips synthesized this run, seconds

Audio paths are relative to the manifest's folder. Every speech manifest except the test ones
holds train-split utterances only (``train_qa`` evaluates on speech heard in training); the text
LLM's manifest holds all Q&A (see fo_jax.toy.world).
User clips carry ``voice``, ``duration`` and ``speech_end`` (seconds to the last voiced 10 ms
frame: where the user stops speaking, for endpoint-delay measurement).

``quick`` hears every train utterance in 4 espeak-ng voices (~30x cheaper than Piper: the ASR
stages generalize to held-out questions from many utterances, not from many epochs of few),
tests on 2 questions per category and a few asides, and the assistant (Piper) speaks only the
train answers; it synthesizes in about a minute on 2 quiet cores. Reruns reuse every
clip already synthesized (content-hash cache) and rewrite the manifests, which are deterministic.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Sequence, TypeVar

from fo_jax.data.manifest import write_manifest
from fo_jax.toy.synth import (ASSISTANT_RATE, ASSISTANT_VOICE, ESPEAK_USER_VOICES, USER_RATE, USER_VOICES, Voice,
                              clip_path, speech_end, synthesize_all, voices_for)
from fo_jax.toy.world import (CATEGORIES, QA, WORD_LIST_PREFIX, Turn, chat, dialogues, make_world, normalize,
                              text_records)


T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How much of the world becomes speech. None = all."""
    train_questions: int | None = None
    test_questions: int | None = None
    train_asides: int | None = None
    test_asides: int | None = None
    read: int | None = None
    user_voices: int = 4        # voices per train utterance; test utterances get one
    dialogue_rounds: int = 2    # dialogues each train question appears in
    speech_out_extra: bool = True  # assistant voice also reads questions and entity sentences
    piper_users: bool = True    # False: user voices from espeak only (fast synthesis, for quick runs)


FULL = Sizes()
QUICK = Sizes(test_questions=2 * len(CATEGORIES), test_asides=6, dialogue_rounds=1,
              speech_out_extra=False, piper_users=False)


def stratified_subset(pairs: Sequence[T], n: int | None, rng: random.Random,
                      category: Callable[[T], str] = lambda p: p.category) -> list[T]:
    """n pairs taken round-robin over categories (seeded order within each); all if n is None.

    Pairs are ``QA``s, or anything ``category`` names the category of (e.g. manifest records)."""
    if n is None:
        return list(pairs)
    groups = defaultdict(list)
    for p in pairs:
        groups[category(p)].append(p)
    for g in groups.values():
        rng.shuffle(g)
    out = []
    while len(out) < n and any(groups.values()):
        for cat in CATEGORIES:
            if groups.get(cat) and len(out) < n:
                out.append(groups[cat].pop())
    return out


def _take(items: Sequence, n: int | None, rng: random.Random) -> list:
    items = list(items)
    if n is None:
        return items
    rng.shuffle(items)
    return items[:n]


def _pick_read(read: Sequence[str], n: int | None, heard: Sequence[str], needed: Sequence[str],
               rng: random.Random) -> list[str]:
    """Read sentences: first ones that cover words of ``needed`` absent from ``heard``, then others."""
    if n is None:
        return list(read)
    missing = {w for s in needed for w in normalize(s).split()} - {w for s in heard for w in normalize(s).split()}
    order = list(read)
    rng.shuffle(order)
    picked = []
    for s in order:
        if set(normalize(s).split()) & missing:
            picked.append(s)
            missing -= set(normalize(s).split())
    rest = [s for s in order if s not in picked]
    return picked + rest[:max(0, n - len(picked))]


def assistant_texts(train_qa: Sequence[QA], read: Sequence[str], extra: bool) -> list[tuple[str, str]]:
    """(kind, text) the assistant voice reads for speech out (codec, decoder stage 2): the train
    answers and, if ``extra``, the train questions and the entity sentences, so that the decoder
    hears the words of answers (held-out entities too) in more contexts. Not the asides, nor the
    word lists of their words: nothing the assistant says (they were ~18 % of its clips, many of
    them long: a full run synthesized in 268 s without them, 314 s with them on a ~10 % slower box)."""
    texts = [("answer", p.answer) for p in train_qa]
    if extra:
        texts += [("question", p.question) for p in train_qa]
        texts += [("read", s) for s in read if not s.startswith(WORD_LIST_PREFIX)]
    return list(dict.fromkeys(texts))


class _Clips:
    """Collects (text, voice, rate) clips, synthesizes the missing ones, then describes them."""

    def __init__(self, root: Path, manifest_dir: Path):
        self.root, self.manifest_dir = root, manifest_dir
        self.jobs: dict[Path, tuple[str, Voice, int]] = {}

    def want(self, text: str, voice: Voice, rate: int) -> Path:
        path = clip_path(self.root / ("user" if rate == USER_RATE else "assistant"), text, voice, rate)
        self.jobs.setdefault(path, (text, voice, rate))
        return path

    def make(self, progress: bool) -> dict[str, int]:
        made = {}
        for kind, rate in (("user", USER_RATE), ("assistant", ASSISTANT_RATE)):
            jobs = [j for j in self.jobs.values() if j[2] == rate]
            _, made[kind] = synthesize_all(jobs, self.root / kind, progress, desc=f"{kind} speech")
        return made

    def record(self, path: Path, **fields) -> dict:
        from fo_jax.audio.io import load_audio

        audio, rate = load_audio(path, sample_rate=None)
        rec = {"audio": os.path.relpath(path, self.manifest_dir), **fields, "duration": round(len(audio) / rate, 3)}
        if rate == USER_RATE:
            rec["speech_end"] = speech_end(audio, rate)
        return rec


def build_world(workdir: str | os.PathLike, quick: bool = False, seed: int = 0, sizes: Sizes | None = None,
                progress: bool = True) -> dict[str, Path]:
    """Synthesizes the toy world's speech and writes every stage's manifest (see the module doc).

    Args:
      workdir: output folder (created); clips already in its cache are reused.
      quick: the QUICK subset instead of FULL (ignored when ``sizes`` is given).
      seed: the world's seed (split, subsets, dialogues, voices).
      sizes: explicit sizes (tests use tiny ones).

    Returns:
      {"text_llm", "text_test", "asr_train", "asr_test", "dialogues_train", "dialogues_test",
       "speech_out", "speech_out_answers", "test_qa", "train_qa", "info"} -> file paths.
    """
    started = time.time()
    sizes = sizes or (QUICK if quick else FULL)
    root = Path(workdir)
    mdir = root / "manifests"
    mdir.mkdir(parents=True, exist_ok=True)
    world = make_world(seed)
    rng = random.Random(f"build/{seed}")
    train_qa = stratified_subset(world.split("train"), sizes.train_questions, rng)
    test_qa = stratified_subset(world.split("test"), sizes.test_questions, rng)
    # Its own rng: adding this sample leaves every other selection (and cached clip) unchanged.
    seen_qa = stratified_subset(train_qa, len(test_qa), random.Random(f"seen/{seed}"))
    train_asides = _take(world.asides_of("train"), sizes.train_asides, rng)
    test_asides = _take(world.asides_of("test"), sizes.test_asides, rng)
    heard = [p.question for p in train_qa] + [a.text for a in train_asides]
    test_said = [p.question for p in test_qa] + [a.text for a in test_asides]
    read = _pick_read(world.read, sizes.read, heard, test_said, rng)

    clips = _Clips(root / "audio", mdir)

    pool = USER_VOICES if sizes.piper_users else ESPEAK_USER_VOICES

    def user(text: str, n: int) -> list[tuple[Voice, Path]]:
        return [(v, clips.want(text, v, USER_RATE)) for v in voices_for(text, seed, n, pool)]

    def assistant(text: str) -> Path:
        return clips.want(text, ASSISTANT_VOICE, ASSISTANT_RATE)

    train_utts = ([("question", p.question) for p in train_qa] + [("aside", a.text) for a in train_asides]
                  + [("read", s) for s in read])
    asr_train = [(kind, text, v, path) for kind, text in train_utts for v, path in user(text, sizes.user_voices)]
    asr_test = [(kind, text, v, path) for kind, text in
                [("question", p.question) for p in test_qa] + [("aside", a.text) for a in test_asides]
                for v, path in user(text, 1)]
    speech_out = [(kind, text, assistant(text))
                  for kind, text in assistant_texts(train_qa, read, sizes.speech_out_extra)]
    answers_test = {p.id: assistant(p.answer) for p in test_qa}
    train_dialogues = dialogues(train_qa, train_asides, seed, rounds=sizes.dialogue_rounds)
    test_dialogues = dialogues(test_qa, test_asides, seed + 1, rounds=1)
    made = clips.make(progress)

    def turn_record(turn: Turn, k: int) -> dict:
        voice, path = user(turn.text, k + 1)[k]  # the k-th of the clip's ASR voices: no new synthesis
        return clips.record(path, text=turn.text, addressed=turn.addressed, answer=turn.answer or "",
                            id=turn.id, voice=voice.name)

    def dialogue_records(ds: list[tuple[Turn, ...]], n_voices: int, prefix: str) -> list[dict]:
        return [{"id": f"{prefix}/{i}", "turns": [turn_record(t, i % n_voices) for t in d]} for i, d in enumerate(ds)]

    manifests = {
        "text_llm": text_records(world),
        "text_test": [{"id": p.id, "category": p.category, "messages": chat((p.question, p.answer))}
                      for p in test_qa],
        "asr_train": [clips.record(path, text=text, kind=kind, voice=v.name) for kind, text, v, path in asr_train],
        "asr_test": [clips.record(path, text=text, kind=kind, voice=v.name) for kind, text, v, path in asr_test],
        "dialogues_train": dialogue_records(train_dialogues, min(sizes.user_voices, len(pool)), "train"),
        "dialogues_test": dialogue_records(test_dialogues, 1, "test"),
        "speech_out": [clips.record(path, text=text, kind=kind) for kind, text, path in speech_out],
        "speech_out_answers": [clips.record(assistant(p.answer), text=p.answer, question=p.question, id=p.id)
                               for p in train_qa],
        "test_qa": [clips.record(path, id=p.id, category=p.category, text=p.question, answer=p.answer,
                                 answer_audio=os.path.relpath(answers_test[p.id], mdir), voice=v.name)
                    for p in test_qa for v, path in user(p.question, 1)],
        "train_qa": [clips.record(path, id=p.id, category=p.category, text=p.question, answer=p.answer, voice=v.name)
                     for p in seen_qa for v, path in user(p.question, 1)],  # the first of its ASR voices
    }
    paths = {}
    for name, records in manifests.items():
        paths[name] = mdir / f"{name}.jsonl"
        write_manifest(paths[name], records)
    heard_words = {w for _, t, _, _ in asr_train for w in normalize(t).split()}
    test_words = {w for _, t, _, _ in asr_test for w in normalize(t).split()}
    info = {"seed": seed, "quick": sizes == QUICK, "sizes": dataclasses.asdict(sizes),
            "records": {k: len(v) for k, v in manifests.items()},
            "synthesized": made, "clips": len(clips.jobs),
            "test_words_unheard": sorted(test_words - heard_words),
            "seconds": round(time.time() - started, 2)}
    paths["info"] = root / "build_info.json"
    paths["info"].write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Build the toy world's speech data and manifests.")
    p.add_argument("--workdir", default="work/toy/data")
    p.add_argument("--quick", action="store_true", help="a small stratified subset (fast)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    paths = build_world(args.workdir, args.quick, args.seed)
    info = json.loads(paths["info"].read_text())
    print(json.dumps({k: info[k] for k in ("records", "synthesized", "seconds")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
