"""The Freeze-Omni speech encoder in Flax Linen: fbank (B, T, 80) -> encoder frames (B, T/4, D).

Global CMVN -> Conv2d subsampling x4 (two 3x3 stride-2 convs + ReLU, then a Linear over channels x
frequencies) -> input layer (Linear, LayerNorm, dropout, ReLU) -> x sqrt(D) -> pre-LN transformer
blocks -> final LayerNorm. Param names mirror the official modules (``linear_q``, ``pos_bias_u``,
``feed_forward/w_1``, ``norm1``, ``after_norm``...) and weights keep the PyTorch layout (Linear
(out, in), Conv (out, in, *kernel); see ``fo_jax.layers.linear``), so conversion is a table of renames.

Attention is the official "rel-enc" as released: score = ((q + u) k + (q + v) Wpos PE(key)) /
sqrt(d_k), with PE the sinusoid at the key's position and no rel_shift (so it is an absolute
key-position bias). Masked scores are filled with the float16 minimum and their probabilities zeroed
after the softmax, as the official code does. Precision: with ``dtype`` bfloat16 the weight
matmuls take bfloat16 inputs (K/V buffers are bfloat16 too); accumulation, attention and the
activations between matmuls are float32.

Streaming (``stream_step``): one call = ``4 * chunk_size + 3`` fbank frames (3 overlap frames feed
the convs' context) -> ``chunk_size`` encoder frames. Each layer keeps its last ``chunk_size *
left_chunks`` keys/values in a fixed-size, right-aligned buffer (``EncoderStreamState``), so the
step has fixed shapes; empty slots are masked, which gives the same numbers as the official
growing buffers (masked probabilities are exactly 0). Key positions follow the official ``infer``
(see ``stream_positions``) unless ``EncoderConfig.strict_positions``.
"""

from __future__ import annotations

import math

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from fo_jax import sharding
from fo_jax.errors import ConfigError
from fo_jax.layers.linear import TorchLinear as Linear, fan_in_init, project
from fo_jax.models.configs import EncoderConfig, to_dtype

# Official masked-fill value: the float16 minimum, whatever the compute dtype.
MASK_VALUE = float(np.finfo(np.float16).min)
SUBSAMPLING = 4  # fbank frames per encoder frame
TORCH_LAYOUT_INIT = fan_in_init()


def conv_init(key, shape, dtype=jnp.float32):
    """LeCun-normal for conv kernels (out, in, *kernel): fan-in over every axis but the first."""
    return fan_in_init(len(shape) - 1)(key, shape, dtype)


def _layer_norm(eps: float, pdtype) -> nn.LayerNorm:
    """LayerNorm computed and returned in float32 (as under torch autocast)."""
    return nn.LayerNorm(epsilon=eps, dtype=jnp.float32, param_dtype=pdtype,
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)))


def _div_term(dim: int) -> np.ndarray:
    """Sinusoid frequencies as the official float32 table computes them, (dim/2,)."""
    return np.exp(np.arange(0, dim, 2, dtype=np.float32) * np.float32(-(math.log(10000.0) / dim)))


def sinusoid(positions: jax.Array, dim: int) -> jax.Array:
    """Official sinusoid PE: (...,) int positions -> (..., dim) float32, sin/cos interleaved."""
    angle = positions.astype(jnp.float32)[..., None] * _div_term(dim)
    return jnp.stack([jnp.sin(angle), jnp.cos(angle)], axis=-1).reshape(*positions.shape, dim)


def chunk_mask(size: int, chunk_size, left_chunks) -> jax.Array:
    """(size, size) bool, True where frame i may attend to frame j: j's chunk is i's chunk or one
    of its ``left_chunks`` predecessors (all when < 0). ``chunk_size <= 0``: full attention.

    chunk_size / left_chunks may be traced ints (dynamic-chunk training).
    """
    if isinstance(chunk_size, int) and chunk_size <= 0:
        return jnp.ones((size, size), bool)
    chunk = jnp.arange(size) // chunk_size
    ci, cj = chunk[:, None], chunk[None, :]
    return (cj <= ci) & ((left_chunks < 0) | (cj >= ci - left_chunks))


