"""``fo-jax infer`` end to end on tiny random bundles: determinism, the report, input handling."""

import json
import re
import struct

import numpy as np
import pytest
import soundfile as sf

from fo_jax.cli.main import main
from tests import bundle_utils as bu

FAST = ["--top_k", "1", "--decoder_top_k", "1", "--max_answer_tokens", "12", "--max_segment_tokens", "8",
        "--max_speech_tokens", "40", "--quiet"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return bu.write_native_bundle(tmp_path_factory.mktemp("cli") / "bundle")


def _question(path, seconds=2.0, rate=16000, channels=1, seed=0, **kw):
    rng = np.random.default_rng(seed)
    audio = 0.1 * rng.standard_normal((int(seconds * rate), channels))
    sf.write(path, audio if channels > 1 else audio[:, 0], rate, **kw)
    return path


def _infer(capsys, model, question, out, *extra):
    code = main(["infer", "--model_path", str(model), "--input_wav", str(question), "--output_wav", str(out),
                 *FAST, *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_greedy_infer_is_deterministic_and_the_report_has_every_field(model, tmp_path, capsys):
    q = _question(tmp_path / "q.wav")
    reports = []
    for i in range(2):
        code, out, err = _infer(capsys, model, q, tmp_path / f"a{i}.wav", "--report", str(tmp_path / f"r{i}.json"))
        assert code == 0, err
        reports.append(json.loads((tmp_path / f"r{i}.json").read_text()))
        assert out.strip() == reports[-1]["text"].strip()
    a, b = reports
    for key in ("text", "text_token_ids", "speech_token_ids", "state_probs"):
        assert a[key] == b[key], key
    assert (tmp_path / "a0.wav").read_bytes() == (tmp_path / "a1.wav").read_bytes()

    assert a["text_token_ids"] and a["speech_token_ids"] and a["mode"] == "forced"
    assert a["input"]["chunks"] == 13 and len(a["state_probs"]) == 13  # 2 s -> 12.5 chunks, padded
    np.testing.assert_allclose(np.sum(a["state_probs"], axis=1), 1.0, atol=1e-5)
    lat = a["latency_ms"]
    stages = [lat[k] for k in ("llm_interrupted_to_first_text_chunk", "first_text_chunk_to_decoder_prefill",
                               "decoder_prefill_to_first_speech_chunk", "first_speech_chunk_to_first_pcm")]
    at = [lat[f"at_{e}"] for e in ("first_text_chunk", "decoder_prefill", "first_speech_chunk", "first_pcm")]
    assert all(s > 0 for s in stages) and at == sorted(at) and lat["total"] == pytest.approx(sum(stages))
    assert a["rtf"]["listen"] > 0 and a["rtf"]["speak"] > 0
    assert a["compiles"]["after_warm_up"] == 0 and a["compiles"]["after_warm_up_programs"] == []
    audio, rate = sf.read(tmp_path / "a0.wav")
    assert rate == 24000 and len(audio) / rate == pytest.approx(a["output"]["seconds"])
    turn = a["turns"][0]
    assert turn["speech_token_ids"] == a["speech_token_ids"] and not turn["interrupted"]
    assert a["settings"]["decoder_top_k"] == 1 and a["settings"]["top_k"] == 1


@pytest.mark.parametrize("rate,channels,fmt,note", [
    (8000, 1, "WAV", "resampling 8000 Hz to 16 kHz"),
    (44100, 2, "WAV", "resampling 44100 Hz to 16 kHz; averaging 2 channels"),
    (16000, 2, "FLAC", "averaging 2 channels"),
])
def test_any_rate_and_channel_count_is_converted(model, tmp_path, capsys, rate, channels, fmt, note):
    q = _question(tmp_path / f"q.{fmt.lower()}", 1.0, rate, channels, format=fmt)
    code = main(["infer", "--model_path", str(model), "--input_wav", str(q), "--output_wav", str(tmp_path / "a.wav"),
                 "--report", str(tmp_path / "r.json"), *FAST[:-1], "--max_answer_tokens", "3"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert note in err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["input"]["sample_rate"] == rate and report["input"]["channels"] == channels
    assert report["input"]["chunks"] == 7  # 1 s at 16 kHz = 6.25 chunks


def _sparse_wav(path, seconds, rate=16000):
    """A 16-bit mono WAV header for ``seconds`` of audio over a sparse file (no disk used)."""
    data = int(seconds * rate) * 2
    with open(path, "wb") as f:
        f.write(b"RIFF" + struct.pack("<I", 36 + data) + b"WAVEfmt " +
                struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16) + b"data" + struct.pack("<I", data))
        f.truncate(44 + data)
    return path


@pytest.mark.parametrize("case,match", [
    ("missing", "audio file not found"),
    ("corrupt", "cannot read audio file"),
    ("empty", "has no samples"),
    ("text", "cannot read audio file"),
    ("3h", r"the input is 10800.0 s long; forced mode holds at most 15\d\.\d s of speech .* use --mode duplex"),
    ("top_p", "invalid sampling settings"),
    ("speech_tokens", r"invalid engine options \(token counts and top-k must be >= 1\)"),
    ("out_dir", "--output_wav: directory"),
    ("model", "not a directory"),
])
def test_bad_input_is_a_one_line_error(model, tmp_path, capsys, case, match):
    q, out, extra = tmp_path / "q.wav", tmp_path / "a.wav", []
    if case == "corrupt":
        q.write_bytes(b"RIFF" + np.random.default_rng(0).bytes(3000))
    elif case == "empty":
        sf.write(q, np.zeros(0), 16000)
    elif case == "text":
        q = tmp_path / "q.txt"
        q.write_text("not audio\n" * 100)
    elif case == "3h":
        _sparse_wav(q, 3 * 3600)
    elif case in ("top_p", "speech_tokens", "out_dir", "model"):
        _question(q, 0.5)
        extra = {"top_p": ["--top_p", "0"], "speech_tokens": ["--max_speech_tokens", "0"]}.get(case, [])
        out = tmp_path / "missing" / "a.wav" if case == "out_dir" else out
        model = tmp_path / "no_model" if case == "model" else model
    code, _, err = _infer(capsys, model, q, out, *extra)
    assert code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert re.search(match, last), last
    assert not out.exists()


@pytest.mark.torch
def test_official_bundle_gives_the_same_answer_and_caches_its_conversion(model, tmp_path, capsys):
    pytest.importorskip("torch")
    official, llm = bu.write_official_bundle(tmp_path / "release")
    q = _question(tmp_path / "q.wav")
    code, out, err = _infer(capsys, model, q, tmp_path / "native.wav")
    assert code == 0, err
    runs = []
    for i in range(2):
        code = main(["infer", "--model_path", str(official), "--llm_path", str(llm), "--input_wav", str(q),
                     "--output_wav", str(tmp_path / f"o{i}.wav"), "--cache_dir", str(tmp_path / "cache"), *FAST[:-1]])
        runs.append(capsys.readouterr())
        assert code == 0, runs[-1].err
    assert "loaded the official bundle" in runs[0].err and "(converted and cached)" in runs[0].err
    assert "(converted and cached)" not in runs[1].err
    assert runs[0].out == runs[1].out == out
    native, _ = sf.read(tmp_path / "native.wav")
    for i in range(2):
        np.testing.assert_allclose(sf.read(tmp_path / f"o{i}.wav")[0], native, atol=2 / 32768)
