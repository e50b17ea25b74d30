"""TiCodec (the Freeze-Omni speech codec) in Flax Linen: encoder, quantiser, HiFi-GAN generator.

24 kHz waveform <-> one token per 600 samples (40 Hz) from a single 1024-entry codebook, plus 8
"global" tokens (1024 x 16 codebooks, concatenated to a 128-d timbre vector) that the generator adds
after its 128-wide upsampling stage. At inference the release always uses the same global tokens
(``config.global_tokens``), i.e. one fixed voice.

Layout: activations are NWC (B, T, C), as JAX convs want; torch is NCW. Conv kernels are stored
(K, Cin, Cout): torch Conv1d weight (Cout, Cin, K) -> transpose (2, 1, 0); torch ConvTranspose1d
weight (Cin, Cout, K) -> transpose (2, 0, 1) (the spatial flip a transposed conv needs is done in
the forward, so stored kernels stay in torch's orientation).

Weight norm: weight-normed convs keep torch's (``weight_g``, ``weight_v``) params for training, with
``weight_g`` shaped to broadcast against ``weight_v`` (size 1 on the axes the norm runs over), so
``fold_weight_norm`` can turn any of them into a plain ``kernel`` without knowing the layer type.
A conv uses a ``kernel`` param when one is present, so one module serves both forms.

Param names mirror the official modules (``generator/ups_0``, ``encoder/resblocks_3/convs1_2``,
``quantizer/quantizer_modules_globaltokens_5``...), so ``fo_jax.conversion.official_codec`` is a
short table. The codec is small (63 M params) and conv-heavy: its params are replicated (logical
names are all None).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from fo_jax.errors import FoJaxError
from fo_jax.models.configs import CodecConfig, to_dtype

LRELU_SLOPE = 0.1
HIFIGAN_INIT = nn.initializers.normal(0.01)  # HiFi-GAN's init_weights for its convs
TORCH_DEFAULT_INIT = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")  # torch's default

Init = Callable[..., jax.Array]


def replicated(init: Init, ndim: int) -> Init:
    """``init`` boxed with all-None logical axis names (the codec's params are replicated)."""
    return nn.with_logical_partitioning(init, (None,) * ndim)


def leaky_relu(x: jax.Array, slope: float = LRELU_SLOPE) -> jax.Array:
    return jnp.where(x >= 0, x, slope * x)


def get_padding(kernel_size: int, dilation: int = 1) -> int:
    """'Same' padding of an odd kernel."""
    return (kernel_size * dilation - dilation) // 2


def weight_norm_kernel(weight_v: jax.Array, weight_g: jax.Array) -> jax.Array:
    """g * v / ||v||, the norm over the axes where ``weight_g`` has size 1 (torch weight_norm)."""
    axes = tuple(i for i, n in enumerate(weight_g.shape) if n == 1)
    xp = np if isinstance(weight_v, np.ndarray) and isinstance(weight_g, np.ndarray) else jnp  # host-side at load
    return weight_g * weight_v / xp.sqrt(xp.sum(xp.square(weight_v), axis=axes, keepdims=True))


def fold_weight_norm(params: Any) -> Any:
    """Replaces every (weight_g, weight_v) pair by its ``kernel`` (inference form; same outputs)."""
    if not isinstance(params, dict):
        return params
    out = {k: fold_weight_norm(v) for k, v in params.items() if k not in ("weight_g", "weight_v")}
    if "weight_v" in params:
        out["kernel"] = weight_norm_kernel(params["weight_v"], params["weight_g"])
    return out


def _kernel(mod: nn.Module, shape: tuple[int, ...], norm_axis: int, weight_norm: bool, init: Init) -> jax.Array:
    """A conv kernel: a folded ``kernel`` if present, else weight_g * weight_v / ||weight_v||.

    norm_axis: the one axis weight norm does not reduce over (torch's dim 0: Cout for Conv1d,
    Cin for ConvTranspose1d).
    """
    if not weight_norm or mod.has_variable("params", "kernel"):
        return mod.param("kernel", replicated(init, len(shape)), shape)
    v = mod.param("weight_v", replicated(init, len(shape)), shape)
    axes = tuple(i for i in range(len(shape)) if i != norm_axis)
    # torch initialises g to ||v||, so the initial kernel equals v.
    g = mod.param("weight_g", replicated(lambda _: jnp.sqrt(jnp.sum(v * v, axis=axes, keepdims=True)), len(shape)))
    return weight_norm_kernel(v, g)


def _bias(mod: nn.Module, features: int) -> jax.Array:
    return mod.param("bias", replicated(nn.initializers.zeros, 1), (features,))


class Conv1d(nn.Module):
    """torch-style Conv1d over (B, T, Cin) -> (B, T', Cout): symmetric zero padding, groups, dilation."""

    features: int
    kernel_size: int
    stride: int = 1
    dilation: int = 1
    padding: int = 0
    groups: int = 1
    use_bias: bool = True
    weight_norm: bool = True
    kernel_init: Init = HIFIGAN_INIT
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_btc: jax.Array) -> jax.Array:
        shape = (self.kernel_size, x_btc.shape[-1] // self.groups, self.features)
        kernel = _kernel(self, shape, 2, self.weight_norm, self.kernel_init).astype(self.dtype)
        y = jax.lax.conv_general_dilated(
                x_btc.astype(self.dtype), kernel, (self.stride,), [(self.padding, self.padding)],
                rhs_dilation=(self.dilation,), dimension_numbers=("NWC", "WIO", "NWC"),
                feature_group_count=self.groups)
        if self.use_bias:
            y = y + _bias(self, self.features).astype(self.dtype)
        return y


class ConvTranspose1d(nn.Module):
    """torch-style ConvTranspose1d over (B, T, Cin) -> (B, (T-1)*stride - 2*padding + K, Cout)."""

    features: int
    kernel_size: int
    stride: int
    padding: int = 0
    weight_norm: bool = True
    kernel_init: Init = HIFIGAN_INIT
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_btc: jax.Array) -> jax.Array:
        k = self.kernel_size
        kernel = _kernel(self, (k, x_btc.shape[-1], self.features), 1, self.weight_norm, self.kernel_init)
        # A transposed conv = a conv of the stride-dilated input with the spatially flipped kernel.
        pad = k - 1 - self.padding
        y = jax.lax.conv_general_dilated(
                x_btc.astype(self.dtype), kernel[::-1].astype(self.dtype), (1,), [(pad, pad)],
                lhs_dilation=(self.stride,), dimension_numbers=("NWC", "WIO", "NWC"))
        return y + _bias(self, self.features).astype(self.dtype)


