"""HiFi-GAN discriminators used to train TiCodec: multi-period (MPD) and multi-scale (MSD).

Each discriminator maps a (B, S) waveform to (logits (B, N), feature maps [...]) and is applied
to real and generated audio separately (the losses live in ``fo_jax.training.codec_losses``).
Layout is NWC like ``fo_jax.models.codec``. The period discriminator's Conv2d with (k, 1) kernels
is a 1-D conv over each of the ``period`` columns, so we fold the columns into the batch:
(B, S) -> (B * period, S / period, 1); its logits are flattened in torch's (time, period) order.
Param names mirror the official modules (``discriminators_0/convs_3``, ``conv_post``).
``width_divisor`` > 1 divides every hidden width (not the 1-channel input/output) for small test and
toy models; 1 is the released HiFi-GAN size.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from fo_jax.models.codec import TORCH_DEFAULT_INIT, Conv1d, replicated, get_padding, leaky_relu

PERIODS = (2, 3, 5, 7, 11)
P_WIDTHS = (32, 128, 512, 1024, 1024)
# (channels, kernel, stride, groups, padding) of the scale discriminator's layers
S_LAYERS = ((128, 15, 1, 1, 7), (128, 41, 2, 4, 20), (256, 41, 2, 16, 20), (512, 41, 4, 16, 20),
            (1024, 41, 4, 16, 20), (1024, 41, 1, 16, 20), (1024, 5, 1, 1, 2), (1, 3, 1, 1, 1))


def _width(channels: int, divisor: int) -> int:
    return channels if channels == 1 else max(channels // divisor, 1)


def _l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x), eps)


class SpectralConv1d(nn.Module):
    """Conv1d with torch-style spectral norm: kernel / sigma, sigma by one power iteration per training call.

    ``weight_orig`` is the (K, Cin/groups, Cout) kernel; the power-iteration vectors ``weight_u``
    (Cout,) and ``weight_v`` (Cin/groups * K,) live in "batch_stats" and are updated (no
    gradient) only when ``update_stats``; sigma = u . (W v) with W torch's (Cout, Cin/groups * K) matrix.
    """

    features: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    groups: int = 1

    @nn.compact
    def __call__(self, x_btc: jax.Array, update_stats: bool = False) -> jax.Array:
        shape = (self.kernel_size, x_btc.shape[-1] // self.groups, self.features)
        w = self.param("weight_orig", replicated(TORCH_DEFAULT_INIT, 3), shape)
        w_mat = w.transpose(2, 1, 0).reshape(self.features, -1)  # torch's weight.view(Cout, -1)
        key = self.make_rng("params") if self.is_initializing() else None
        u = self.variable("batch_stats", "weight_u",
                          lambda: _l2_normalize(jax.random.normal(key, (self.features,))))
        v = self.variable("batch_stats", "weight_v", lambda: _l2_normalize(w_mat.T @ u.value))
        if update_stats and not self.is_initializing():
            wm = jax.lax.stop_gradient(w_mat)
            v.value = _l2_normalize(wm.T @ u.value)
            u.value = _l2_normalize(wm @ v.value)
        sigma = jnp.dot(u.value, w_mat @ v.value)
        y = jax.lax.conv_general_dilated(
                x_btc, w / sigma, (self.stride,), [(self.padding, self.padding)],
                dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=self.groups)
        return y + self.param("bias", replicated(nn.initializers.zeros, 1), (self.features,))


class DiscriminatorP(nn.Module):
    """Period discriminator: (B, S) -> logits (B, N), 6 feature maps (B, period, T_i, C_i)."""

    period: int
    kernel_size: int = 5
    stride: int = 3
    width_divisor: int = 1

    @nn.compact
    def __call__(self, wav_bs: jax.Array, train: bool = False) -> tuple[jax.Array, list[jax.Array]]:
        b, s = wav_bs.shape
        p = self.period
        if s % p:
            wav_bs = jnp.pad(wav_bs, ((0, 0), (0, p - s % p)), mode="reflect")
        x = wav_bs.reshape(b, -1, p).transpose(0, 2, 1).reshape(b * p, -1, 1)
        fmap = []
        k, pad = self.kernel_size, get_padding(5, 1)
        strides = (self.stride,) * (len(P_WIDTHS) - 1) + (1,)
        for i, (ch, stride) in enumerate(zip(P_WIDTHS, strides)):
            ch = _width(ch, self.width_divisor)
            x = leaky_relu(Conv1d(ch, k, stride, padding=pad, kernel_init=TORCH_DEFAULT_INIT, name=f"convs_{i}")(x))
            fmap.append(x.reshape(b, p, *x.shape[1:]))
        x = Conv1d(1, 3, 1, padding=1, kernel_init=TORCH_DEFAULT_INIT, name="conv_post")(x)
        fmap.append(x.reshape(b, p, *x.shape[1:]))
        logits = x.reshape(b, p, -1).transpose(0, 2, 1).reshape(b, -1)
        return logits, fmap


class DiscriminatorS(nn.Module):
    """Scale discriminator: (B, S) -> logits (B, N), 8 feature maps (B, T_i, C_i)."""

    use_spectral_norm: bool = False
    width_divisor: int = 1

    @nn.compact
    def __call__(self, wav_bs: jax.Array, train: bool = False) -> tuple[jax.Array, list[jax.Array]]:
        x, fmap = wav_bs[..., None], []
        for i, (ch, k, stride, groups, pad) in enumerate(S_LAYERS):
            ch = _width(ch, self.width_divisor)
            groups = min(groups, x.shape[-1], ch)  # narrow layers: fewer groups, so each has a channel
            name = "conv_post" if i == len(S_LAYERS) - 1 else f"convs_{i}"
            if self.use_spectral_norm:
                x = SpectralConv1d(ch, k, stride, pad, groups, name=name)(x, train)
            else:
                x = Conv1d(ch, k, stride, padding=pad, groups=groups, kernel_init=TORCH_DEFAULT_INIT, name=name)(x)
            if i < len(S_LAYERS) - 1:
                x = leaky_relu(x)
            fmap.append(x)
        return x.reshape(x.shape[0], -1), fmap


def avg_pool_4_2(wav_bs: jax.Array) -> jax.Array:
    """torch AvgPool1d(4, 2, padding=2) (zero padding counted): (B, S) -> (B, S // 2 + 1)."""
    x = jnp.pad(wav_bs, ((0, 0), (2, 2)))
    return jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 4), (1, 2), "VALID") / 4.0


