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


def dataclass_from_dict(cls, values: Mapping[str, Any]):
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
    # Training layout: one block scanned over stacked params (``qwen2.stack_layers``); no KV cache.
    scan_layers: bool = False

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                    f"LLMConfig: num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        to_dtype(self.dtype), to_dtype(self.param_dtype)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "LLMConfig":
        return dataclass_from_dict(cls, values)

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
    """Chunked speech encoder (Conv2d x4 subsampling + transformer blocks with "rel-enc" bias).

    Streaming: each call takes ``chunk_size * 4 + 3`` fbank frames (16 new + 3 overlap) and gives
    ``chunk_size`` encoder frames; each layer keeps ``chunk_size * left_chunks`` key/value frames.
    ``strict_positions=False`` reproduces the released ``infer`` positions (index advancing by
    ``chunk_size``, wrapping at ``chunk_size * (pe_max_len // chunk_size) - (left_chunks + 1) *
    chunk_size``, keys from ``max(0, index - (left_chunks + 1) * chunk_size)``: one chunk behind the
    true positions from the (left_chunks + 2)-th call on); True uses the true absolute positions.
    """

    input_dim: int = 80  # fbank bins
    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    ffn_size: int = 4096
    # Conv2d subsampling channels; 0 = hidden_size (the release). Narrower convs cut most of a
    # small encoder's compute (the toy world's CPU runs); not an option of the official code.
    subsampling_channels: int = 0
    chunk_size: int = 4  # encoder frames per streaming chunk; <= 0: full attention (forward only)
    left_chunks: int = 16  # < 0: unlimited left context (forward only)
    dynamic_chunks: bool = False  # training: random chunk size / left chunks per batch (WeNet style)
    dropout: float = 0.1  # input layer, residual and FFN dropout
    positional_dropout: float = 0.1  # on the x sqrt(d)-scaled input and on the sinusoid
    attention_dropout: float = 0.0
    layer_norm_eps: float = 1e-5
    pe_max_len: int = 5000  # official sinusoid table length (sets the streaming wrap point)
    strict_positions: bool = False  # streaming: True = true absolute key positions (not the release)
    use_cmvn: bool = True  # global CMVN (params global_cmvn/{mean,istd}) applied to the input fbank
    ctc_vocab_size: int = 5538
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False  # rematerialise each block in the backward pass (training)

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"EncoderConfig: hidden_size={self.hidden_size} is not a multiple of "
                              f"num_heads={self.num_heads}")
        to_dtype(self.dtype), to_dtype(self.param_dtype)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "EncoderConfig":
        return dataclass_from_dict(cls, values)

    @property
    def buffer_size(self) -> int:
        """Key/value frames each layer keeps between streaming calls."""
        return self.chunk_size * self.left_chunks

    @property
    def stream_input_frames(self) -> int:
        """fbank frames per streaming call: 4 per encoder frame + 3 of overlap (conv context)."""
        return 4 * self.chunk_size + 3


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """Encoder -> LLM embedding adapter (official ``adpter_type``).

    kind: ``subsampling`` (released; causal Conv1d stride 2, one conv when 4 * input_dim >=
    output_dim, else two convs with BatchNorm/ReLU), ``cnn`` (two causal stride-1 convs with
    BatchNorm/ReLU, no subsampling) or ``linear`` (one Linear).
    """

    kind: str = "subsampling"  # subsampling | cnn | linear
    input_dim: int = 1024
    output_dim: int = 3584
    kernel_size: int = 5
    activation: str = "gelu"  # gelu | relu (single-conv subsampling only)
    norm: str = "layer"  # layer | batch (single-conv subsampling only; others always batch)
    norm_eps: float = 1e-3
    # The heads below (prompt / task embeddings, state head) are initialised in this param_dtype
    # (they train: float32 master weights) and compute in the LLM's dtype.
    prompt_num: int = 25  # learned prompt embeddings before each question
    num_states: int = 4  # state-head classes (the first 3 are used at inference)
    task_num: int = 20  # stage-2 special-token table
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        if self.kind not in ("subsampling", "cnn", "linear"):
            raise ConfigError(f"AdapterConfig: kind={self.kind!r}; expected subsampling, cnn or linear")
        if self.norm not in ("layer", "batch"):
            raise ConfigError(f"AdapterConfig: norm={self.norm!r}; expected layer or batch")
        if self.activation not in ("gelu", "relu"):
            raise ConfigError(f"AdapterConfig: activation={self.activation!r}; expected gelu or relu")
        to_dtype(self.dtype), to_dtype(self.param_dtype)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "AdapterConfig":
        return dataclass_from_dict(cls, values)


@dataclasses.dataclass(frozen=True)
class SpeechDecoderConfig:
    """NAR prefix / NAR pre-network / shared NAR-AR LLaMA decoder over codec tokens.

    Token ids: codes 0..codec_vocab_size-1, then 4 specials (context-start, sequence-start, end,
    pad); the embedding and the output head cover all ``vocab_size`` = codec_vocab_size + 4 ids.
    """

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
    llm_hidden_size: int = 3584  # each LLM vector is reshaped into llm_hidden_size / hidden_size frames
    use_prefix: bool = True  # the NAR prefix stack over LLM hidden states (kv_cache_prefix_finetune)
    top_k: int = 2
    penalty_window: int = -1  # repetition penalty over the last tokens; <= 0 disables it
    penalty: float = 1.1  # logits of tokens in the window are divided by this (once per occurrence)
    max_tokens: int = 1000
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ConfigError(f"SpeechDecoderConfig: hidden_size={self.hidden_size}, num_heads={self.num_heads} "
                              f"and num_kv_heads={self.num_kv_heads} do not divide evenly")
        if self.llm_hidden_size % self.hidden_size:
            raise ConfigError(f"SpeechDecoderConfig: llm_hidden_size={self.llm_hidden_size} is not a multiple "
                              f"of hidden_size={self.hidden_size}")
        to_dtype(self.dtype), to_dtype(self.param_dtype)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def frames_per_vector(self) -> int:
        """Decoder frames per LLM vector (3584 / 896 = 4 in the release)."""
        return self.llm_hidden_size // self.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.codec_vocab_size + 4

    @property
    def context_start_id(self) -> int:
        return self.codec_vocab_size

    @property
    def start_id(self) -> int:
        return self.codec_vocab_size + 1

    @property
    def end_id(self) -> int:
        return self.codec_vocab_size + 2

    @property
    def pad_id(self) -> int:
        return self.codec_vocab_size + 3

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "SpeechDecoderConfig":
        return dataclass_from_dict(cls, values)


