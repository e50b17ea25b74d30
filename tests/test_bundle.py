"""Model bundles: native round trip, official layout conversion + cache, one-line errors."""

import dataclasses
import json
import os
import sys

import jax
import numpy as np
import pytest

from fo_jax.conversion.safetensors_io import read_safetensors, write_safetensors
from fo_jax.errors import LoadError
from fo_jax.inference import bundle as B
from fo_jax.inference import text_segmentation as ts
from fo_jax.inference.speech_decoder import TokenSampling
from fo_jax.inference.vocoder_stream import VocoderStreamConfig
from tests import bundle_utils as bu


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    return bu.write_native_bundle(tmp_path_factory.mktemp("native") / "bundle")


def _assert_same_params(a, b):
    flat = lambda t: {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(t)}  # noqa: E731
    fa, fb = flat(a), flat(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        np.testing.assert_allclose(fa[k], fb[k], rtol=1e-6, atol=1e-7, err_msg=k)


def test_native_bundle_round_trip(native, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # neither writing nor reading needs torch
    bu.write_native_bundle(tmp_path / "again")
    B.load_bundle(tmp_path / "again")
    b = B.load_bundle(native)
    assert b.layout == "native" and not b.converted and b.llm_path == native / "llm"
    cfg = bu.tiny_config()
    assert b.config == cfg and b.server == B.ServerSettings() and b.chat_template == bu.CHAT_TEMPLATE
    expected = bu.converted_params()
    expected = dict(expected, codec={k: expected["codec"][k] for k in ("generator", "quantizer")})
    _assert_same_params(b.params, expected)
    # Not a torch file anywhere: the layout is safetensors + JSON + the HF LLM directory.
    assert sorted(p.name for p in native.iterdir()) == ["fo_jax_model.json", "llm", "params.safetensors"]


def test_server_settings_are_the_release_streaming_defaults():
    s = B.ServerSettings()
    assert s.vocoder(bu.tiny_config().codec) == VocoderStreamConfig()
    assert s.decoder_sampling() == TokenSampling(top_k=2, penalty_window=-1, penalty=1.1)
    assert s.decoder_sampling(top_k=1).top_k == 1
    assert B.ServerSettings.from_dict({"decoder_chunk_size": 30, "decoder_penalty": 1}).decoder_penalty == 1.0
    with pytest.raises(LoadError, match=r"server.json: unknown key 'decoder_chunk'"):
        B.ServerSettings.from_dict({"decoder_chunk": 30})
    with pytest.raises(LoadError, match=r"server.json: decoder_chunk_size must be an integer, got 2.5"):
        B.ServerSettings.from_dict({"decoder_chunk_size": 2.5})
    # Our one extension: the release's file lacks it and splits at clause ends, as its server does.
    assert s.segmentation() == ts.SERVER_POLICY
    whole = B.ServerSettings.from_dict({"text_clause_splits": 0}).segmentation()
    assert whole.clause_states is None and not whole.clauses_in_first_segment
    assert whole.min_states == ts.SERVER_POLICY.min_states
    with pytest.raises(LoadError, match=r"server.json: text_clause_splits must be 0 or 1, got 2"):
        B.ServerSettings.from_dict({"text_clause_splits": 2})


@pytest.mark.parametrize("damage,match", [
    ("no_llm", r"bundle: this bundle has no llm/ directory; give the HF Qwen2 directory"),
    ("format", r"fo_jax_model.json: not a fo_jax bundle"),
    ("server", r"\(server\): unknown key 'port'"),
    ("shape", r"params.safetensors: tensor 'decoder/norm/scale' has shape \(3,\), the config implies \(32,\)"),
    ("missing", r"params.safetensors: missing tensor 'codec/generator/conv_post/kernel'"),
    ("width", r"the speech decoder expects 32-d LLM states, the LLM is 64 wide"),
])
def test_native_bundle_errors_are_one_line(native, tmp_path, damage, match):
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(native, bundle)
    meta = json.loads((bundle / B.BUNDLE_FILE).read_text())
    tensors = dict(read_safetensors(bundle / B.PARAMS_FILE))
    if damage == "no_llm":
        shutil.rmtree(bundle / "llm")
    elif damage == "format":
        meta["format"] = "something"
    elif damage == "server":
        meta["server"]["port"] = 8080
    elif damage == "shape":
        tensors["decoder/norm/scale"] = np.ones(3, np.float32)
    elif damage == "missing":
        del tensors["codec/generator/conv_post/kernel"]
    elif damage == "width":
        meta["model"]["decoder"]["llm_hidden_size"] = 32
    (bundle / B.BUNDLE_FILE).write_text(json.dumps(meta))
    write_safetensors(bundle / B.PARAMS_FILE, {k: np.array(v) for k, v in tensors.items()})
    with pytest.raises(LoadError, match=match) as e:
        B.load_bundle(bundle)
    assert "\n" not in str(e.value)
    with pytest.raises(LoadError, match="neither a fo_jax bundle"):
        B.load_bundle(tmp_path)


def test_official_layout_without_torch_names_the_extra(tmp_path, monkeypatch):
    model, llm = bu.write_official_bundle(tmp_path, torch_files=False)
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    with pytest.raises(LoadError, match=r"final.pt: reading .pt checkpoints needs PyTorch \(the 'torch' extra\)"):
        B.load_bundle(model, llm, cache_dir=tmp_path / "cache")
    with pytest.raises(LoadError, match=r"checkpoints: the official layout; give the HF Qwen2 directory"):
        B.load_bundle(model)
    (model / "codec/model.json").unlink()
    with pytest.raises(LoadError, match=r"checkpoints: missing codec/model.json \(official layout: "):
        B.load_bundle(model, llm)


@pytest.mark.torch
def test_official_bundle_converts_once_then_loads_from_the_cache(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    model, llm = bu.write_official_bundle(tmp_path)
    reads = []
    real = B.load_official_pt
    monkeypatch.setattr(B, "load_official_pt", lambda path: reads.append(path) or real(path))
    cache = tmp_path / "cache"
    first = B.load_bundle(model, llm, cache_dir=cache)
    assert first.converted and first.layout == "official" and len(reads) == 1
    assert first.config == bu.tiny_config() and first.chat_template == bu.CHAT_TEMPLATE
    expected = bu.converted_params()
    expected = dict(expected, codec={k: expected["codec"][k] for k in ("generator", "quantizer")})
    _assert_same_params(first.params, expected)  # the same tensors as the native bundle

    torch = sys.modules["torch"]
    monkeypatch.setitem(sys.modules, "torch", None)  # the cached start needs no torch ...
    again = B.load_bundle(model, llm, cache_dir=cache)
    assert not again.converted and len(reads) == 1  # ... and does no conversion work
    _assert_same_params(again.params, first.params)

    monkeypatch.setitem(sys.modules, "torch", torch)
    pt = model / "decoder/final.pt"  # a changed source converts again
    os.utime(pt, ns=(pt.stat().st_atime_ns, pt.stat().st_mtime_ns + 10**9))
    third = B.load_bundle(model, llm, cache_dir=cache)
    assert third.converted and len(reads) == 2
    assert B.load_bundle(model, llm, cache_dir=cache, use_cache=False).converted and len(reads) == 3


def test_native_bundle_with_the_toy_mel_codec_round_trips(tmp_path):
    from fo_jax.models.mel_codec import MelVQConfig

    mel = MelVQConfig(n_codes=1024)
    cfg = dataclasses.replace(bu.tiny_config(), codec=mel)
    params = bu.converted_params()
    codebook = np.random.default_rng(0).normal(size=(mel.n_codes, mel.frames_per_token * mel.n_mels)).astype(np.float32)
    B.save_bundle(tmp_path / "b", cfg, dict(params, codec={"codebook": codebook}), tokenizer=bu.tokenizer())
    meta = json.loads((tmp_path / "b" / "fo_jax_model.json").read_text())
    assert meta["model"]["codec"]["kind"] == "mel_vq"
    b = B.load_bundle(tmp_path / "b")
    assert b.config.codec == mel and b.config == cfg
    np.testing.assert_array_equal(b.params["codec"]["codebook"], codebook)
    with pytest.raises(LoadError, match="codec/codebook.*shape"):  # checked like any tensor
        B.save_bundle(tmp_path / "bad", cfg, dict(params, codec={"codebook": codebook[:, :10]}))
