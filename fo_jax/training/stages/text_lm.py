"""Stage ``text_lm``: causal-LM training of a Qwen2 text model on a JSONL manifest.

Trains the toy world's LLM before it is frozen (all params trainable by default), or fine-tunes
part of a loaded HF Qwen2 (``stage.init_from``) with the rest frozen.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax

from fo_jax.config import model_config
from fo_jax.conversion.hf_qwen2 import load_hf_qwen2
from fo_jax.data.manifest import read_manifest
from fo_jax.data.pipeline import batched
from fo_jax.data.text import encode_record
from fo_jax.errors import ConfigError
from fo_jax.models.qwen2 import init_params
from fo_jax.text.tokenizer import load_tokenizer
from fo_jax.training.lm import fit_vocab, next_token_loss


class TextLMStage:
    def __init__(self, cfg):
        s = cfg.stage
        for field in ("manifest", "tokenizer"):
            if not s.get(field):
                raise ConfigError(f"stage.{field} is required (--set stage.{field}=PATH)")
        self.trainable = tuple(s.trainable)
        self.tokenizer = load_tokenizer(s.tokenizer)
        llm = model_config(cfg).llm
        if s.get("init_from"):
            llm, self._pretrained = load_hf_qwen2(s.init_from, dtype=llm.dtype)
        else:
            self._pretrained = None
            llm = fit_vocab(llm, self.tokenizer)
        if len(self.tokenizer) > llm.vocab_size:
            raise ConfigError(f"{s.tokenizer}: tokenizer has {len(self.tokenizer)} tokens, model vocab {llm.vocab_size}")
        self.llm = llm
        self.seq_len, self.batch_size = s.seq_len, s.batch_size
        self.embed_noise = float(s.get("embed_noise", 0.0))
        if self.embed_noise < 0:
            raise ConfigError(f"stage.embed_noise={self.embed_noise}: must be >= 0")
        self.stretch = (float(s.get("stretch_prob", 0.0)), int(s.get("stretch_max", 1)))
        if not 0 <= self.stretch[0] <= 1 or self.stretch[1] < 1:
            raise ConfigError(f"stage.stretch_prob={self.stretch[0]}, stage.stretch_max={self.stretch[1]}: "
                              "need 0 <= stretch_prob <= 1 and stretch_max >= 1")
        self.records = read_manifest(s.manifest, validate=_check_record, policy=s.get("manifest_policy", "skip"),
                                     report=(report := []))
        self.rejected = report

    def init_boxed(self, rng):
        return init_params(self.llm, rng)

    def load_params(self, rng):
        if self._pretrained is not None:
            return self._pretrained
        return nn.unbox(self.init_boxed(rng))

    def loss(self, params, batch, rng):
        return next_token_loss(params, self.llm, batch["tokens"], batch["mask"], self.embed_noise, rng), {}

    def dataset(self, seed):
        encode = functools.partial(encode_record, tokenizer=self.tokenizer, seq_len=self.seq_len, stretch=self.stretch)
        stretching = self.stretch[0] > 0 and self.stretch[1] > 1  # else a plain map, as before stretching existed
        to_example = (lambda r, rng: encode(r, rng=rng)) if stretching else encode
        return batched(self.records, to_example, self.batch_size // jax.process_count(), seed, random=stretching)


def _check_record(record, base):
    if "messages" in record:
        if not record["messages"] or not all(m.get("content") for m in record["messages"]):
            return "empty message"
        return None
    if not record.get("text"):
        return "no 'messages' and no non-empty 'text'"
    return None


def build(cfg) -> TextLMStage:
    return TextLMStage(cfg)
