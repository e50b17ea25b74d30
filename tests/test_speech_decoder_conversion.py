"""Official decoder checkpoint conversion: key table vs the release's state-dict keys, model.json, errors."""

import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fo_jax.config import load_config, model_config
from fo_jax.conversion.official_decoder import (config_from_model_json, convert_state_dict, expected_shapes,
                                                load_official_decoder)
from fo_jax.errors import LoadError
from fo_jax.models.speech_decoder import init_params
from tests.test_speech_decoder import random_state_dict

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "speech_decoder_official_keys.json").read_text())

# The release's decoder/model.json: the fields the converter reads plus a few it ignores.
RELEASE_ARGS = {"encoder_criterion": "ce", "encoder_drop_rate": 0.1, "encoder_output_dim": 896,
                "encoder_upsample_rate": 9, "idim": 896, "kv_cache_prefix_finetune": 1, "odim": 1024,
                "transformer_attention_dim": 896, "transformer_attention_heads": 14,
                "transformer_dropout_rate": 0.1, "transformer_linear_units": 4864, "transformer_num_blocks": 4,
                "transformer_pos_enc_class": "rel-enc", "init_lr": 0.0005}


def _variant(name):
    return model_config(load_config(f"configs/freeze_omni.py:{name}")).decoder


def _write_model_json(directory, args=RELEASE_ARGS, idim=896, odim=1024):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.json").write_text(json.dumps([idim, odim, args]))


