"""End to end: ``fo-jax toy --quick`` runs the toy world's steps, writes the report, and resumes."""

from __future__ import annotations

import json
import time

import pytest

from fo_jax.cli.main import main

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
    steps = {s["name"]: s for s in doc["steps"]}
    assert all(s["status"] == "done" for s in steps.values()), steps
    fast = steps["codec_fast"]["result"]["intelligibility"]
    assert fast["reference"]["wer"] < 0.25 and fast["roundtrip"]["wer"] < 0.5, fast
    assert steps["ticodec"]["result"]["steps"] == 100 and steps["ticodec"]["result"]["intelligibility"]["n"] == 14
    assert (tmp_path / "llm" / "hf" / "model.safetensors").exists()
    assert (tmp_path / "codec_fast" / "wavs" / "00_roundtrip.wav").exists()
    assert (tmp_path / "ticodec" / "wavs" / "00_roundtrip.wav").exists()
    assert (tmp_path / "report" / "plots" / "losses.png").exists()
    md = (tmp_path / "report" / "report.md").read_text()
    assert "NOT RUN" in md and "## Text LLM (frozen)" in md

    capsys.readouterr()
    started = time.perf_counter()
    assert main(["toy", "--quick", "--workdir", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.count("done earlier, skipped") == 5
    assert time.perf_counter() - started < first / 3
