"""A random tiny Qwen2 written as a HF directory with a small BPE tokenizer (tests, benchmarks, smoke runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import flax.linen as nn
import jax

from fo_jax.conversion.hf_qwen2 import save_hf_qwen2
from fo_jax.models.configs import LLMConfig
from fo_jax.models.qwen2 import init_params
from fo_jax.text.tokenizer import train_bpe_tokenizer

TINY_LLM = LLMConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=16, max_position_embeddings=512, eos_token_ids=(2,))


def write_random_llm_dir(path: str | Path, texts: Sequence[str], seed: int = 0,
                         config: LLMConfig = TINY_LLM) -> Path:
    """Saves a random ``config`` Qwen2 the HF way to ``path`` with a BPE tokenizer trained on ``texts``
    (at most ``config.vocab_size`` ids); returns ``path``."""
    path = Path(path)
    tokenizer = train_bpe_tokenizer(list(texts), vocab_size=min(300, config.vocab_size))
    save_hf_qwen2(path, config, nn.unbox(init_params(config, jax.random.key(seed))))
    tokenizer.save_pretrained(path)
    return path
