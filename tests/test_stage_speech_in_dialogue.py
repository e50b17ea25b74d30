"""Speech-in stage 3 (prompt embeddings + state head on spoken dialogues): the training sequence is
what streaming inference feeds, labels, frozen weights, gradients through the frozen LLM."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fo_jax.cli.main import main
from fo_jax.config import load_config
from fo_jax.errors import ConfigError, LoadError
from fo_jax.inference import session as S
from fo_jax.inference.dialogue import Event
from fo_jax.inference.sampling import SamplingConfig
from fo_jax.models.audio_llm import SOURCE_AUDIO, SOURCE_PROMPT, SOURCE_TEXT, state_probs
from fo_jax.training.checkpoint import load_lineage
from fo_jax.training.freeze import fingerprint, flatten
from fo_jax.training.speech_common import graft, init_speech_llm
from fo_jax.training.stages import build_stage
from fo_jax.training.stages.speech_in_dialogue import Turn, decision_chunk
from tests.speech_stage_utils import (assert_moments_only_for, fake_speech_run, speech_world, stage_gradients,
                                      train_run)

CONFIG = "configs/speech_in_stage3.py:tiny"
SMALL = ["model.llm.num_layers=1", "model.encoder.num_layers=1"]  # one block each: compile time


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("dialogues")
    speech_world(root)
    cfg = load_config(CONFIG, [f"stage.tokenizer={root / 'tok'}", *SMALL])
    fake_speech_run(root / "stage2", build_stage(cfg).model)
    return root


def _config(world, *extra):
    return load_config(CONFIG, [f"stage.tokenizer={world / 'tok'}", f"stage.manifest={world / 'dialogues.jsonl'}",
                                f"stage.speech_from={world / 'stage2'}", *SMALL, *extra])


def _stage(world, *extra):
    return build_stage(load_config(CONFIG, [f"stage.tokenizer={world / 'tok'}", *SMALL, *extra]))


GREEDY = SamplingConfig(top_k=1)


def _listen(p, sess, chunks, stage):
    probs = []
    for c in chunks:
        sess, pr = S.listen(p, sess, jnp.asarray(c[None]), jnp.ones((1,), bool), jnp.zeros((1,), bool),
                            cfg=stage.model, template=stage.template)
        probs.append(np.asarray(pr[0]))
    return sess, probs


def _speak(p, sess, n, stage):
    tokens, hidden = [], []
    for i in range(n):
        sess, tok, h = S.speak(p, sess, jax.random.key(i)[None], cfg=stage.model, template=stage.template,
                               sampling=GREEDY)
        tokens.append(int(tok[0]))
        hidden.append(np.asarray(h[0]))
    return sess, tokens, hidden


@pytest.mark.parametrize("streaming", [True, False])
def test_training_sequence_is_what_streaming_inference_feeds(world, streaming):
    """Addressed, unaddressed (dropped), addressed: state probabilities at every chunk and the hidden
    states that predict every answer token equal the session's listen / speak outputs."""
    stage = _stage(world, f"stage.streaming_encoder={streaming}")
    params = init_speech_llm(stage.model, jax.random.key(1), with_llm=True)
    rng = np.random.default_rng(0)
    feats = [rng.normal(3.0, 2.0, (16 * n, 80)).astype(np.float32) for n in (3, 2, 2)]
    chunks = [f.reshape(-1, 16, 80) for f in feats]

    system = S.prefill_system(params, stage.template, stage.model)
    sess = S.new_session(system, cfg=stage.model, batch=1, max_len=256)
    sess, probs1 = _listen(params, sess, chunks[0], stage)
    sess, answer1, hidden1 = _speak(params, S.apply_event(sess, Event.END_OF_INPUT), 3, stage)
    sess = S.apply_event(sess, Event.INTERRUPTED)  # fed: speak ids, answer1[0], answer1[1]
    sess, probs2 = _listen(params, sess, chunks[1], stage)
    sess = S.apply_event(S.apply_event(sess, Event.VAD_END), Event.VAD_START)  # turn 2 dropped
    sess, probs3 = _listen(params, sess, chunks[2], stage)
    sess, answer3, hidden3 = _speak(params, S.apply_event(sess, Event.END_OF_INPUT), 2, stage)

    turns = [Turn(3, tuple(answer1[:2])), Turn(2, None), Turn(2, tuple(answer3[:1]))]
    batch = stage.rows([turns], [feats], 256)
    out = jax.jit(stage.outputs)(params, jax.tree.map(jnp.asarray, batch))
    n_states, n_targets = int(batch["state_w"].sum()), int(batch["target_w"].sum())
    assert (n_states, n_targets) == (7, 5)
    tol = 2e-5 if streaming else 1e-4
    probs = state_probs(out["state_logits"][0, batch["state_pos"][0, :n_states]])
    np.testing.assert_allclose(probs, np.stack(probs1 + probs2 + probs3), atol=tol)
    hidden = out["hidden"][0, batch["target_pos"][0, :n_targets]]
    np.testing.assert_allclose(hidden, np.stack(hidden1 + hidden3), atol=tol)
    # Targets: the answer as fed, then <|im_end|> where inference would stop.
    end = stage.template.end_id
    assert list(batch["target_ids"][0, :n_targets]) == answer1[:2] + [end] + answer3[:1] + [end]


