"""``fo-jax train`` on the text_lm stage: exact resume, manifest problems reported, compile-only."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from fo_jax.cli.main import main
from fo_jax.config import load_config
from fo_jax.data.manifest import ManifestError, read_manifest, write_manifest
from fo_jax.errors import ConfigError
from fo_jax.data.text import encode_record
from fo_jax.text.tokenizer import chatml, load_tokenizer, train_bpe_tokenizer
from fo_jax.training import trainer
from fo_jax.training.freeze import fingerprint

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    records = [{"messages": [{"role": "user", "content": f"what is {a} plus {b}?"},
                             {"role": "assistant", "content": f"{a + b}"}]} for a in range(6) for b in range(6)]
    records += [{"text": "plain text counts too."}]
    write_manifest(root / "train.jsonl", records)
    with open(root / "train.jsonl", "a") as f:
        f.write('{"messages": []}\n{not json\n{"text": ""}\n')
    tok = train_bpe_tokenizer([chatml(r["messages"]) for r in records[:-1]], vocab_size=300)
    tok.save_pretrained(root / "tok")
    return root


def _overrides(corpus, steps):
    return [f"stage.manifest={corpus / 'train.jsonl'}", f"stage.tokenizer={corpus / 'tok'}",
            f"stage.steps={steps}", "stage.batch_size=8", "stage.seq_len=32", "stage.log_every=1",
            "stage.save_every=3", "model.llm.num_layers=1"]


def _losses(workdir):
    return [json.loads(l)["loss"] for l in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def test_resume_is_exact_and_data_order_identical(tmp_path, corpus):
    cfg = load_config("configs/text_llm.py:tiny", _overrides(corpus, 6))
    straight = trainer.train(cfg, tmp_path / "a", progress=False)
    first = trainer.train(cfg, tmp_path / "b", max_steps=3, progress=False)
    assert first["step"] == 3
    resumed = trainer.train(cfg, tmp_path / "b", progress=False)  # a new run picks up at step 3
    assert resumed["step"] == straight["step"] == 6
    jax.tree.map(np.testing.assert_array_equal, resumed["trainable"], straight["trainable"])
    assert _losses(tmp_path / "b") == _losses(tmp_path / "a")  # same batches in the same order
    assert len(straight["rejected"]) == 3
    assert any(r.endswith("train.jsonl:38: empty message") for r in straight["rejected"])
    assert any("train.jsonl:39: not valid JSON" in r for r in straight["rejected"])


def test_frozen_weights_are_bitwise_unchanged(tmp_path, corpus):
    cfg = load_config("configs/text_llm.py:tiny", _overrides(corpus, 4) + ['stage.trainable=["^layers_0/mlp/"]'])
    before = trainer.train(cfg, tmp_path, max_steps=0, progress=False)["frozen_fingerprint"]
    summary = trainer.train(cfg, tmp_path, progress=False)
    assert fingerprint(summary["frozen"]) == summary["frozen_fingerprint"] == before  # after the steps too
    assert list(summary["trainable"]) == ["layers_0"] and list(summary["trainable"]["layers_0"]) == ["mlp"]


def test_strict_manifest_policy_rejects(tmp_path, corpus):
    with pytest.raises(ManifestError, match=r"train.jsonl:39: not valid JSON"):
        read_manifest(corpus / "train.jsonl", policy="strict")
    with pytest.raises(ManifestError, match=r"train.jsonl:37: missing or empty field\(s\) \['messages'\]"):
        read_manifest(corpus / "train.jsonl", required=["messages"], policy="strict")
    with pytest.raises(ManifestError, match="manifest not found"):
        read_manifest(tmp_path / "nope.jsonl")


def test_cli_train_and_compile_only(tmp_path, corpus, capsys):
    args = ["train", "--config", "configs/text_llm.py:tiny", "--workdir", str(tmp_path)]
    for o in _overrides(corpus, 2):
        args += ["--set", o]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "step 2: done" in out and "skipped" in out
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert main(args[:3] + args[5:] + ["--compile-only"]) == 0
    report = json.loads(capsys.readouterr().out)
    sizes = report["per_device_bytes"]
    # Adam: two moments per trainable leaf plus scalar step counters.
    assert report["devices"] == 1 and 0 <= sizes["optimizer"] - 2 * sizes["trainable"] <= 64
    assert sizes["temp"] > 0


def test_compile_only_on_8_fake_devices_shards_the_state(corpus):
    script = (
        "import json, sys\n"
        "from fo_jax.config import load_config\n"
        "from fo_jax.training import trainer\n"
        f"cfg = load_config('configs/text_llm.py:tiny', {_overrides(corpus, 2)!r} + ['mesh.shape=(2, 2, 2)'])\n"
        "print('REPORT', json.dumps(trainer.compile_only(cfg)))\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT), XLA_FLAGS="--xla_force_host_platform_device_count=8")
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads([l for l in r.stdout.splitlines() if l.startswith("REPORT")][-1][7:])
    assert report["devices"] == 8 and report["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    total_param_bytes = 4 * report["trainable_params"]
    # fsdp x tensor sharding: each device holds well under the whole model.
    assert report["per_device_bytes"]["trainable"] < total_param_bytes / 2
    # Adam's moments are sharded like the params they mirror (XLA alone would replicate them).
    assert report["per_device_bytes"]["optimizer"] <= 2 * report["per_device_bytes"]["trainable"] + 64


def test_load_trained_gives_the_runs_trainable_params(tmp_path, corpus):
    from fo_jax.errors import LoadError
    from fo_jax.training.checkpoint import load_run_meta, load_trained

    cfg = load_config("configs/text_llm.py:tiny", _overrides(corpus, 3))
    summary = trainer.train(cfg, tmp_path / "run", progress=False)
    params, meta = load_trained(tmp_path / "run")
    assert meta["step"] == 3 and meta["frozen_fingerprint"] == summary["frozen_fingerprint"]
    jax.tree.map(np.testing.assert_array_equal, params, jax.device_get(summary["trainable"]))
    assert load_run_meta(tmp_path / "run") == meta  # the same meta, arrays not read
    for load in (load_trained, load_run_meta):
        with pytest.raises(LoadError, match="no training run here"):
            load(tmp_path / "nothing")
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(LoadError, match="no complete checkpoint"):
        load_run_meta(tmp_path / "empty")


def test_embedding_noise_trains_through_the_stage_and_bad_values_are_config_errors(tmp_path, corpus):
    cfg = load_config("configs/text_llm.py:tiny", _overrides(corpus, 4) + ["stage.embed_noise=0.5"])
    noisy = trainer.train(cfg, tmp_path / "noisy", progress=False)
    clean = trainer.train(load_config("configs/text_llm.py:tiny", _overrides(corpus, 4)), tmp_path / "clean",
                          progress=False)
    losses = _losses(tmp_path / "noisy")
    assert noisy["step"] == 4 and all(np.isfinite(losses)) and losses != _losses(tmp_path / "clean")
    assert clean["step"] == 4
    # The full toy world trains its LLM this way; --quick does not (measured on the full run only).
    assert load_config("configs/text_llm.py:toy").stage.embed_noise == 0.5
    assert load_config("configs/text_llm.py:toy_quick").stage.embed_noise == 0.0
    bad = load_config("configs/text_llm.py:tiny", _overrides(corpus, 1) + ["stage.embed_noise=-0.1"])
    with pytest.raises(ConfigError, match=r"stage.embed_noise=-0.1: must be >= 0"):
        trainer.train(bad, tmp_path / "bad", progress=False)


def test_stretched_records_repeat_only_the_user_tokens(corpus):
    tok = load_tokenizer(corpus / "tok")
    question = "what is 2 plus 3?"
    record = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": "5"}]}
    plain = encode_record(record, tok, 64)
    n = int(plain["mask"].nonzero()[0][-1]) + 2  # through the closing "\n"
    content = tok(question, add_special_tokens=False)["input_ids"]
    start = next(i for i in range(n) if plain["tokens"][i:i + len(content)].tolist() == content)
    end = start + len(content)
    for off in ((0.0, 4), (1.0, 1)):  # never drawn / nothing to repeat: the plain record
        got = encode_record(record, tok, 64, off, np.random.default_rng(0))
        np.testing.assert_array_equal(got["tokens"], plain["tokens"])

    stretched = encode_record(record, tok, 64, (1.0, 3), np.random.default_rng(0))
    runs = []  # (token, run length) over the stretched user content
    i = start
    for c in content:
        k = 0
        while stretched["tokens"][i] == c:
            i, k = i + 1, k + 1
        runs.append(k)
    assert all(1 <= k <= 3 for k in runs) and sum(runs) > len(content)  # every token kept, some repeated
    np.testing.assert_array_equal(stretched["tokens"][:start], plain["tokens"][:start])  # system + user header
    grown = i - end
    np.testing.assert_array_equal(stretched["tokens"][i:n + grown], plain["tokens"][end:n])  # the rest, shifted
    np.testing.assert_array_equal(stretched["mask"][i:n + grown], plain["mask"][end:n])  # targets unchanged
    assert not stretched["mask"][:i].any()
    again = encode_record(record, tok, 64, (1.0, 3), np.random.default_rng(0))
    np.testing.assert_array_equal(again["tokens"], stretched["tokens"])  # the rng decides, nothing else
    # A stretched record that would not fit stays plain (truncating it would cut the targets).
    tight = encode_record(record, tok, n, (1.0, 3), np.random.default_rng(0))
    np.testing.assert_array_equal(tight["tokens"], plain["tokens"][:n])


def test_stretching_trains_through_the_stage_resumes_exactly_and_bad_values_are_config_errors(tmp_path, corpus):
    # seq_len 64: room for the stretched records (32 holds the plain ones only, which would stay plain).
    over = _overrides(corpus, 6) + ["stage.seq_len=64", "stage.stretch_prob=1.0", "stage.stretch_max=3"]
    cfg = load_config("configs/text_llm.py:tiny", over)
    straight = trainer.train(cfg, tmp_path / "a", progress=False)
    trainer.train(cfg, tmp_path / "b", max_steps=3, progress=False)
    resumed = trainer.train(cfg, tmp_path / "b", progress=False)
    assert straight["step"] == resumed["step"] == 6
    assert _losses(tmp_path / "b") == _losses(tmp_path / "a")  # the same stretches after the resume
    trainer.train(load_config("configs/text_llm.py:tiny", _overrides(corpus, 6) + ["stage.seq_len=64"]),
                  tmp_path / "plain", progress=False)
    assert all(np.isfinite(_losses(tmp_path / "a"))) and _losses(tmp_path / "a") != _losses(tmp_path / "plain")
    toy, quick = load_config("configs/text_llm.py:toy").stage, load_config("configs/text_llm.py:toy_quick").stage
    assert (toy.stretch_prob, toy.stretch_max) == (0.5, 4) and (quick.stretch_prob, quick.stretch_max) == (0.25, 3)
    for bad in (["stage.stretch_prob=1.5"], ["stage.stretch_max=0"]):
        with pytest.raises(ConfigError, match=r"need 0 <= stretch_prob <= 1 and stretch_max >= 1"):
            trainer.train(load_config("configs/text_llm.py:tiny", _overrides(corpus, 1) + bad), tmp_path / "bad",
                          progress=False)
