"""The toy world's evaluation arithmetic: ASR and spoken-answer scores, endpoint delay, latency stats."""

from __future__ import annotations

import numpy as np
import pytest

from fo_jax.toy.speech_in import asr_scores
from fo_jax.toy.talk import endpoint_delay_ms, latency_stats, speech_scores, whole_chunks


def test_asr_scores_corpus_wer_and_sentence_accuracy():
    refs = ["What is one plus two?", "What color is snow?"]
    hyps = ["what is one plus three", "What color is snow"]  # one substitution in 9 words
    s = asr_scores(refs, hyps)
    assert s["wer"] == pytest.approx(1 / 9) and s["sentence_accuracy"] == 0.5 and s["n"] == 2
    assert s["errors"] == [{"text": "What is one plus two?", "heard": "what is one plus three"}]
    assert asr_scores(refs, ["", ""])["wer"] == 1.0


def test_speech_scores_compare_generated_with_reference_audio():
    answers = ["Snow is white.", "One plus one is two."]
    s = speech_scores(answers, ["snow is white", "one plus one is"], ["snow is white", "one plus one is two"])
    assert s["accuracy"] == 0.5 and s["reference_accuracy"] == 1.0
    assert s["wer"] == pytest.approx(1 / 8) and s["reference_wer"] == 0.0


def test_endpoint_delay_is_measured_from_the_end_of_speech_to_the_deciding_chunk_end():
    assert endpoint_delay_ms(10, 1.5) == pytest.approx(100.0)  # 10 chunks = 1.6 s
    assert endpoint_delay_ms(8, 1.5) == pytest.approx(-220.0)  # decided before the user stopped


def test_whole_chunks_pads_to_160ms_chunks_plus_silence():
    x = np.ones(3000, np.float32)
    y = whole_chunks(x, extra_seconds=0.32)
    assert len(y) == 2 * 2560 + 2 * 2560 and y[:3000].sum() == 3000 and y[3000:].sum() == 0
    assert len(whole_chunks(np.ones(2560))) == 2560


def test_latency_stats_drop_cumulative_times():
    lat = [{"first_pcm": float(v), "total": 2.0 * v, "at_first_pcm": 9.0} for v in (100, 200, 300)]
    s = latency_stats(lat)
    assert set(s) == {"first_pcm", "total"}
    assert s["first_pcm"] == {"avg": 200.0, "p50": 200.0, "p90": pytest.approx(280.0)}
    assert latency_stats([]) == {}