def test_layout_token_ids_positions_and_state_labels(world):
    stage = _stage(world)
    t, p = stage.template, stage.model.adapter.prompt_num
    turns = [Turn(2, (40, 41)), Turn(3, None), Turn(1, (42,))]
    row = stage.layout(turns).arrays(128, 16, 16)
    tokens, source, index, positions = row["tokens"], row["source"], row["index"], row["positions"]
    per_turn = stage.turn_chunks * stage.per_chunk
    turn_len = [len(t.listen_ids) + p + 2 * c for c in (2, 3, 1)]
    starts = np.cumsum([len(t.system_ids), turn_len[0] + len(t.speak_ids) + 2, turn_len[1]])
    assert list(tokens[:len(t.system_ids)]) == list(t.system_ids)
    for k, (start, c) in enumerate(zip(starts, (2, 3, 1))):
        listen = slice(start, start + len(t.listen_ids))
        assert list(tokens[listen]) == list(t.listen_ids) and set(source[listen]) == {SOURCE_TEXT}
        prompts = slice(listen.stop, listen.stop + p)
        assert set(source[prompts]) == {SOURCE_PROMPT} and list(index[prompts]) == list(range(p))
        audio = slice(prompts.stop, prompts.stop + 2 * c)
        assert set(source[audio]) == {SOURCE_AUDIO}
        assert list(index[audio]) == list(range(k * per_turn, k * per_turn + 2 * c))
    # State labels on each chunk's last frame: 0 while speaking, 1 (answer) / 2 (not addressed) at the end.
    n = int(row["state_w"].sum())
    assert list(row["state_label"][:n]) == [0, 1, 0, 0, 2, 1]
    chunk_ends = [s + len(t.listen_ids) + p + 2 * i + 1 for s, c in zip(starts, (2, 3, 1)) for i in range(c)]
    assert list(row["state_pos"][:n]) == chunk_ends
    # Turn 1's answer: speak ids then the fed answer; targets are predicted from the position before.
    answer_at = starts[0] + turn_len[0] + len(t.speak_ids)
    assert list(tokens[answer_at - len(t.speak_ids):answer_at + 2]) == list(t.speak_ids) + [40, 41]
    assert list(row["target_pos"][:3]) == [answer_at - 1, answer_at, answer_at + 1]
    # The dropped turn: seen only by itself; turn 3 takes its positions, as the cache reset does.
    dropped = slice(starts[1], starts[2])
    assert set(row["until"][dropped]) == {starts[2]} and row["until"][0] == 128
    assert positions[starts[2]] == positions[starts[1]] == starts[1]
    assert int(row["lengths"]) == starts[2] + turn_len[2] + len(t.speak_ids) + 1


