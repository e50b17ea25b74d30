"""Codec training side: discriminator shapes, GAN / feature / mel / VQ losses vs straightforward references."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fo_jax.config import load_config, model_config
from fo_jax.models import codec as C
from fo_jax.models.discriminators import MultiPeriodDiscriminator, MultiScaleDiscriminator, avg_pool_4_2
from fo_jax.training import codec_losses as L

TINY = model_config(load_config("configs/freeze_omni.py:tiny")).codec
REAL = model_config(load_config("configs/freeze_omni.py:freeze_omni")).codec


def _conv_len(n: int, k: int, s: int, p: int) -> int:
    return (n + 2 * p - k) // s + 1


@pytest.fixture(scope="module")
def discriminators():
    """Output shapes by abstract evaluation (no compile; values: tests/test_codec_parity.py)."""
    wav = jax.ShapeDtypeStruct((2, 1001), jnp.float32)
    out = {}
    for name, mod in (("mpd", MultiPeriodDiscriminator()), ("msd", MultiScaleDiscriminator())):
        variables = nn.unbox(jax.eval_shape(mod.init, jax.random.PRNGKey(0), wav))
        out[name] = (mod, variables, jax.eval_shape(mod.apply, variables, wav))
    return wav, out


def test_multi_period_discriminator_shapes(discriminators):
    wav, d = discriminators
    _, _, (logits, fmaps) = d["mpd"]
    assert len(logits) == len(fmaps) == 5
    for p, lg, fm in zip((2, 3, 5, 7, 11), logits, fmaps):
        h = -(-1001 // p)  # reflect-padded to a multiple of the period
        widths = []
        for ch, s in ((32, 3), (128, 3), (512, 3), (1024, 3), (1024, 1)):
            h = _conv_len(h, 5, s, 2)
            widths.append((2, p, h, ch))
        widths.append((2, p, _conv_len(h, 3, 1, 1), 1))
        assert [f.shape for f in fm] == widths
        assert lg.shape == (2, widths[-1][2] * p)


def test_multi_scale_discriminator_shapes_and_spectral_norm(discriminators):
    wav, d = discriminators
    mod, variables, (logits, fmaps) = d["msd"]
    n = 1001
    for i, (lg, fm) in enumerate(zip(logits, fmaps)):
        if i:
            n = (n + 4 - 4) // 2 + 1  # AvgPool1d(4, 2, padding=2)
        h, shapes = n, []
        for ch, k, s, p in ((128, 15, 1, 7), (128, 41, 2, 20), (256, 41, 2, 20), (512, 41, 4, 20),
                            (1024, 41, 4, 20), (1024, 41, 1, 20), (1024, 5, 1, 2), (1, 3, 1, 1)):
            h = _conv_len(h, k, s, p)
            shapes.append((2, h, ch))
        assert [f.shape for f in fm] == shapes and lg.shape == (2, h)
    # only the first scale is spectral-normed (power-iteration vectors in batch_stats), the others weight-normed
    assert set(variables["batch_stats"]) == {"discriminators_0"}
    assert set(variables["batch_stats"]["discriminators_0"]["convs_1"]) == {"weight_u", "weight_v"}
    assert "weight_orig" in variables["params"]["discriminators_0"]["convs_3"]
    assert {"weight_g", "weight_v"} <= set(variables["params"]["discriminators_1"]["convs_3"])


def test_spectral_norm_divides_by_the_top_singular_value():
    from fo_jax.models.discriminators import SpectralConv1d

    conv = SpectralConv1d(6, 3, padding=1)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 9, 4)), jnp.float32)
    v = nn.unbox(conv.init(jax.random.PRNGKey(1), x))
    step = jax.jit(lambda v: conv.apply(v, x, True, mutable=["batch_stats"])[1]["batch_stats"])
    u0 = v["batch_stats"]["weight_u"]
    for _ in range(50):  # one power iteration per training call: converges to sigma_max
        v = {"params": v["params"], "batch_stats": step(v)}
    assert not np.allclose(u0, v["batch_stats"]["weight_u"])
    assert np.isclose(np.linalg.norm(v["batch_stats"]["weight_u"]), 1.0, atol=1e-5)
    w = np.asarray(v["params"]["weight_orig"])
    sigma = np.linalg.svd(w.transpose(2, 1, 0).reshape(6, -1), compute_uv=False)[0]
    ref = jax.lax.conv_general_dilated(x, w / sigma, (1,), [(1, 1)], dimension_numbers=("NWC", "WIO", "NWC"))
    np.testing.assert_allclose(conv.apply(v, x) - v["params"]["bias"], ref, atol=1e-5)


def test_avg_pool_counts_the_zero_padding():
    x = np.arange(1.0, 8.0)[None]  # 7 samples -> 4 outputs
    padded = np.pad(x[0], 2)
    ref = [padded[2 * i:2 * i + 4].sum() / 4 for i in range(4)]
    np.testing.assert_allclose(avg_pool_4_2(jnp.asarray(x))[0], ref, rtol=1e-6)


def test_gan_and_feature_losses_match_reference_loops():
    rng = np.random.default_rng(0)
    real = [rng.standard_normal((2, n)).astype(np.float32) for n in (5, 9, 3)]
    gen = [rng.standard_normal((2, n)).astype(np.float32) for n in (5, 9, 3)]
    fr = [[rng.standard_normal((2, 4, c)) for c in (3, 1)] for _ in range(3)]
    fg = [[rng.standard_normal((2, 4, c)) for c in (3, 1)] for _ in range(3)]
    total, r_terms, g_terms = L.discriminator_loss(real, gen)
    ref_r = [np.mean((1 - a) ** 2) for a in real]
    ref_g = [np.mean(b ** 2) for b in gen]
    np.testing.assert_allclose(total, sum(ref_r) + sum(ref_g), rtol=1e-6)
    np.testing.assert_allclose(r_terms, ref_r, rtol=1e-6)
    np.testing.assert_allclose(g_terms, ref_g, rtol=1e-6)
    gl, g_each = L.generator_loss(gen)
    np.testing.assert_allclose(g_each, [np.mean((1 - b) ** 2) for b in gen], rtol=1e-6)
    np.testing.assert_allclose(gl, sum(np.mean((1 - b) ** 2) for b in gen), rtol=1e-6)
    ref_fm = 0.0
    for dr, dg in zip(fr, fg):
        for a, b in zip(dr, dg):
            ref_fm += np.abs(a - b).sum() / a.size
    np.testing.assert_allclose(L.feature_loss(fr, fg), 2 * ref_fm, rtol=1e-6)


def test_mel_filterbank_matches_a_loop_reference():
    sr, n_fft, n_mels, fmin, fmax = 24000, 1024, 80, 0.0, 8000.0
    fb = L.mel_filterbank(sr, n_fft, n_mels, fmin, fmax)
    assert fb.shape == (80, 513)

    def hz_to_mel(f):  # Slaney: 200/3 Hz per mel up to 1 kHz, then 27 mels per factor 6.4
        return f / (200 / 3) if f < 1000 else 15 + 27 * np.log(f / 1000) / np.log(6.4)

    def mel_to_hz(m):
        return m * 200 / 3 if m < 15 else 1000 * 6.4 ** ((m - 15) / 27)

    lo_m, hi_m = hz_to_mel(fmin), hz_to_mel(fmax)
    edges = [mel_to_hz(lo_m + (hi_m - lo_m) * i / (n_mels + 1)) for i in range(n_mels + 2)]
    ref = np.zeros((n_mels, n_fft // 2 + 1))
    for m in range(n_mels):
        a, b, c = edges[m], edges[m + 1], edges[m + 2]
        for k in range(n_fft // 2 + 1):
            f = k * sr / n_fft
            if a < f <= b:
                ref[m, k] = (f - a) / (b - a)
            elif b < f < c:
                ref[m, k] = (c - f) / (c - b)
        ref[m] *= 2 / (c - a)
    np.testing.assert_allclose(fb, ref, atol=1e-7)
    assert fb[:, 513 * 8000 // 12000 + 2:].max() == 0  # nothing above fmax


def _reference_log_mel(wav: np.ndarray, n_fft, n_mels, sr, hop, win, fmin, fmax) -> np.ndarray:
    pad = (n_fft - hop) // 2
    x = np.pad(wav.astype(np.float64), (pad, pad), mode="reflect")
    window = np.zeros(n_fft)
    window[(n_fft - win) // 2:(n_fft - win) // 2 + win] = np.hanning(win + 1)[:-1]  # periodic Hann
    frames = []
    for start in range(0, len(x) - n_fft + 1, hop):
        spec = np.fft.rfft(x[start:start + n_fft] * window)
        frames.append(np.sqrt(spec.real ** 2 + spec.imag ** 2 + 1e-9))
    mel = np.stack(frames) @ L.mel_filterbank(sr, n_fft, n_mels, fmin, fmax).T.astype(np.float64)
    return np.log(np.maximum(mel, 1e-5))


def test_mel_spectrogram_and_mel_l1_loss_match_references():
    rng = np.random.default_rng(0)
    y = (0.3 * rng.standard_normal((2, 4800))).astype(np.float32)
    y_hat = (0.3 * rng.standard_normal((2, 4800))).astype(np.float32)
    args = (REAL.n_fft, REAL.n_mels, REAL.sample_rate, REAL.hop_size, REAL.win_size, REAL.fmin, REAL.fmax)
    mel = L.codec_mel(REAL, jnp.asarray(y))
    assert mel.shape == (2, 4800 // 240, 80)
    np.testing.assert_allclose(mel[1], _reference_log_mel(y[1], *args), atol=2e-4)
    full = args[:-1] + (12000.0,)  # fmax_for_loss None -> Nyquist
    ref = np.mean([np.abs(_reference_log_mel(a, *full) - _reference_log_mel(b, *full)).mean()
                   for a, b in zip(y, y_hat)])
    np.testing.assert_allclose(L.mel_l1_loss(REAL, jnp.asarray(y), jnp.asarray(y_hat)), ref, rtol=1e-4)
    assert float(L.mel_l1_loss(REAL, jnp.asarray(y), jnp.asarray(y))) == 0.0


def test_mel_matches_torch_stft():
    torch = pytest.importorskip("torch")
    wav = np.random.default_rng(1).standard_normal((1, 4800)).astype(np.float32) * 0.2
    args = (REAL.n_fft, REAL.n_mels, REAL.sample_rate, REAL.hop_size, REAL.win_size, REAL.fmin, REAL.fmax)
    pad = (REAL.n_fft - REAL.hop_size) // 2
    x = torch.nn.functional.pad(torch.from_numpy(wav)[:, None], (pad, pad), mode="reflect")[:, 0]
    spec = torch.stft(x, REAL.n_fft, REAL.hop_size, REAL.win_size, torch.hann_window(REAL.win_size), center=False,
                      return_complex=True)
    mag = torch.sqrt(spec.real ** 2 + spec.imag ** 2 + 1e-9).numpy()[0].T
    fb = L.mel_filterbank(REAL.sample_rate, REAL.n_fft, REAL.n_mels, REAL.fmin, REAL.fmax)
    ref = np.log(np.maximum(mag @ fb.T, 1e-5))
    np.testing.assert_allclose(L.mel_spectrogram(jnp.asarray(wav), *args)[0], ref, atol=2e-4)


def test_quantizer_nearest_codes_straight_through_and_vq_loss_gradients():
    q = C.Quantizer(TINY)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 3, TINY.code_dim)), jnp.float32) * 0.05
    g = jnp.asarray(rng.standard_normal((2, TINY.global_dim)), jnp.float32) * 0.05
    params = nn.unbox(jax.jit(q.init)(jax.random.PRNGKey(0), x, g)["params"])
    apply = jax.jit(lambda p, xx: q.apply({"params": p}, xx, g))
    out = apply(params, x)
    book = np.asarray(params["quantizer_modules_0"]["embedding"])
    d = ((np.asarray(x)[:, :, None, :] - book[None, None]) ** 2).sum(-1)
    np.testing.assert_array_equal(out.tokens_bt, d.argmin(-1))
    for j in range(TINY.global_codes):
        gb = np.asarray(params[f"quantizer_modules_globaltokens_{j}"]["embedding"])
        part = np.asarray(g)[:, j * TINY.global_code_dim:(j + 1) * TINY.global_code_dim]
        np.testing.assert_array_equal(out.global_tokens_bg[:, j], ((part[:, None] - gb[None]) ** 2).sum(-1).argmin(-1))
    z = book[np.asarray(out.tokens_bt)]
    np.testing.assert_allclose(out.quantized_btd, z, atol=1e-6)  # forward value = the codes
    zg = np.concatenate([np.asarray(params[f"quantizer_modules_globaltokens_{j}"]["embedding"])[
        np.asarray(out.global_tokens_bg[:, j])] for j in range(TINY.global_codes)], -1)
    ref_loss = 1.25 * np.mean((z - np.asarray(x)) ** 2) + 1.25 * np.mean((zg - np.asarray(g)) ** 2)
    np.testing.assert_allclose(out.loss, ref_loss, rtol=1e-5)
    # straight-through: d(sum(w * quantized))/dx = w; VQ loss: commitment pulls x, codebook term pulls codes
    w = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    gx = jax.jit(jax.grad(lambda xx: jnp.sum(w * apply(params, xx).quantized_btd)))(x)
    np.testing.assert_allclose(gx, w, rtol=1e-6)
    gp, gx_loss = jax.jit(jax.grad(lambda p, xx: apply(p, xx).loss, argnums=(0, 1)))(params, x)
    np.testing.assert_allclose(gx_loss, 0.25 * 2 * (np.asarray(x) - z) / x.size, rtol=1e-4, atol=1e-9)
    gbook = gp["quantizer_modules_0"]["embedding"]
    ref_gbook = np.zeros_like(book)
    np.add.at(ref_gbook, np.asarray(out.tokens_bt).ravel(),
              (2 * (z - np.asarray(x)) / x.size).reshape(-1, TINY.code_dim))
    np.testing.assert_allclose(gbook, ref_gbook, rtol=1e-4, atol=1e-9)


def test_global_consistency_and_generator_objective():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((3, 8)), rng.standard_normal((3, 8))
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    np.testing.assert_allclose(L.global_consistency_loss(jnp.asarray(a), jnp.asarray(b)), 1 - cos.mean(), rtol=1e-5)
    assert abs(float(L.global_consistency_loss(jnp.asarray(a), jnp.asarray(2 * a)))) < 1e-6
    terms = {"mel": 0.5, "vq": 0.2, "adv": 3.0}
    assert L.generator_objective(terms) == pytest.approx(45 * 0.5 + 10 * 0.2 + 3.0)
    with pytest.raises(KeyError, match="stft"):
        L.generator_objective({"stft": 1.0})
