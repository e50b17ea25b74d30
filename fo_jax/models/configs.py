"""Model configurations: frozen, hashable dataclasses that modules take.

Run configs (``configs/*.py``) are ``ml_collections.ConfigDict`` files; ``fo_jax.config`` resolves
them into these dataclasses, so modules never see a ConfigDict and configs can be static jit args.
Default values are those of the released Freeze-Omni model (``../shared/reference/freeze-omni.md``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

from fo_jax.errors import ConfigError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def to_dtype(name: str) -> jnp.dtype:
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def _from_mapping(cls, values: Mapping[str, Any]):
    """Builds dataclass ``cls`` from a mapping, rejecting unknown keys by name."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown field(s) {unknown}")
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return cls(**kw)


@dataclasses.dataclass(frozen=True)
class LLMConfig:
    """A Qwen2 decoder-only LLM. Defaults: Qwen2-7B-Instruct (the Freeze-Omni backbone)."""

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_layers: int = 28
    num_heads: int = 28
    num_kv_heads: int = 4
    head_dim: int = 128
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    qkv_bias: bool = True
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    # Token ids that end generation (Qwen2-Instruct: <|im_end|>, <|endoftext|>).
    eos_token_ids: tuple[int, ...] = (151645, 151643)
    dtype: str = "float32"  # activations / compute
    param_dtype: str = "float32"
    remat: bool = False  # rematerialise each block in the backward pass (training)

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                    f"LLMConfig: num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        to_dtype(self.dtype), to_dtype(self.param_dtype)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "LLMConfig":
        return _from_mapping(cls, values)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], **overrides: Any) -> "LLMConfig":
        """From a HF ``config.json`` dict of a Qwen2 model (transformers 4 or 5 layout)."""
        arch = hf.get("model_type")
        if arch != "qwen2":
            raise ConfigError(f"model_type is {arch!r}, expected 'qwen2' (architectures={hf.get('architectures')})")
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(f"rope type {rope_type!r} is not supported (only 'default' RoPE)")
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        if hf.get("use_sliding_window"):
            raise ConfigError("use_sliding_window=true is not supported")
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                                      "num_attention_heads") if k not in hf]
        if missing:
            raise ConfigError(f"missing key(s) {missing}")
        heads = hf["num_attention_heads"]
        eos = hf.get("eos_token_id", cls.eos_token_ids)
        eos = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        values = dict(
                vocab_size=hf["vocab_size"],
                hidden_size=hf["hidden_size"],
                intermediate_size=hf["intermediate_size"],
                num_layers=hf["num_hidden_layers"],
                num_heads=heads,
                num_kv_heads=hf.get("num_key_value_heads") or heads,
                head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
                rope_theta=float(theta),
                rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                max_position_embeddings=hf.get("max_position_embeddings", 32768),
                eos_token_ids=eos,
        )
        values.update(overrides)
        return cls(**values)

    def to_hf(self) -> dict[str, Any]:
        """The HF ``config.json`` dict of this model (inverse of ``from_hf``)."""
        return {
                "architectures": ["Qwen2ForCausalLM"],
                "model_type": "qwen2",
                "vocab_size": self.vocab_size,
                "hidden_size": self.hidden_size,
                "intermediate_size": self.intermediate_size,
                "num_hidden_layers": self.num_layers,
                "num_attention_heads": self.num_heads,
                "num_key_value_heads": self.num_kv_heads,
                "head_dim": self.head_dim,
                "hidden_act": "silu",
                "rms_norm_eps": self.rms_norm_eps,
                "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
                "tie_word_embeddings": self.tie_word_embeddings,
                "max_position_embeddings": self.max_position_embeddings,
                "eos_token_id": list(self.eos_token_ids),
                "use_sliding_window": False,
                "torch_dtype": self.param_dtype,
        }


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Chunked speech encoder (Conv2d x4 subsampling + transformer blocks with "rel-enc" bias)."""

    input_dim: int = 80  # fbank bins
    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    ffn_size: int = 4096
    chunk_size: int = 4  # encoder frames per streaming chunk
    left_chunks: int = 16
    dropout: float = 0.1
    layer_norm_eps: float = 1e-5
    ctc_vocab_size: int = 5538
    dtype: str = "float32"
    param_dtype: str = "float32"

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "EncoderConfig":
        return _from_mapping(cls, values)


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """Encoder -> LLM embedding adapter (causal Conv1d, stride 2)."""

    kind: str = "subsampling"  # subsampling | cnn | linear
    input_dim: int = 1024
    output_dim: int = 3584
    kernel_size: int = 5
    activation: str = "gelu"
    norm: str = "layer"
    prompt_num: int = 25  # learned prompt embeddings before each question
    num_states: int = 4  # state-head classes (the first 3 are used at inference)
    task_num: int = 20  # stage-2 special-token table

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "AdapterConfig":
        return _from_mapping(cls, values)


@dataclasses.dataclass(frozen=True)
class SpeechDecoderConfig:
    """NAR prefix / NAR pre-network / shared NAR-AR LLaMA decoder over codec tokens."""

    hidden_size: int = 896
    num_layers: int = 4  # shared NAR/AR stack; the pre-network has half, the prefix stack as many
    num_heads: int = 14
    num_kv_heads: int = 14
    intermediate_size: int = 4864
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    codec_vocab_size: int = 1024  # + 4 specials: context-start, sequence-start, end, pad
    attention_dropout: float = 0.1
    top_k: int = 2
    max_tokens: int = 1000
    dtype: str = "float32"
    param_dtype: str = "float32"

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "SpeechDecoderConfig":
        return _from_mapping(cls, values)


@dataclasses.dataclass(frozen=True)
class CodecConfig:
    """TiCodec, single codebook, 24 kHz, 40 tokens per second."""

    sample_rate: int = 24000
    upsample_rates: tuple[int, ...] = (8, 5, 5, 3)
    upsample_kernel_sizes: tuple[int, ...] = (16, 11, 11, 5)
    upsample_initial_channel: int = 512
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilations: tuple[int, ...] = (1, 3, 5)
    n_codes: int = 1024
    code_dim: int = 512
    global_codes: int = 8
    global_code_size: int = 1024
    global_code_dim: int = 16
    global_tokens: tuple[int, ...] = (473, 975, 419, 219, 565, 121, 550, 616)
    n_mels: int = 80
    n_fft: int = 1024
    hop_size: int = 240

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "CodecConfig":
        return _from_mapping(cls, values)

    @property
    def samples_per_token(self) -> int:
        n = 1
        for r in self.upsample_rates:
            n *= r
        return n


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The whole Freeze-Omni model: frozen LLM + speech in + speech out."""

    llm: LLMConfig = LLMConfig()
    encoder: EncoderConfig = EncoderConfig()
    adapter: AdapterConfig = AdapterConfig()
    decoder: SpeechDecoderConfig = SpeechDecoderConfig()
    codec: CodecConfig = CodecConfig()