@dataclasses.dataclass(frozen=True)
class CodecConfig:
    """TiCodec, single codebook, 24 kHz, 40 tokens per second (``fo_jax.models.codec``).

    Widths: the encoder's are ``encoder_initial_channel * 2**(i+1)`` per downsampling stage (the
    release: 64, 128, 256, 512 = ``code_dim``); the global token encoder reads the stage after
    half of them (128 wide), and the generator adds the global vector (``global_codes *
    global_code_dim`` = 128) after every upsampling stage of that width.
    """

    sample_rate: int = 24000
    upsample_rates: tuple[int, ...] = (8, 5, 5, 3)
    upsample_kernel_sizes: tuple[int, ...] = (16, 11, 11, 5)
    upsample_initial_channel: int = 512
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilations: tuple[int, ...] = (1, 3, 5)  # the same for every kernel size (as released)
    encoder_initial_channel: int = 32
    n_codes: int = 1024
    code_dim: int = 512
    global_codes: int = 8
    global_code_size: int = 1024
    global_code_dim: int = 16
    global_encoder_hidden: int = 64  # global_feature_conv = [mid width, hidden, global dim, kernel, stride]
    global_encoder_kernel: int = 3
    global_encoder_stride: int = 1
    global_tokens: tuple[int, ...] = (473, 975, 419, 219, 565, 121, 550, 616)
    codebook_loss_lambda: float = 1.0
    commitment_loss_lambda: float = 0.25
    n_mels: int = 80
    n_fft: int = 1024
    hop_size: int = 240
    win_size: int = 1024
    fmin: float = 0.0
    fmax: float = 8000.0
    fmax_for_loss: float | None = None  # mel-loss fmax; None = Nyquist (HiFi-GAN convention)
    segment_size: int = 24000  # training crop, samples
    dtype: str = "float32"  # compute dtype of the conv stacks (params are cast to it)

    def __post_init__(self):
        to_dtype(self.dtype)
        n = len(self.upsample_rates)
        if len(self.upsample_kernel_sizes) != n:
            raise ConfigError(f"CodecConfig: {n} upsample_rates but {len(self.upsample_kernel_sizes)} kernel sizes")
        for u, k in zip(self.upsample_rates, self.upsample_kernel_sizes):
            if k < u or (k - u) % 2:
                raise ConfigError(f"CodecConfig: upsample kernel {k} with rate {u}: need k >= u and k - u even")
        if self.encoder_initial_channel % 8:
            raise ConfigError(f"CodecConfig: encoder_initial_channel={self.encoder_initial_channel} is not a "
                              "multiple of 8 (GroupNorm uses 16 channels per group)")
        if self.code_dim != self.encoder_initial_channel * 2 ** n:
            raise ConfigError(f"CodecConfig: code_dim={self.code_dim} must equal encoder_initial_channel * "
                              f"2**{n} = {self.encoder_initial_channel * 2 ** n}")
        if self.global_dim != self.encoder_initial_channel * 2 ** (n // 2):
            raise ConfigError(f"CodecConfig: global_codes * global_code_dim = {self.global_dim} must equal the "
                              f"encoder width {self.encoder_initial_channel * 2 ** (n // 2)} at stage {n // 2}")
        if self.global_dim not in self.generator_channels:
            raise ConfigError(f"CodecConfig: global dim {self.global_dim} matches no generator stage width "
                              f"{self.generator_channels}")
        if len(self.global_tokens) != self.global_codes:
            raise ConfigError(f"CodecConfig: {len(self.global_tokens)} global_tokens for {self.global_codes} codebooks")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "CodecConfig":
        return dataclass_from_dict(cls, values)

    @property
    def samples_per_token(self) -> int:
        n = 1
        for r in self.upsample_rates:
            n *= r
        return n

    @property
    def global_dim(self) -> int:
        return self.global_codes * self.global_code_dim

    @property
    def generator_channels(self) -> tuple[int, ...]:
        """Output width of each upsampling stage."""
        return tuple(self.upsample_initial_channel // 2 ** (i + 1) for i in range(len(self.upsample_rates)))

    @property
    def encoder_channels(self) -> tuple[int, ...]:
        """Output width of each downsampling stage."""
        return tuple(self.encoder_initial_channel * 2 ** (i + 1) for i in range(len(self.upsample_rates)))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The whole Freeze-Omni model: frozen LLM + speech in + speech out.

    ``codec`` is TiCodec's config, or a ``fo_jax.models.mel_codec.MelVQConfig`` (the toy world's
    fast codec: same token rate and vocabulary, a codebook instead of a generator).
    """

    llm: LLMConfig = LLMConfig()
    encoder: EncoderConfig = EncoderConfig()
    adapter: AdapterConfig = AdapterConfig()
    decoder: SpeechDecoderConfig = SpeechDecoderConfig()
    codec: CodecConfig | Any = CodecConfig()