@pytest.mark.parametrize("variant,fixture", [("freeze_omni", "real"), ("tiny", "tiny")])
def test_key_table_matches_release_state_dict(variant, fixture):
    cfg = _variant(variant)
    official = {k: tuple(v) for k, v in FIXTURE[fixture]["shapes"].items()}
    assert expected_shapes(cfg) == official
    # Converting the real-size key set gives exactly our model's param tree and shapes (no allocation).
    converted = jax.eval_shape(lambda sd: convert_state_dict(sd, cfg),
                               {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in official.items()})
    ours = jax.eval_shape(lambda r: nn.unbox(init_params(cfg, r)), jax.random.key(0))
    assert jax.tree.map(lambda a: a.shape, converted) == jax.tree.map(lambda a: a.shape, ours)
    # Every param carries logical axis names (one per dim), for sharding.
    boxed = jax.tree.leaves(jax.eval_shape(lambda r: init_params(cfg, r), jax.random.key(0)),
                            is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert all(isinstance(b, nn.LogicallyPartitioned) and len(b.names) == b.value.ndim for b in boxed)


def test_release_model_json_gives_the_freeze_omni_config(tmp_path):
    _write_model_json(tmp_path)
    assert config_from_model_json(tmp_path / "model.json") == _variant("freeze_omni")


def test_model_json_errors(tmp_path):
    with pytest.raises(LoadError, match="model.json: not found"):
        config_from_model_json(tmp_path / "model.json")
    (tmp_path / "model.json").write_text("{oops")
    with pytest.raises(LoadError, match="not valid JSON"):
        config_from_model_json(tmp_path / "model.json")
    _write_model_json(tmp_path, {k: v for k, v in RELEASE_ARGS.items() if k != "transformer_num_blocks"})
    with pytest.raises(LoadError, match="transformer_num_blocks"):
        config_from_model_json(tmp_path / "model.json")
    _write_model_json(tmp_path, RELEASE_ARGS | {"transformer_attention_heads": 5})
    with pytest.raises(LoadError, match="model.json: .*num_heads=5"):
        config_from_model_json(tmp_path / "model.json")


def test_state_dict_errors_name_the_key():
    cfg = _variant("tiny")
    sd = random_state_dict(cfg)
    missing = {k: v for k, v in sd.items() if k != "layers_prefix.1.mlp.up_proj.weight"}
    with pytest.raises(LoadError, match=r"final.pt: missing tensor 'layers_prefix.1.mlp.up_proj.weight'$"):
        convert_state_dict(missing, cfg, source="final.pt")
    with pytest.raises(LoadError, match=r"unexpected tensor 'decoder.extra' \(and 1 more\)"):
        convert_state_dict(sd | {"decoder.extra": sd["norm.weight"], "x.y": sd["norm.weight"]}, cfg)
    with pytest.raises(LoadError, match=r"'layers.0.self_attn.k_proj.weight' has shape \(16, 32\), the config "
                                        r"implies \(32, 32\)"):
        convert_state_dict(sd | {"layers.0.self_attn.k_proj.weight": np.zeros((16, 32), np.float32)}, cfg)
    # Buffers some exports carry are ignored.
    convert_state_dict(sd | {"layers.0.self_attn.rotary_emb.inv_freq": np.zeros(4, np.float32)}, cfg)


@pytest.mark.torch
def test_pt_checkpoint_loads_with_every_key_mapped(tmp_path):
    torch = pytest.importorskip("torch")
    cfg = _variant("tiny")
    sd = random_state_dict(cfg, seed=3)
    args = RELEASE_ARGS | {"idim": 32, "encoder_output_dim": 32, "transformer_attention_dim": 32,
                           "transformer_attention_heads": 4, "transformer_linear_units": 64,
                           "transformer_num_blocks": 2}
    _write_model_json(tmp_path, args, idim=32)
    torch.save({"model": {k: torch.tensor(v).to(torch.bfloat16 if "mlp" in k else torch.float32)
                          for k, v in sd.items()}}, tmp_path / "final.pt")
    loaded_cfg, params = load_official_decoder(tmp_path, llm_hidden_size=64)
    assert loaded_cfg == cfg
    leaves = jax.tree.leaves(params)
    assert len(leaves) == len(sd) and all(a.dtype == np.float32 for a in leaves)
    ours = jax.eval_shape(lambda r: nn.unbox(init_params(cfg, r)), jax.random.key(0))
    assert jax.tree.map(lambda a: a.shape, params) == jax.tree.map(lambda a: a.shape, ours)
    # Spot-check the layouts: torch Linear (out, in) keeps its layout, heads split out of the flat axis.
    q = sd["layers.1.self_attn.q_proj.weight"]
    np.testing.assert_array_equal(params["layers_1"]["self_attn"]["q_proj"]["kernel"], q.reshape(4, 8, 32))
    o = sd["layers_pre_nn.0.self_attn.o_proj.weight"]
    np.testing.assert_array_equal(params["layers_pre_nn_0"]["self_attn"]["o_proj"]["kernel"],
                                  o.reshape(32, 4, 8))
    np.testing.assert_array_equal(params["out_fnn"]["kernel"], sd["out_fnn.weight"])
    up = torch.tensor(sd["layers_prefix.0.mlp.up_proj.weight"]).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(params["layers_prefix_0"]["mlp"]["up_proj"]["kernel"], up)
    # bfloat16 params on request.
    _, bf16 = load_official_decoder(tmp_path, llm_hidden_size=64, dtype="bfloat16")
    assert {a.dtype for a in jax.tree.leaves(bf16)} == {np.dtype(jnp.bfloat16)}


@pytest.mark.torch
def test_pt_errors(tmp_path):
    torch = pytest.importorskip("torch")
    with pytest.raises(LoadError, match="not a directory"):
        load_official_decoder(tmp_path / "nope")
    _write_model_json(tmp_path)
    with pytest.raises(LoadError, match="final.pt: not found"):
        load_official_decoder(tmp_path)
    (tmp_path / "final.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(LoadError, match="final.pt: cannot load as a weights-only state dict"):
        load_official_decoder(tmp_path)
    torch.save([1, 2], tmp_path / "final.pt")
    with pytest.raises(LoadError, match="final.pt: expected a state dict, got list"):
        load_official_decoder(tmp_path)
