"""AudioLLM composition: chat template ids, params, training forward, head conversion."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fo_jax.conversion.official_audiollm_heads import HEADS_TABLE, convert_heads, expected_head_shapes
from fo_jax.errors import LoadError
from fo_jax.models import audio_llm as al
from fo_jax.models.qwen2 import Qwen2
from fo_jax.text.tokenizer import chatml
from tests.test_session_utils import TINY, tiny_params


def test_template_gives_the_official_token_ids(qwen2_tokenizer):
    tok = qwen2_tokenizer
    t = al.ChatTemplate.from_tokenizer(tok)
    # Qwen2 ids: <|im_start|>=151644, <|im_end|>=151645, "\n"=198, system=8948, user=872, assistant=77091.
    assert t.system_ids == (151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13)
    assert t.listen_ids == (151645, 198, 151644, 872, 198)
    assert t.speak_ids == (151645, 198, 151644, 77091, 198)
    assert t.end_id == 151645
    # The pieces spell the whole ChatML conversation with the audio cut out.
    text = chatml([{"role": "user", "content": al.AUDIO_PLACEHOLDER}]).replace(al.AUDIO_PLACEHOLDER, "")
    assert tok.decode(list(t.system_ids + t.listen_ids + t.speak_ids)) == text


def test_template_with_a_role(qwen2_tokenizer):
    tok = qwen2_tokenizer
    role = "You are a helpful voice assistant. Your name is Xiao Yun."
    t = al.ChatTemplate.from_tokenizer(tok, role=role)
    assert t.system_ids == tuple(tok.encode("<|im_start|>system\n" + role))
    assert t.system_ids[:3] == (151644, 8948, 198) and 151645 not in t.system_ids
    default_role = al.ChatTemplate.from_tokenizer(tok, role="You are a helpful assistant.")
    assert default_role == al.ChatTemplate.from_tokenizer(tok)
    hash(t)  # a static jit argument


def test_param_tree_and_shapes():
    params = tiny_params()
    assert set(params) == {"encoder", "adapter", "llm", "prompt_embeddings", "task_embeddings", "state_head"}
    d = TINY.llm.hidden_size
    assert params["prompt_embeddings"]["embedding"].shape == (TINY.adapter.prompt_num, d)
    assert params["task_embeddings"]["embedding"].shape == (TINY.adapter.task_num, d)
    assert params["state_head"]["kernel"].shape == (TINY.adapter.num_states, d)  # torch layout


def test_training_forward_assembles_text_prompts_tasks_and_audio():
    params = tiny_params()
    cfg, d = TINY, TINY.llm.hidden_size
    rng = np.random.default_rng(0)
    audio = jnp.asarray(rng.normal(size=(2, 6, d)), jnp.float32)
    tokens = rng.integers(0, cfg.llm.vocab_size, (2, 12)).astype(np.int32)
    # Row 0: text, 2 prompts, 3 audio frames, a task token, text; row 1: audio first, shorter.
    source = np.array([[0, 1, 1, 2, 2, 2, 3, 0, 0, 0, 0, 0], [2, 2, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]])
    index = np.array([[0, 0, 1, 0, 1, 2, 5, 0, 0, 0, 0, 0], [4, 5, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0]])
    lengths = jnp.array([12, 9])
    model = al.AudioLLM(cfg)
    out = model.apply({"params": params}, jnp.asarray(tokens), jnp.asarray(source), jnp.asarray(index),
                      lengths, audio)
    # The same sequences built by hand.
    emb = np.asarray(params["llm"]["embed_tokens"]["embedding"])[tokens]
    tables = {1: params["prompt_embeddings"]["embedding"], 3: params["task_embeddings"]["embedding"]}
    for b in range(2):
        for t in range(12):
            if source[b, t] == 2:
                emb[b, t] = audio[b, index[b, t]]
            elif source[b, t] in tables:
                emb[b, t] = tables[source[b, t]][index[b, t]]
    hidden, _ = Qwen2(cfg.llm).apply({"params": params["llm"]}, jnp.asarray(emb), lengths)
    for b, n in enumerate([12, 9]):
        np.testing.assert_allclose(out["hidden"][b, :n], hidden[b, :n], atol=1e-5)
    w, bias = params["state_head"]["kernel"], params["state_head"]["bias"]
    np.testing.assert_allclose(out["state_logits"], out["hidden"] @ w.T + bias, atol=1e-5)
    assert out["logits"].shape == (2, 12, cfg.llm.vocab_size)
    assert "logits" not in model.apply({"params": params}, jnp.asarray(tokens), jnp.asarray(source),
                                       jnp.asarray(index), lengths, audio, with_logits=False)


def test_training_forward_has_gradients_for_prompts_and_state_head():
    params = tiny_params()
    tokens = jnp.zeros((1, 8), jnp.int32) + 7
    source = jnp.array([[0, 1, 1, 1, 1, 0, 0, 0]])
    index = jnp.array([[0, 0, 1, 2, 3, 0, 0, 0]])

    def loss(p):
        out = al.AudioLLM(TINY).apply({"params": p}, tokens, source, index, jnp.array([8]), with_logits=False)
        return out["state_logits"][0, -1, 1]

    grads = jax.jit(jax.grad(loss))(params)
    assert np.abs(grads["prompt_embeddings"]["embedding"]).sum(-1).min() > 0  # every prompt is used
    assert np.abs(grads["state_head"]["kernel"]).sum() > 0


def _official_state_dict(cfg, seed=0):
    """The head tensors as the official torch modules name and shape them."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(seed)
    d, a = cfg.llm.hidden_size, cfg.adapter
    heads = torch.nn.ModuleDict({"prompt_embeddings": torch.nn.Embedding(a.prompt_num, d),
                                 "task_embeddings": torch.nn.Embedding(a.task_num, d),
                                 "predictor_head": torch.nn.Linear(d, a.num_states)})
    return heads, {k: v.detach().numpy() for k, v in heads.state_dict().items()}


