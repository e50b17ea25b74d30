"""Run configs (file.py:variant + overrides) resolve into the frozen model dataclasses."""

import dataclasses

import pytest

from fo_jax.config import TOY_SAVE_EVERY, load_config, model_config
from fo_jax.errors import ConfigError
from fo_jax.models.configs import LLMConfig


def test_freeze_omni_preset_has_the_released_dimensions():
    cfg = model_config(load_config("configs/freeze_omni.py:freeze_omni"))
    llm = cfg.llm
    assert (llm.hidden_size, llm.num_layers, llm.num_heads, llm.num_kv_heads, llm.head_dim) == (3584, 28, 28, 4, 128)
    assert (llm.vocab_size, llm.intermediate_size, llm.rope_theta) == (152064, 18944, 1e6)
    assert (cfg.encoder.hidden_size, cfg.encoder.num_layers, cfg.encoder.num_heads) == (1024, 24, 16)
    assert (cfg.adapter.output_dim, cfg.adapter.prompt_num) == (3584, 25)
    assert (cfg.decoder.hidden_size, cfg.decoder.num_layers, cfg.decoder.num_heads) == (896, 4, 14)
    assert cfg.codec.samples_per_token == 600 and cfg.codec.sample_rate == 24000
    assert 151645 in llm.eos_token_ids


def test_tiny_preset_and_overrides():
    cfg = model_config(load_config("configs/freeze_omni.py:tiny", ["model.llm.num_layers=3",
                                                                   "model.llm.dtype=bfloat16"]))
    assert cfg.llm.num_layers == 3 and cfg.llm.dtype == "bfloat16" and cfg.llm.hidden_size == 64
    hash(cfg)  # hashable: usable as a static jit argument
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.llm.num_layers = 4


@pytest.mark.parametrize("preset, encoder", [("toy", (128, 4, 512)), ("toy_quick", (64, 2, 128))])
def test_toy_speech_in_stages_chain_one_encoder(preset, encoder):
    # Stage 2 starts from stage 1's encoder and stage 3 from stage 2's: one shape across the chain.
    shapes = set()
    for stage in (1, 2, 3):
        cfg = model_config(load_config(f"configs/speech_in_stage{stage}.py:{preset}"))
        shapes.add((cfg.encoder.hidden_size, cfg.encoder.num_layers, cfg.encoder.ffn_size))
        if stage > 1:
            assert cfg.adapter.input_dim == cfg.encoder.hidden_size
    assert shapes == {encoder}


@pytest.mark.parametrize("preset, width", [("toy", 128), ("toy_quick", 64)])
def test_toy_stages_agree_on_the_llm_width(preset, width):
    # The text LLM a toy run trains is what every later stage reads: the adapter writes its
    # embeddings, the decoder reads each of its vectors as one frame of its own width.
    assert model_config(load_config(f"configs/text_llm.py:{preset}")).llm.hidden_size == width
    for stage in (2, 3):
        cfg = model_config(load_config(f"configs/speech_in_stage{stage}.py:{preset}"))
        assert cfg.llm.hidden_size == cfg.adapter.output_dim == width
        dec = model_config(load_config(f"configs/speech_out_stage{stage}.py:{preset}")).decoder
        assert dec.llm_hidden_size == width and dec.frames_per_vector == 1


@pytest.mark.parametrize("preset", ["toy", "toy_quick"])
def test_toy_stages_checkpoint_sparsely(preset):
    """Toy stages save every TOY_SAVE_EVERY steps (a save costs ~1.7 s on 2 cores); tiny keeps 100."""
    for name in ("text_llm", "speech_in_stage1", "speech_in_stage2", "speech_in_stage3", "speech_out_stage2",
                 "speech_out_stage3"):
        cfg = load_config(f"configs/{name}.py:{preset}")
        assert cfg.stage.save_every == TOY_SAVE_EVERY, name
        assert load_config(f"configs/{name}.py:tiny").stage.save_every == 100, name


@pytest.mark.parametrize("spec, overrides, match", [
    ("configs/nope.py:tiny", [], "config file not found"),
    ("configs/freeze_omni.py:huge", [], "unknown variant 'huge'"),
    ("configs/freeze_omni.py:tiny", ["model.llm.nope=1"], "no field 'nope'"),
    ("configs/freeze_omni.py:tiny", ["model.llm.num_layers"], "not key=value"),
])
def test_config_errors_are_one_line(spec, overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(spec, overrides)


def test_llm_config_validation():
    with pytest.raises(ConfigError, match="num_heads"):
        LLMConfig(num_heads=5, num_kv_heads=2)
    with pytest.raises(ConfigError, match="unknown field"):
        LLMConfig.from_dict({"hidden": 3})
    with pytest.raises(ConfigError, match="rope type 'yarn'"):
        LLMConfig.from_hf({"model_type": "qwen2", "rope_scaling": {"type": "yarn"}})


def test_hf_config_round_trip():
    cfg = LLMConfig(vocab_size=1000, hidden_size=64, intermediate_size=96, num_layers=3, num_heads=4,
                    num_kv_heads=1, head_dim=16, tie_word_embeddings=True, eos_token_ids=(7,))
    assert LLMConfig.from_hf(cfg.to_hf()) == cfg
    legacy = cfg.to_hf() | {"rope_theta": 5e5}
    del legacy["rope_parameters"]
    assert LLMConfig.from_hf(legacy).rope_theta == 5e5
