"""Speech-in stage 2 (encoder + adapter + task embeddings into the frozen LLM): the chat layout,
start from a stage-1 encoder, frozen weights, gradients through the LLM, hand-over to stage 3."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from fo_jax.cli.main import main
from fo_jax.config import load_config
from fo_jax.conversion.hf_qwen2 import save_hf_qwen2
from fo_jax.errors import LoadError
from fo_jax.models.audio_llm import (SOURCE_AUDIO, SOURCE_TASK, TASK_AUDIO_BOS, TASK_AUDIO_EOS, encode_speech,
                                     stream_speech)
from fo_jax.models.qwen2 import init_params as init_qwen2, unstack_layers
from fo_jax.text.tokenizer import load_tokenizer
from fo_jax.toy.world import TRANSCRIBE_PREFIX
from fo_jax.training import trainer
from fo_jax.training.checkpoint import load_trained
from fo_jax.training.freeze import fingerprint, flatten
from fo_jax.training.speech_common import cmvn_params
from fo_jax.training.stages import build_stage
from tests.speech_stage_utils import (TRANSCRIPTS, assert_moments_only_for, fake_speech_run, speech_world,
                                      stage_gradients, train_run)

CONFIG = "configs/speech_in_stage2.py:tiny"
# One block each (compile time); the run's optimizer settings, which compile-only reuses.
SMALL = ["model.llm.num_layers=1", "model.encoder.num_layers=1"]
RUN = ["stage.steps=10", "stage.log_every=1", "stage.spec_augment={}", "stage.buckets=(256,)",
       "optimizer.schedule=constant", "optimizer.warmup_steps=1", "optimizer.lr=0.003"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("asr")
    speech_world(root)
    stage = build_stage(load_config(CONFIG, [f"stage.tokenizer={root / 'tok'}", *SMALL]))
    fake_speech_run(root / "stage1", stage.model, parts=("encoder", "ctc"))
    return root


def _config(world, *extra):
    return load_config(CONFIG, [f"stage.tokenizer={world / 'tok'}", f"stage.manifest={world / 'asr.jsonl'}",
                                f"stage.encoder_from={world / 'stage1'}", *SMALL, *extra])


@pytest.fixture(scope="module")
def run(world, tmp_path_factory):
    # 8 usable utterances = one batch of 8; no SpecAugment: every step sees the same batch.
    cfg = _config(world, *RUN)
    workdir = tmp_path_factory.mktemp("run")
    return (cfg, *train_run(cfg, workdir), workdir / "run")


def test_chat_layout_of_an_utterance(world):
    stage = build_stage(_config(world))
    tok, t = load_tokenizer(world / "tok"), stage.template
    row = stage.layout(6, [30, 31, 32]).arrays(stage.seq_len(256), stage.max_label)
    head = t.system_ids + t.listen_ids
    # <|im_start|>system ... user\nTranscribe: [audio] 6 frames [/audio] <|im_end|>\n<|im_start|>assistant\n
    assert tok.decode(head).endswith("<|im_start|>user\n" + TRANSCRIBE_PREFIX)
    assert tok.decode(head).startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    n = len(head)
    assert list(row["tokens"][:n]) == list(head)
    assert list(row["source"][n:n + 8]) == [SOURCE_TASK] + [SOURCE_AUDIO] * 6 + [SOURCE_TASK]
    assert list(row["index"][n:n + 8]) == [TASK_AUDIO_BOS, 0, 1, 2, 3, 4, 5, TASK_AUDIO_EOS]
    speak = slice(n + 8, n + 8 + len(t.speak_ids))
    assert tok.decode(row["tokens"][speak]) == "<|im_end|>\n<|im_start|>assistant\n"
    # Targets: the transcript then <|im_end|>, each predicted by the position before it.
    assert list(row["target_ids"][:4]) == [30, 31, 32, t.end_id] and row["target_w"].sum() == 4
    assert list(row["target_pos"][:4]) == list(range(speak.stop - 1, speak.stop + 3))
    assert int(row["lengths"]) == speak.stop + 3 and list(row["positions"][:5]) == list(range(5))


def test_encoder_starts_from_stage1_and_frozen_stays_bitwise(run, world):
    cfg, before, summary, _, _ = run
    trained1, meta1 = load_trained(world / "stage1")
    jax.tree.map(np.testing.assert_array_equal, before["trainable"]["encoder"], trained1["encoder"])
    assert set(summary["trainable"]) == {"encoder", "adapter", "task_embeddings"}
    assert not [p for p in flatten(summary["trainable"]) if "cmvn" in p]
    frozen = summary["frozen"]
    assert set(frozen) == {"encoder", "llm", "prompt_embeddings", "state_head"}
    np.testing.assert_array_equal(frozen["encoder"]["cmvn_istd"], cmvn_params(meta1["cmvn_stats"])["cmvn_istd"])
    assert summary["frozen_fingerprint"] == before["frozen_fingerprint"] == fingerprint(frozen)
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(summary["trainable"]),
                                                         jax.tree.leaves(before["trainable"]))]
    assert all(changed)


def test_loss_decreases_on_a_fixed_batch(run):
    losses = run[3]
    assert len({l["targets"] for l in losses}) == 1 and losses[0]["targets"] == 8 + sum(
        len(load_tokenizer(run[0].stage.tokenizer).encode(t, add_special_tokens=False)) for t in TRANSCRIPTS)
    assert min(l["loss"] for l in losses[-3:]) < losses[0]["loss"] - 0.05


def test_bad_lines_are_reported_and_skipped(run):
    rejected = run[2]["rejected"]
    assert any(r.endswith("asr.jsonl:9: audio file not found: " + str(run[0].stage.manifest).replace(
        "asr.jsonl", "missing.wav")) for r in rejected), rejected
    assert any("asr.jsonl:10: missing or empty field(s) ['text']" in r for r in rejected)
    assert len(rejected) == 2


def test_gradients_reach_encoder_adapter_and_task_embeddings_through_the_frozen_llm(run):
    grads, trainable, frozen_grads, open_llm_grads = stage_gradients(run[0])
    assert {p.split("/")[0] for p in grads} == {"encoder", "adapter", "task_embeddings"}
    zero = [p for p, g in grads.items() if p != "task_embeddings/embedding" and not np.any(g)]
    assert not zero, zero  # every encoder and adapter leaf: the LLM's CE reaches it through the LLM
    rows = np.abs(np.asarray(grads["task_embeddings/embedding"])).sum(-1)
    assert rows[TASK_AUDIO_BOS] > 0 and rows[TASK_AUDIO_EOS] > 0
    assert not np.delete(rows, [TASK_AUDIO_BOS, TASK_AUDIO_EOS]).any()  # unused task rows: nothing
    # Never the LLM: the step's objective gives it (and every other frozen leaf) exactly zero,
    # where the same loss without the freeze would move every LLM weight.
    assert any(p.startswith("llm/") for p in frozen_grads)
    assert not [p for p, g in frozen_grads.items() if np.any(g)]
    assert open_llm_grads and all(np.any(g) for g in open_llm_grads.values())
    # The run's optimizer: two Adam moments per trainable leaf, none for a frozen one.
    assert_moments_only_for(run[2]["opt_state"], run[2]["trainable"])


def test_stage3_takes_this_runs_speech_path(run, world):
    cfg3 = load_config("configs/speech_in_stage3.py:tiny", [
        f"stage.tokenizer={world / 'tok'}", f"stage.manifest={world / 'dialogues.jsonl'}", f"stage.speech_from={run[4]}",
        *SMALL])
    params = build_stage(cfg3).load_params(jax.random.key(5))
    summary = run[2]
    for part in ("encoder", "adapter", "task_embeddings"):
        loaded = flatten(params[part])
        for path, value in flatten(summary["trainable"][part]).items():
            np.testing.assert_array_equal(loaded[path], value)
    np.testing.assert_array_equal(params["encoder"]["cmvn_mean"], summary["frozen"]["encoder"]["cmvn_mean"])


def test_training_speech_is_what_the_stream_gives(run):
    """Stage 2's whole-utterance forward on its stream-framed batch (zero overlap frames, whole
    chunks) equals the streaming chunk loop inference runs (turns here are < 17 chunks)."""
    stage = build_stage(run[0])
    params = stage.load_params(jax.random.key(0))
    batch = next(iter(stage.dataset(0)))
    whole, valid = jax.jit(lambda p, f, n: encode_speech(p, stage.model, f, n))(params, batch["feats"],
                                                                                  batch["feat_lengths"])
    streamed = jax.jit(lambda p, f: stream_speech(p, stage.model, f))(params, batch["feats"])
    n = np.asarray(valid).sum(1)
    assert list(n) == list((batch["feat_lengths"] - 3) // 16 * 2)
    for row, count in enumerate(n):
        np.testing.assert_allclose(whole[row, :count], streamed[row, :count], atol=1e-4)


def test_example_batch_matches_real_batches(run):
    stage = build_stage(run[0])
    real = next(iter(stage.dataset(0)))
    spec = stage.example_batch(real["feats"].shape[1] - 3)
    assert {k: (v.shape, v.dtype) for k, v in real.items()} == {k: (v.shape, v.dtype) for k, v in spec.items()}


@pytest.mark.parametrize("scan", [False, True])
def test_llm_from_a_hf_directory(world, tmp_path, scan):
    tiny = build_stage(load_config(CONFIG, [f"stage.tokenizer={world / 'tok'}", *SMALL])).model.llm
    llm = jax.device_get(jax.jit(lambda r: nn.unbox(init_qwen2(tiny, r)))(jax.random.key(3)))
    save_hf_qwen2(tmp_path / "llm", tiny, llm)
    load_tokenizer(world / "tok").save_pretrained(tmp_path / "llm")
    cfg = _config(world, f"stage.llm_path={tmp_path / 'llm'}", "stage.tokenizer=''", f"model.llm.scan_layers={scan}")
    stage = build_stage(cfg)
    assert stage.model.llm.vocab_size == tiny.vocab_size and stage.model.llm.scan_layers == scan
    params = stage.load_params(jax.random.key(0))
    # The training layout: layers stacked for the scan when the config asks for it.
    jax.tree.map(np.testing.assert_array_equal, unstack_layers(params["llm"]) if scan else params["llm"], llm)
    shapes = jax.eval_shape(stage.init_boxed, jax.random.key(0))["llm"]
    assert jax.tree.map(np.shape, nn.unbox(shapes)) == jax.tree.map(np.shape, params["llm"])
    with pytest.raises(LoadError, match="not a directory"):
        build_stage(_config(world, f"stage.llm_path={tmp_path / 'nope'}"))


def test_compile_only_needs_no_data_or_weights():
    report = trainer.compile_only(load_config(CONFIG, SMALL + RUN))  # no manifest, tokenizer or LLM
    sizes = report["per_device_bytes"]
    assert report["devices"] == 1 and sizes["temp"] > 0
    assert 0 <= sizes["optimizer"] - 2 * sizes["trainable"] <= 64  # Adam: 2 moments per trainable leaf


def test_one_line_errors(world, tmp_path, capsys):
    base = ["train", "--config", CONFIG, "--workdir", str(tmp_path)]
    assert main(base + ["--set", f"stage.tokenizer={world / 'tok'}"]) == 2
    assert capsys.readouterr().err.strip() == "error: stage.manifest is required (--set stage.manifest=PATH)"
    assert main(base + ["--set", f"stage.manifest={world / 'asr.jsonl'}"]) == 2
    assert "stage.llm_path (a HF Qwen2 directory with its tokenizer) is required" in capsys.readouterr().err
    assert main(base + ["--set", f"stage.tokenizer={world / 'tok'}", "--set", f"stage.manifest={world / 'asr.jsonl'}",
                        "--set", f"stage.encoder_from={tmp_path / 'nothing'}"]) == 2
    assert "no training run here" in capsys.readouterr().err
    assert main(base + ["--set", "stage.buckets=(250,)"]) == 2
    assert "whole 16-frame chunks" in capsys.readouterr().err
