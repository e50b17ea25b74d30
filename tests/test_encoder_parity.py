"""Numerical parity of the converted encoder / adapter with PyTorch, and .pt loading.

- A PyTorch reference written here from the official formulas, reading the official state-dict
  layout directly (CI: checks the conversion table numerically, and the fixed-size streaming
  buffers against the official growing ones, positional quirk included).
- The official modules themselves, when /work/official (VITA-MLLM/Freeze-Omni) is present: their
  state-dict keys equal the test fixture, and their outputs equal ours.
"""

import contextlib
import dataclasses
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fo_jax.conversion.official_audiollm import convert_encoder_adapter, load_official_pt
from fo_jax.errors import LoadError
from fo_jax.models.adapter import AdapterStreamState, adapter_forward, adapter_stream_step
from fo_jax.models.encoder import EncoderStreamState, encoder_forward, encoder_stream_step
from tests.test_encoder_conversion import TINY, official_shapes, random_state

torch = pytest.importorskip("torch")
F = torch.nn.functional
pytestmark = pytest.mark.torch

OFFICIAL = os.environ.get("FREEZE_OMNI_OFFICIAL", "/work/official")
ENC, AD = TINY.encoder, TINY.adapter
CHUNKS = 22  # past the quirk onset (call 18)
forward = jax.jit(encoder_forward, static_argnums=1)
step = jax.jit(encoder_stream_step, static_argnums=1)
adapter_step = jax.jit(adapter_stream_step, static_argnums=1)


def official_state(seed=0, adapter=AD):
    state = random_state(official_shapes(ENC, adapter, audio_llm=False), seed)
    for k in state:  # O(1) activations: unit-variance rows for weights, positive CMVN scale
        if k.endswith("weight") and state[k].ndim >= 2:
            state[k] /= np.sqrt(np.prod(state[k].shape[1:]))
        if k.endswith(("norm1.weight", "norm2.weight", "after_norm.weight", "embed.1.weight", "istd")):
            state[k] = 1 + 0.2 * state[k]
    return state


def fbank_stream(chunks, seed=0):
    feats = np.random.default_rng(seed).normal(3, 2, (1, 16 * chunks, 80)).astype(np.float32)
    return np.concatenate([np.zeros((1, 3, 80), np.float32), feats], 1)


# ----------------------------------------------------------------------- PyTorch reference

