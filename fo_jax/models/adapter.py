"""Encoder -> LLM-embedding adapters of Freeze-Omni (official ``adpter_type``), with streaming caches.

- ``subsampling`` (released): causal Conv1d(D -> 2D, kernel K, stride 2) -> LayerNorm(eps 1e-3) or
  BatchNorm -> GELU (exact) or ReLU -> Linear(2D -> E). When 4 D < E the official module instead
  uses two convs: Conv1d(D -> 2D, stride 1) -> BatchNorm -> ReLU -> Conv1d(2D -> 4D, stride 2) ->
  BatchNorm -> ReLU -> Linear(4D -> E). The frame mask keeps every other frame.
- ``cnn``: the two-conv form with both convs stride 1 (no subsampling).
- ``linear``: one Linear(D -> E) per frame.

"Causal" = K - 1 zero frames on the left; padded input frames are zeroed first. Streaming keeps
each conv's last K - 1 input frames (``AdapterStreamState``): with the released model, 4 new
encoder frames + 4 cached give 2 embeddings, equal to the whole-utterance forward. Param names
mirror the official (``conv1d2``, ``bn2``, ``project``, ``adpter``). BatchNorm running statistics
live in the ``batch_stats`` collection, so adapter functions take Flax *variables*
(``{"params": ..., ["batch_stats": ...]}``).

``SpeechInputState`` / ``speech_input_step`` chain the encoder and adapter streaming steps: one
160 ms chunk of fbank (19 frames) -> the adapter's LLM embeddings (2 for the released model).
"""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from fo_jax.layers.linear import TorchLinear as Linear, project
from fo_jax.models.configs import AdapterConfig, EncoderConfig, to_dtype
from fo_jax.models.encoder import (EncoderStreamState, conv_init, encoder_stream_step,
                                   zero_rows)


def _two_convs(cfg: AdapterConfig) -> bool:
    return cfg.kind == "cnn" or (cfg.kind == "subsampling" and 4 * cfg.input_dim < cfg.output_dim)


def _conv_stride(cfg: AdapterConfig) -> int:
    return 2 if cfg.kind == "subsampling" else 1


class CausalConv1d(nn.Module):
    """VALID Conv1d over frames that already include the K - 1 left-context frames.

    Params: kernel (Cout, Cin, K) (torch layout), bias (Cout,). Runs as one matmul over explicit
    taps (faster on XLA:CPU than its direct convolution for these shapes). Returns float32.
    """

    features: int
    kernel_size: int
    stride: int = 1
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_btc: jax.Array) -> jax.Array:
        """(B, T, Cin) -> (B, (T - K) // stride + 1, Cout)."""
        k, (b, t, c) = self.kernel_size, x_btc.shape
        kernel = self.param("kernel", nn.with_logical_partitioning(conv_init, ("mlp", "embed", None)),
                            (self.features, c, k), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)),
                          (self.features,), self.param_dtype)
        t_out = (t - k) // self.stride + 1
        taps = [x_btc[:, i:i + self.stride * (t_out - 1) + 1:self.stride] for i in range(k)]
        patches = jnp.stack(taps, axis=-1).reshape(b, t_out, c * k)  # (Cin, K) order as the kernel
        return project(patches, kernel.reshape(self.features, c * k), 1, self.dtype, jnp.float32) + bias.astype(jnp.float32)


@flax.struct.dataclass
class AdapterStreamState:
    """Per-user adapter caches, leading batch axis: the last K - 1 input frames of each conv.

    Attributes:
      conv1d1: (B, K - 1, D) input cache of the first conv of the two-conv forms, else None.
      conv1d2: (B, K - 1, C) input cache of the (last) conv, else None (``linear``).
    """

    conv1d1: jax.Array | None
    conv1d2: jax.Array | None

    @classmethod
    def zeros(cls, config: AdapterConfig, batch: int) -> "AdapterStreamState":
        dtype, k, d = to_dtype(config.dtype), config.kernel_size - 1, config.input_dim
        if config.kind == "linear":
            return cls(conv1d1=None, conv1d2=None)
        if _two_convs(config):
            return cls(conv1d1=jnp.zeros((batch, k, d), dtype), conv1d2=jnp.zeros((batch, k, 2 * d), dtype))
        return cls(conv1d1=None, conv1d2=jnp.zeros((batch, k, d), dtype))

    def reset_rows(self, reset_b: jax.Array) -> "AdapterStreamState":
        """Rows where ``reset_b`` is True start over (zero caches), the others are kept."""
        return zero_rows(self, reset_b)


