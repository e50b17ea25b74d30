"""The toy world's content, split, speech clips and manifests (fo_jax.toy)."""

from __future__ import annotations

import json
import random
import re
from collections import Counter

import numpy as np
import pytest

from fo_jax.audio.fbank import CHUNK_SAMPLES, num_frames
from fo_jax.audio.io import audio_info, load_audio
from fo_jax.data.manifest import read_manifest, resolve
from fo_jax.data.prepare import check_audio
from fo_jax.data.speech import stream_chunks
from fo_jax.toy import build, synth, world
from fo_jax.toy.world import TRANSCRIBE_PREFIX, make_world, normalize

# An independent reading of number words, so answers are checked, not re-derived with spell().
_UNITS = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve "
                                     "thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split())}
_TENS = {w: 10 * i for i, w in enumerate("_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()) if i > 1}


def number(words: str) -> int:
    total = 0
    for w in words.lower().split():
        total += _UNITS[w] if w in _UNITS else _TENS[w]
    return total


def test_world_is_deterministic_with_expected_counts():
    w0, w0b, w1 = make_world(0), make_world(0), make_world(1)
    assert w0 == w0b
    assert {p.id for p in w0.split("test")} != {p.id for p in w1.split("test")}
    counts = Counter(p.category for p in w0.qa)
    assert counts == {"plus": 81, "minus": 45, "times": 81, "capital": 60, "color": 40, "opposite": 55,
                      "counting": 36}
    assert len({p.id for p in w0.qa}) == len(w0.qa) and len({p.question for p in w0.qa}) == len(w0.qa)
    for cat, n in counts.items():  # stratified 15 % hold-out
        n_test = sum(p.split == "test" for p in w0.qa if p.category == cat)
        assert n_test == round(0.15 * n), cat
    assert len(w0.asides) == 160 and len({a.text for a in w0.asides}) == 160
    assert sum(a.split == "test" for a in w0.asides) == 24
    questions = {p.question for p in w0.qa}
    for a in w0.asides:  # asides never look like the assistant's question templates
        assert a.text not in questions and not re.match(r"(What is|What color|Count from)", a.text), a.text


def test_answers_are_consistent():
    capitals = dict(world.CAPITALS)
    for p in make_world(0).qa:
        if p.category in ("plus", "minus", "times"):
            m = re.fullmatch(r"What is ([a-z ]+) (plus|minus|times) ([a-z ]+)\?", p.question)
            a, b = number(m[1]), number(m[3])
            r = re.fullmatch(r"([A-Za-z ]+) (plus|minus|times) ([a-z ]+) is ([a-z ]+)\.", p.answer)
            assert (number(r[1]), r[2], number(r[3])) == (a, m[2], b), p
            assert number(r[4]) == {"plus": a + b, "minus": a - b, "times": a * b}[m[2]], p
            assert 1 <= a <= 9 and 1 <= b <= 9 and number(r[4]) >= 0
        elif p.category == "counting":
            m = re.fullmatch(r"Count from ([a-z ]+) to ([a-z ]+)\.", p.question)
            said = [number(x) for x in p.answer.rstrip(".").split(", ")]
            assert said == list(range(number(m[1]), number(m[2]) + 1)) and 3 <= len(said) <= 5, p
        elif p.category == "capital":
            country = re.fullmatch(r"What is the capital of (.+)\?", p.question)[1]
            assert p.answer == f"The capital of {country} is {capitals[country]}."
        elif p.category == "opposite":
            word = re.fullmatch(r"What is the opposite of (\w+)\?", p.question)[1]
            opposite = re.fullmatch(rf"The opposite of {word} is (\w+)\.", p.answer)[1]
            assert opposite != word
    opposites = dict(world.OPPOSITES)
    assert all(opposites[b] == a for a, b in world.OPPOSITES if b in opposites)  # asked both ways: symmetric


def test_speech_never_hears_test_questions_and_covers_their_words():
    w = make_world(3)
    train, test = w.split("train"), w.split("test")
    dialogues = world.dialogues(train, w.asides_of("train"), seed=3, rounds=2)
    for d in dialogues:
        assert {t.id for t in d} <= {p.id for p in train} | {a.id for a in w.asides_of("train")}
        assert any(t.addressed for t in d)
    assert dialogues == world.dialogues(train, w.asides_of("train"), seed=3, rounds=2)
    # Every question once per round; asides dealt from a deck: each heard equally often, +-1.
    assert Counter(t.id for d in dialogues for t in d if t.addressed) == {p.id: 2 for p in train}
    for asides in (w.asides_of("train"), w.asides_of("test")):
        heard = Counter(t.id for d in world.dialogues(train, asides, seed=3, rounds=2) for t in d if not t.addressed)
        assert set(heard) == {a.id for a in asides} and max(heard.values()) - min(heard.values()) <= 1, heard
    heard = {x for s in [p.question for p in train] + [a.text for a in w.asides_of("train")] + list(w.read)
             for x in normalize(s).split()}
    said = [p.question for p in test] + [a.text for a in w.asides_of("test")]
    assert not {x for s in said for x in normalize(s).split()} - heard  # a real ASR corpus knows the words
    assert not {p.question for p in test} & set(w.read)


def test_text_llm_mix_has_all_knowledge_and_skills():
    w = make_world(0)
    recs = world.text_records(w)
    kinds = Counter(r["kind"] for r in recs)
    assert {r["id"] for r in recs if r["kind"] == "qa"} == {p.id for p in w.qa}  # test split included
    assert kinds["dialogue"] > 100 and kinds["transcribe"] > len(w.qa) and kinds["repeat"] == len(w.qa)
    for r in recs:
        roles = [m["role"] for m in r["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and all(m["content"] for m in r["messages"])
    transcribe = {r["messages"][0]["content"]: r["messages"][1]["content"] for r in recs if r["kind"] == "transcribe"}
    q = w.split("test")[0].question
    assert transcribe[TRANSCRIBE_PREFIX + q] == q


def test_stratified_subset_takes_every_category_in_turn():
    """QAs or manifest records (talk's sample): n items round-robin over the categories, seeded."""
    qa = make_world(0).split("test")
    records = [{"id": p.id, "category": p.category} for p in qa]  # arithmetic first, as test_qa.jsonl
    pick = build.stratified_subset(records, 20, random.Random(0), lambda r: r["category"])
    counts = Counter(r["category"] for r in pick)
    assert len(pick) == 20 and set(counts) == set(world.CATEGORIES) and max(counts.values()) == 3
    assert pick == build.stratified_subset(records, 20, random.Random(0), lambda r: r["category"])
    assert [r["category"] for r in records[:20]] != [r["category"] for r in pick]  # not the first 20
    assert [p.id for p in build.stratified_subset(qa, 7, random.Random(1))] == [
        r["id"] for r in build.stratified_subset(records, 7, random.Random(1), lambda r: r["category"])]
    assert build.stratified_subset(records, None, random.Random(0), lambda r: r["category"]) == records


def test_wer():
    assert synth.wer("the cat sat", "the cat sat") == 0.0
    assert synth.wer("The cat sat.", "the bat sat") == pytest.approx(1 / 3)
    assert synth.wer("a b c d", "a c d e f") == pytest.approx(3 / 4)  # 1 deletion + 2 insertions
    assert synth.wer(["a b", "c d e"], ["a b", ""]) == pytest.approx(3 / 5)
    assert synth.wer("", "") == 0.0 and synth.wer("", "x") == 1.0


def test_speech_end_finds_the_last_voiced_frame():
    t = np.arange(16000) / 16000
    x = np.concatenate([np.zeros(8000), 0.3 * np.sin(2 * np.pi * 220 * t), 1e-4 * np.ones(8000)]).astype(np.float32)
    assert synth.speech_end(x, 16000) == pytest.approx(1.5, abs=0.011)
    assert synth.speech_end(np.zeros(1600, np.float32), 16000) == 0.0


@pytest.mark.parametrize("tail_s", [0.0, 0.01, 0.09, 0.4, 1.3])
def test_user_clips_end_on_a_chunk_after_a_pause(tail_s):
    rng = np.random.default_rng(0)
    speech = 0.3 * np.sin(2 * np.pi * 200 * np.arange(int(1.237 * 16000)) / 16000)
    x = np.concatenate([np.zeros(3000), speech, 1e-4 * rng.standard_normal(int(tail_s * 16000))]).astype(np.float32)
    end = synth.speech_end(x, 16000)
    y = synth.end_on_chunk(x)
    assert y.dtype == np.float32 and len(y) % CHUNK_SAMPLES == 0
    # The first chunk boundary at least END_PAUSE after the speech: cut (long tails) or padded with zeros.
    assert end + synth.END_PAUSE <= len(y) / 16000 < end + synth.END_PAUSE + CHUNK_SAMPLES / 16000
    n = min(len(x), len(y))
    np.testing.assert_array_equal(y[:n], x[:n])
    # (x's last, partial 10 ms frame is not measured; y's is whole: at most one frame later.)
    assert not y[len(x):].any() and synth.speech_end(y, 16000) == pytest.approx(end, abs=0.0101)
    # Training counts a turn's chunks from its fbank frames, streaming from whole 160 ms chunks: equal.
    assert stream_chunks(num_frames(len(y))) == len(y) // CHUNK_SAMPLES
    np.testing.assert_array_equal(synth.end_on_chunk(y), y)  # idempotent
    assert len(synth.end_on_chunk(x, pause=0.3)) >= 16000 * (end + 0.3)


def _centroid(x: np.ndarray, rate: int) -> float:
    spec = np.abs(np.fft.rfft(x)) ** 2
    return float((np.fft.rfftfreq(len(x), 1 / rate) * spec).sum() / spec.sum())


def test_voices_rates_and_variety(tmp_path):
    pytest.importorskip("piper")
    pytest.importorskip("espeakng_loader")
    text = "What is the capital of France?"
    by_name = {v.name: v for v in synth.USER_VOICES}
    voices = [by_name[n] for n in ("joe-fast", "joe-slow", "espeak-m3-quick", "espeak-f3", "espeak-m7-low")]
    jobs = [(text, v, synth.USER_RATE) for v in voices] + [(text, synth.ASSISTANT_VOICE, synth.ASSISTANT_RATE)]
    paths, made = synth.synthesize_all(jobs, tmp_path, progress=False)
    assert made == len(jobs) and synth.synthesize_all(jobs, tmp_path, progress=False)[1] == 0
    clips = [load_audio(p, sample_rate=None) for p in paths]
    assert [r for _, r in clips] == [16000] * len(voices) + [24000]
    for x, r in clips:
        assert 0.8 < len(x) / r < 4.0 and 0.05 < np.abs(x).max() <= 1.0
    for x, _ in clips[:-1]:  # user clips: whole chunks, the last one >= END_PAUSE after the speech
        # (measured on the 16-bit file: a frame near the threshold may count 10 ms later than before)
        assert len(x) % CHUNK_SAMPLES == 0 and len(x) / 16000 >= synth.speech_end(x, 16000) + synth.END_PAUSE - 0.0101
    # Speaking time, to the end of the speech: the clips themselves now end on whole 160 ms chunks
    # after a pause (end_on_chunk), so their lengths no longer carry each voice's trailing silence
    # (with it these clips spanned 1.43-2.01 s; speech ends at 1.42-1.80 s, the espeak-ng ones
    # deterministic: espeak-m3-quick 1.42 s, espeak-m7-low 1.76 s).
    lengths = np.array([synth.speech_end(x, r) for x, r in clips[:-1]])
    centroids = np.array([_centroid(x, r) for x, r in clips[:-1]])
    assert max(lengths) > 1.2 * min(lengths) and max(centroids) > 1.3 * min(centroids)  # speed, pitch/timbre
    for i in range(len(voices)):  # every two voices differ by > 4 % in duration or spectral centroid
        for j in range(i):
            assert max(abs(np.log(lengths[i] / lengths[j])), abs(np.log(centroids[i] / centroids[j]))) > 0.04
    # The assistant voice is fixed and deterministic; the recognizer understands it.
    again = synth.render(text, synth.ASSISTANT_VOICE, synth.ASSISTANT_RATE)
    np.testing.assert_allclose(again, clips[-1][0], atol=1 / 16000)
    pytest.importorskip("pocketsphinx")
    from fo_jax.audio.io import resample

    heard = synth.recognize(resample(clips[-1][0], 24000, 16000))
    assert synth.wer(text, heard) <= 0.34, heard
    lm = synth.write_arpa([p.question for p in make_world(0).qa], tmp_path / "toy.arpa")
    assert "\nfrance F R AE N S\n" in "\n" + (tmp_path / "toy.dict").read_text()
    assert synth.wer(text, synth.recognize(resample(clips[-1][0], 24000, 16000), lm=lm)) <= 0.34


def test_assistant_reads_answers_questions_and_entity_sentences():
    w = make_world(0)
    train = w.split("train")
    lists = [s for s in w.read if s.startswith(world.WORD_LIST_PREFIX)]
    assert lists and len(lists) < len(w.read)
    texts = build.assistant_texts(train, w.read, extra=True)
    assert len(texts) == len(set(texts))
    by_kind = {k: {t for kind, t in texts if kind == k} for k in ("answer", "question", "read")}
    assert by_kind["answer"] == {p.answer for p in train} and by_kind["question"] == {p.question for p in train}
    assert by_kind["read"] == set(w.read) - set(lists) and "My aunt went to France last summer." in by_kind["read"]
    assert not {t for _, t in texts} & {a.text for a in w.asides}  # nothing the assistant says
    assert build.assistant_texts(train, w.read, extra=False) == [("answer", p.answer) for p in train]


TINY = build.Sizes(train_questions=4, test_questions=2, train_asides=2, test_asides=1, read=2, user_voices=2,
                   dialogue_rounds=1, speech_out_extra=False, piper_users=False)


def _dialogue_audio_ok(record, base):
    for turn in record["turns"]:
        if (reason := check_audio(turn, base)) is not None:
            return reason
    return None


def test_tiny_build_end_to_end_and_cached(tmp_path, monkeypatch):
    pytest.importorskip("piper")
    pytest.importorskip("espeakng_loader")
    paths = build.build_world(tmp_path, seed=5, sizes=TINY, progress=False)
    info = json.loads(paths["info"].read_text())
    assert info["synthesized"]["user"] > 0 and info["synthesized"]["assistant"] == 4 + 2
    m = {k: p for k, p in paths.items() if k != "info"}
    audio_fields = {"asr_train": ["audio", "text"], "asr_test": ["audio", "text"], "speech_out": ["audio", "text"],
                    "speech_out_answers": ["audio", "text", "question"], "test_qa": ["audio", "text", "answer"],
                    "train_qa": ["audio", "text", "answer"]}
    recs = {k: read_manifest(m[k], required=req, validate=check_audio, policy="strict")
            for k, req in audio_fields.items()}
    for k in ("dialogues_train", "dialogues_test"):
        recs[k] = read_manifest(m[k], required=["turns"], validate=_dialogue_audio_ok, policy="strict")
    for k in ("text_llm", "text_test"):
        recs[k] = read_manifest(m[k], required=["messages"], policy="strict")
    kinds = Counter(r["kind"] for r in recs["asr_train"])
    assert kinds["question"] == 4 * 2 and kinds["aside"] == 2 * 2 and kinds["read"] >= 2 * 2  # 2 voices each
    # Read sentences were picked to cover the test utterances' words (numbers come from arithmetic).
    assert set(info["test_words_unheard"]) <= set(_UNITS)
    assert len(recs["test_qa"]) == 2 and Counter(r["kind"] for r in recs["asr_test"]) == {"question": 2, "aside": 1}
    assert len(recs["text_llm"]) == len(world.text_records(make_world(5)))
    base = m["test_qa"].parent
    for r in recs["asr_train"] + recs["test_qa"]:
        assert audio_info(resolve(r["audio"], base))[1] == 16000 and 0 < r["speech_end"] <= r["duration"]
    for r in recs["speech_out"] + recs["speech_out_answers"]:
        assert audio_info(resolve(r["audio"], base))[1] == 24000
    for r in recs["test_qa"]:
        assert audio_info(resolve(r["answer_audio"], base))[1] == 24000
    # The split: no held-out question is heard (or spoken by the assistant) in training data.
    w = make_world(5)
    test_q = {p.question for p in w.split("test")} | {p.answer for p in w.split("test")}
    assert {r["text"] for r in recs["test_qa"]} <= test_q
    train_texts = ({r["text"] for k in ("asr_train", "speech_out", "speech_out_answers") for r in recs[k]}
                   | {t["text"] for d in recs["dialogues_train"] for t in d["turns"]})
    assert not train_texts & test_q
    # train_qa: as many train questions as test ones, each a clip the ASR stages train on.
    asr_clips = {(r["audio"], r["text"]) for r in recs["asr_train"] if r["kind"] == "question"}
    assert len(recs["train_qa"]) == len(recs["test_qa"])
    assert {(r["audio"], r["text"]) for r in recs["train_qa"]} <= asr_clips
    train_pairs = {(p.question, p.answer) for p in w.split("train")}
    assert {(r["text"], r["answer"]) for r in recs["train_qa"]} <= train_pairs
    turns = [t for d in recs["dialogues_train"] for t in d["turns"]]
    assert all(t["answer"] for t in turns if t["addressed"]) and any(not t["addressed"] for t in turns)
    assert all(t["answer"] == "" for t in turns if not t["addressed"])
    # A rerun synthesizes nothing and writes identical manifests.
    before = {k: p.read_bytes() for k, p in m.items()}

    def no_synthesis(*args, **kwargs):
        raise AssertionError("synthesized again")

    monkeypatch.setattr(synth, "render", no_synthesis)
    again = build.build_world(tmp_path, seed=5, sizes=TINY, progress=False)
    assert json.loads(again["info"].read_text())["synthesized"] == {"user": 0, "assistant": 0}
    assert {k: again[k].read_bytes() for k in m} == before
    # Resumable: a missing clip is made again, and only that one.
    monkeypatch.undo()
    resolve(recs["test_qa"][0]["answer_audio"], base).unlink()
    third = build.build_world(tmp_path, seed=5, sizes=TINY, progress=False)
    assert json.loads(third["info"].read_text())["synthesized"] == {"user": 0, "assistant": 1}
