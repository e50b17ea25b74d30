"""Official audiollm state dict -> our encoder / adapter / CTC / Qwen2 trees; train.yaml parsing.

``official_shapes`` is the test fixture: the official ``AudioLLM`` state-dict keys and shapes of
the parts these tests cover, built by walking the official module tree the way its constructors
build it (``speechEncoder.enc = [Subsampling, Transformer]``, ``nn.Sequential`` indices, ...).
tests/test_encoder_parity.py checks it against the real official modules when they are available.
"""

import dataclasses

import jax
import numpy as np
import pytest
import yaml

from fo_jax.config import load_config, model_config
from fo_jax.conversion.official_audiollm import (configs_from_train_yaml, convert_ctc, convert_encoder_adapter,
                                                 convert_llm)
from fo_jax.errors import ConfigError, LoadError
from fo_jax.models.adapter import init_adapter_variables
from fo_jax.models.configs import LLMConfig
from fo_jax.models.encoder import init_encoder_params

FREEZE_OMNI = model_config(load_config("configs/freeze_omni.py:freeze_omni"))
TINY = model_config(load_config("configs/freeze_omni.py:tiny"))
AUDIO_LLM_KEYS = ("prompt_embeddings.weight", "task_embeddings.weight", "predictor_head.weight",
                  "predictor_head.bias")


