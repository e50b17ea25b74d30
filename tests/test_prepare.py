"""``fo-jax prepare``: folders of audio + transcripts become checked manifests."""

import numpy as np

from fo_jax.audio.io import write_wav
from fo_jax.cli.main import main
from fo_jax.data.manifest import read_manifest
from fo_jax.data.prepare import check_audio


def test_prepare_folder_reports_and_skips_bad_files(tmp_path, capsys):
    audio = tmp_path / "audio"
    (audio / "spk1").mkdir(parents=True)
    tone = 0.1 * np.sin(np.linspace(0, 2000, 16000)).astype(np.float32)
    write_wav(audio / "spk1" / "a.wav", tone, 16000)
    (audio / "spk1" / "a.txt").write_text("  hello   world \n")
    write_wav(audio / "spk1" / "u1.wav", tone[:8000], 8000)
    (audio / "spk1" / "spk1.trans.txt").write_text("u1 from a trans file\n")
    write_wav(audio / "spk1" / "notext.wav", tone, 16000)
    write_wav(audio / "spk1" / "empty_text.wav", tone, 16000)
    (audio / "spk1" / "empty_text.txt").write_text("\n")
    (audio / "spk1" / "corrupt.wav").write_bytes(b"RIFF\x00\x00garbage")
    (audio / "spk1" / "corrupt.txt").write_text("never trained on")
    out = tmp_path / "data" / "train.jsonl"
    assert main(["prepare", "--audio_dir", str(audio), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2 utterances" in printed and "3 skipped" in printed
    assert "notext.wav: no transcript" in printed and "empty_text.wav: empty transcript" in printed
    assert "corrupt.wav" in printed
    records = read_manifest(out, required=["audio", "text"], validate=check_audio)
    assert [(r["text"], r["duration"]) for r in records] == [("hello world", 1.0), ("from a trans file", 1.0)]
    assert records[0]["audio"] == "../audio/spk1/a.wav"


def test_manifest_audio_validator(tmp_path):
    write_wav(tmp_path / "ok.wav", np.zeros(160, np.float32), 16000)
    (tmp_path / "m.jsonl").write_text('{"audio": "ok.wav", "text": "a"}\n{"audio": "gone.wav", "text": "b"}\n')
    report = []
    records = read_manifest(tmp_path / "m.jsonl", required=["audio", "text"], validate=check_audio, report=report)
    assert len(records) == 1 and len(report) == 1 and "m.jsonl:2:" in report[0] and "gone.wav" in report[0]
