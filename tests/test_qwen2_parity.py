"""Parity of our Qwen2 with transformers' PyTorch Qwen2ForCausalLM, through our HF loader."""

import json
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from fo_jax.conversion.hf_qwen2 import load_hf_qwen2, save_hf_qwen2
from fo_jax.inference.llm import generate
from fo_jax.models.qwen2 import Qwen2
from tests.conftest import make_hf_qwen2

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch


def _padded_batch(vocab):
    rng = np.random.default_rng(0)
    lengths = np.array([11, 7, 3])
    tokens = rng.integers(0, vocab, (3, 11)).astype(np.int32)
    for row, n in enumerate(lengths):
        tokens[row, n:] = 0  # right padding
    return tokens, lengths


def _torch_logits(model, tokens, lengths):
    mask = (np.arange(tokens.shape[1])[None] < lengths[:, None]).astype(np.int64)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask))
    return out.logits.float().numpy()


def _max_valid_diff(a, b, lengths):
    return max(np.abs(a[i, :n] - b[i, :n]).max() for i, n in enumerate(lengths))


def test_logits_match_transformers_on_padded_batch(hf_qwen2_dir):
    path, model = hf_qwen2_dir
    cfg, params = load_hf_qwen2(path)
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.qkv_bias) == (2, 4, 2, True)
    tokens, lengths = _padded_batch(cfg.vocab_size)
    ours = np.asarray(Qwen2(cfg).apply({"params": params}, jnp.asarray(tokens), jnp.asarray(lengths),
                                       method=Qwen2.forward))
    ref = _torch_logits(model, tokens, lengths)
    assert ours.shape == ref.shape == (3, 11, cfg.vocab_size)
    assert _max_valid_diff(ours, ref, lengths) <= 1e-4


def test_tied_embeddings_and_sharded_checkpoint(tmp_path):
    """A tied-head model, re-saved by us as a sharded checkpoint, still matches transformers."""
    model = make_hf_qwen2(tmp_path / "hf", seed=1, tie_word_embeddings=True, vocab_size=1000)
    cfg, params = load_hf_qwen2(tmp_path / "hf")
    assert cfg.tie_word_embeddings and "lm_head" not in params
    save_hf_qwen2(tmp_path / "ours", cfg, params, max_shard_bytes=100_000)
    assert (tmp_path / "ours" / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "ours").glob("model-*-of-*.safetensors"))) > 1
    cfg2, params2 = load_hf_qwen2(tmp_path / "ours")
    assert cfg2 == cfg
    tokens, lengths = _padded_batch(cfg.vocab_size)
    ours = np.asarray(Qwen2(cfg2).apply({"params": params2}, jnp.asarray(tokens), jnp.asarray(lengths),
                                        method=Qwen2.forward))
    assert _max_valid_diff(ours, _torch_logits(model, tokens, lengths), lengths) <= 1e-4


def test_our_export_loads_in_transformers(tmp_path, hf_qwen2_dir):
    from transformers import Qwen2ForCausalLM

    path, model = hf_qwen2_dir
    cfg, params = load_hf_qwen2(path)
    save_hf_qwen2(tmp_path, cfg, params)
    reloaded = Qwen2ForCausalLM.from_pretrained(tmp_path).eval()
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_bfloat16_load_is_close(hf_qwen2_dir):
    path, model = hf_qwen2_dir
    cfg, params = load_hf_qwen2(path, dtype="bfloat16")
    assert params["embed_tokens"]["embedding"].dtype == jnp.bfloat16
    tokens, lengths = _padded_batch(cfg.vocab_size)
    ours = np.asarray(Qwen2(cfg).apply({"params": params}, jnp.asarray(tokens), jnp.asarray(lengths),
                                       method=Qwen2.forward))
    ref = _torch_logits(model, tokens, lengths)
    assert _max_valid_diff(ours, ref, lengths) < 0.05 * np.abs(ref).max() + 1e-2


def _hf_greedy(model, prompt, n):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


def test_greedy_generation_matches_transformers(hf_qwen2_dir):
    path, model = hf_qwen2_dir
    cfg, params = load_hf_qwen2(path)
    prompts = [[151644, 872, 198, 3838, 374, 1378, 5519, 2326, 30], [9707, 11, 1879]]
    ours = generate(params, cfg, prompts, 32)
    for prompt, got in zip(prompts, ours):
        assert len(got) == 32
        assert got == _hf_greedy(model, prompt, 32)


def _fo_jax_command():
    exe = Path(sys.executable).with_name("fo-jax")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "fo_jax.cli.main"]


def test_cli_generate_json_matches_transformers(hf_qwen2_dir):
    path, model = hf_qwen2_dir
    result = subprocess.run(
        _fo_jax_command() + ["generate", "--llm_path", str(path), "--prompt", "What is two plus three?",
                             "--chat", "--top_k", "1", "--max_new_tokens", "32", "--json"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    # The chat prompt: default system turn, user turn, open assistant turn, in official ids.
    assert out["prompt_ids"][:3] == [151644, 8948, 198]
    assert out["prompt_ids"][-3:] == [151644, 77091, 198]
    assert 151645 in out["prompt_ids"]
    assert out["token_ids"] == _hf_greedy(model, out["prompt_ids"], 32)
    assert isinstance(out["text"], str)
