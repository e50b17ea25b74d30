"""Parity with the official PyTorch TiCodec modules (models/decoder/ticodec/models.py of a
VITA-MLLM/Freeze-Omni checkout at $FREEZE_OMNI_OFFICIAL, default /work/official).

Imported through sys.path for these tests only; skipped cleanly where that checkout (or torch) is
absent. Uses the official modules at reduced width (2 resblock kernels, generator 256 wide; the
official encoder hard-codes its widths) with the same random weights on both sides.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fo_jax.conversion import official_codec as oc
from fo_jax.models import codec as C
from fo_jax.models.discriminators import MultiPeriodDiscriminator, MultiScaleDiscriminator
from fo_jax.training import codec_losses as L
from tests.test_codec import FIXTURE, random_official_state

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch
OFFICIAL = Path(os.environ.get("FREEZE_OMNI_OFFICIAL", "/work/official"))
if not (OFFICIAL / "models/decoder/ticodec/models.py").exists():
    pytest.skip(f"official Freeze-Omni code not found at {OFFICIAL} (set FREEZE_OMNI_OFFICIAL)",
                allow_module_level=True)
sys.path.insert(0, str(OFFICIAL))
ticodec = pytest.importorskip("models.decoder.ticodec.models")


class _H(dict):
    __getattr__ = dict.__getitem__


def _official(model_json: dict) -> dict:
    h = _H(model_json)
    return {"generator": ticodec.Generator(h), "encoder": ticodec.Encoder(h), "quantizer": ticodec.Quantizer(h)}


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_fixture_lists_the_official_state_dicts():
    for name in ("real", "reduced"):
        listed = {f"{sec}.{k}": list(v.shape) for sec, m in _official(FIXTURE[name]["model_json"]).items()
                  for k, v in m.state_dict().items()}
        assert listed == FIXTURE[name]["keys"]


@pytest.fixture(scope="module")
def reduced():
    model_json = FIXTURE["reduced"]["model_json"]
    cfg = oc.config_from_official(model_json)
    state = random_official_state({k: tuple(s) for k, s in FIXTURE["reduced"]["keys"].items()}, seed=3)
    mods = _official(model_json)
    for sec, m in mods.items():
        m.load_state_dict({k: torch.from_numpy(np.asarray(a)) for k, a in state[sec].items()})
        m.eval()
    variables = jax.tree_util.tree_map(jnp.asarray, oc.convert_state_dicts(cfg, state))
    return cfg, mods, variables


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_encoder_quantizer_generator_match_official(reduced):
    cfg, mods, variables = reduced
    wav = (0.3 * np.random.default_rng(0).standard_normal((2, 4800))).astype(np.float32)
    with torch.no_grad():
        c, g = mods["encoder"](torch.from_numpy(wav)[:, None])
        q, loss, tokens, gq, gtokens = mods["quantizer"](c, g)
        y = mods["generator"](q, gq)[:, 0].numpy()
    (ours_c, ours_g), out = jax.jit(lambda v, w: C.Codec(cfg).apply(v, w, method=lambda m, x: (m.encoder(x), m(x))))(
            variables, jnp.asarray(wav))
    scale = float(np.abs(c.numpy()).max())
    np.testing.assert_allclose(ours_c, c.numpy().transpose(0, 2, 1), atol=2e-5 * scale)
    np.testing.assert_allclose(ours_g, g.numpy(), atol=2e-5)
    np.testing.assert_array_equal(out.quantizer.tokens_bt, tokens[0].reshape(2, -1).numpy())
    np.testing.assert_array_equal(out.quantizer.global_tokens_bg, torch.stack(gtokens, -1).numpy())
    np.testing.assert_allclose(out.quantizer.loss, loss.numpy(), rtol=1e-5)
    np.testing.assert_allclose(out.wav_bs, y, atol=1e-5)
    assert float(np.std(y)) > 1e-2
    # inference path (VQVAE.forward: embed tokens + global tokens, generate) with the release's fixed voice
    tok = np.random.default_rng(1).integers(0, 1024, (1, 12))
    gt = np.array(C.inference_global_tokens(cfg))
    with torch.no_grad():
        ref = mods["generator"](mods["quantizer"].embed(torch.from_numpy(tok)[..., None]),
                                mods["quantizer"].embed_gst(torch.from_numpy(gt)[:, None]).squeeze(-1))[:, 0].numpy()
    np.testing.assert_allclose(C.decode_chunk(variables["params"], jnp.asarray(tok, jnp.int32), jnp.asarray(gt),
                                              config=cfg), ref, atol=1e-5)


def _disc_state_to_ours(sd: dict) -> dict:
    """Official discriminator state dict -> our params / batch_stats (test-only mapping)."""
    params, stats = {}, {}
    for key, t in sd.items():
        a = t.numpy()
        *parts, leaf = key.split(".")
        path = []
        for p in parts:  # "discriminators.0.convs.3" -> discriminators_0/convs_3
            if p.isdigit():
                path[-1] += f"_{p}"
            else:
                path.append(p)
        if a.ndim == 4:  # Conv2d (O, I, K, 1)
            a = a[..., 0]
        if leaf in ("weight_g", "weight_v", "weight_orig") and a.ndim == 3:
            a = a.transpose(2, 1, 0)
        if leaf in ("weight_u",) or (leaf == "weight_v" and a.ndim == 1):
            target = stats
        else:
            target = params
        for p in path:
            target = target.setdefault(p, {})
        target[leaf] = a
    return {"params": params, "batch_stats": stats}


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_discriminators_and_losses_match_official():
    torch.manual_seed(0)
    mpd, msd = ticodec.MultiPeriodDiscriminator().eval(), ticodec.MultiScaleDiscriminator()
    rng = np.random.default_rng(0)
    y = (0.5 * rng.standard_normal((1, 1, 1001))).astype(np.float32)
    y_hat = (0.5 * rng.standard_normal((1, 1, 1001))).astype(np.float32)
    with torch.no_grad():
        for _ in range(2):  # power iterations, so the spectral-normed scale has a converged sigma
            msd(torch.from_numpy(y), torch.from_numpy(y_hat))
        msd.eval()
        ref_p = mpd(torch.from_numpy(y), torch.from_numpy(y_hat))
        ref_s = msd(torch.from_numpy(y), torch.from_numpy(y_hat))
    for mod, ref, tmod in ((MultiPeriodDiscriminator(), ref_p, mpd), (MultiScaleDiscriminator(), ref_s, msd)):
        v = _disc_state_to_ours(tmod.state_dict())
        v["params"] = C.fold_weight_norm(v["params"])  # (fewer ops to compile)
        if not v["batch_stats"]:
            v.pop("batch_stats")
        run = jax.jit(mod.apply)
        (lr, fr), (lg, fg) = run(v, jnp.asarray(y[:, 0])), run(v, jnp.asarray(y_hat[:, 0]))
        for ours, theirs in zip(lr + lg, ref[0] + ref[1]):
            np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(L.feature_loss(fr, fg), ticodec.feature_loss(ref[2], ref[3]).numpy(), rtol=1e-4)
        np.testing.assert_allclose(L.discriminator_loss(lr, lg)[0],
                                   ticodec.discriminator_loss(ref[0], ref[1])[0].numpy(), rtol=1e-5)
        np.testing.assert_allclose(L.generator_loss(lg)[0], ticodec.generator_loss(ref[1])[0].numpy(), rtol=1e-5)
