"""Shared tiny model for the audio-LLM / session tests (no tests here)."""

import functools

import flax.linen as nn
import jax

from fo_jax.models.audio_llm import ChatTemplate, init_params
from fo_jax.models.configs import AdapterConfig, EncoderConfig, ModelConfig
from tests.conftest import TINY_LLM

# Tiny encoder (2 layers, 4-frame chunks, 4 left chunks) -> subsampling adapter -> tiny Qwen2.
TINY = ModelConfig(
    llm=TINY_LLM,
    encoder=EncoderConfig(hidden_size=32, num_layers=2, num_heads=2, ffn_size=64, chunk_size=4, left_chunks=4,
                          ctc_vocab_size=16),
    adapter=AdapterConfig(input_dim=32, output_dim=TINY_LLM.hidden_size, prompt_num=4, task_num=6))

# The released template's structure with tiny-vocabulary ids: <|im_start|>=1, <|im_end|>=2, "\n"=13.
TEMPLATE = ChatTemplate(system_ids=(1, 20, 13, 21, 22, 23), listen_ids=(2, 13, 1, 24, 13),
                        speak_ids=(2, 13, 1, 25, 13), end_id=2)


@functools.lru_cache(maxsize=None)
def _params():
    return jax.jit(lambda key: nn.unbox(init_params(TINY, key)))(jax.random.key(0))


def tiny_params() -> dict:
    """Random AudioLLM params of ``TINY`` (a fresh dict: callers may edit it)."""
    return jax.tree.map(lambda x: x, _params())