@pytest.mark.torch
def test_convert_heads_matches_the_official_modules():
    torch = pytest.importorskip("torch")
    heads, sd = _official_state_dict(TINY)
    assert set(sd) == {k for k, _, _ in HEADS_TABLE}
    assert {k: v.shape for k, v in sd.items()} == expected_head_shapes(TINY)
    converted, used = convert_heads(sd | {"encoder.other.weight": np.zeros(3)}, TINY)
    assert used == set(sd)
    params = tiny_params()
    assert jax.tree.map(np.shape, converted) == jax.tree.map(np.shape, {k: params[k] for k in converted})
    params.update(converted)
    hidden = np.random.default_rng(1).normal(size=(3, TINY.llm.hidden_size)).astype(np.float32)
    ours = al.AudioLLM(TINY).apply({"params": params}, jnp.asarray(hidden), method=al.AudioLLM.state_logits)
    ref = heads["predictor_head"](torch.from_numpy(hidden)).detach().numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    prompts = al.AudioLLM(TINY).apply({"params": params}, method=al.AudioLLM.prompts)
    np.testing.assert_array_equal(prompts, sd["prompt_embeddings.weight"])


@pytest.mark.torch
def test_convert_heads_errors_name_the_key():
    _, sd = _official_state_dict(TINY)
    with pytest.raises(LoadError, match=r"final.pt: missing tensor 'predictor_head.bias'"):
        convert_heads({k: v for k, v in sd.items() if k != "predictor_head.bias"}, TINY)
    bad = dict(sd, **{"prompt_embeddings.weight": np.zeros((3, TINY.llm.hidden_size))})
    with pytest.raises(LoadError, match=rf"'prompt_embeddings.weight' has shape \(3, {TINY.llm.hidden_size}\)"):
        convert_heads(bad, TINY)
    # The stage-2 task table may be absent (unused at inference): zeros.
    converted, used = convert_heads({k: v for k, v in sd.items() if not k.startswith("task")}, TINY)
    assert "task_embeddings.weight" not in used
    assert not np.any(converted["task_embeddings"]["embedding"])


def _official_full_state_dict(cfg, seed=0):
    """Random tensors under every official name of an AudioLLM with this config (LLM included)."""
    from fo_jax.conversion import hf_qwen2, official_audiollm as oa

    rng = np.random.default_rng(seed)
    shapes = dict(oa.encoder_shapes(cfg.encoder))
    shapes.update({entry[0]: entry[-1] for entry in oa.adapter_table(cfg.adapter)})  # (name, ..., shape)
    shapes.update(expected_head_shapes(cfg))
    shapes.update({"llm_decoder." + k: s for k, s in hf_qwen2.expected_shapes(cfg.llm).items()})
    return {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}


def test_convert_whole_audiollm_gives_our_param_tree():
    from fo_jax.conversion.official_audiollm_heads import convert_audiollm

    sd = _official_full_state_dict(TINY)
    cmvn = (np.zeros(80, np.float32), np.ones(80, np.float32))
    params = convert_audiollm(sd, TINY, cmvn=cmvn)
    shapes = lambda t: jax.tree.map(np.shape, t)
    assert shapes(params) == shapes(tiny_params())
    np.testing.assert_array_equal(params["state_head"]["bias"], sd["predictor_head.bias"])
    with pytest.raises(LoadError, match=r"final.pt: unexpected tensor 'speaker_head.weight'"):
        convert_audiollm(sd | {"speaker_head.weight": np.zeros(2)}, TINY, cmvn=cmvn)
    no_llm = {k: v for k, v in sd.items() if not k.startswith("llm_decoder.")}
    with pytest.raises(LoadError, match="no 'llm_decoder"):
        convert_audiollm(no_llm, TINY, cmvn=cmvn)
    assert convert_audiollm(no_llm, TINY, llm_params=params["llm"], cmvn=cmvn)["llm"] is params["llm"]


def test_forward_encodes_each_utterance_on_its_own():
    params = tiny_params()
    rng = np.random.default_rng(3)
    fbank = jnp.asarray(rng.normal(size=(1, 2, 35, 80)) * 3 + 8, jnp.float32)  # 2 questions, 4 embeddings each
    lengths_bn = jnp.array([[35, 27]])
    # [prompt, q0 audio x4, text, prompt, q1 audio x3 (its 4th is padding), text]
    source = jnp.array([[1, 2, 2, 2, 2, 0, 1, 2, 2, 2, 0]])
    index = jnp.array([[0, 0, 1, 2, 3, 0, 0, 4, 5, 6, 0]])
    tokens = jnp.full((1, 11), 9, jnp.int32)
    out = jax.jit(lambda p, f, n: al.forward(p, TINY, tokens, source, index, jnp.array([11]), f, n,
                                             with_logits=False))(params, fbank, lengths_bn)
    enc = jax.jit(lambda p, f, n: al.encode_speech(p, TINY, f, n)[0])
    audio = jnp.concatenate([enc(params, fbank[:, 0], lengths_bn[:, 0]), enc(params, fbank[:, 1], lengths_bn[:, 1])],
                            axis=1)
    ref = al.AudioLLM(TINY).apply({"params": params}, tokens, source, index, jnp.array([11]), audio, False)
    np.testing.assert_allclose(out["state_logits"], ref["state_logits"], atol=1e-5)
