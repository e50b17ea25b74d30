"""End to end: ``fo-jax toy --quick`` trains the toy world (all stages), evaluates it, talks,
writes the report and its wavs, and a rerun skips every finished step.

Loose thresholds that still fail on a broken pipeline: the frozen LLM bitwise unchanged, ASR
better than 60 % WER, the answers to spoken questions better than 60 % WER (noise instead of the
question measured 79 %, another question's audio 97 %), the state head right on at least half of
the final chunks, every step done.

Two quick-mode rows are measured and reported but not held: speech-in -> text-out accuracy
(> 0 % of 14 held-out questions; the quick model answers ~1 in 14 exactly, so 0 comes up by
chance: CI saw it) and speech out (> 0 % of answers recognized: the quick decoder does not speak
held-out answers intelligibly, issue 7); the test checks that both measurements work.
"""

from __future__ import annotations

import json
import time

import pytest

from fo_jax.cli.main import main
from fo_jax.data.manifest import read_manifest

pytest.importorskip("piper")
pytest.importorskip("pocketsphinx")


@pytest.mark.slow
def test_toy_quick_end_to_end_and_rerun_skips(tmp_path, capsys):
    started = time.perf_counter()
    assert main(["toy", "--quick", "--workdir", str(tmp_path), "--no-progress"]) == 0
    first = time.perf_counter() - started
    doc = json.loads((tmp_path / "report" / "report.json").read_text())
    targets = {t["target"]: t for t in doc["targets"]}
    assert targets["frozen LLM fingerprint before == after"]["status"] == "PASS"
    assert targets["frozen LLM text-QA accuracy (test split)"]["status"] == "PASS"  # quick: >= 25 %
    assert targets["speech-in -> text-out answer WER (test split)"]["status"] == "PASS"  # quick: < 60 %
    assert min(targets[t]["status"] == "PASS" for t in targets if t.startswith("ASR WER")) is True  # < 60 %
    assert targets["state head correct on the final chunk"]["status"] == "PASS"  # quick: >= 50 %
    steps = {s["name"]: s for s in doc["steps"]}
    assert all(s["status"] == "done" for s in steps.values()), steps
    results = {name: s["result"] for name, s in steps.items()}
    heard = results["speech_in_eval"]
    assert heard["compiles_after_warm_up"] == 0 and heard["n"] == results["data"]["records"]["test_qa"]
    # Train questions (seen voices): 42 % and 49 % in two runs, 86 % with noise for the question.
    assert heard["train"]["n"] == heard["n"] and heard["train"]["answer_wer"] < 0.7, heard["train"]
    talk = results["talk"]
    assert talk["n"] == results["data"]["records"]["test_qa"] and talk["compiles_after_warm_up"] == 0
    assert talk["answered"] + talk["dropped"] + talk["undecided"] == talk["n"]
    assert 0.0 <= results["state_eval"]["final_chunk_accuracy"] <= 1.0
    # Every turn's final chunk ends 160-320 ms after its speech (synth.end_on_chunk; 10 ms: the 16-bit file).
    after = results["state_eval"]["final_chunk_after_speech_ms"]
    assert 150 <= after["min"] <= after["avg"] <= after["max"] <= 320, after
    assert 0 <= results["state_eval"]["turns_deciding_before_speech_end"] <= results["state_eval"]["n"]
    spoken = results["speech_out_eval"]
    assert spoken["n"] == talk["n"] and spoken["reference_accuracy"] >= 0.75, spoken  # the recognizer hears TTS
    assert set(spoken["by_category"]) == {r["category"] for r in read_manifest(tmp_path / "data/manifests/test_qa.jsonl")}
    assert len(spoken["errors"]) == min(10, round((1 - spoken["accuracy"]) * spoken["n"]))
    fast = results["codec_fast"]["intelligibility"]
    assert fast["reference"]["wer"] < 0.25 and fast["roundtrip"]["wer"] < 0.5, fast
    for path in ("llm/hf/model.safetensors", "model/fo_jax_model.json", "model/params.safetensors",
                 "talk/wavs/00_question.wav", "talk/wavs/00_answer.wav", "talk/wavs/turns.jsonl",
                 "speech_out_eval/wavs/00_generated.wav", "report/plots/losses.png"):
        assert (tmp_path / path).exists(), path
    md = (tmp_path / "report" / "report.md").read_text()
    assert "NOT RUN" not in md and "## Talking (duplex, streaming)" in md

    capsys.readouterr()
    started = time.perf_counter()
    assert main(["toy", "--quick", "--workdir", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.count("done earlier, skipped") == len(steps)
    assert time.perf_counter() - started < first / 3