def dynamic_chunk(rng: jax.Array, size: int) -> tuple[jax.Array, jax.Array]:
    """WeNet-style random (chunk_size, left_chunks) for one training batch of ``size`` frames.

    With probability ~1/2 full context (chunk = size, left = -1); otherwise chunk in [1, 25] and
    left chunks uniform in [0, (size - 1) // chunk).
    """
    k1, k2 = jax.random.split(rng)
    c = jax.random.randint(k1, (), 1, max(size, 2))
    full = c > size // 2
    c = jnp.where(full, size, c % 25 + 1)
    left = jax.random.randint(k2, (), 0, jnp.maximum((size - 1) // c, 1))
    return c, jnp.where(full, -1, left)


def output_lengths(lengths_b: jax.Array) -> jax.Array:
    """Valid encoder frames of ``lengths_b`` fbank frames: frame i needs fbank frame 4 i + 6."""
    return jnp.maximum((lengths_b - 3) // SUBSAMPLING, 0)


class StridedConv3x3(nn.Module):
    """VALID 3x3 stride-2 conv over (time, freq) + bias, on (B, H, W, C) inputs.

    Params: kernel (Cout, Cin, 3, 3) (torch layout), bias (Cout,). With Cin > 1 it runs as one
    (B H' W', Cin 9) x (Cin 9, Cout) matmul over explicit patches: XLA:CPU's direct convolution is
    several times slower for these shapes. Returns float32.
    """

    features: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_bhwc: jax.Array) -> jax.Array:
        """(B, H, W, Cin) -> (B, (H - 3) // 2 + 1, (W - 3) // 2 + 1, Cout)."""
        b, h, w, c = x_bhwc.shape
        kernel = self.param("kernel", nn.with_logical_partitioning(conv_init, ("embed", None, None, None)),
                            (self.features, c, 3, 3), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                          (self.features,), self.param_dtype)
        x = x_bhwc.astype(self.dtype)
        if c == 1:
            out = jax.lax.conv_general_dilated(x, kernel.astype(self.dtype), (2, 2), "VALID",
                                               dimension_numbers=("NHWC", "OIHW", "NHWC"),
                                               preferred_element_type=jnp.float32)
        else:
            ho, wo = (h - 3) // 2 + 1, (w - 3) // 2 + 1
            taps = [x[:, i:i + 2 * ho - 1:2, j:j + 2 * wo - 1:2] for i in range(3) for j in range(3)]
            patches = jnp.stack(taps, axis=-1).reshape(b, ho, wo, c * 9)  # (Cin, kh, kw) order as the kernel
            out = project(patches, kernel.reshape(self.features, c * 9), 1, self.dtype, jnp.float32)
        return out + bias.astype(jnp.float32)


class Conv2dSubsampling(nn.Module):
    """Two 3x3 stride-2 convs (1 -> C -> C channels, ReLU), then Linear(C * F' -> D); C =
    ``subsampling_channels`` or, when 0 (the release), D.

    Params: conv_0, conv_1 (``StridedConv3x3``), out (``Linear``, input ordered (channel, freq) as
    the official flatten).
    """

    config: EncoderConfig

    @nn.compact
    def __call__(self, x_btf: jax.Array) -> jax.Array:
        """(B, T, F) -> (B, ((T - 1) // 2 - 1) // 2, D) float32."""
        cfg = self.config
        dtype, pdtype, d = to_dtype(cfg.dtype), to_dtype(cfg.param_dtype), cfg.hidden_size
        channels = cfg.subsampling_channels or d
        x = nn.relu(StridedConv3x3(channels, dtype, pdtype, name="conv_0")(x_btf[..., None]))
        x = nn.relu(StridedConv3x3(channels, dtype, pdtype, name="conv_1")(x))  # (B, T', F', C)
        b, t, f, c = x.shape
        x = x.astype(dtype).transpose(0, 1, 3, 2).reshape(b, t, c * f)
        return Linear(d, names=("embed", "mlp"), dtype=dtype, param_dtype=pdtype, name="out")(x)


class PosLinear(nn.Module):
    """linear_pos (bias-free D -> H x d_k). Param kernel (H, d_k, D): the torch (out, in) weight with
    out split by head, so the streaming path can contract per head without copying the weight."""

    heads: int
    d_k: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.kernel = self.param("kernel", nn.with_logical_partitioning(TORCH_LAYOUT_INIT, (
            "heads", "head_dim", "embed")), (self.heads, self.d_k, self.heads * self.d_k), self.param_dtype)

    def __call__(self, pe_sd: jax.Array) -> jax.Array:
        """(..., D) -> (..., H, d_k) float32."""
        return jnp.einsum("...e,hke->...hk", pe_sd.astype(self.dtype), self.kernel.astype(self.dtype),
                          preferred_element_type=jnp.float32)

    def transposed(self, x_bthk: jax.Array) -> jax.Array:
        """(B, T, H, d_k) -> (B, T, H, D): x_h Wpos_h, so that (x . Wpos PE(s)) = (x Wpos) . PE(s)."""
        b, t, h, k = x_bthk.shape
        x = x_bthk.astype(self.dtype).reshape(b * t, h, k).transpose(1, 0, 2)
        # head-major operands: XLA:CPU has no bf16 x bf16 -> f32 kernel for the other batch layout
        r = jnp.einsum("hnk,hke->hne", x, self.kernel.astype(self.dtype), preferred_element_type=jnp.float32)
        return r.transpose(1, 0, 2).reshape(b, t, h, -1)


class RelEncAttention(nn.Module):
    """Official "rel-enc" multi-head attention (absolute key-position bias, no rel_shift).

    Params: linear_q/k/v/out (``Linear``), linear_pos (``PosLinear``), pos_bias_u/v (H, d_k).
    """

    config: EncoderConfig

    def setup(self):
        cfg = self.config
        self.dtype, pdtype, d = to_dtype(cfg.dtype), to_dtype(cfg.param_dtype), cfg.hidden_size
        self.heads, self.d_k = cfg.num_heads, d // cfg.num_heads
        self.linear_q = Linear(d, names=("heads", "embed"), dtype=self.dtype, param_dtype=pdtype)
        self.linear_k = Linear(d, names=("heads", "embed"), dtype=self.dtype, param_dtype=pdtype)
        self.linear_v = Linear(d, names=("heads", "embed"), dtype=self.dtype, param_dtype=pdtype)
        self.linear_out = Linear(d, names=("embed", "heads"), dtype=self.dtype, param_dtype=pdtype)
        self.linear_pos = PosLinear(self.heads, self.d_k, self.dtype, pdtype)
        bias_init = nn.with_logical_partitioning(nn.initializers.xavier_uniform(), ("heads", "head_dim"))
        self.pos_bias_u = self.param("pos_bias_u", bias_init, (self.heads, self.d_k), pdtype)
        self.pos_bias_v = self.param("pos_bias_v", bias_init, (self.heads, self.d_k), pdtype)
        self.dropout = nn.Dropout(cfg.attention_dropout)

    def _qkv(self, x_btd: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(B, T, D) -> three (B, T, H, d_k) float32."""
        split = lambda y: y.reshape(*y.shape[:2], self.heads, self.d_k)  # noqa: E731
        return split(self.linear_q(x_btd)), split(self.linear_k(x_btd)), split(self.linear_v(x_btd))

    def _attend(self, q_bthk, k_bshk, v_bshk, bd_bhts, mask_bts, deterministic) -> jax.Array:
        ac = jnp.einsum("bthk,bshk->bhts", q_bthk + self.pos_bias_u, k_bshk.astype(jnp.float32))
        scores = (ac + bd_bhts) / math.sqrt(self.d_k)
        mask = mask_bts[:, None]
        probs = jnp.where(mask, jax.nn.softmax(jnp.where(mask, scores, MASK_VALUE), axis=-1), 0.0)
        probs = self.dropout(probs, deterministic=deterministic)
        out = jnp.einsum("bhts,bshk->bthk", probs, v_bshk.astype(jnp.float32))
        return self.linear_out(out.reshape(*out.shape[:2], -1))

    def __call__(self, x_btd: jax.Array, mask_bts: jax.Array, pe_1sd: jax.Array,
                 deterministic: bool = True) -> jax.Array:
        """Whole-sequence attention. x_btd (B, T, D), mask_bts (B, T, T), pe_1sd (1 or B, T, D)."""
        q, k, v = self._qkv(x_btd)
        p = self.linear_pos(pe_1sd)
        p = jnp.broadcast_to(p, (q.shape[0],) + p.shape[1:])
        bd = jnp.einsum("bthk,bshk->bhts", q + self.pos_bias_v, p)
        return self._attend(q, k, v, bd, mask_bts, deterministic)

    def step(self, x_btd: jax.Array, k_bshk: jax.Array, v_bshk: jax.Array, key_valid_bs: jax.Array,
             pe_bsd: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """One streaming chunk over the buffered keys.

        Args:
          x_btd: (B, C, D) the chunk's normalised inputs.
          k_bshk, v_bshk: (B, S, H, d_k) buffered keys/values, right-aligned (newest last).
          key_valid_bs: (B, S + C) bool, which of [buffer, chunk] slots hold keys.
          pe_bsd: (B, S + C, D) sinusoid at each slot's key position.
        Returns:
          (B, C, D) outputs and the new buffers (the last S of [buffer, chunk]).
        """
        q, k, v = self._qkv(x_btd)
        keys = jnp.concatenate([k_bshk, k.astype(k_bshk.dtype)], axis=1)
        values = jnp.concatenate([v_bshk, v.astype(v_bshk.dtype)], axis=1)
        # (q + v) . Wpos PE(s) computed as ((q + v) Wpos) . PE(s): the C queries, not the S + C keys,
        # go through the D x D projection (8x fewer flops for C = 4, S = 64).
        r = self.linear_pos.transposed(q + self.pos_bias_v)
        bd = jnp.einsum("bthe,bse->bhts", r, pe_bsd)
        mask = jnp.broadcast_to(key_valid_bs[:, None, :], (q.shape[0], q.shape[1], keys.shape[1]))
        out = self._attend(q, keys, values, bd, mask, True)
        size = k_bshk.shape[1]
        return out, keys[:, -size:], values[:, -size:]


class FeedForward(nn.Module):
    """w_2(dropout(relu(w_1 x))). Params: w_1 (F, D), w_2 (D, F) (``Linear``)."""

    config: EncoderConfig

    @nn.compact
    def __call__(self, x_btd: jax.Array, deterministic: bool = True) -> jax.Array:
        cfg = self.config
        dtype, pdtype = to_dtype(cfg.dtype), to_dtype(cfg.param_dtype)
        h = nn.relu(Linear(cfg.ffn_size, names=("mlp", "embed"), dtype=dtype, param_dtype=pdtype, name="w_1")(x_btd))
        h = nn.Dropout(cfg.dropout)(h, deterministic=deterministic)
        return Linear(cfg.hidden_size, names=("embed", "mlp"), dtype=dtype, param_dtype=pdtype, name="w_2")(h)


class EncoderLayer(nn.Module):
    """Pre-LN block: x + dropout(attn(norm1 x)), then + dropout(ffn(norm2 .))."""

    config: EncoderConfig

    def setup(self):
        cfg = self.config
        dtype, pdtype = to_dtype(cfg.dtype), to_dtype(cfg.param_dtype)
        self.self_attn = RelEncAttention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.norm1 = _layer_norm(cfg.layer_norm_eps, pdtype)
        self.norm2 = _layer_norm(cfg.layer_norm_eps, pdtype)
        self.dropout = nn.Dropout(cfg.dropout)

    def __call__(self, x_btd, mask_bts, pe_1sd, deterministic: bool = True):
        h = self.self_attn(self.norm1(x_btd), mask_bts, pe_1sd, deterministic)
        x_btd = x_btd + self.dropout(h, deterministic=deterministic)
        h = self.feed_forward(self.norm2(x_btd), deterministic)
        return x_btd + self.dropout(h, deterministic=deterministic)

    def step(self, x_btd, k_bshk, v_bshk, key_valid_bs, pe_bsd):
        h, k_bshk, v_bshk = self.self_attn.step(self.norm1(x_btd), k_bshk, v_bshk, key_valid_bs, pe_bsd)
        x_btd = x_btd + h
        return x_btd + self.feed_forward(self.norm2(x_btd)), k_bshk, v_bshk


@flax.struct.dataclass
class EncoderStreamState:
    """Per-user streaming state of the encoder; every field has a leading batch axis.

    Attributes:
      k, v: (B, L, S, H, d_k) each layer's last S = chunk_size * left_chunks keys/values,
        right-aligned (slot S - 1 is the newest); the first S - min(frames, S) slots are empty.
      pe_index: (B,) int32, the official positional index (advances by chunk_size per call and
        wraps; see ``stream_positions``).
      frames: (B,) int32, encoder frames produced so far (true positions; buffer fill).
    """

    k: jax.Array
    v: jax.Array
    pe_index: jax.Array
    frames: jax.Array

    @classmethod
    def zeros(cls, config: EncoderConfig, batch: int) -> "EncoderStreamState":
        if config.chunk_size <= 0 or config.left_chunks <= 0:
            raise ConfigError(f"streaming needs chunk_size > 0 and left_chunks > 0, got "
                              f"{config.chunk_size} and {config.left_chunks}")
        d_k = config.hidden_size // config.num_heads
        shape = (batch, config.num_layers, config.buffer_size, config.num_heads, d_k)
        dtype = to_dtype(config.dtype)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   pe_index=jnp.zeros((batch,), jnp.int32), frames=jnp.zeros((batch,), jnp.int32))

    def reset_rows(self, reset_b: jax.Array) -> "EncoderStreamState":
        """Rows where ``reset_b`` is True start over (a new turn), the others are kept."""
        return zero_rows(self, reset_b)


def zero_rows(tree, reset_b: jax.Array):
    """Zeroes row b of every (batch-leading) leaf where ``reset_b[b]`` is True."""
    return jax.tree.map(lambda x: jnp.where(reset_b.reshape((-1,) + (1,) * (x.ndim - 1)), jnp.zeros_like(x), x),
                        tree)


def stream_positions(config: EncoderConfig, pe_index_b: jax.Array, frames_b: jax.Array
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Key positions and validity of the S + C attention slots of one streaming call.

    Official ``infer`` (strict_positions False): idx = pe_index mod M with M = C (pe_max_len // C)
    - (left_chunks + 1) C; the valid keys, oldest first, take positions max(0, idx - (left_chunks +
    1) C), +1, ...; the next index is idx + C. Because the window start subtracts S + C while only S
    frames are buffered, keys lag their true positions by C from the (left_chunks + 2)-th call on,
    and after a wrap (every M / C calls) positions restart at 0. strict_positions True: the true
    absolute positions ``frames - S + slot``.

    Returns:
      positions_bs (B, S + C) int32, key_valid_bs (B, S + C) bool, next pe_index (B,).
    """
    c, s = config.chunk_size, config.buffer_size
    slots = jnp.arange(s + c)[None, :]
    filled = jnp.minimum(frames_b, s)[:, None]
    valid = slots >= s - filled
    idx = pe_index_b % (c * (config.pe_max_len // c) - (s + c))
    if config.strict_positions:
        positions = frames_b[:, None] - s + slots
    else:
        positions = jnp.maximum(idx - (s + c), 0)[:, None] + slots - (s - filled)
    return positions.astype(jnp.int32), valid, (idx + c).astype(jnp.int32)


class SpeechEncoder(nn.Module):
    """CMVN + subsampling + transformer. Methods: ``__call__`` (whole utterance), ``stream_step``."""

    config: EncoderConfig

    def setup(self):
        cfg = self.config
        dtype, pdtype, d = to_dtype(cfg.dtype), to_dtype(cfg.param_dtype), cfg.hidden_size
        if cfg.use_cmvn:
            # Fixed statistics (official buffers encoder.global_cmvn.mean / istd); keep them frozen.
            self.cmvn_mean = self.param("cmvn_mean", nn.with_logical_partitioning(
                nn.initializers.zeros, ("norm",)), (cfg.input_dim,), jnp.float32)
            self.cmvn_istd = self.param("cmvn_istd", nn.with_logical_partitioning(
                nn.initializers.ones, ("norm",)), (cfg.input_dim,), jnp.float32)
        self.subsampling = Conv2dSubsampling(cfg)
        self.embed_linear = Linear(d, names=("embed", "mlp"), dtype=dtype, param_dtype=pdtype)
        self.embed_norm = _layer_norm(cfg.layer_norm_eps, pdtype)
        self.embed_dropout = nn.Dropout(cfg.dropout)
        self.pos_dropout = nn.Dropout(cfg.positional_dropout)
        # remat: each block's activations are recomputed in the backward pass (training memory);
        # only __call__ is wrapped, the streaming ``step`` is untouched.
        layer = nn.remat(EncoderLayer, static_argnums=(4,)) if cfg.remat else EncoderLayer
        self.encoders = [layer(cfg) for _ in range(cfg.num_layers)]
        self.after_norm = _layer_norm(cfg.layer_norm_eps, pdtype)

    def _input(self, fbank_btf: jax.Array, deterministic: bool) -> jax.Array:
        x = fbank_btf.astype(jnp.float32)
        if self.config.use_cmvn:
            x = (x - self.cmvn_mean) * self.cmvn_istd
        x = self.subsampling(x)
        x = self.embed_norm(self.embed_linear(x))
        x = nn.relu(self.embed_dropout(x, deterministic=deterministic))
        return x * math.sqrt(self.config.hidden_size)

    def __call__(self, fbank_btf: jax.Array, lengths_b: jax.Array, train: bool = False,
                 chunk_size=None, left_chunks=None, positions_t: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array]:
        """Whole-utterance forward (training, offline decoding, streaming reference).

        Args:
          fbank_btf: (B, T, F) raw log-mel fbank (CMVN is applied here), right-padded.
          lengths_b: (B,) valid fbank frames per row.
          train: dropout on (needs a 'dropout' rng); with ``config.dynamic_chunks`` also draws a
            random chunk mask (needs a 'chunk' rng).
          chunk_size, left_chunks: override the config's static chunk mask (may be traced).
          positions_t: (T',) key positions of the sinusoid (default 0..T'-1, as officially).
        Returns:
          enc_btd (B, T', D) with T' = ((T - 1) // 2 - 1) // 2, and enc_lengths_b (B,) int32.
        """
        cfg = self.config
        deterministic = not train
        x = self._input(fbank_btf, deterministic)
        t = x.shape[1]
        enc_lengths = output_lengths(lengths_b).astype(jnp.int32)
        if chunk_size is None and train and cfg.dynamic_chunks:
            chunk_size, left_chunks = dynamic_chunk(self.make_rng("chunk"), t)
        elif chunk_size is None:
            chunk_size, left_chunks = cfg.chunk_size, cfg.left_chunks
        valid_key = jnp.arange(t)[None, :] < enc_lengths[:, None]
        mask = chunk_mask(t, chunk_size, left_chunks)[None] & valid_key[:, None, :]
        x = self.pos_dropout(x, deterministic=deterministic)
        positions_t = jnp.arange(t) if positions_t is None else positions_t
        pe = self.pos_dropout(sinusoid(positions_t, cfg.hidden_size)[None], deterministic=deterministic)
        for layer in self.encoders:
            x = sharding.constrain(x, ("act_batch", None, None))  # as Qwen2: batch-split under rules
            x = layer(x, mask, pe, deterministic)
        return self.after_norm(x), enc_lengths

    def stream_step(self, state: EncoderStreamState, fbank_bwf: jax.Array
                    ) -> tuple[EncoderStreamState, jax.Array]:
        """One streaming call (inference): (B, 4 C + 3, F) fbank -> (B, C, D) encoder frames.

        Rows are independent (each has its own buffers and positions).
        """
        cfg = self.config
        x = self._input(fbank_bwf, True)
        positions, valid, next_index = stream_positions(cfg, state.pe_index, state.frames)
        pe = sinusoid(positions, cfg.hidden_size)
        ks, vs = [], []
        for i, layer in enumerate(self.encoders):
            x, k, v = layer.step(x, state.k[:, i], state.v[:, i], valid, pe)
            ks.append(k)
            vs.append(v)
        state = EncoderStreamState(k=jnp.stack(ks, 1), v=jnp.stack(vs, 1), pe_index=next_index,
                                   frames=state.frames + cfg.chunk_size)
        return state, self.after_norm(x)


def init_encoder_params(config: EncoderConfig, rng: jax.Array) -> dict:
    """Random params, boxed with logical axis names (``nn.unbox`` gives plain arrays)."""
    fbank = jnp.zeros((1, config.stream_input_frames, config.input_dim), jnp.float32)
    return SpeechEncoder(config).init(rng, fbank, jnp.array([fbank.shape[1]]))["params"]


def encoder_forward(params: dict, config: EncoderConfig, fbank_btf: jax.Array, lengths_b: jax.Array,
                    *, train: bool = False, rng: jax.Array | None = None, chunk_size=None,
                    left_chunks=None, positions_t: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """``SpeechEncoder.__call__`` on a params tree: (B, T, F), (B,) -> (B, T', D), (B,)."""
    rngs = None
    if train:
        r1, r2 = jax.random.split(rng)
        rngs = {"dropout": r1, "chunk": r2}
    return SpeechEncoder(config).apply({"params": params}, fbank_btf, lengths_b, train, chunk_size,
                                       left_chunks, positions_t, rngs=rngs)


def encoder_stream_step(params: dict, config: EncoderConfig, state: EncoderStreamState,
                        fbank_bwf: jax.Array) -> tuple[EncoderStreamState, jax.Array]:
    """``SpeechEncoder.stream_step`` on a params tree: (B, 4 C + 3, F) -> new state, (B, C, D)."""
    return SpeechEncoder(config).apply({"params": params}, state, fbank_bwf,
                                       method=SpeechEncoder.stream_step)