@pytest.fixture(scope="module")
def run(world, tmp_path_factory):
    cfg = _config(world, "stage.steps=10", "stage.log_every=1", "stage.spec_augment={}",
                  "optimizer.schedule='constant'", "optimizer.warmup_steps=1", "optimizer.lr=0.005")
    return (cfg, *train_run(cfg, tmp_path_factory.mktemp("run")))


def test_only_prompts_and_state_head_train_and_frozen_stays_bitwise(run, world):
    cfg, before, summary, losses = run
    assert summary["step"] == 10
    assert set(summary["trainable"]) == {"prompt_embeddings", "state_head"}
    assert summary["frozen_fingerprint"] == before["frozen_fingerprint"] == fingerprint(summary["frozen"])
    # Encoder, adapter and task embeddings are the stage-2 run's, CMVN its statistics.
    from fo_jax.training.checkpoint import load_trained

    trained, meta = load_trained(world / "stage2")
    for path, value in flatten(trained).items():
        np.testing.assert_array_equal(flatten(summary["frozen"])[path], value)
    np.testing.assert_allclose(summary["frozen"]["encoder"]["cmvn_mean"],
                               np.asarray(meta["cmvn_stats"]["mean_stat"]) / meta["cmvn_stats"]["frame_num"], rtol=1e-6)
    for leaf, old in zip(jax.tree.leaves(summary["trainable"]), jax.tree.leaves(before["trainable"])):
        assert not np.array_equal(leaf, old)


def test_loss_decreases_on_a_fixed_batch(run):
    _, _, summary, losses = run
    # 4 usable dialogues = one batch, no augmentation: every step sees the same batch.
    assert len({(l["targets"], l["chunks"]) for l in losses}) == 1
    first, last = losses[0], losses[-3:]
    assert min(l["state_loss"] for l in last) < 0.6 * first["state_loss"]
    assert max(l["lm_loss"] for l in last) < first["lm_loss"] - 0.01  # prompts steer the frozen LLM
    # The total falls by what the state term must lose (the LM term moves little: the LLM is frozen).
    assert min(l["loss"] for l in last) < first["loss"] - 0.4 * first["state_loss"]


def test_bad_dialogues_are_reported_and_skipped(run):
    rejected = run[2]["rejected"]
    assert any("dialogues.jsonl:5: turn 1: audio file not found" in r for r in rejected)
    assert any("dialogues.jsonl:6: turn 0: addressed but no answer" in r for r in rejected)
    assert any("dialogues.jsonl:7: missing or empty field(s) ['turns']" in r for r in rejected)
    assert any("dialogues.jsonl:8: not valid JSON" in r for r in rejected)
    assert any("turns > stage.max_turns=4" in r for r in rejected)
    assert len(rejected) == 5


def test_gradients_reach_prompts_and_state_head_through_the_frozen_llm(run):
    grads, trainable, frozen_grads, open_llm_grads = stage_gradients(run[0])
    assert set(grads) == {"prompt_embeddings/embedding", "state_head/kernel", "state_head/bias"}
    # Every prompt gets a gradient: it reaches them only through the LLM's attention.
    assert np.abs(grads["prompt_embeddings/embedding"]).sum(-1).min() > 0
    kernel = np.asarray(grads["state_head/kernel"])
    assert np.abs(kernel[:3]).sum() > 0 and not kernel[3].any()  # the 4th class (row) is never read
    # Never the LLM (nor the frozen encoder / adapter): zero under the step's objective, where the
    # same loss without the freeze would move every LLM weight.
    assert {p.split("/")[0] for p in frozen_grads} >= {"llm", "encoder", "adapter"}
    assert not [p for p, g in frozen_grads.items() if np.any(g)]
    assert open_llm_grads and all(np.any(g) for g in open_llm_grads.values())
    assert_moments_only_for(run[2]["opt_state"], run[2]["trainable"])


def test_example_batch_matches_real_batches(run):
    stage = build_stage(run[0])
    real = next(iter(stage.dataset(0)))
    spec = stage.example_batch(real["tokens"].shape[1])
    assert {k: (v.shape, v.dtype) for k, v in real.items()} == {k: (v.shape, v.dtype) for k, v in spec.items()}