class Adapter(nn.Module):
    """The adapter. Methods: ``__call__`` (whole sequence), ``stream_step``."""

    config: AdapterConfig

    def setup(self):
        cfg = self.config
        dtype, pdtype, d = to_dtype(cfg.dtype), to_dtype(cfg.param_dtype), cfg.input_dim

        def dense(name):
            return Linear(cfg.output_dim, names=("embed", "mlp"), dtype=dtype, param_dtype=pdtype, name=name)

        def batch_norm():
            # torch BatchNorm1d(momentum=0.99): running = 0.01 running + 0.99 batch -> flax momentum 0.01
            return nn.BatchNorm(momentum=0.01, epsilon=cfg.norm_eps, dtype=jnp.float32, param_dtype=pdtype,
                                scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)))

        if cfg.kind == "linear":
            self.adpter = dense(None)
            return
        if _two_convs(cfg):
            self.conv1d1 = CausalConv1d(2 * d, cfg.kernel_size, 1, dtype, pdtype)
            self.bn1 = batch_norm()
            self.conv1d2 = CausalConv1d(4 * d, cfg.kernel_size, _conv_stride(cfg), dtype, pdtype)
            self.bn2 = batch_norm()
        else:
            self.conv1d2 = CausalConv1d(2 * d, cfg.kernel_size, 2, dtype, pdtype)
            if cfg.norm == "layer":
                self.bn2 = nn.LayerNorm(epsilon=cfg.norm_eps, dtype=jnp.float32, param_dtype=pdtype,
                                        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)))
            else:
                self.bn2 = batch_norm()
        self.project = dense(None)

    def _norm_act(self, norm: nn.Module, x: jax.Array, train: bool, gelu: bool) -> jax.Array:
        x = norm(x) if isinstance(norm, nn.LayerNorm) else norm(x, use_running_average=not train)
        return jax.nn.gelu(x, approximate=False) if gelu else nn.relu(x)

    def _convs(self, x_btd: jax.Array, ctx1: jax.Array | None, ctx2: jax.Array | None, train: bool
               ) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
        """Conv stack; ctx* are each conv's K - 1 left input frames (kept in the compute dtype).

        Returns the (B, T', E) output in the compute dtype and the new contexts.
        """
        cfg = self.config
        dtype = to_dtype(cfg.dtype)
        if cfg.kind == "linear":
            return self.adpter(x_btd).astype(dtype), None, None
        keep = cfg.kernel_size - 1
        two = _two_convs(cfg)
        if two:
            x_btd = jnp.concatenate([ctx1, x_btd.astype(dtype)], axis=1)
            ctx1 = x_btd[:, x_btd.shape[1] - keep:]
            x_btd = self._norm_act(self.bn1, self.conv1d1(x_btd), train, gelu=False)
        x_btd = jnp.concatenate([ctx2, x_btd.astype(dtype)], axis=1)
        ctx2 = x_btd[:, x_btd.shape[1] - keep:]
        gelu = not two and cfg.activation == "gelu"
        x_btd = self._norm_act(self.bn2, self.conv1d2(x_btd), train, gelu)
        return self.project(x_btd).astype(dtype), ctx1, ctx2

    def __call__(self, x_btd: jax.Array, mask_bt: jax.Array, train: bool = False
                 ) -> tuple[jax.Array, jax.Array]:
        """Whole sequence: (B, T, D) encoder frames, (B, T) bool frame mask -> (B, T', E), (B, T').

        T' = ceil(T / 2) for ``subsampling``, else T. ``train`` uses batch statistics in BatchNorm
        (apply with ``mutable=["batch_stats"]``).
        """
        cfg = self.config
        x = jnp.where(mask_bt[..., None], x_btd, 0).astype(to_dtype(cfg.dtype))
        zeros = AdapterStreamState.zeros(cfg, x.shape[0])
        out, _, _ = self._convs(x, zeros.conv1d1, zeros.conv1d2, train)
        return out, (mask_bt[:, ::2] if cfg.kind == "subsampling" else mask_bt)

    def stream_step(self, state: AdapterStreamState, x_btd: jax.Array
                    ) -> tuple[AdapterStreamState, jax.Array]:
        """One chunk of (B, C, D) encoder frames (C even for ``subsampling``) -> (B, C', E)."""
        out, c1, c2 = self._convs(x_btd, state.conv1d1, state.conv1d2, False)
        return AdapterStreamState(conv1d1=c1, conv1d2=c2), out