class TorchReference:
    """The official encoder math on the official state dict (float32)."""

    def __init__(self, state):
        self.t = {k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}
        self.d, self.h = ENC.hidden_size, ENC.num_heads

    def g(self, name):
        return self.t["encoder." + name]

    def embed(self, x):
        x = (x - self.g("global_cmvn.mean")) * self.g("global_cmvn.istd")
        x = F.relu(F.conv2d(x[:, None], self.g("enc.0.core.conv.0.weight"), self.g("enc.0.core.conv.0.bias"), 2))
        x = F.relu(F.conv2d(x, self.g("enc.0.core.conv.2.weight"), self.g("enc.0.core.conv.2.bias"), 2))
        b, c, t, f = x.shape
        x = F.linear(x.transpose(1, 2).reshape(b, t, c * f), self.g("enc.0.core.out.0.weight"),
                     self.g("enc.0.core.out.0.bias"))
        x = F.linear(x, self.g("enc.1.embed.0.weight"), self.g("enc.1.embed.0.bias"))
        x = F.relu(F.layer_norm(x, (self.d,), self.g("enc.1.embed.1.weight"), self.g("enc.1.embed.1.bias")))
        return x * math.sqrt(self.d)

    def pe(self, start, length):
        div = torch.exp(torch.arange(0, self.d, 2, dtype=torch.float32) * -(math.log(10000.0) / self.d))
        pos = torch.arange(start, start + length, dtype=torch.float32)[:, None]
        pe = torch.zeros(length, self.d)
        pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * div), torch.cos(pos * div)
        return pe

    def heads(self, x):
        return x.view(x.shape[0], -1, self.h, self.d // self.h).transpose(1, 2)

    def layer(self, i, x, mask, pe, buffer=None):
        """One block; buffer: None (whole sequence) or [k, v] growing list (infer)."""
        p = f"enc.1.encoders.{i}."

        def lin(n, y, bias=True):
            return F.linear(y, self.g(p + n + ".weight"), self.g(p + n + ".bias") if bias else None)
        y = F.layer_norm(x, (self.d,), self.g(p + "norm1.weight"), self.g(p + "norm1.bias"))
        q, k, v = (self.heads(lin(f"self_attn.linear_{n}", y)) for n in "qkv")
        if buffer is not None:
            if buffer[0] is not None:
                k, v = torch.cat([buffer[0], k], 2), torch.cat([buffer[1], v], 2)
            buffer[:] = [k[:, :, -ENC.buffer_size:], v[:, :, -ENC.buffer_size:]]
        pos = self.heads(lin("self_attn.linear_pos", pe[None], bias=False))
        u = self.g(p + "self_attn.pos_bias_u")[:, None]
        vb = self.g(p + "self_attn.pos_bias_v")[:, None]
        scores = ((q + u) @ k.transpose(-2, -1) + (q + vb) @ pos.transpose(-2, -1)) / math.sqrt(self.d // self.h)
        if mask is not None:
            fill = float(np.finfo(np.float16).min)
            attn = torch.softmax(scores.masked_fill(~mask, fill), -1).masked_fill(~mask, 0.0)
        else:
            attn = torch.softmax(scores, -1)
        out = (attn @ v).transpose(1, 2).reshape(x.shape[0], -1, self.d)
        x = x + lin("self_attn.linear_out", out)
        y = F.layer_norm(x, (self.d,), self.g(p + "norm2.weight"), self.g(p + "norm2.bias"))
        return x + lin("feed_forward.w_2", F.relu(lin("feed_forward.w_1", y)))

    def after(self, x):
        return F.layer_norm(x, (self.d,), self.g("enc.1.after_norm.weight"), self.g("enc.1.after_norm.bias"))

    def forward(self, fbank):
        x = self.embed(torch.from_numpy(fbank))
        t = x.shape[1]
        i = torch.arange(t) // ENC.chunk_size
        mask = (i[None] <= i[:, None]) & (i[None] >= i[:, None] - ENC.left_chunks)
        for n in range(ENC.num_layers):
            x = self.layer(n, x, mask, self.pe(0, t))
        return self.after(x).numpy()

    def infer(self, padded, chunks):
        """The official infer loop: growing buffers, index % 4932, keys from max(0, index - 68)."""
        buffers, index, outs = [[None, None] for _ in range(ENC.num_layers)], 0, []
        size = ENC.chunk_size * (ENC.pe_max_len // ENC.chunk_size) - (ENC.left_chunks + 1) * ENC.chunk_size
        for c in range(chunks):
            x = self.embed(torch.from_numpy(padded[:, 16 * c:16 * c + 19]))
            index = index % size
            length = (0 if buffers[0][0] is None else buffers[0][0].shape[2]) + x.shape[1]
            pe = self.pe(max(0, index - (ENC.left_chunks + 1) * ENC.chunk_size), length)
            for n in range(ENC.num_layers):
                x = self.layer(n, x, None, pe, buffers[n])
            index += ENC.chunk_size
            outs.append(self.after(x).numpy())
        return np.concatenate(outs, 1)


def test_converted_encoder_matches_torch_reference():
    state = official_state()
    params, _, _ = convert_encoder_adapter(state, ENC, AD)
    ref = TorchReference(state)
    padded = fbank_stream(CHUNKS)
    with torch.no_grad():
        want_full, want_stream = ref.forward(padded), ref.infer(padded, CHUNKS)
    ours_full, _ = forward(params, ENC, jnp.asarray(padded), jnp.array([padded.shape[1]]))
    np.testing.assert_allclose(ours_full, want_full, atol=2e-5)
    stream_state, outs = EncoderStreamState.zeros(ENC, 1), []
    for c in range(CHUNKS):
        stream_state, out = step(params, ENC, stream_state, jnp.asarray(padded[:, 16 * c:16 * c + 19]))
        outs.append(out)
    np.testing.assert_allclose(np.concatenate(outs, 1), want_stream, atol=2e-5)
    assert np.abs(want_stream - want_full)[:, 4 * 17:].max() > 1e-3  # the reference has the quirk


@pytest.mark.parametrize("adapter", [dict(), dict(output_dim=5 * 64)])
def test_converted_adapter_matches_torch_reference(adapter):
    ad = dataclasses.replace(AD, **adapter)
    state = official_state(adapter=ad)
    _, variables, _ = convert_encoder_adapter(state, ENC, ad)
    t = {k: torch.from_numpy(np.asarray(v)) for k, v in state.items() if k.startswith("adpter.")}
    x = np.random.default_rng(1).normal(size=(1, 12, 64)).astype(np.float32)

    def conv(y, name, stride):
        return F.conv1d(F.pad(y, (ad.kernel_size - 1, 0)), t[f"adpter.{name}.weight"], t[f"adpter.{name}.bias"], stride)

    def bn(y, name):
        return F.batch_norm(y, t[f"adpter.{name}.running_mean"], t[f"adpter.{name}.running_var"],
                            t[f"adpter.{name}.weight"], t[f"adpter.{name}.bias"], False, 0.0, ad.norm_eps)
    with torch.no_grad():
        y = torch.from_numpy(x).transpose(1, 2)
        if adapter:  # two convs, BatchNorm, ReLU
            y = F.relu(bn(conv(F.relu(bn(conv(y, "conv1d1", 1), "bn1")), "conv1d2", 2), "bn2"))
        else:
            y = conv(y, "conv1d2", 2).transpose(1, 2)
            y = F.gelu(F.layer_norm(y, (128,), t["adpter.bn2.weight"], t["adpter.bn2.bias"], ad.norm_eps))
            y = y.transpose(1, 2)
        want = F.linear(y.transpose(1, 2), t["adpter.project.weight"], t["adpter.project.bias"]).numpy()
    ours, _ = adapter_forward(variables, ad, jnp.asarray(x), jnp.ones((1, 12), bool))
    np.testing.assert_allclose(ours, want, atol=2e-5)


def test_load_official_pt(tmp_path):
    sd = {"encoder.a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
          "adpter.b": torch.tensor([1.5, -2.0], dtype=torch.bfloat16), "n": torch.tensor(3)}
    torch.save(sd, tmp_path / "final.pt")
    out = load_official_pt(tmp_path / "final.pt")
    np.testing.assert_array_equal(out["encoder.a"], np.arange(6).reshape(2, 3))
    assert str(out["adpter.b"].dtype) == "bfloat16" and out["adpter.b"].astype(np.float32).tolist() == [1.5, -2.0]
    torch.save({"model": sd}, tmp_path / "nested.pt")
    assert sorted(load_official_pt(tmp_path / "nested.pt")) == sorted(sd)
    with pytest.raises(LoadError, match="missing.pt: not found"):
        load_official_pt(tmp_path / "missing.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(LoadError, match="garbage.pt: not a readable weights-only PyTorch checkpoint"):
        load_official_pt(tmp_path / "garbage.pt")
    torch.save({"encoder.a": torch.nn.Linear(2, 2)}, tmp_path / "pickle.pt")  # a module: not weights-only
    with pytest.raises(LoadError, match="pickle.pt"):
        load_official_pt(tmp_path / "pickle.pt")


# ----------------------------------------------------------------------- official modules

@contextlib.contextmanager
def official_modules(monkeypatch):
    """Imports the official code; its infer path moves the PE to 'cuda': keep it on the CPU."""
    if not os.path.isdir(os.path.join(OFFICIAL, "models", "encoder")):
        pytest.skip(f"official Freeze-Omni code not found at {OFFICIAL} (set FREEZE_OMNI_OFFICIAL); "
                    "parity with the official modules is checked where it is available")
    monkeypatch.syspath_prepend(OFFICIAL)
    monkeypatch.setattr(sys, "argv", ["test"])  # the official encoder parses sys.argv
    original_to = torch.Tensor.to

    def to_cpu(self, *args, **kwargs):
        if args and args[0] == "cuda":
            return self
        return original_to(self, *args, **kwargs)
    monkeypatch.setattr(torch.Tensor, "to", to_cpu)
    from models.adapter import CNNAdapter, CNNSubsampling, LinearAdapter
    from models.encoder.cmvn import GlobalCMVN
    from models.encoder.encoder import speechEncoder
    yield speechEncoder, GlobalCMVN, CNNSubsampling, CNNAdapter, LinearAdapter


def official_encoder(speech_encoder, global_cmvn, seed=0):
    d = ENC.hidden_size
    overview = {"encoder-input-dim": 80, "encoder-layer-config": "subsampling-transformer", "encoder-output-dim": d}
    para = {"subsampling": {"subsampling-rate": 4, "subsampling-input-dim": 80, "subsampling-output-dim": d},
            "transformer": {"transformer-input-dim": d, "transformer-output-dim": d, "transformer-attention-dim": d,
                            "transformer-attention-heads": ENC.num_heads, "transformer-linear-units": ENC.ffn_size,
                            "transformer-num-blocks": ENC.num_layers, "transformer-chunk_size": ENC.chunk_size,
                            "transformer-left_chunks": ENC.left_chunks, "transformer-dynamic-chunks": False,
                            "transformer-pos-enc-class": "rel-enc", "transformer-input-layer": "linear"}}
    torch.manual_seed(seed)
    cmvn = global_cmvn(torch.randn(80), 1 + 0.2 * torch.rand(80))
    enc = speech_encoder(80, overview, para, global_cmvn=cmvn).eval()
    with torch.no_grad():  # O(1) positional terms (the init of linear_pos / pos biases is small)
        for name, p in enc.named_parameters():
            if "pos_bias" in name:
                p.normal_()
    return enc


def test_fixture_and_numbers_match_official_modules(monkeypatch):
    with official_modules(monkeypatch) as (speech_encoder, global_cmvn, cnn_subsampling, cnn_adapter, linear_adapter):
        enc = official_encoder(speech_encoder, global_cmvn)
        adapters = {"subsampling-layer": (cnn_subsampling(64, 64, 5, "gelu", "layer"), AD),
                    "subsampling-two": (cnn_subsampling(64, 320, 5, "relu", "batch"),
                                        dataclasses.replace(AD, output_dim=320)),
                    "cnn": (cnn_adapter(64, 64, 3), dataclasses.replace(AD, kind="cnn", kernel_size=3)),
                    "linear": (linear_adapter(64, 64), dataclasses.replace(AD, kind="linear"))}
        for name, (module, ad) in adapters.items():
            module.eval()
            official = {"encoder." + k: tuple(v.shape) for k, v in enc.state_dict().items()}
            official.update({"adpter." + k: tuple(v.shape) for k, v in module.state_dict().items()})
            assert official == official_shapes(ENC, ad, audio_llm=False), name

        state = {"encoder." + k: v.numpy() for k, v in enc.state_dict().items()}
        module, ad = adapters["subsampling-layer"]
        state.update({"adpter." + k: v.detach().numpy() for k, v in module.state_dict().items()})
        params, variables, rest = convert_encoder_adapter(state, ENC, ad)
        assert rest == {}

        padded = fbank_stream(CHUNKS, seed=2)
        x = torch.from_numpy(padded)
        with torch.no_grad():  # speechEncoder.forward's loop (it calls an undefined make_pad_mask)
            masks = torch.ones(1, 1, x.shape[1], dtype=torch.bool)
            ys, lens = enc.global_cmvn(x), torch.tensor([x.shape[1]])
            for m in enc.enc:
                ys, lens, masks = m(ys, lens, masks)
            want_full = ys.numpy()
            buffer, pe_index, cache, want_stream, want_emb = [None] * ENC.num_layers, 0, None, [], []
            for c in range(CHUNKS):
                out, buffer, _, _, pe_index = enc.infer(x[:, 16 * c:16 * c + 19], buffer, 0, None, pe_index)
                emb, _, cache = module(out, torch.ones(1, 1, 4, dtype=torch.bool), cache=cache, return_cache=True)
                want_stream.append(out.numpy())
                want_emb.append(emb.numpy())
        ours_full, _ = forward(params, ENC, jnp.asarray(padded), jnp.array([padded.shape[1]]))
        np.testing.assert_allclose(ours_full, want_full, atol=2e-5)
        enc_state, ad_state, outs, embs = EncoderStreamState.zeros(ENC, 1), AdapterStreamState.zeros(ad, 1), [], []
        for c in range(CHUNKS):
            enc_state, out = step(params, ENC, enc_state, jnp.asarray(padded[:, 16 * c:16 * c + 19]))
            ad_state, emb = adapter_step(variables, ad, ad_state, out)
            outs.append(out)
            embs.append(emb)
        want_stream = np.concatenate(want_stream, 1)
        np.testing.assert_allclose(np.concatenate(outs, 1), want_stream, atol=2e-5)
        np.testing.assert_allclose(np.concatenate(embs, 1), np.concatenate(want_emb, 1), atol=5e-5)
        assert pe_index == 4 * CHUNKS
        assert np.abs(want_stream - want_full)[:, 4 * 17:].max() > 1e-3  # the official quirk