def test_one_line_errors(world, tmp_path, capsys):
    base = ["train", "--config", CONFIG, "--workdir", str(tmp_path)]
    assert main(base + ["--set", f"stage.tokenizer={world / 'tok'}"]) == 2
    assert capsys.readouterr().err.strip() == "error: stage.manifest is required (--set stage.manifest=PATH)"
    assert main(base + ["--set", f"stage.tokenizer={world / 'tok'}",
                        "--set", f"stage.manifest={world / 'dialogues.jsonl'}"]) == 2
    assert "stage.speech_from is required" in capsys.readouterr().err
    assert main(base + ["--set", f"stage.manifest={world / 'dialogues.jsonl'}"]) == 2
    assert "stage.llm_path (a HF Qwen2 directory with its tokenizer) is required" in capsys.readouterr().err
    with pytest.raises(LoadError, match="no training run here"):
        build_stage(_config(world, f"stage.speech_from={tmp_path}")).load_params(jax.random.key(0))


def test_state_cross_entropy_plain_and_balanced():
    from fo_jax.models.audio_llm import state_log_probs
    from fo_jax.training.speech_common import state_cross_entropy

    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(1, 6, 4)), jnp.float32)  # (B, T, states)
    pos = jnp.asarray([[0, 1, 2, 3, 4, 5]])
    labels = jnp.asarray([[0, 0, 0, 0, 1, 2]])
    w = jnp.asarray([[1, 1, 1, 0, 1, 1]], jnp.float32)  # position 3 unlabelled
    nll = -np.take_along_axis(np.asarray(state_log_probs(logits))[0], np.asarray(labels)[0][:, None], 1)[:, 0]
    plain, acc = state_cross_entropy(logits, pos, labels, w)
    np.testing.assert_allclose(plain, nll[[0, 1, 2, 4, 5]].mean(), rtol=1e-6)
    balanced, acc_b = state_cross_entropy(logits, pos, labels, w, balanced=True)
    # each present state's mean CE, averaged over the 3 present states
    np.testing.assert_allclose(balanced, (nll[[0, 1, 2]].mean() + nll[4] + nll[5]) / 3, rtol=1e-6)
    assert acc == acc_b  # accuracy stays the plain one
    # a batch with no labelled chunk gives 0, not NaN
    zero, _ = state_cross_entropy(logits, pos, labels, jnp.zeros_like(w), balanced=True)
    assert float(zero) == 0.0


def test_graft_keeps_only_the_leaves_it_is_told_to():
    ours = {"encoder": {"conv": np.zeros(2, np.float32), "layer": np.zeros(3, np.float32)}}
    trained = {"encoder": {"layer": np.ones(3, np.float32)}}
    out = graft(ours, trained, "run", keep=r"^encoder/conv")
    np.testing.assert_array_equal(out["encoder"]["layer"], np.ones(3))
    np.testing.assert_array_equal(out["encoder"]["conv"], np.zeros(2))  # kept: the run does not hold it
    with pytest.raises(ConfigError, match="run has no param 'encoder/conv'"):
        graft(ours, trained, "run")
    with pytest.raises(ConfigError, match="'encoder/layer' has shape"):
        graft(ours, {"encoder": {"layer": np.ones(4, np.float32)}}, "run", keep=r"conv")
    with pytest.raises(ConfigError, match="'encoder/extra', which this config does not"):
        graft(ours, {"encoder": {"layer": np.ones(3, np.float32), "extra": np.ones(1)}}, "run", keep=r"conv")


