"""TiCodec: official-format conversion, shapes, encode/decode on speech, weight-norm folding, chunk jit.

Weights come from random official-format state dicts (``random_official_state``) converted with
``fo_jax.conversion.official_codec``: no init compile, and every test goes through the mapping.
Official key names/shapes: tests/fixtures/codec_official_keys.json (listed from the official
modules; tests/test_codec_parity.py regenerates and compares it when /work/official exists).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fo_jax.config import load_config, model_config
from fo_jax.conversion import official_codec as oc
from fo_jax.errors import ConfigError, FoJaxError, LoadError
from fo_jax.models import codec as C
from fo_jax.models.configs import CodecConfig

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "codec_official_keys.json").read_text())
TINY = model_config(load_config("configs/freeze_omni.py:tiny")).codec
REAL = model_config(load_config("configs/freeze_omni.py:freeze_omni")).codec


def random_official_state(shapes: dict[str, tuple[int, ...]], seed: int = 0,
                          zeros: bool = False) -> dict[str, dict[str, np.ndarray]]:
    """{section: {key: array}} with O(1) activations: weight-norm g ~ U(0.5, 1.5) (= the per-channel
    norm of the effective kernel), plain kernels ~ N(0, 1/fan_in), biases/norm shifts ~ N(0, 0.1).
    ``zeros``: all zeros (cheap, for shape-only checks)."""
    rng = np.random.default_rng(seed)
    state: dict[str, dict[str, np.ndarray]] = {}
    for full, shape in shapes.items():
        section, key = full.split(".", 1)
        if zeros:
            a = np.zeros(shape, np.float32)
        elif key.endswith("weight_g"):
            a = rng.uniform(0.5, 1.5, shape)
        elif key.endswith("running_var"):
            a = rng.uniform(0.5, 1.5, shape)
        elif "normalize" in key or "fn.2" in key:  # GroupNorm / BatchNorm affine and mean
            a = (1.0 if key.endswith(".weight") else 0.0) + 0.1 * rng.standard_normal(shape)
        elif key.endswith("bias"):
            a = 0.1 * rng.standard_normal(shape)
        elif "embedding" in key:
            a = rng.standard_normal(shape)
        elif key.endswith("num_batches_tracked"):
            a = np.array(7)
        else:  # weight_v, plain conv / linear weights: N(0, 1/fan_in)
            a = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
        state.setdefault(section, {})[key] = np.asarray(a, np.float32 if a.dtype.kind == "f" else a.dtype)
    return state


def _variables(cfg: CodecConfig, seed: int = 0, fold: bool = True) -> dict:
    state = random_official_state(oc.official_shapes(cfg), seed)
    return jax.tree_util.tree_map(jnp.asarray, oc.convert_state_dicts(cfg, state, fold=fold))


@pytest.fixture(scope="module")
def tiny_vars():
    return _variables(TINY)


def _shapes(tree) -> dict:
    return {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


# ---------------------------------------------------------------- conversion


@pytest.mark.parametrize("name", ["real", "reduced"])
def test_official_key_listing_matches_the_fixture(name):
    entry = FIXTURE[name]
    cfg = oc.config_from_official(entry["model_json"])
    ours = oc.official_shapes(cfg)
    ignored = {k for k in entry["keys"] if k in oc.IGNORED_KEYS or k.endswith(oc.IGNORED_SUFFIXES)}
    assert ignored == {"encoder.linear.0.weight", "encoder.linear.0.bias",
                       "encoder.GlobalTokenEncoder.fn.2.num_batches_tracked"}
    assert {k: list(s) for k, s in ours.items()} == {k: s for k, s in entry["keys"].items() if k not in ignored}


def test_release_model_json_parses_to_the_preset():
    assert oc.config_from_official(FIXTURE["real"]["model_json"]) == REAL  # every field
    assert REAL.samples_per_token == 600 and REAL.global_dim == 128
    assert REAL.generator_channels == (256, 128, 64, 32) and REAL.encoder_channels == (64, 128, 256, 512)
    assert np.asarray(C.inference_global_tokens(REAL)).tolist() == [[473, 975, 419, 219, 565, 121, 550, 616]]


@pytest.mark.parametrize("cfg_name", ["tiny", "real"])
def test_random_official_state_dict_converts_onto_the_module_tree(cfg_name):
    cfg = {"tiny": TINY, "real": REAL}[cfg_name]
    shapes = dict(oc.official_shapes(cfg))
    if cfg_name == "real":  # the official listing, ignored keys included
        shapes = {k: tuple(s) for k, s in FIXTURE["real"]["keys"].items()}
    state = random_official_state(shapes, zeros=cfg_name == "real")
    v = np.random.default_rng(0).standard_normal(shapes["generator.ups.1.weight_v"]).astype(np.float32)
    state["generator"]["ups.1.weight_v"] = v
    converted = oc.convert_state_dicts(cfg, state, fold=False)
    wav = jnp.zeros((1, 2 * cfg.samples_per_token))
    expected = nn.unbox(jax.eval_shape(C.Codec(cfg).init, jax.random.PRNGKey(0), wav))
    assert _shapes(converted["params"]) == _shapes(expected["params"])
    assert _shapes(converted["batch_stats"]) == _shapes(expected["batch_stats"])
    # one value checked through its layout: torch ConvTranspose1d (Cin, Cout, K) -> (K, Cin, Cout)
    np.testing.assert_array_equal(converted["params"]["generator"]["ups_1"]["weight_v"], v.transpose(2, 0, 1))
    assert set(C.fold_weight_norm(converted["params"]["generator"]["ups_1"])) == {"kernel", "bias"}


def _tiny_state():
    return random_official_state(oc.official_shapes(TINY))


@pytest.mark.parametrize("edit, match", [
    (lambda s: s["generator"].__setitem__("ups.2.weight_v", np.zeros((3, 4, 5), np.float32)),
     r"'generator\.ups\.2\.weight_v' has shape \(3, 4, 5\), model\.json implies \(16, 8, 11\)"),
    (lambda s: s["encoder"].pop("resblocks.4.convs2.1.bias"), r"missing key 'encoder\.resblocks\.4\.convs2\.1\.bias'"),
    (lambda s: s["quantizer"].__setitem__("quantizer_modules2.0.embedding.weight", np.zeros(1)),
     r"unexpected key 'quantizer\.quantizer_modules2\.0\.embedding\.weight'"),
    (lambda s: s.pop("generator"), r"missing section 'generator'"),
])
def test_conversion_errors_name_the_key(edit, match):
    state = _tiny_state()
    edit(state)
    with pytest.raises(LoadError, match=match) as e:
        oc.convert_state_dicts(TINY, state, source="final.pt")
    assert str(e.value).startswith("final.pt: ") and "\n" not in str(e.value)


def test_encoderless_state_and_new_style_weight_norm_names():
    state = _tiny_state()
    del state["encoder"]
    g = state["generator"]
    g["conv_pre.parametrizations.weight.original0"] = g.pop("conv_pre.weight_g")
    g["conv_pre.parametrizations.weight.original1"] = g.pop("conv_pre.weight_v")
    v = oc.convert_state_dicts(TINY, state)
    assert set(v["params"]) == {"generator", "quantizer"} and v["batch_stats"] == {}
    assert v["params"]["generator"]["conv_pre"]["kernel"].shape == (7, 128, 64)


@pytest.mark.parametrize("change, match", [
    ({"resblock": "2"}, "resblock='2' is not supported"),
    ({"n_code_groups": 2}, "n_code_groups=2 is not supported"),
    ({"residul_layer": 2}, "residul_layer=2 is not supported"),
    ({"resblock_dilation_sizes": [[1, 3, 5], [1, 2, 3], [1, 3, 5]]}, "must repeat one dilation list"),
    ({"global_feature_conv": [64, 64, 128, 3, 1]}, "global_feature_conv in width 64"),
    ({"upsample_kernel_sizes": [16, 10, 11, 5]}, "upsample kernel 10 with rate 5"),
    ({"hop": 1}, "unknown key 'hop'"),
])
def test_bad_model_json_is_one_line_config_error(change, match):
    with pytest.raises(ConfigError, match=match):
        oc.config_from_official(dict(FIXTURE["real"]["model_json"], **change), "model.json")


def test_load_official_codec_directory(tmp_path):
    torch = pytest.importorskip("torch")
    model_json = FIXTURE["reduced"]["model_json"]
    cfg = oc.config_from_official(model_json)
    state = random_official_state({k: s for k, s in oc.official_shapes(cfg).items() if not k.startswith("encoder")})
    ckpt = {sec: {k: torch.from_numpy(a) for k, a in sd.items()} for sec, sd in state.items()}
    (tmp_path / "model.json").write_text(json.dumps(model_json))
    torch.save(dict(ckpt, steps=123), tmp_path / "final.pt")
    cfg2, v = oc.load_official_codec(tmp_path)
    assert cfg2 == cfg
    g, vv = state["generator"]["conv_post.weight_g"], state["generator"]["conv_post.weight_v"]
    kernel = (g * vv / np.sqrt((vv ** 2).sum(axis=(1, 2), keepdims=True))).transpose(2, 1, 0)
    np.testing.assert_allclose(v["params"]["generator"]["conv_post"]["kernel"], kernel, rtol=1e-6)
    (tmp_path / "final.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(LoadError, match="final.pt: not a readable torch checkpoint"):
        oc.load_official_codec(tmp_path)
    with pytest.raises(LoadError, match="model.json: not found"):
        oc.load_official_codec(tmp_path / "..")


# ---------------------------------------------------------------- model


def test_generator_output_is_600_samples_per_token(tiny_vars):
    num_tokens = 30  # (the speech and trim tests below decode 40 and 60 tokens too)
    tokens = jnp.asarray(np.random.default_rng(num_tokens).integers(0, 1024, (1, num_tokens)), jnp.int32)
    wav = C.decode_chunk(tiny_vars["params"], tokens, C.inference_global_tokens(TINY), config=TINY)
    assert wav.shape == (1, 600 * num_tokens) and wav.dtype == jnp.float32
    assert bool(jnp.all(jnp.abs(wav) < 1.0)) and float(jnp.std(wav)) > 1e-3  # tanh output, not silent


def test_encode_quantize_decode_one_second_of_speech(tiny_vars):
    from fo_jax.testing.speech import synthesize

    speech = synthesize("one two three four", engine="espeak", sample_rate=24000)[:24000]
    speech = np.pad(speech, (0, 24000 - len(speech)))
    tokens, global_tokens = C.encode(TINY, tiny_vars, speech)
    assert tokens.shape == (1, 40) and global_tokens.shape == (1, 8)
    assert tokens.dtype == jnp.int32 and 0 <= int(tokens.min()) and int(tokens.max()) < 1024
    assert 0 <= int(global_tokens.min()) and int(global_tokens.max()) < 1024
    assert len(np.unique(np.asarray(tokens))) > 1  # speech and silence get different codes
    wav = C.decode(TINY, tiny_vars["params"], tokens, global_tokens)
    assert wav.shape == (1, 24000) and bool(jnp.all(jnp.isfinite(wav))) and float(jnp.max(jnp.abs(wav))) < 1.0
    assert float(jnp.std(wav)) > 1e-3


def test_global_token_encoder_batch_norm_train_and_eval():
    enc = C.GlobalTokenEncoder(hidden=8, features=16)
    x = jnp.asarray(1e3 * np.random.default_rng(0).standard_normal((3, 20, 32)), jnp.float32)
    v = nn.unbox(jax.jit(enc.init)(jax.random.PRNGKey(0), x))
    # eval with the fresh running stats (mean 0, var 1) gives the pre-BatchNorm activations
    h = np.asarray(jax.jit(lambda v, x: enc.apply(v, x))(v, x), np.float64) * np.sqrt(1 + 1e-5)
    y, updated = jax.jit(lambda v, x: enc.apply(v, x, True, mutable=["batch_stats"]))(v, x)
    # training: normalised with the batch statistics; running stats move 10% towards them
    np.testing.assert_allclose(y, (h - h.mean(0)) / np.sqrt(h.var(0) + 1e-5), atol=1e-4)
    np.testing.assert_allclose(updated["batch_stats"]["fn_2"]["mean"], 0.1 * h.mean(0), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(updated["batch_stats"]["fn_2"]["var"], 0.9 + 0.1 * h.var(0), rtol=1e-4)


def test_weight_norm_folding_leaves_outputs_unchanged():
    # fewest convs (the unfolded compile is slow); every conv kind is still there
    cfg = dataclasses.replace(TINY, resblock_kernel_sizes=(3,), resblock_dilations=(1, 2))
    raw, folded = _variables(cfg, fold=False), _variables(cfg, fold=True)
    assert "weight_g" in raw["params"]["generator"]["ups_0"] and "kernel" in folded["params"]["generator"]["ups_0"]
    np.testing.assert_allclose(C.fold_weight_norm(raw["params"])["generator"]["ups_0"]["kernel"],
                               folded["params"]["generator"]["ups_0"]["kernel"], rtol=1e-6)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 1024, (1, 3)), jnp.int32)
    g = C.inference_global_tokens(cfg)
    a = C.decode_chunk(raw["params"], tokens, g, config=cfg)
    b = C.decode_chunk(folded["params"], tokens, g, config=cfg)
    assert float(jnp.std(a)) > 1e-2
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_trimmed_chunk_equals_the_sliced_full_window_with_less_compute(tiny_vars):
    params, g = tiny_vars["params"], C.inference_global_tokens(TINY)
    rng = np.random.default_rng(2)
    assert C.crop_margins(REAL) == (10, 2, 1, 1)  # tokens of context each upsampling stage keeps
    for n, (left, right) in ((60, (10, 10)), (30, (0, 10))):  # later windows, first window
        tokens = jnp.asarray(rng.integers(0, 1024, (1, n)), jnp.int32)
        full = C.decode_chunk(params, tokens, g, config=TINY)
        part = C.decode_chunk(params, tokens, g, config=TINY, trim=(left, right))
        np.testing.assert_allclose(part, full[:, left * 600:(n - right) * 600], atol=1e-5)
        flops = [C.decode_chunk.lower(params, tokens, g, config=TINY, trim=t).cost_analysis()["flops"]
                 for t in ((0, 0), (left, right))]
        assert flops[1] < 0.85 * flops[0]
    with pytest.raises(FoJaxError, match=r"trim \(20, 10\) leaves no samples of a 30-token window"):
        C.decode_chunk(params, tokens, g, config=TINY, trim=(20, 10))


def test_chunk_function_compiles_once_per_window_size(tiny_vars):
    params, g = tiny_vars["params"], C.inference_global_tokens(TINY)
    rng = np.random.default_rng(0)
    window = lambda n: jnp.asarray(rng.integers(0, 1024, (1, n)), jnp.int32)
    # warm-up: the first window (20 + 10 lookahead) and the later ones (10 + 40 + 10)
    C.decode_chunk(params, window(30), g, config=TINY, trim=(0, 10)).block_until_ready()
    C.decode_chunk(params, window(60), g, config=TINY, trim=(10, 10)).block_until_ready()
    size = C.decode_chunk._cache_size()
    outs = [C.decode_chunk(params, window(60), g, config=TINY, trim=(10, 10)) for _ in range(8)]
    assert C.decode_chunk._cache_size() == size
    assert all(o.shape == (1, 24000) for o in outs) and not np.allclose(outs[0], outs[1])


def test_bad_codec_inputs_are_one_line_errors(tiny_vars):
    with pytest.raises(FoJaxError, match=r"tokens must lie in \[0, 1024\), got \[3, 1024\]"):
        C.decode(TINY, tiny_vars["params"], [3, 1024])
    with pytest.raises(FoJaxError, match=r"global tokens shape \(1, 7\)"):
        C.decode(TINY, tiny_vars["params"], [3, 4], np.zeros((1, 7), int))
    with pytest.raises(FoJaxError, match="100 samples is shorter than one token"):
        C.encode(TINY, tiny_vars, np.zeros(100, np.float32))
    with pytest.raises(FoJaxError, match="expected a"):
        C.encode(TINY, tiny_vars, np.zeros((1, 2, 3000), np.float32))
