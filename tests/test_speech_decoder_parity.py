"""Parity with transformers' PyTorch LlamaDecoderLayer: single blocks and the whole decoder, ± KV prefix.

The torch side is a module with the official decoder's submodule names (``embedding``,
``layers_pre_nn``, ``layers``, ``layers_prefix``, ``norm``, ``out_fnn``); its state dict goes
through our conversion table. Its forward follows the release's training forward: the prefix
layers write K/V into a DynamicCache that the shared layers then extend, additive float masks.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fo_jax.conversion.official_decoder import convert_state_dict
from fo_jax.layers.kv_cache import KVCache
from fo_jax.models.qwen2 import Qwen2Block
from fo_jax.models.speech_decoder import SpeechDecoder, block_config, decoder_loss, decoder_mask, make_targets
from tests.test_speech_decoder import TINY

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

from transformers import LlamaConfig  # noqa: E402
from transformers.cache_utils import DynamicCache  # noqa: E402
from transformers.models.llama.modeling_llama import (LlamaDecoderLayer, LlamaRMSNorm,  # noqa: E402
                                                      LlamaRotaryEmbedding)


def llama_config(cfg=TINY) -> LlamaConfig:
    lc = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                     intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                     num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                     max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
                     rope_theta=cfg.rope_theta)
    lc._attn_implementation = "eager"  # what a bare LlamaConfig gave the release (transformers 4.45)
    return lc


class TorchDecoder(torch.nn.Module):
    """The official decoder's submodules, randomly initialised (norms perturbed so they matter)."""

    def __init__(self, cfg=TINY, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        lc = llama_config(cfg)
        self.embedding = torch.nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers_pre_nn = torch.nn.ModuleList(LlamaDecoderLayer(lc, i) for i in range(cfg.num_layers // 2))
        self.layers = torch.nn.ModuleList(LlamaDecoderLayer(lc, i) for i in range(cfg.num_layers))
        self.layers_prefix = torch.nn.ModuleList(LlamaDecoderLayer(lc, i) for i in range(cfg.num_layers))
        self.norm = LlamaRMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=lc)
        self.out_fnn = torch.nn.Linear(cfg.hidden_size, cfg.vocab_size)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if "norm" in name:
                    p.add_(0.2 * torch.randn_like(p))
        self.eval()

    def params(self, cfg=TINY):
        sd = {k: v.detach().numpy() for k, v in self.state_dict().items()}
        return jax.tree.map(jnp.asarray, convert_state_dict(sd, cfg))

    def rope(self, x, t):
        return self.rotary_emb(x, torch.arange(t)[None])

    def stack(self, layers, x, allowed, cache=None):
        """Runs layers with a (B, T, S) bool mask turned into the release's additive float mask."""
        bias = (~allowed)[:, None].float() * torch.finfo(torch.float32).min
        emb = self.rope(x, x.shape[1])
        for layer in layers:
            x = layer(x, attention_mask=bias, position_embeddings=emb, cache=cache, use_cache=cache is not None)
        return x

    def forward(self, cfg, text, text_lens, codes, code_lens, prefix=None, prefix_lens=None):
        """The release's training forward: (B, Y + 1, V) logits."""
        b, n, _ = text.shape
        valid = torch.arange(n)[None] < torch.as_tensor(text_lens)[:, None]
        ctx = self.stack(self.layers_pre_nn, text, valid[:, :, None] & valid[:, None, :])
        ctx = torch.cat([self.embedding(torch.full((b, 1), cfg.context_start_id)), ctx], 1)
        y = codes.shape[1]
        inputs = torch.full((b, y + 1), cfg.pad_id)
        inputs[:, 0] = cfg.start_id
        for i in range(b):
            inputs[i, 1: code_lens[i] + 1] = codes[i, : code_lens[i]]
        x = torch.cat([ctx, self.embedding(inputs)], 1)
        wc, t = ctx.shape[1], x.shape[1]
        p = 0 if prefix is None else prefix.shape[1]
        allowed = torch.zeros(b, t, p + t, dtype=torch.bool)
        for i in range(b):  # the release's masks, row by row
            nc, nt = text_lens[i] + 1, code_lens[i] + 1
            np_ = 0 if prefix is None else prefix_lens[i]
            allowed[i, :nc, :np_] = True
            allowed[i, :nc, p: p + nc] = True
            allowed[i, wc: wc + nt, :np_] = True
            allowed[i, wc: wc + nt, p: p + nc] = True
            allowed[i, wc: wc + nt, p + wc: p + wc + nt] = torch.tril(torch.ones(nt, nt, dtype=torch.bool))
        cache = DynamicCache()
        if prefix is not None:
            pv = torch.arange(p)[None] < torch.as_tensor(prefix_lens)[:, None]
            self.stack(self.layers_prefix, prefix, pv[:, :, None] & pv[:, None, :], cache)
        h = self.norm(self.stack(self.layers, x, allowed, cache))
        return self.out_fnn(h[:, wc:])


@pytest.fixture(scope="module")
def torch_decoder():
    return TorchDecoder()


def _valid_max_diff(a, b, lens):
    return max(np.abs(a[i, :n] - b[i, :n]).max() for i, n in enumerate(lens))


@jax.jit
def _apply_block(params, x, mask, cache=None):
    b, t, _ = x.shape
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    return Qwen2Block(block_config(TINY)).apply({"params": params}, x, positions, mask, cache, 0)


@pytest.mark.parametrize("stack", ["layers_pre_nn", "layers", "layers_prefix"])
def test_block_matches_llama_decoder_layer(torch_decoder, stack):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 7, TINY.hidden_size)).astype(np.float32)
    # Row 0 causal, row 1 bidirectional over its first 5 positions.
    mask = np.zeros((2, 7, 7), bool)
    mask[0] = np.tril(np.ones((7, 7), bool))
    mask[1, :, :5] = True
    layer = getattr(torch_decoder, stack)[0]
    with torch.no_grad():
        ref = torch_decoder.stack([layer], torch.tensor(x), torch.tensor(mask)).numpy()
    ours, _ = _apply_block(torch_decoder.params()[f"{stack}_0"], jnp.asarray(x), jnp.asarray(mask))
    assert np.abs(np.asarray(ours) - ref).max() <= 1e-5


