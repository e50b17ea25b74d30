"""The toy world's report (fo_jax.toy.report) and its answer-matching rule."""

from __future__ import annotations

import json

from fo_jax.toy.report import FAIL, NOT_RUN, PASS, RunInfo, evaluate_targets, write_report
from fo_jax.toy.steps import Outcome
from fo_jax.toy.world import answer_matches


def test_answer_matching_rule():
    assert answer_matches("Seven plus five is twelve.", "seven plus five is twelve")
    assert answer_matches("  The capital of Peru is   Lima!", "The capital of Peru is Lima.")
    assert answer_matches("Three, four, five.", "three four five")
    assert not answer_matches("Twelve.", "Seven plus five is twelve.")  # the whole sentence counts
    assert not answer_matches("Seven plus five is twelve, yes.", "Seven plus five is twelve.")
    assert not answer_matches("", "Snow is white.")


def _llm_result(accuracy: float) -> list[Outcome]:
    llm = {"fingerprint": "ab" * 32, "steps": 10, "final_loss": 0.5, "params": 1234, "hf_dir": "llm/hf",
           "metrics": "llm/run/metrics.jsonl",
           "dims": {"vocab_size": 1024, "hidden_size": 64, "num_layers": 2}}
    text = {"accuracy": accuracy, "n": 20, "by_category": {"plus": accuracy},
            "errors": [{"question": "What is one plus one?", "expected": "One plus one is two.", "answer": "Two."}]}
    return [Outcome("data", "cached", result={"records": {"text_llm": 5}, "manifests": "data/manifests",
                                              "synthesized": {"user": 3, "assistant": 0}},
                    seconds=60.0, cpu_seconds=50.0),
            Outcome("llm", "done", result=llm, seconds=100.0, cpu_seconds=150.0),
            Outcome("text_eval", "done", result=text, seconds=5.0, cpu_seconds=4.0)]


def _status(rows, name):
    return next(r for r in rows if r["target"].startswith(name))


def test_report_renders_with_missing_sections(tmp_path):
    metrics = tmp_path / "llm" / "run" / "metrics.jsonl"
    metrics.parent.mkdir(parents=True)
    metrics.write_text("".join(json.dumps({"step": s, "loss": 5.0 / s}) + "\n" for s in range(10, 110, 10)))
    run = RunInfo(tmp_path, quick=False, outcomes=_llm_result(0.97),
                  checks={"llm_fingerprint_now": "ab" * 32},
                  pending={"speech_in_ctc": "stage 1 is not a toy step yet", "talk": "no talking yet"}, budget_s=1800)
    paths = write_report(tmp_path / "report", run)
    md = paths["markdown"].read_text()
    doc = json.loads(paths["json"].read_text())
    rows = doc["targets"]
    assert _status(rows, "frozen LLM text-QA")["status"] == PASS and "97.0 %" in md
    assert _status(rows, "frozen LLM fingerprint")["status"] == PASS
    asr = _status(rows, "ASR WER")
    assert asr["status"] == NOT_RUN and asr["note"] == "stage 1 is not a toy step yet" and asr["measured"] == "-"
    assert _status(rows, "speech-in -> text-out")["status"] == NOT_RUN
    runtime = _status(rows, "total run time")
    assert runtime["status"] == NOT_RUN and "2.8 min so far" in runtime["measured"]
    assert "Not run: no talking yet." in md and "| One plus one is two. | Two. |" in md
    assert "Clips synthesized by this step: user 3, assistant 0" in md
    assert "![losses](plots/losses.png)" in md and (tmp_path / "report" / "plots" / "losses.png").stat().st_size > 1000
    assert "latency" not in doc["plots"]


def test_report_fails_missed_targets_and_names_failed_steps(tmp_path):
    outcomes = _llm_result(0.9)
    outcomes[2] = Outcome("text_eval", "failed", error="out of memory")
    run = RunInfo(tmp_path, quick=False, outcomes=outcomes,
                  checks={"llm_fingerprint_now": "cd" * 32}, budget_s=1800)
    rows = evaluate_targets(run)
    assert _status(rows, "frozen LLM fingerprint")["status"] == FAIL
    text = _status(rows, "frozen LLM text-QA")
    assert text["status"] == NOT_RUN and text["note"] == "step text_eval failed: out of memory"
    assert _status(rows, "total run time")["status"] == PASS  # nothing pending: 165 s <= 30 min
    outcomes[2] = _llm_result(0.9)[2]
    assert _status(evaluate_targets(run), "frozen LLM text-QA")["status"] == FAIL  # 90 % < 95 %
    run.quick = True
    assert _status(evaluate_targets(run), "frozen LLM text-QA")["status"] == PASS  # quick: >= 25 %
    run.outcomes, run.checks = [Outcome("llm", "failed", error="diverged")], {}
    assert _status(evaluate_targets(run), "frozen LLM fingerprint")["note"] == "step llm failed: diverged"