def official_shapes(enc, ad, cmvn=True, audio_llm=True) -> dict[str, tuple[int, ...]]:
    """{official state-dict key: torch shape} for encoder + adapter (+ the AudioLLM's own tables)."""
    shapes = {}

    def linear(prefix, fan_in, fan_out, bias=True):
        shapes[f"{prefix}.weight"] = (fan_out, fan_in)
        if bias:
            shapes[f"{prefix}.bias"] = (fan_out,)

    def layer_norm(prefix, n):
        shapes[f"{prefix}.weight"], shapes[f"{prefix}.bias"] = (n,), (n,)

    def batch_norm(prefix, n):
        layer_norm(prefix, n)
        shapes.update({f"{prefix}.running_mean": (n,), f"{prefix}.running_var": (n,),
                       f"{prefix}.num_batches_tracked": ()})

    def conv(prefix, cin, cout, *kernel):
        shapes[f"{prefix}.weight"], shapes[f"{prefix}.bias"] = (cout, cin, *kernel), (cout,)

    d, f = enc.hidden_size, enc.input_dim
    # speechEncoder.enc[0] = Subsampling -> .core = Conv2dSubsampling4: conv = Sequential(Conv2d, ReLU,
    # Conv2d, ReLU), out = Sequential(Linear)
    conv("encoder.enc.0.core.conv.0", 1, d, 3, 3)
    conv("encoder.enc.0.core.conv.2", d, d, 3, 3)
    linear("encoder.enc.0.core.out.0", d * (((f - 1) // 2 - 1) // 2), d)
    # speechEncoder.enc[1] = Transformer: embed = Sequential(Linear, LayerNorm, Dropout, ReLU)
    linear("encoder.enc.1.embed.0", d, d)
    layer_norm("encoder.enc.1.embed.1", d)
    for i in range(enc.num_layers):
        block = f"encoder.enc.1.encoders.{i}"
        for name in ("linear_q", "linear_k", "linear_v", "linear_out"):
            linear(f"{block}.self_attn.{name}", d, d)
        linear(f"{block}.self_attn.linear_pos", d, d, bias=False)
        shapes[f"{block}.self_attn.pos_bias_u"] = shapes[f"{block}.self_attn.pos_bias_v"] = (
            enc.num_heads, d // enc.num_heads)
        linear(f"{block}.feed_forward.w_1", d, enc.ffn_size)
        linear(f"{block}.feed_forward.w_2", enc.ffn_size, d)
        layer_norm(f"{block}.norm1", d)
        layer_norm(f"{block}.norm2", d)
    layer_norm("encoder.enc.1.after_norm", d)
    if cmvn:  # GlobalCMVN registered buffers
        shapes["encoder.global_cmvn.mean"] = shapes["encoder.global_cmvn.istd"] = (f,)
    k, e = ad.kernel_size, ad.output_dim
    if ad.kind == "linear":  # LinearAdapter.adpter
        linear("adpter.adpter", d, e)
    elif ad.kind == "cnn" or 4 * d < e:  # CNNAdapter, or CNNSubsampling's two-conv branch
        conv("adpter.conv1d1", d, 2 * d, k)
        batch_norm("adpter.bn1", 2 * d)
        conv("adpter.conv1d2", 2 * d, 4 * d, k)
        batch_norm("adpter.bn2", 4 * d)
        linear("adpter.project", 4 * d, e)
    else:  # CNNSubsampling single-conv branch
        conv("adpter.conv1d2", d, 2 * d, k)
        (layer_norm if ad.norm == "layer" else batch_norm)("adpter.bn2", 2 * d)
        linear("adpter.project", 2 * d, e)
    if audio_llm:  # AudioLLM's own tables (mapped by the audio-LLM code, not here)
        shapes["task_embeddings.weight"] = (ad.task_num, e)
        shapes["prompt_embeddings.weight"] = (ad.prompt_num, e)
        linear("predictor_head", e, ad.num_states)
    return shapes


def random_state(shapes, seed=0):
    rng = np.random.default_rng(seed)
    return {k: (np.array(7, np.int64) if k.endswith("num_batches_tracked") else
                rng.normal(size=s).astype(np.float32) + (1.5 if k.endswith("running_var") else 0))
            for k, s in shapes.items()}


def init_shapes(init, cfg):
    """Shapes of our freshly initialised tree (abstract: nothing is computed)."""
    tree = jax.eval_shape(lambda r: init(cfg, r), jax.random.PRNGKey(0))
    tree = jax.tree.map(lambda x: x.unbox() if hasattr(x, "unbox") else x, tree, is_leaf=lambda x: hasattr(x, "unbox"))
    return jax.tree.map(lambda x: tuple(x.shape), tree)


def test_freeze_omni_dims_convert_without_missing_or_unexpected_keys():
    """Real sizes (358 M encoder params): np.empty tensors are never touched (the mapping is views)."""
    enc, ad = FREEZE_OMNI.encoder, FREEZE_OMNI.adapter
    shapes = official_shapes(enc, ad)
    assert len([k for k in shapes if k.startswith("encoder.")]) == 12 + 24 * 19 + 2
    state = {k: np.empty(s, np.float32) for k, s in shapes.items()}
    enc_params, ad_vars, rest = convert_encoder_adapter(state, enc, ad)
    assert sorted(rest) == sorted(AUDIO_LLM_KEYS)
    assert len(state) == len(shapes)  # the input dict is not modified
    assert jax.tree.map(lambda x: tuple(x.shape), enc_params) == init_shapes(init_encoder_params, enc)
    assert jax.tree.map(lambda x: tuple(x.shape), ad_vars) == init_shapes(init_adapter_variables, ad)
    n_params = sum(int(np.prod(s)) for k, s in shapes.items() if k.startswith("encoder.enc."))
    assert 357e6 < n_params < 359e6  # digest: ~358 M


@pytest.mark.parametrize("adapter", [
    dict(), dict(norm="batch", activation="relu"), dict(output_dim=5 * 64), dict(kind="cnn", kernel_size=3),
    dict(kind="linear")])
def test_tiny_dims_convert_every_adapter_variant(adapter):
    enc = TINY.encoder
    ad = dataclasses.replace(TINY.adapter, **adapter)
    state = random_state(official_shapes(enc, ad))
    enc_params, ad_vars, rest = convert_encoder_adapter(state, enc, ad)
    assert sorted(rest) == sorted(AUDIO_LLM_KEYS)
    assert jax.tree.map(lambda x: tuple(x.shape), enc_params) == init_shapes(init_encoder_params, enc)
    assert jax.tree.map(lambda x: tuple(x.shape), ad_vars) == init_shapes(init_adapter_variables, ad)
    # values: torch layouts are kept; linear_pos's output axis is split by head
    np.testing.assert_array_equal(enc_params["encoders_1"]["self_attn"]["linear_pos"]["kernel"][2, 3],
                                  state["encoder.enc.1.encoders.1.self_attn.linear_pos.weight"][2 * 16 + 3])
    np.testing.assert_array_equal(enc_params["subsampling"]["conv_1"]["kernel"],
                                  state["encoder.enc.0.core.conv.2.weight"])
    np.testing.assert_array_equal(enc_params["cmvn_istd"], state["encoder.global_cmvn.istd"])
    if "batch_stats" in ad_vars:
        np.testing.assert_array_equal(ad_vars["batch_stats"]["bn2"]["var"], state["adpter.bn2.running_var"])


def test_errors_name_the_key():
    enc, ad = TINY.encoder, TINY.adapter
    good = random_state(official_shapes(enc, ad))

    bad = dict(good, **{"encoder.enc.1.encoders.1.feed_forward.w_1.weight": np.zeros((3, 64), np.float32)})
    with pytest.raises(LoadError, match=r"final\.pt: tensor 'encoder\.enc\.1\.encoders\.1\.feed_forward\.w_1"
                                        r"\.weight' has shape \(3, 64\), the config implies \(128, 64\)"):
        convert_encoder_adapter(bad, enc, ad)
    missing = {k: v for k, v in good.items() if k != "adpter.project.bias"}
    with pytest.raises(LoadError, match=r"missing tensor 'adpter\.project\.bias'"):
        convert_encoder_adapter(missing, enc, ad)
    deeper = random_state(official_shapes(dataclasses.replace(enc, num_layers=3), ad))
    with pytest.raises(LoadError, match=r"unexpected tensor 'encoder\.enc\.1\.encoders\.2\..*' \(and 18 more\)"):
        convert_encoder_adapter(deeper, enc, ad, source="ckpt/final.pt")
    wrong_adapter = random_state(official_shapes(enc, dataclasses.replace(ad, norm="batch")))
    with pytest.raises(LoadError, match=r"unexpected tensor 'adpter\.bn2\.running_mean' \(and 1 more\)"):
        convert_encoder_adapter(wrong_adapter, enc, ad)
    no_cmvn = random_state(official_shapes(enc, ad, cmvn=False))
    with pytest.raises(LoadError, match="global_cmvn"):
        convert_encoder_adapter(no_cmvn, enc, ad)
    mean, istd = np.arange(80, dtype=np.float32), np.full(80, 0.5, np.float32)
    params, _, _ = convert_encoder_adapter(no_cmvn, enc, ad, cmvn=(mean, istd))
    np.testing.assert_array_equal(params["cmvn_mean"], mean)
    # the checkpoint's buffers win over the file's, as with the official load_state_dict
    params, _, _ = convert_encoder_adapter(good, enc, ad, cmvn=(mean, istd))
    np.testing.assert_array_equal(params["cmvn_mean"], good["encoder.global_cmvn.mean"])


def test_ctc_and_llm_parts():
    enc = TINY.encoder
    state = {"ctc.ctc_lo.weight": np.ones((64, 64), np.float32), "ctc.ctc_lo.bias": np.zeros(64, np.float32),
             "prompt_embeddings.weight": np.zeros((4, 64), np.float32)}
    ctc, rest = convert_ctc(state, enc)
    assert ctc["ctc_lo"]["kernel"].shape == (64, 64) and sorted(rest) == ["prompt_embeddings.weight"]
    np.testing.assert_array_equal(ctc["ctc_lo"]["kernel"], state["ctc.ctc_lo.weight"])
    assert convert_ctc(rest, enc) == (None, rest)
    with pytest.raises(LoadError, match=r"'ctc\.ctc_lo\.weight' has shape \(3, 64\)"):
        convert_ctc(dict(state, **{"ctc.ctc_lo.weight": np.ones((3, 64), np.float32)}), enc)

    llm = LLMConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2,
                    num_kv_heads=1, head_dim=4)
    from fo_jax.conversion.hf_qwen2 import expected_shapes
    rng = np.random.default_rng(0)
    hf = {"llm_decoder." + k: rng.normal(size=s).astype(np.float32) for k, s in expected_shapes(llm).items()}
    params, rest = convert_llm(dict(hf, **state), llm)
    assert params["layers_0"]["self_attn"]["q_proj"]["kernel"].shape == (2, 4, 8)
    np.testing.assert_array_equal(params["embed_tokens"]["embedding"], hf["llm_decoder.model.embed_tokens.weight"])
    assert not any(k.startswith("llm_decoder.") for k in rest) and "ctc.ctc_lo.bias" in rest
    assert convert_llm(state, llm)[0] is None
    del hf["llm_decoder.model.norm.weight"]
    with pytest.raises(LoadError, match=r"missing tensor 'llm_decoder\.model\.norm\.weight'"):
        convert_llm(hf, llm)


RELEASED_YAML = {  # the encoder / model parts of the released audiollm/train.yaml
    "cmvn_file": None, "input_dim": 80, "is_json_cmvn": True, "output_dim": 5538,
    "encoder_conf": {
        "overview_conf": {"encoder-input-dim": 80, "encoder-layer-config": "subsampling-transformer",
                          "encoder-output-dim": 1024},
        "para_conf": {
            "subsampling": {"subsampling-dropout-rate": 0.1, "subsampling-input-dim": 80,
                            "subsampling-output-dim": 1024, "subsampling-rate": 4},
            "transformer": {"transformer-attention-dim": 1024, "transformer-attention-dropout-rate": 0.0,
                            "transformer-attention-heads": 16, "transformer-chunk_size": 4,
                            "transformer-concat-after": False, "transformer-dropout-rate": 0.1,
                            "transformer-dynamic-chunks": False, "transformer-input-dim": 1024,
                            "transformer-input-layer": "linear", "transformer-left_chunks": 16,
                            "transformer-linear-units": 4096, "transformer-normalize-before": True,
                            "transformer-num-blocks": 24, "transformer-output-dim": 1024,
                            "transformer-pos-enc-class": "rel-enc", "transformer-positional-dropout-rate": 0.1,
                            "transformer-positionwise-layer-type": "linear"}}},
    "model_conf": {"activation_func": "gelu", "add_audio_bos_eos": True, "add_prompt_before": True,
                   "adpter_type": "subsampling", "chunk_size": 2, "enc_out_dim": 1024, "freeze_adpter": True,
                   "kernel_size": 5, "llm_embed_dim": 3584, "llm_head_num": 28, "norm": "layer",
                   "num_key_value_heads": 4, "predict_usr_state": 4, "prompt_finetune": True, "prompt_num": 25,
                   "task_num": 20, "task_type": "prompt_finetune"},
}


def test_train_yaml_gives_the_released_configs(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(RELEASED_YAML))
    enc, ad = configs_from_train_yaml(path)
    assert enc == FREEZE_OMNI.encoder and ad == FREEZE_OMNI.adapter
    assert configs_from_train_yaml(RELEASED_YAML, dtype="bfloat16")[0].dtype == "bfloat16"

    post_ln = yaml.safe_load(yaml.safe_dump(RELEASED_YAML))
    post_ln["encoder_conf"]["para_conf"]["transformer"]["transformer-normalize-before"] = False
    with pytest.raises(ConfigError, match="transformer-normalize-before"):
        configs_from_train_yaml(post_ln)
    abs_enc = yaml.safe_load(yaml.safe_dump(RELEASED_YAML))
    del abs_enc["encoder_conf"]["para_conf"]["transformer"]["transformer-pos-enc-class"]  # default abs-enc
    with pytest.raises(ConfigError, match="abs-enc"):
        configs_from_train_yaml(abs_enc)
    with pytest.raises(LoadError, match="not found"):
        configs_from_train_yaml(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    with pytest.raises(LoadError, match="not valid YAML"):
        configs_from_train_yaml(tmp_path / "bad.yaml")