def test_block_with_kv_prefix_matches_llama_decoder_layer(torch_decoder):
    """Prefix K/V in the torch layer's cache (positions of the block from 0) vs ours in KVCache slots."""
    rng = np.random.default_rng(1)
    b, p, t, k, h = 2, 5, 6, TINY.num_kv_heads, TINY.head_dim
    x = rng.standard_normal((b, t, TINY.hidden_size)).astype(np.float32)
    pk, pv = (rng.standard_normal((b, p, k, h)).astype(np.float32) for _ in range(2))
    mask = np.ones((b, t, p + t), bool)
    mask[1, :, 3:p] = False  # row 1 sees only 3 prefix entries
    mask[:, :, p:] = np.tril(np.ones((t, t), bool))
    layer = torch_decoder.layers[0]
    cache = DynamicCache()
    cache.update(torch.tensor(pk).transpose(1, 2), torch.tensor(pv).transpose(1, 2), 0)
    with torch.no_grad():
        ref = torch_decoder.stack([layer], torch.tensor(x), torch.tensor(mask), cache).numpy()
    ours_cache = KVCache.zeros(1, b, p + t, k, h)
    # the cache layouts: keys (B, K, S, H), values (B, K, H, S)
    ours_cache = ours_cache.replace(k=ours_cache.k.at[0, :, :, :p].set(pk.transpose(0, 2, 1, 3)),
                                    v=ours_cache.v.at[0, ..., :p].set(pv.transpose(0, 2, 3, 1)),
                                    lengths=jnp.full((b,), p, jnp.int32))
    ours, ours_cache = _apply_block(torch_decoder.params()["layers_0"], jnp.asarray(x), jnp.asarray(mask),
                                    ours_cache)
    assert np.abs(np.asarray(ours) - ref).max() <= 1e-5
    ref_k = cache.layers[0].keys.numpy()  # (B, K, P + T, H), rotated
    assert np.abs(np.asarray(ours_cache.k[0]) - ref_k).max() <= 1e-5