def test_report_draws_the_latency_table(tmp_path):
    talk = {"n": 4, "answered": 3, "dropped": 1, "undecided": 0, "text_accuracy": 0.5, "speech_accuracy": 0.25,
            "speech_wer": 0.6, "reference_accuracy": 1.0, "endpoint_delay_ms": 320.0, "endpoint_delay_p90_ms": 480.0,
            "answered_before_speech_end": 0, "rtf": 0.5, "compiles_after_warm_up": 0, "wav_dir": "talk/wavs",
            "latency_ms": {"encoder": {"avg": 40.0, "p50": 38.0, "p90": 55.0},
                           "LLM prefill": {"avg": 120.0, "p50": 110.0, "p90": 150.0}}}
    outcomes = [Outcome("talk", "done", result=talk)]
    paths = write_report(tmp_path, RunInfo(tmp_path, quick=True, outcomes=outcomes, budget_s=600))
    md = paths["markdown"].read_text()
    assert "| LLM prefill | 120 | 110 | 150 |" in md
    assert "Endpoint delay (after the user stops speaking): 320 ms average, 480 ms p90" in md
    assert "Speech in -> speech out (pocketsphinx on the spoken answers): **25.0 %**" in md
    assert "answered 3, dropped 1, undecided 0" in md
    assert (tmp_path / "plots" / "latency.png").stat().st_size > 1000


def test_report_speech_in_answer_wer_target_and_train_questions(tmp_path):
    ev = {"accuracy": 0.0, "n": 14, "answer_wer": 0.38, "by_category": {"plus": 0.0}, "compiles_after_warm_up": 0,
          "errors": [{"question": "What is six plus four?", "expected": "Six plus four is ten.",
                      "answer": "Six plus four is eight."}],
          "train": {"accuracy": 0.5, "n": 14, "answer_wer": 0.2, "by_category": {"plus": 0.5}, "errors": []}}
    run = RunInfo(tmp_path, quick=True, outcomes=[Outcome("speech_in_eval", "done", result=ev)], budget_s=600)
    rows = evaluate_targets(run)
    assert _status(rows, "speech-in -> text-out accuracy")["status"] == NOT_RUN  # needs text_eval's accuracy
    assert _status(rows, "speech-in -> text-out answer WER")["status"] == PASS  # quick: < 60 %
    run.quick = False
    assert _status(evaluate_targets(run), "speech-in -> text-out answer WER")["status"] == FAIL  # full: <= 10 %
    ev["answer_wer"] = 0.8
    run.quick = True
    assert _status(evaluate_targets(run), "speech-in -> text-out answer WER")["status"] == FAIL
    md = write_report(tmp_path, run)["markdown"].read_text()
    assert "**0.0 %** of 14 spoken test questions (answer WER 80.0 %)" in md
    assert "The same on 14 train questions" in md and "**50.0 %** (answer WER 20.0 %)" in md
    assert "| What is six plus four? | Six plus four is ten. | Six plus four is eight. |" in md


def test_report_speech_out_shows_categories_and_misses(tmp_path):
    ev = {"accuracy": 0.5, "wer": 0.3, "reference_accuracy": 0.9, "reference_wer": 0.05, "n": 2,
          "by_category": {"capital": 0.0, "plus": 1.0}, "wav_dir": "speech_out_eval/wavs",
          "examples": [{"answer": "One plus one is two.", "heard": "one plus one is two",
                        "reference_heard": "one plus one is two"}],
          "errors": [{"answer": "The capital of Peru is Lima.", "heard": "the capital of pull is white",
                      "reference_heard": "the capital of peru is lima"}]}
    run = RunInfo(tmp_path, quick=False, outcomes=[Outcome("speech_out_eval", "done", result=ev)], budget_s=1800)
    md = write_report(tmp_path, run)["markdown"].read_text()
    assert "| spoken by the toy model | 30.0 % | 50.0 % |" in md
    assert "| capital | 0.0 % |" in md and "| plus | 100.0 % |" in md
    assert "| The capital of Peru is Lima. | the capital of pull is white | the capital of peru is lima |" in md
    assert md.index("Not recognized") < md.index("The answers written as wavs") < md.index("Listen: `speech_out_eval")


def test_report_state_head_says_where_the_final_chunk_ends(tmp_path):
    ev = {"final_chunk_accuracy": 0.95, "n": 20, "addressed_accuracy": 1.0, "aside_accuracy": 0.9,
          "turns_deciding_early": 2, "turns_deciding_before_speech_end": 1, "errors": [],
          "final_chunk_after_speech_ms": {"min": 160.0, "avg": 231.5, "max": 320.0}}
    run = RunInfo(tmp_path, quick=False, outcomes=[Outcome("state_eval", "done", result=ev)], budget_s=1800)
    assert _status(evaluate_targets(run), "state head correct on the final chunk")["status"] == PASS
    md = write_report(tmp_path, run)["markdown"].read_text()
    assert ("State head on the final chunk (it ends 160-320 ms after the user's speech, 232 ms on average) of every "
            "test dialogue turn: **95.0 %** of 20 turns (addressed 100.0 %, aside 90.0 %); turns where it left "
            "'listen' before the final chunk: 2 (on a chunk that ended before the user's speech did: 1).") in md
    del ev["final_chunk_after_speech_ms"], ev["turns_deciding_before_speech_end"]  # results from before them
    md = write_report(tmp_path, run)["markdown"].read_text()
    assert "State head on the final chunk of every test dialogue turn: **95.0 %**" in md
    assert "'listen' before the final chunk: 2." in md
