"""``fo-jax smoke`` (the main job before the toy world) in a short form: trains, saves, reloads, generates."""

import json

from fo_jax.cli.main import main


def test_smoke_job_trains_and_generates(tmp_path, capsys):
    assert main(["smoke", "--workdir", str(tmp_path), "--steps", "200", "--batch_size", "32"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["final_loss"] < report["first_loss"] / 10
    assert report["train_accuracy"] > 0.0  # exact answers to questions it trained on
    assert (tmp_path / "llm" / "config.json").exists() and (tmp_path / "llm" / "tokenizer.json").exists()
    assert "held-out" in capsys.readouterr().out

    # The saved model answers through `fo-jax generate`, greedily and deterministically.
    args = ["generate", "--llm_path", str(tmp_path / "llm"), "--chat", "--top_k", "1", "--json",
            "--max_new_tokens", "12", "--prompt", "What is two plus five?"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == first
    assert first["text"].startswith("2 plus 5 is")
