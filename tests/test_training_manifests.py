"""Bad manifest lines of the speech stages: a missing audio file, a corrupt wav and an empty
transcript are reported with their manifest line and reason and skipped (``manifest_policy=skip``,
the default) or stop the run before anything trains (``strict``); never trained on."""

import json

import pytest

from fo_jax.cli.main import main
from fo_jax.config import load_config
from fo_jax.data.manifest import ManifestError, write_manifest
from fo_jax.training.stages import build_stage
from tests.speech_stage_utils import TRANSCRIPTS, speech_world

GOOD = [{"audio": f"{i}.wav", "text": t} for i, t in enumerate(TRANSCRIPTS)]
# Each problem: its manifest line and the reason reported for it (line 9: after the 8 good ones).
PROBLEMS = {
    "missing": ({"audio": "missing.wav", "text": "never used"}, "audio file not found: {root}/missing.wav"),
    "corrupt": ({"audio": "corrupt.wav", "text": "never used"}, "cannot read audio file {root}/corrupt.wav"),
    "empty transcript": ({"audio": "0.wav", "text": ""}, "missing or empty field(s) ['text']"),
}
STAGES = {"speech_in_ctc": "configs/speech_in_stage1.py:tiny", "speech_in_llm": "configs/speech_in_stage2.py:tiny"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("manifests")
    speech_world(root)
    (root / "corrupt.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt garbage")
    for name, (line, _) in PROBLEMS.items():
        write_manifest(root / f"{name.replace(' ', '_')}.jsonl", GOOD + [line])
    return root


def _config(world, stage, problem, *extra):
    manifest = world / f"{problem.replace(' ', '_')}.jsonl"
    tokenizer = [f"stage.tokenizer={world / 'tok'}"] if stage == "speech_in_llm" else []
    return load_config(STAGES[stage], [f"stage.manifest={manifest}", *tokenizer, *extra])


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("problem", PROBLEMS)
def test_bad_line_is_reported_and_skipped_or_rejected(world, stage, problem):
    reason = PROBLEMS[problem][1].format(root=world)
    built = build_stage(_config(world, stage, problem))
    assert len(built.rejected) == 1 and built.rejected[0].startswith(f"{world / problem.replace(' ', '_')}.jsonl:9: "
                                                                      + reason), built.rejected
    assert built.records == GOOD  # batches are planned from these: the bad line is in none
    with pytest.raises(ManifestError, match=r"\.jsonl:9: " + reason.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        build_stage(_config(world, stage, problem, "stage.manifest_policy=strict"))


def test_corrupt_turn_of_a_dialogue_is_reported_and_skipped(world):
    turns = [json.loads(line) for line in (world / "dialogues.jsonl").read_text().splitlines()[:4]]
    turns.insert(1, {"turns": [{"audio": "corrupt.wav", "text": "hi", "addressed": False}]})
    write_manifest(world / "corrupt_dialogues.jsonl", turns)
    cfg = load_config("configs/speech_in_stage3.py:tiny", [f"stage.manifest={world / 'corrupt_dialogues.jsonl'}",
                                                           f"stage.tokenizer={world / 'tok'}"])
    built = build_stage(cfg)
    assert len(built.rejected) == 1 and built.rejected[0].startswith(f"{world / 'corrupt_dialogues.jsonl'}:2: turn 0: cannot read audio file")
    assert all(t["turns"][0]["audio"] != "corrupt.wav" for t in built.records)


def test_strict_policy_is_a_one_line_error_of_fo_jax_train(world, tmp_path, capsys):
    args = ["train", "--config", STAGES["speech_in_ctc"], "--workdir", str(tmp_path),
            "--set", f"stage.manifest={world / 'corrupt.jsonl'}", "--set", "stage.manifest_policy=strict"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {world / 'corrupt.jsonl'}:9: cannot read audio file") and err.count("\n") == 1
    assert not (tmp_path / "checkpoints").exists()