def _padded_batch(seed=2):
    rng = np.random.default_rng(seed)
    d = TINY.hidden_size
    text_lens, prefix_lens, code_lens = np.array([8, 3, 5]), np.array([4, 9, 2]), np.array([7, 2, 5])
    return dict(text=rng.standard_normal((3, 8, d)).astype(np.float32), text_lens=text_lens,
                prefix=rng.standard_normal((3, 9, d)).astype(np.float32), prefix_lens=prefix_lens,
                codes=rng.integers(0, TINY.codec_vocab_size, (3, 7)), code_lens=code_lens)


@pytest.mark.parametrize("with_prefix", [True, False])
def test_decoder_forward_and_loss_match_torch(torch_decoder, with_prefix):
    """Pre-network + (prefix +) shared stack + head on a padded batch of 3, and the summed CE
    (with the release's positions: one index over the padded block)."""
    batch = _padded_batch()
    prefix = torch.tensor(batch["prefix"]) if with_prefix else None
    with torch.no_grad():
        ref = torch_decoder(TINY, torch.tensor(batch["text"]), batch["text_lens"], torch.tensor(batch["codes"]),
                            batch["code_lens"], prefix, batch["prefix_lens"])
    inputs, labels = make_targets(jnp.asarray(batch["codes"]), jnp.asarray(batch["code_lens"]), TINY)
    ours = jax.jit(functools.partial(SpeechDecoder(TINY).apply, release_positions=True))(
        {"params": torch_decoder.params()}, jnp.asarray(batch["text"]), jnp.asarray(batch["text_lens"]), inputs,
        jnp.asarray(batch["code_lens"] + 1), jnp.asarray(batch["prefix"]) if with_prefix else None,
        jnp.asarray(batch["prefix_lens"]))
    assert ours.shape == ref.shape == (3, 8, TINY.vocab_size)
    assert _valid_max_diff(np.asarray(ours), ref.numpy(), batch["code_lens"] + 1) <= 1e-5
    criterion = torch.nn.CrossEntropyLoss(reduction="sum", ignore_index=TINY.pad_id)
    ref_loss = float(criterion(ref.transpose(1, 2), torch.tensor(np.asarray(labels), dtype=torch.long)))
    assert abs(float(decoder_loss(ours, labels, TINY.pad_id)) - ref_loss) <= 1e-5 * abs(ref_loss)


def test_decoder_mask_matches_release_layout():
    """The mask with prefix slots first equals the torch reference's row-by-row mask (no prefix packing)."""
    ctx, tgt, pre = np.array([3, 2]), np.array([2, 3]), np.array([2, 1])
    got = np.asarray(decoder_mask(jnp.asarray(ctx), jnp.asarray(tgt), 3, 3, jnp.asarray(pre), 2 + 6))
    want = np.zeros((2, 6, 8), bool)
    for i in range(2):
        # ours packs the block right after the row's valid prefix: slot = prefix_len + j
        o = pre[i]
        want[i, : ctx[i], :o] = want[i, 3: 3 + tgt[i], :o] = True
        want[i, : ctx[i], o: o + ctx[i]] = want[i, 3: 3 + tgt[i], o: o + ctx[i]] = True
        want[i, 3: 3 + tgt[i], o + 3: o + 3 + tgt[i]] = np.tril(np.ones((tgt[i], tgt[i]), bool))
    np.testing.assert_array_equal(got, want)