class ResBlock1(nn.Module):
    """HiFi-GAN resblock type 1: per dilation d, x += conv(lrelu(conv_d(lrelu(x)))). Keeps (B, T, C)."""

    channels: int
    kernel_size: int
    dilations: tuple[int, ...]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_btc: jax.Array) -> jax.Array:
        k = self.kernel_size
        for j, d in enumerate(self.dilations):
            h = Conv1d(self.channels, k, dilation=d, padding=get_padding(k, d), dtype=self.dtype,
                       name=f"convs1_{j}")(leaky_relu(x_btc))
            h = Conv1d(self.channels, k, padding=get_padding(k), dtype=self.dtype,
                       name=f"convs2_{j}")(leaky_relu(h))
            x_btc = x_btc + h
        return x_btc


class GlobalTokenEncoder(nn.Module):
    """(B, T, C) mid-encoder features -> (B, out) global (timbre) vector: 3 convs, time mean, Linear + BatchNorm."""

    hidden: int
    features: int
    kernel_size: int = 3
    stride: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_btc: jax.Array, train: bool = False) -> jax.Array:
        pad = (self.kernel_size - self.stride) // 2
        # Names follow the official nn.Sequential indices (LeakyReLUs sit at the odd ones).
        for idx, width in ((0, self.hidden), (2, self.hidden), (4, self.features)):
            x_btc = leaky_relu(Conv1d(width, self.kernel_size, self.stride, padding=pad, use_bias=False,
                                      weight_norm=False, dtype=self.dtype, name=f"conv_{idx}")(x_btc))
        x = jnp.mean(x_btc.astype(jnp.float32), axis=1)
        x = nn.Dense(self.features, kernel_init=replicated(TORCH_DEFAULT_INIT, 2),
                     bias_init=replicated(nn.initializers.zeros, 1), name="fn_0")(x)
        x = leaky_relu(x)
        # torch BatchNorm1d(momentum=0.1) == flax momentum 0.9; eval uses the running statistics.
        return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, use_fast_variance=False,
                            scale_init=replicated(nn.initializers.ones, 1),
                            bias_init=replicated(nn.initializers.zeros, 1), name="fn_2")(x)