def test_frozen_leaves_come_from_the_run_each_stage_started_from(world, tmp_path):
    """A checkpoint holds only what trained there: leaves a stage kept frozen (here the subsampling
    convs in stages 2 and 3) are read from its start run, followed back to stage 1."""
    model = _stage(world).model
    sub = r"^encoder/subsampling/"
    s1 = fake_speech_run(tmp_path / "s1", model, parts=("encoder", "ctc"), seed=1)
    s2 = fake_speech_run(tmp_path / "s2", model, seed=2, frozen=sub, stage={"encoder_from": str(tmp_path / "s1")})
    s3 = fake_speech_run(tmp_path / "s3", model, parts=("encoder", "prompt_embeddings", "state_head"), seed=3,
                         frozen=sub, stage={"speech_from": str(tmp_path / "s2")})
    assert not any(k.startswith("subsampling/") for k in flatten(s2["encoder"]))
    params, meta = load_lineage(tmp_path / "s3")
    got, want = flatten(params), flatten(s3)
    for path, value in flatten(s1).items():  # stage 1's subsampling and CTC head
        if path.startswith(("encoder/subsampling/", "ctc/")):
            np.testing.assert_array_equal(got[path], value, err_msg=path)
    for path, value in flatten({"adapter": s2["adapter"], "task_embeddings": s2["task_embeddings"]}).items():
        np.testing.assert_array_equal(got[path], value, err_msg=path)
    for path, value in want.items():  # stage 3's own leaves win over the earlier runs'
        np.testing.assert_array_equal(got[path], value, err_msg=path)
    assert "start_run_missing" not in meta

    # stage 3 training from that stage-2 run starts with stage 1's convs and stage 2's other leaves
    stage = build_stage(_config(world, f"stage.speech_from={tmp_path / 's2'}"))
    start = flatten(stage.load_params(jax.random.key(0)))
    conv = next(p for p in flatten(s1) if p.startswith("encoder/subsampling/"))
    np.testing.assert_array_equal(start[conv], flatten(s1)[conv])
    np.testing.assert_array_equal(start["adapter/" + next(iter(flatten(s2["adapter"])))],
                                  next(iter(flatten(s2["adapter"]).values())))

    shutil.rmtree(tmp_path / "s1")  # the convs' only holder is gone: a one-line error naming it
    assert load_lineage(tmp_path / "s3")[1]["start_run_missing"] == str(tmp_path / "s1")
    with pytest.raises(ConfigError, match=r"started from .*s1, which is gone.*no param 'subsampling/"):
        stage.load_params(jax.random.key(0))


def test_decision_labels_from_a_pause_after_the_speech(world, tmp_path):
    assert decision_chunk(0.7, 0.1, 8) == 4  # chunk 4 ends at 0.80 s: the first >= 0.7 + 0.1
    assert decision_chunk(0.62, 0.1, 8) == 4 and decision_chunk(0.5, 0.0, 8) == 3  # ends 0.64 s >= 0.5
    assert decision_chunk(1.5, 0.1, 8) == 7 and decision_chunk(0.0, 0.05, 8) == 0  # clamped to the turn
    stage = _stage(world)
    row = stage.layout([Turn(3, (40,), decide_from=1), Turn(2, None, decide_from=0), Turn(2, (41,))]).arrays(
        128, 16, 16)
    assert list(row["state_label"][:int(row["state_w"].sum())]) == [0, 1, 1, 2, 2, 0, 1]
    # From a manifest: turns with a speech_end get their decision chunk; others keep the last chunk.
    lines = [json.loads(x) for x in (world / "dialogues.jsonl").read_text().splitlines()[:4]]
    for t in (t for x in lines for t in x["turns"]):
        t["audio"] = str(world / t["audio"])
    lines[0]["turns"][0]["speech_end"] = 0.7  # 0.wav: 1.2 s, 8 chunks
    lines[2]["turns"][1]["speech_end"] = 0.9
    manifest = tmp_path / "dialogues.jsonl"
    manifest.write_text("".join(json.dumps(x) + "\n" for x in lines))
    for pause, first in ((0.1, 4), (0.0, 7)):
        stage = build_stage(_config(world, f"stage.manifest={manifest}", f"stage.decision_pause={pause}"))
        turns = stage.dialogues[0] + stage.dialogues[2]
        assert turns[0].chunks == 8 and (turns[0].decide_from or 7) == first
        assert [t.decide_from is None for t in turns[1:]] == [True, pause == 0, True]
        if pause:
            assert turns[2].decide_from == decision_chunk(0.9, 0.1, turns[2].chunks) == 6
    with pytest.raises(ConfigError, match="stage.decision_pause=-0.1"):
        _stage(world, "stage.decision_pause=-0.1")