def output_frames(config: AdapterConfig, frames: int) -> int:
    """Embeddings the adapter gives for ``frames`` encoder frames (whole sequence or one chunk)."""
    return (frames + 1) // 2 if config.kind == "subsampling" else frames


def init_adapter_variables(config: AdapterConfig, rng: jax.Array) -> dict:
    """Random variables ``{"params": ..., ["batch_stats": ...]}``, params boxed with logical names."""
    x = jnp.zeros((1, 4, config.input_dim), jnp.float32)
    return dict(Adapter(config).init(rng, x, jnp.ones((1, 4), bool)))


def adapter_forward(variables: dict, config: AdapterConfig, x_btd: jax.Array, mask_bt: jax.Array
                    ) -> tuple[jax.Array, jax.Array]:
    """Inference forward (BatchNorm uses running statistics): (B, T, D), (B, T) -> (B, T', E), (B, T')."""
    return Adapter(config).apply(variables, x_btd, mask_bt)


def adapter_stream_step(variables: dict, config: AdapterConfig, state: AdapterStreamState,
                        x_btd: jax.Array) -> tuple[AdapterStreamState, jax.Array]:
    """``Adapter.stream_step`` on variables: (B, C, D) -> new state, (B, C', E)."""
    return Adapter(config).apply(variables, state, x_btd, method=Adapter.stream_step)


@flax.struct.dataclass
class SpeechInputState:
    """Streaming state of the speech input path (encoder buffers + adapter caches), batch-leading."""

    encoder: EncoderStreamState
    adapter: AdapterStreamState

    @classmethod
    def zeros(cls, encoder_config: EncoderConfig, adapter_config: AdapterConfig, batch: int
              ) -> "SpeechInputState":
        return cls(encoder=EncoderStreamState.zeros(encoder_config, batch),
                   adapter=AdapterStreamState.zeros(adapter_config, batch))

    def reset_rows(self, reset_b: jax.Array) -> "SpeechInputState":
        """Rows where ``reset_b`` is True start a new utterance (official: caches None, pe_index 0)."""
        return SpeechInputState(encoder=self.encoder.reset_rows(reset_b),
                                adapter=self.adapter.reset_rows(reset_b))


def speech_input_step(encoder_params: dict, adapter_variables: dict, encoder_config: EncoderConfig,
                      adapter_config: AdapterConfig, state: SpeechInputState, fbank_bwf: jax.Array
                      ) -> tuple[SpeechInputState, jax.Array]:
    """One 160 ms chunk: (B, 4 C + 3, F) raw fbank -> new state, (B, C', E) LLM-input embeddings."""
    enc_state, enc = encoder_stream_step(encoder_params, encoder_config, state.encoder, fbank_bwf)
    ad_state, emb = adapter_stream_step(adapter_variables, adapter_config, state.adapter, enc)
    return SpeechInputState(encoder=enc_state, adapter=ad_state), emb


# Jitted, state donated, configs static: compiles once per (configs, batch size, dtype).
speech_input_step_jit = jax.jit(speech_input_step, static_argnames=("encoder_config", "adapter_config"),
                                donate_argnames=("state",))