class Encoder(nn.Module):
    """(B, S) waveform -> (B, S/600, code_dim) continuous codes and the (B, global_dim) global vector.

    Mirror of the generator: strided convs (rates reversed), resblocks in reverse kernel order each
    followed by GroupNorm (16 channels per group), then conv_post (not weight-normed).
    """

    config: CodecConfig

    def setup(self):
        cfg, dtype = self.config, to_dtype(self.config.dtype)
        stages = list(reversed(list(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes))))
        kernels = list(reversed(cfg.resblock_kernel_sizes))
        self.conv_pre = Conv1d(cfg.encoder_initial_channel, 7, padding=3, kernel_init=TORCH_DEFAULT_INIT, dtype=dtype)
        self.ups = [Conv1d(ch, k, stride=u, padding=(k - u) // 2, dtype=dtype)
                    for ch, (u, k) in zip(cfg.encoder_channels, stages)]
        self.resblocks = [ResBlock1(ch, k, cfg.resblock_dilations, dtype)
                          for ch in cfg.encoder_channels for k in kernels]
        self.normalize = [nn.GroupNorm(num_groups=ch // 16, epsilon=1e-6, dtype=dtype, use_fast_variance=False,
                                       scale_init=replicated(nn.initializers.ones, 1),
                                       bias_init=replicated(nn.initializers.zeros, 1))
                          for ch in cfg.encoder_channels for _ in kernels]
        self.conv_post = Conv1d(cfg.code_dim, 3, padding=1, weight_norm=False, dtype=dtype)
        self.GlobalTokenEncoder = GlobalTokenEncoder(cfg.global_encoder_hidden, cfg.global_dim,
                                                     cfg.global_encoder_kernel, cfg.global_encoder_stride, dtype)

    def _stage(self, i: int, x_btc: jax.Array) -> jax.Array:
        nk = len(self.config.resblock_kernel_sizes)
        x_btc = self.ups[i](leaky_relu(x_btc))
        xs = None
        for j in range(nk):
            r = self.resblocks[i * nk + j](x_btc)
            xs = r if xs is None else xs + r
            xs = self.normalize[i * nk + j](xs)  # as released: normalises the running sum
        return xs / nk

    def __call__(self, wav_bs: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
        n = len(self.config.upsample_rates)
        x = self.conv_pre(wav_bs[..., None])
        global_bd = None
        for i in range(n):
            x = self._stage(i, x)
            if i == n // 2 - 1:
                global_bd = self.GlobalTokenEncoder(x, train)
        # The release uses torch's default slope (0.01) here, not 0.1.
        x = self.conv_post(leaky_relu(x, 0.01))
        return x.astype(jnp.float32), global_bd

    def global_features(self, wav_bs: jax.Array, train: bool = False) -> jax.Array:
        """(B, S) -> (B, global_dim): only the stages the global token encoder needs (training's 2nd clip)."""
        x = self.conv_pre(wav_bs[..., None])
        for i in range(len(self.config.upsample_rates) // 2):
            x = self._stage(i, x)
        return self.GlobalTokenEncoder(x, train)


def quantizer_loss(x: jax.Array, z_q: jax.Array, codebook_lambda: float, commitment_lambda: float) -> jax.Array:
    """VQ loss: codebook term moves codes to sg(x), commitment term moves x to sg(codes)."""
    sg = jax.lax.stop_gradient
    return (codebook_lambda * jnp.mean(jnp.square(z_q - sg(x)))
            + commitment_lambda * jnp.mean(jnp.square(sg(z_q) - x)))


def nearest_code(x_nd: jax.Array, codebook_kd: jax.Array) -> jax.Array:
    """(N, D), (K, D) -> (N,) int32 index of the nearest code (squared Euclidean)."""
    d = (jnp.sum(jnp.square(x_nd), -1, keepdims=True) + jnp.sum(jnp.square(codebook_kd), -1)
         - 2.0 * x_nd @ codebook_kd.T)
    return jnp.argmin(d, axis=-1).astype(jnp.int32)


@flax.struct.dataclass
class QuantizerOutput:
    quantized_btd: jax.Array  # straight-through: forward = codes, gradient = identity to the input
    global_bd: jax.Array  # quantised global vector, straight-through as well
    tokens_bt: jax.Array  # (B, T) int32
    global_tokens_bg: jax.Array  # (B, global_codes) int32
    loss: jax.Array  # local VQ loss + global VQ loss (scalar)


class Quantizer(nn.Module):
    """One code_dim-wide codebook for the frame codes; ``global_codes`` narrow ones for the global vector."""

    config: CodecConfig

    def setup(self):
        cfg = self.config
        def codebook(n, d):  # torch's init: uniform(-1/n, 1/n)
            init = lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -1.0 / n, 1.0 / n)
            return nn.Embed(n, d, embedding_init=replicated(init, 2))
        self.quantizer_modules = [codebook(cfg.n_codes, cfg.code_dim)]
        self.quantizer_modules_globaltokens = [codebook(cfg.global_code_size, cfg.global_code_dim)
                                               for _ in range(cfg.global_codes)]

    def embed(self, tokens_bt: jax.Array) -> jax.Array:
        """(B, T) int -> (B, T, code_dim); tokens must be in [0, n_codes)."""
        return jnp.take(self.quantizer_modules[0].embedding, tokens_bt, axis=0)

    def embed_global(self, global_tokens_bg: jax.Array) -> jax.Array:
        """(B, G) int -> (B, G * global_code_dim)."""
        return jnp.concatenate([jnp.take(m.embedding, global_tokens_bg[:, j], axis=0)
                                for j, m in enumerate(self.quantizer_modules_globaltokens)], axis=-1)

    def __call__(self, x_btd: jax.Array, global_bd: jax.Array) -> QuantizerOutput:
        cfg = self.config
        st = lambda x, q: x + jax.lax.stop_gradient(q - x)
        b, t, d = x_btd.shape
        tokens = nearest_code(x_btd.reshape(b * t, d), self.quantizer_modules[0].embedding).reshape(b, t)
        z_q = self.embed(tokens)
        loss = quantizer_loss(x_btd, z_q, cfg.codebook_loss_lambda, cfg.commitment_loss_lambda)
        parts = jnp.split(global_bd, cfg.global_codes, axis=-1)
        g_tokens = jnp.stack([nearest_code(p, m.embedding) for p, m in
                              zip(parts, self.quantizer_modules_globaltokens)], axis=-1)
        g_q = self.embed_global(g_tokens)
        loss = loss + quantizer_loss(global_bd, g_q, cfg.codebook_loss_lambda, cfg.commitment_loss_lambda)
        return QuantizerOutput(st(x_btd, z_q), st(global_bd, g_q), tokens, g_tokens, loss)


def crop_margins(config: CodecConfig) -> tuple[int, ...]:
    """Per upsampling stage, the tokens of context its resblock input needs around the output we keep.

    Walks the generator backwards adding each layer's one-sided receptive radius (conv_post 3
    samples; ResBlock1 sum_j (k-1)/2 * (d_j + 1) frames; a transposed conv ceil(k/u) input frames).
    Released codec: (10, 2, 1, 1) tokens.
    """
    radius = 3  # conv_post (kernel 7), in output samples
    margins = []
    frames_per_token = config.samples_per_token
    for u, k in reversed(list(zip(config.upsample_rates, config.upsample_kernel_sizes))):
        radius += max((kk - 1) // 2 * (sum(config.resblock_dilations) + len(config.resblock_dilations))
                      for kk in config.resblock_kernel_sizes)
        margins.append(-(-radius // frames_per_token))
        radius = -(-radius // u) + -(-k // u)  # in the previous stage's frames
        frames_per_token //= u
    return tuple(reversed(margins))


class Generator(nn.Module):
    """(B, T, code_dim) codes + (B, global_dim) global vector -> (B, T * 600) waveform in (-1, 1).

    ``trim=(left, right)`` returns only samples [left * 600, (T - right) * 600): the same values as
    slicing the full output, but the later (long) stages run only on the kept tokens plus the
    context they need (``crop_margins``), as the streaming vocoder discards the rest anyway.
    """

    config: CodecConfig

    @nn.compact
    def __call__(self, x_btd: jax.Array, global_bd: jax.Array, trim: tuple[int, int] = (0, 0)) -> jax.Array:
        cfg, dtype = self.config, to_dtype(self.config.dtype)
        nk = len(cfg.resblock_kernel_sizes)
        left, right = trim
        start, end = 0, x_btd.shape[1]  # the tokens the current activations cover
        frames = 1  # frames per token at the current stage
        x = Conv1d(cfg.upsample_initial_channel, 7, padding=3, kernel_init=TORCH_DEFAULT_INIT, dtype=dtype,
                   name="conv_pre")(x_btd)
        for i, (u, k, margin) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes, crop_margins(cfg))):
            ch = cfg.generator_channels[i]
            x = ConvTranspose1d(ch, k, u, (k - u) // 2, dtype=dtype, name=f"ups_{i}")(leaky_relu(x))
            frames *= u
            # Crop to the kept tokens + margin. Where the crop reaches the window edge nothing is cut,
            # so the zero padding there is the same as in the full computation.
            new_start, new_end = max(start, left - margin), min(end, x_btd.shape[1] - right + margin)
            x = x[:, (new_start - start) * frames:(new_end - start) * frames]
            start, end = new_start, new_end
            x = sum(ResBlock1(ch, kk, cfg.resblock_dilations, dtype, name=f"resblocks_{i * nk + j}")(x)
                    for j, kk in enumerate(cfg.resblock_kernel_sizes)) / nk
            if ch == cfg.global_dim:  # as released: at every stage whose width matches
                x = x + global_bd[:, None, :].astype(dtype)
        x = Conv1d(1, 7, padding=3, dtype=dtype, name="conv_post")(leaky_relu(x))
        x = x[:, (left - start) * frames:(x_btd.shape[1] - right - start) * frames]
        return jnp.tanh(x[..., 0].astype(jnp.float32))


@flax.struct.dataclass
class CodecOutput:
    wav_bs: jax.Array  # (B, T * 600) reconstruction
    quantizer: QuantizerOutput
    global_features_bd: jax.Array  # encoder's global vector before quantisation


class Codec(nn.Module):
    """TiCodec. Variables: {"params": {encoder, quantizer, generator}, "batch_stats": {encoder}}.

    Methods (``apply(..., method=...)``):
      __call__: waveform -> reconstruction + quantiser output (training; train=True needs
        ``mutable=["batch_stats"]``).
      encode: waveform -> (tokens, global tokens).
      decode: (tokens, global tokens) -> waveform.
      global_features: waveform -> global vector (first half of the encoder only).
    """

    config: CodecConfig

    def setup(self):
        self.encoder = Encoder(self.config)
        self.quantizer = Quantizer(self.config)
        self.generator = Generator(self.config)

    def __call__(self, wav_bs: jax.Array, train: bool = False) -> CodecOutput:
        c, g = self.encoder(wav_bs, train)
        q = self.quantizer(c, g)
        return CodecOutput(self.generator(q.quantized_btd, q.global_bd), q, g)

    def encode(self, wav_bs: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
        """(B, S) float waveform -> tokens (B, S // 600) int32, global tokens (B, global_codes) int32."""
        q = self.quantizer(*self.encoder(wav_bs, train))
        return q.tokens_bt, q.global_tokens_bg

    def decode(self, tokens_bt: jax.Array, global_tokens_bg: jax.Array, trim: tuple[int, int] = (0, 0)) -> jax.Array:
        """(B, T) tokens, (B, G) global tokens -> (B, (T - sum(trim)) * 600) float32 waveform."""
        return self.generator(self.quantizer.embed(tokens_bt), self.quantizer.embed_global(global_tokens_bg), trim)

    def global_features(self, wav_bs: jax.Array, train: bool = False) -> jax.Array:
        return self.encoder.global_features(wav_bs, train)


def init_variables(config: CodecConfig, rng: jax.Array) -> dict:
    """Random variables {"params", "batch_stats"}, params in weight-norm form and boxed with logical names."""
    wav = jnp.zeros((1, 2 * config.samples_per_token), jnp.float32)
    return dict(jax.jit(Codec(config).init)(rng, wav))  # eager init of ~250 convs is very slow


def inference_global_tokens(config: CodecConfig) -> jax.Array:
    """(1, global_codes) int32: the release's fixed voice."""
    return jnp.asarray([config.global_tokens], jnp.int32)


@functools.partial(jax.jit, static_argnames=("config", "trim"))
def decode_chunk(params: dict, tokens_bt: jax.Array, global_tokens_bg: jax.Array, *,
                 config: CodecConfig, trim: tuple[int, int] = (0, 0)) -> jax.Array:
    """The streaming vocoder's step: (B, T) tokens, (B, G) global tokens -> (B, (T - l - r) * 600) float32.

    Decodes a token window (tokens in [0, n_codes)); ``trim=(l, r)`` drops the first l and last r
    tokens' samples, i.e. equals ``decode_chunk(...)[:, l * 600:(T - r) * 600]``, computed faster.
    Compiles once per (config, B, T, trim). ``params``: the "params" collection, folded (faster)
    or in weight-norm form.
    """
    left, right = trim
    if left < 0 or right < 0 or left + right >= tokens_bt.shape[1]:
        raise FoJaxError(f"codec decode_chunk: trim {trim} leaves no samples of a {tokens_bt.shape[1]}-token window")
    return Codec(config).apply({"params": params}, tokens_bt, global_tokens_bg, (left, right), method=Codec.decode)


@functools.partial(jax.jit, static_argnames=("config",))
def _encode(variables: dict, wav_bs: jax.Array, *, config: CodecConfig) -> tuple[jax.Array, jax.Array]:
    return Codec(config).apply(variables, wav_bs, method=Codec.encode)


def encode(config: CodecConfig, variables: dict, wav: Any) -> tuple[jax.Array, jax.Array]:
    """(S,) or (B, S) 24 kHz waveform in [-1, 1] -> tokens (B, S // 600), global tokens (B, G).

    ``variables`` holds "params" and "batch_stats" (the global token encoder's BatchNorm).
    """
    wav = jnp.asarray(wav, jnp.float32)
    if wav.ndim == 1:
        wav = wav[None]
    if wav.ndim != 2:
        raise FoJaxError(f"codec encode: expected a (samples,) or (batch, samples) waveform, got shape {wav.shape}")
    if wav.shape[1] < config.samples_per_token:
        raise FoJaxError(f"codec encode: {wav.shape[1]} samples is shorter than one token "
                         f"({config.samples_per_token} samples at {config.sample_rate} Hz)")
    return _encode(variables, wav, config=config)


def decode(config: CodecConfig, params: dict, tokens: Any, global_tokens: Any | None = None) -> jax.Array:
    """(T,) or (B, T) tokens [+ (B, G) global tokens; default: the release's] -> (B, T * 600) float32."""
    tokens = np.asarray(tokens)
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2 or tokens.shape[1] == 0:
        raise FoJaxError(f"codec decode: expected (T,) or (B, T) tokens with T > 0, got shape {tokens.shape}")
    if tokens.min() < 0 or tokens.max() >= config.n_codes:
        raise FoJaxError(f"codec decode: tokens must lie in [0, {config.n_codes}), "
                         f"got [{tokens.min()}, {tokens.max()}]")
    if global_tokens is None:
        global_tokens = np.repeat(np.asarray(inference_global_tokens(config)), tokens.shape[0], axis=0)
    global_tokens = np.asarray(global_tokens)
    if global_tokens.shape != (tokens.shape[0], config.global_codes):
        raise FoJaxError(f"codec decode: global tokens shape {global_tokens.shape}, expected "
                         f"({tokens.shape[0]}, {config.global_codes})")
    return decode_chunk(params, jnp.asarray(tokens, jnp.int32), jnp.asarray(global_tokens, jnp.int32), config=config)
