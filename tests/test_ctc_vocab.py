"""CTC target vocabularies: characters and learned word pieces."""

import jax
import numpy as np
import pytest

from fo_jax.audio.io import write_wav
from fo_jax.config import load_config
from fo_jax.data.manifest import write_manifest
from fo_jax.errors import ConfigError
from fo_jax.text.ctc_vocab import BLANK, WORD, CtcVocab, learn_pieces
from fo_jax.training.stages import build_stage

TEXTS = ["What is two plus three?", "What is the capital of France?", "What is two times two?",
         "The sky is blue.", "Count from one to four."]


def test_characters():
    v = CtcVocab.from_texts(TEXTS)
    assert v.units[0] == BLANK and v.units[1] == " " and not v.word_pieces
    assert list(v.units[1:]) == sorted(set("".join(t.lower() for t in TEXTS)) - set("?."))
    ids = v.encode("What is TWO?!")
    assert ids == [v.units.index(c) for c in "what is two"]
    assert v.decode([0] + ids + [0]) == "what is two"
    assert v.encode("zebra") == [v.units.index(c) for c in "ebra"]  # z unseen: dropped


def test_learned_pieces_merge_the_most_frequent_pair_first():
    # words: "▁aa" x2, "▁ab" x1. Pairs (▁,a) 3, (a,a) 2, (a,b) 1 -> "▁a"; then (▁a,a) 2 -> "▁aa".
    assert learn_pieces(["aa aa ab"], 5) == ("a", "b", WORD, WORD + "a", WORD + "aa")
    # Asked for more units than merges exist: stops when every word is one unit.
    assert learn_pieces(["aa aa ab"], 50) == ("a", "b", WORD, WORD + "a", WORD + "aa", WORD + "ab")


def test_word_pieces_encode_by_longest_match_and_round_trip():
    v = CtcVocab.from_texts(TEXTS, size=40)
    assert len(v) == 40 and v.units[0] == BLANK and v.word_pieces
    assert v == CtcVocab.from_texts(TEXTS, size=40)  # deterministic
    ids = v.encode("What is two plus two?")
    # The most frequent words became whole units.
    assert [v.units[i] for i in ids[:2]] == [WORD + "what", WORD + "is"]
    assert len(ids) < len("what is two plus two")
    for text in TEXTS:
        assert v.decode(v.encode(text)) == text.lower().rstrip("?.")
    # An unseen word is spelled with smaller pieces; unknown characters are dropped.
    assert v.decode(v.encode("Fourteen zebras")) == "fourteen ebras"
    assert v.decode([0, 0]) == ""
    with pytest.raises(ValueError, match="10 CTC units: use 0 .characters. or more than the transcripts' 20"):
        CtcVocab.from_texts(TEXTS, size=10)  # fewer units than characters: not a word-piece vocabulary
    with pytest.raises(ValueError):
        CtcVocab.from_texts(TEXTS, size=-1)


def test_ctc_stage_uses_word_pieces(tmp_path):
    rng = np.random.default_rng(0)
    records = []
    for i, text in enumerate(TEXTS):
        write_wav(tmp_path / f"{i}.wav", (0.1 * rng.standard_normal(32000)).astype(np.float32), 16000)
        records.append({"audio": f"{i}.wav", "text": text})
    write_manifest(tmp_path / "asr.jsonl", records)
    cfg = load_config("configs/speech_in_stage1.py:tiny",
                      [f"stage.manifest={tmp_path / 'asr.jsonl'}", "stage.ctc_units=30", "stage.batch_size=2",
                       "stage.buckets=(256,)"])
    stage = build_stage(cfg)
    assert len(stage.vocab) == stage.encoder.ctc_vocab_size == 30 and stage.vocab.word_pieces
    params = stage.load_params(jax.random.key(0))
    assert params["ctc"]["ctc_lo"]["kernel"].shape == (30, stage.encoder.hidden_size)  # (V, D)
    assert stage.meta["vocab"] == list(stage.vocab.units)
    cfg.stage.ctc_units = 5
    with pytest.raises(ConfigError, match="stage.ctc_units: 5 CTC units"):
        build_stage(cfg)
