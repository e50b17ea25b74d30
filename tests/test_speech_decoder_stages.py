"""Stages ``speech_decoder`` (speech-out 2) and ``speech_prefix`` (speech-out 3) on a tiny random HF
Qwen2: what trains and what stays bitwise, losses, gradients, and stage 3's LLM hidden states
against the inference decode loop."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fo_jax.cli.main import main
from fo_jax.config import load_config
from fo_jax.conversion.hf_qwen2 import load_hf_qwen2
from fo_jax.errors import ConfigError, FoJaxError
from fo_jax.inference import llm as inference
from fo_jax.training import trainer
from fo_jax.training.freeze import flatten
from fo_jax.training.stages import build_stage
from fo_jax.training.stages.speech_decoder import answer_hidden_states, corrupt_inputs
from tests.speech_out_data import write_answers_manifest, write_llm_dir

STEPS = 6


def _overrides(data, **extra):
    values = {"stage.manifest": data["manifest"], "stage.llm_path": data["llm"], "stage.batch_size": 4,
              "stage.buckets": "(32,)", "stage.steps": STEPS, "stage.log_every": 1, "optimizer.warmup_steps": 1,
              "optimizer.lr": 5e-3} | extra
    return [f"{k}={v}" for k, v in values.items()]


def _metrics(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("speech_out")
    manifest = write_answers_manifest(root / "answers.jsonl", [20, 30, 25, 28])
    with open(manifest, "a") as f:  # problems are reported, not trained on
        f.write(json.dumps({"question": "q?", "text": "no tokens."}) + "\n")
        f.write(json.dumps({"question": "q?", "text": "bad.", "codec_tokens": [3, 1024]}) + "\n")
        f.write(json.dumps({"question": "q?", "text": "long.", "codec_tokens": [5] * 40}) + "\n")
    return {"root": root, "llm": write_llm_dir(root / "llm"), "manifest": manifest}


@pytest.fixture(scope="module")
def stage2(data):
    cfg = load_config("configs/speech_out_stage2.py:tiny", _overrides(data))
    initial = jax.device_get(build_stage(cfg).load_params(jax.random.key(cfg.seed)))
    return initial, trainer.train(cfg, data["root"] / "stage2", progress=False)


@pytest.fixture(scope="module")
def stage3_cfg(data, stage2):
    return load_config("configs/speech_out_stage3.py:tiny",
                       _overrides(data, **{"stage.decoder_from": data["root"] / "stage2"}))


@pytest.fixture(scope="module")
def stage3(data, stage3_cfg):
    return trainer.train(stage3_cfg, data["root"] / "stage3", progress=False)


def _adam_paths(opt_state):
    return set(flatten(opt_state[1][0].mu))  # chain(clip, adamw): adamw's first part is Adam


def test_stage2_trains_the_decoder_and_leaves_the_llm_table_bitwise(data, stage2):
    initial, out = stage2
    assert len(out["rejected"]) == 3
    assert "answers.jsonl:5: no codec_tokens" in out["rejected"][0]
    assert "answers.jsonl:6: codec_tokens must be a list of ints in [0, 1024)" in out["rejected"][1]
    assert out["rejected"][2].endswith("'long.': 40 codec tokens (largest of stage.buckets 32)")
    frozen = flatten(jax.device_get(out["frozen"]))
    assert list(frozen) == ["llm/embed_tokens/embedding"]
    np.testing.assert_array_equal(frozen["llm/embed_tokens/embedding"], load_hf_qwen2(data["llm"])[1]
                                  ["embed_tokens"]["embedding"])
    trainable = flatten(jax.device_get(out["trainable"]))
    assert _adam_paths(out["opt_state"]) == set(trainable) and all(p.startswith("decoder/") for p in trainable)
    assert not any("layers_prefix" in p for p in trainable)  # no prefix stack in stage 2
    assert all(not np.array_equal(v, flatten(initial)[p]) for p, v in trainable.items())
    ce = [m["token_ce"] for m in _metrics(data["root"] / "stage2")]  # one fixed batch, every step
    assert ce[-1] < ce[0] - 0.5, ce


def test_stage3_trains_only_the_prefix_stack(data, stage2, stage3):
    frozen = flatten(jax.device_get(stage3["frozen"]))
    trainable = flatten(jax.device_get(stage3["trainable"]))
    assert trainable and all(p.startswith("decoder/layers_prefix_") for p in trainable)
    assert _adam_paths(stage3["opt_state"]) == set(trainable)
    # The decoder is stage 2's, bitwise; the LLM is the HF directory's, bitwise.
    for path, value in flatten(jax.device_get(stage2[1]["trainable"])).items():
        np.testing.assert_array_equal(frozen[path], value)
    for path, value in flatten(load_hf_qwen2(data["llm"])[1]).items():
        np.testing.assert_array_equal(frozen["llm/" + path], value)
    ce = [m["token_ce"] for m in _metrics(data["root"] / "stage3")]
    assert ce[-1] < ce[0], ce


def test_trained_decoder_joins_the_prefix_run_and_the_run_it_started_from(data, stage2, stage3):
    """What a bundle gets (fo_jax.toy.model): stage 3's prefix stack over stage 2's shared decoder."""
    from fo_jax.toy.model import trained_decoder

    config, params = trained_decoder(data["root"] / "stage3", llm_hidden_size=64)
    assert config.use_prefix and config.llm_hidden_size == 64
    got = flatten(params)
    want = flatten(jax.device_get(stage2[1]["trainable"])["decoder"]) | \
        flatten(jax.device_get(stage3["trainable"])["decoder"])
    assert set(got) == set(want) and any(p.startswith("layers_prefix_") for p in got)
    for path, value in want.items():
        np.testing.assert_array_equal(got[path], value, err_msg=path)


def test_stage3_gradients_reach_the_prefix_stack_and_stop_at_the_llm(stage3_cfg):
    stage = build_stage(stage3_cfg)
    params = stage.load_params(jax.random.key(0))
    batch = jax.tree.map(jnp.asarray, next(iter(stage.dataset(0))))
    grads = flatten(jax.jit(jax.grad(lambda p: stage.loss(p, batch, jax.random.key(0))[0]))(params))
    peak = {p: float(jnp.max(jnp.abs(g))) for p, g in grads.items()}
    # Only the K/V a prefix layer writes is read, so the last one's query, output and MLP are dead
    # weights (as in the release); everything else in the prefix stack gets a gradient.
    last = f"decoder/layers_prefix_{stage.decoder.num_layers - 1}/"
    dead = tuple(last + part for part in ("self_attn/q_proj", "self_attn/o_proj", "mlp", "post_attention_layernorm"))
    prefix = {p: g for p, g in peak.items() if p.startswith("decoder/layers_prefix_")}
    assert len(prefix) == 9 * stage.decoder.num_layers  # 2 norms, q k v o, 3 MLP kernels per block
    assert all((g == 0) == p.startswith(dead) for p, g in prefix.items()), prefix
    # The hidden states enter under stop_gradient: no LLM layer gets any gradient, even unfrozen.
    llm_body = {p: g for p, g in peak.items() if p.startswith("llm/") and "embed_tokens" not in p}
    assert llm_body and all(g == 0 for g in llm_body.values())


def test_stage3_hidden_states_are_the_inference_speak_loop_states(data, stage3_cfg):
    stage = build_stage(stage3_cfg)
    cfg, params = load_hf_qwen2(data["llm"])
    batch = next(iter(stage.dataset(0)))
    got = answer_hidden_states(params, cfg, jnp.asarray(batch["dialogue"]), jnp.asarray(batch["dialogue_lens"]),
                               jnp.asarray(batch["answer_start"]), stage.max_answer)
    for row in range(2):
        start, n = int(batch["answer_start"][row]), int(batch["answer_lens"][row])
        prompt, answer = batch["dialogue"][row, :start], batch["dialogue"][row, start:start + n]
        # As a speak loop runs: prefill the prompt (its last state samples answer token 0), then
        # feed answer tokens 0 .. n-2 one at a time (each state samples the next token).
        cache = inference.init_cache(cfg, 1, 128)
        _, hidden, cache = inference.prefill(params, jnp.asarray(prompt[None]), jnp.array([start]), cache, cfg=cfg)
        states = [hidden[0, start - 1]]
        for token in answer[:-1]:
            _, h, cache = inference.decode_step(params, jnp.asarray([token]), cache, cfg=cfg)
            states.append(h[0])
        np.testing.assert_allclose(np.asarray(got[row, :n]), np.stack(states), rtol=1e-5, atol=1e-5)


def test_stage3_start_checks(data, stage3_cfg, tmp_path):
    with pytest.raises(ConfigError, match="stage.decoder_from is required"):
        build_stage(load_config("configs/speech_out_stage3.py:tiny", _overrides(data)))
    other = write_llm_dir(tmp_path / "other_llm", seed=1)
    stage = build_stage(load_config("configs/speech_out_stage3.py:tiny", _overrides(
        data, **{"stage.decoder_from": data["root"] / "stage2", "stage.llm_path": other})))
    with pytest.raises(FoJaxError, match="trained against another LLM embedding table"):
        stage.load_params(jax.random.key(0))
    stage = build_stage(load_config("configs/speech_out_stage3.py:tiny", _overrides(
        data, **{"stage.decoder_from": data["root"] / "stage3"})))
    with pytest.raises(FoJaxError, match="not a speech_decoder run"):
        stage.load_params(jax.random.key(0))


def test_cli_train_stage2_and_one_line_errors(data, tmp_path, capsys):
    args = ["train", "--config", "configs/speech_out_stage2.py:tiny", "--workdir", str(tmp_path)]
    for o in _overrides(data, **{"stage.steps": 1}):
        args += ["--set", o]
    assert main(args) == 0
    assert "step 1: done" in capsys.readouterr().out
    bad = args[:5] + ["--set", f"stage.manifest={data['manifest']}"]
    assert main(bad) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: stage.llm_path") and err.count("\n") == 1


def test_input_noise_replaces_a_share_of_the_codec_inputs_never_sequence_start(data):
    inputs = jnp.broadcast_to(jnp.array([1025] + [7] * 399, jnp.int32), (64, 400))  # [start, codes...]
    assert corrupt_inputs(inputs, 0.0, 1024, jax.random.key(0)) is inputs
    noisy = np.asarray(corrupt_inputs(inputs, 0.3, 1024, jax.random.key(0)))
    assert (noisy[:, 0] == 1025).all() and noisy.min() >= 0 and noisy[:, 1:].max() < 1024
    changed = np.mean(noisy[:, 1:] != 7)
    assert 0.28 < changed < 0.32, changed  # 25,536 draws: the share is within 2 points of 0.3
    again = np.asarray(corrupt_inputs(inputs, 0.3, 1024, jax.random.key(1)))
    assert (again != noisy).any()  # a new draw per step's rng
    with pytest.raises(ConfigError, match=r"stage.input_noise must lie in \[0, 1\), got 1.0"):
        build_stage(load_config("configs/speech_out_stage2.py:tiny", _overrides(data, **{"stage.input_noise": 1.0})))
    noisy_stage = build_stage(load_config("configs/speech_out_stage2.py:tiny",
                                          _overrides(data, **{"stage.input_noise": 0.5})))
    clean_stage = build_stage(load_config("configs/speech_out_stage2.py:tiny", _overrides(data)))
    params = clean_stage.load_params(jax.random.key(0))
    batch = next(iter(clean_stage.dataset(0)))
    clean, _ = clean_stage.loss(params, batch, jax.random.key(0))
    assert float(noisy_stage.loss(params, batch, jax.random.key(0))[0]) != pytest.approx(float(clean))