class MultiPeriodDiscriminator(nn.Module):
    """(B, S) -> ([logits per period], [feature maps per period])."""

    periods: tuple[int, ...] = PERIODS
    width_divisor: int = 1

    @nn.compact
    def __call__(self, wav_bs: jax.Array, train: bool = False) -> tuple[list[jax.Array], list[list[jax.Array]]]:
        outs = [DiscriminatorP(p, width_divisor=self.width_divisor, name=f"discriminators_{i}")(wav_bs, train)
                for i, p in enumerate(self.periods)]
        return [o[0] for o in outs], [o[1] for o in outs]


class MultiScaleDiscriminator(nn.Module):
    """(B, S) -> ([logits per scale], [feature maps per scale]); scales S, S/2, S/4 (the first spectral-normed)."""

    width_divisor: int = 1

    @nn.compact
    def __call__(self, wav_bs: jax.Array, train: bool = False) -> tuple[list[jax.Array], list[list[jax.Array]]]:
        logits, fmaps = [], []
        for i in range(3):
            if i:
                wav_bs = avg_pool_4_2(wav_bs)
            out = DiscriminatorS(use_spectral_norm=(i == 0), width_divisor=self.width_divisor,
                                 name=f"discriminators_{i}")(wav_bs, train)
            logits.append(out[0])
            fmaps.append(out[1])
        return logits, fmaps
