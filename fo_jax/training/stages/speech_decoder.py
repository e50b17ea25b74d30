"""Stages ``speech_decoder`` (speech-out stage 2) and ``speech_prefix`` (speech-out stage 3).

Stage 2 trains the NAR pre-network + shared NAR/AR decoder (embedding and head included) to emit
an utterance's codec tokens from its text: the text, normalised as the release does before
re-tokenising (``normalize_tts_text``), is tokenised with the LLM's tokenizer and looked up in the
*frozen* LLM input-embedding table, each vector reshaped into frames (``to_frames``). Loss: the
official teacher-forced cross-entropy, summed over targets (codes + end), under the official masks.

Stage 3 adds the NAR prefix stack and trains only it; the decoder comes from a stage-2 run
(``stage.decoder_from``), the LLM from ``stage.llm_path``. Per example, the frozen LLM runs
teacher-forced over the chat-formatted dialogue (system, user question, assistant header, answer
tokens); the prefix input is the final-norm hidden state that *produced* each answer token, as at
inference (the first from the assistant header's last position, the answer's last token's own
state unused). These are computed inside the loss under ``stop_gradient``, not precomputed: the
frozen LLM is on the devices anyway, a forward without backward costs about a third of a training
step through it, and a 7B model's states would be ~7 KB per token on disk (tens of GB for the
release's 60k answers) tied to one LLM and one chat template.

Param trees: stage 2 ``{'decoder': ..., 'llm': {'embed_tokens': ...}}`` (the table only); stage 3
``{'decoder': ... + layers_prefix_*, 'llm': <Qwen2>}``. Without ``stage.llm_path`` the LLM is
random (tests, smoke runs), drawn the same way in both stages so a stage-3 run can check it got
the table its stage-2 run was trained against.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fo_jax.config import model_config
from fo_jax.conversion.hf_qwen2 import load_hf_config, load_hf_embedding, load_hf_qwen2
from fo_jax.data.codec_tokens import TOKENS_FIELD, codec_tokens_problem
from fo_jax.data.manifest import read_manifest
from fo_jax.data.speech import bucketed_dataset, plan_batches
from fo_jax.errors import ConfigError, FoJaxError
from fo_jax.inference.text_segmentation import normalize_tts_text
from fo_jax.models import qwen2
from fo_jax.models.configs import LLMConfig
from fo_jax.models.speech_decoder import SpeechDecoder, decoder_loss, init_params, make_targets, to_frames
from fo_jax.text.tokenizer import DEFAULT_SYSTEM, chatml, load_tokenizer
from fo_jax.training.checkpoint import check_like, load_trained
from fo_jax.training.freeze import fingerprint, flatten, unflatten


def answer_hidden_states(llm_params: dict, llm: LLMConfig, dialogue_bt: jax.Array, lengths_b: jax.Array,
                         answer_start_b: jax.Array, max_answer: int) -> jax.Array:
    """The frozen LLM's final-norm hidden state that produced each answer token, teacher-forced.

    Args:
      dialogue_bt: (B, T) ids [prompt ... assistant header, answer tokens], right-padded.
      lengths_b: (B,) valid ids per row.
      answer_start_b: (B,) index of the first answer token (= prompt length, >= 1).
      max_answer: A, the answer positions to gather.
    Returns:
      (B, A, D): row b, entry j = hidden state at position answer_start - 1 + j (entries past the
      answer hold clipped positions; mask them by answer length). No gradient flows back.
    """
    model = qwen2.Qwen2(llm)
    x = model.apply({"params": llm_params}, dialogue_bt, method=qwen2.Qwen2.embed)
    hidden, _ = model.apply({"params": llm_params}, x, lengths_b)
    idx = jnp.clip(answer_start_b[:, None] - 1 + jnp.arange(max_answer)[None, :], 0, dialogue_bt.shape[1] - 1)
    return jax.lax.stop_gradient(jnp.take_along_axis(hidden, idx[:, :, None], axis=1))


def corrupt_inputs(inputs_bt: jax.Array, rate: float, codec_vocab: int, rng: jax.Array) -> jax.Array:
    """Teacher-forcing inputs with a ``rate`` share of the codec tokens (not sequence-start, column 0)
    replaced by random codec tokens; the labels stay. A training-only regulariser: with its history
    unreliable the AR decoder must follow the text context instead of replaying memorised token
    sequences (measured on the toy world, ``configs/speech_out_stage2.py``). (B, T) -> (B, T)."""
    if rate <= 0.0:
        return inputs_bt
    k_where, k_code = jax.random.split(jax.random.fold_in(rng, 11))
    hit = jax.random.bernoulli(k_where, rate, inputs_bt.shape).at[:, 0].set(False)
    return jnp.where(hit, jax.random.randint(k_code, inputs_bt.shape, 0, codec_vocab, inputs_bt.dtype), inputs_bt)


def _random_llm(llm: LLMConfig, rng: jax.Array) -> dict:
    """A random LLM, drawn identically by both stages for the same seed."""
    return nn.unbox(qwen2.init_params(llm, jax.random.fold_in(rng, 7)))


class SpeechDecoderStage:
    """Stage 2; ``SpeechPrefixStage`` extends it with the prefix input."""

    with_prefix = False
    required = ("text",)  # codec_tokens: checked by codec_tokens_problem (with a hint)

    def __init__(self, cfg):
        s = cfg.stage
        if not s.get("manifest"):
            raise ConfigError("stage.manifest is required (--set stage.manifest=PATH)")
        self.llm_path = s.get("llm_path", "")
        if not self.llm_path and not s.get("tokenizer"):
            raise ConfigError("stage.llm_path (HF Qwen2 directory with its tokenizer) is required; "
                              "stage.tokenizer alone gives a random LLM, for tests")
        self.tokenizer = load_tokenizer(self.llm_path or s.tokenizer)
        model = model_config(cfg)
        if self.llm_path:
            self.llm = load_hf_config(self.llm_path, dtype=model.llm.dtype, param_dtype=model.llm.param_dtype)
        else:
            vocab = -(-len(self.tokenizer) // 64) * 64
            self.llm = dataclasses.replace(model.llm, vocab_size=max(model.llm.vocab_size, vocab))
        if len(self.tokenizer) > self.llm.vocab_size:
            raise ConfigError(f"tokenizer has {len(self.tokenizer)} tokens, the LLM vocabulary {self.llm.vocab_size}")
        try:  # each LLM vector becomes llm_hidden / hidden decoder frames
            self.decoder = dataclasses.replace(model.decoder, llm_hidden_size=self.llm.hidden_size,
                                               use_prefix=self.with_prefix)
        except ConfigError as e:
            raise ConfigError(f"model.decoder does not fit the LLM: {e}") from None
        self.trainable = tuple(s.trainable)
        self.max_text = s.max_text_len
        self.input_noise = float(s.get("input_noise", 0.0))
        if not 0.0 <= self.input_noise < 1.0:
            raise ConfigError(f"stage.input_noise must lie in [0, 1), got {self.input_noise}")
        report: list[str] = []
        vocab = self.decoder.codec_vocab_size
        self.records = read_manifest(s.manifest, required=self.required,
                                     validate=lambda r, base: codec_tokens_problem(r, vocab),
                                     policy=s.get("manifest_policy", "skip"), report=report)
        self.examples = [self.encode(r) for r in self.records]
        self.max_codes = s.buckets[-1]
        problems = [self.length_problem(ex) for ex in self.examples]
        lengths = [-1 if p else len(ex["codes"]) for ex, p in zip(self.examples, problems)]
        self.batch_size = s.batch_size
        self.batches, _ = plan_batches(lengths, tuple(s.buckets), self.batch_size // jax.process_count(),
                                       cfg.get("seed", 0))
        self.rejected = report + [f"{s.manifest}: {r.get('audio') or r['text']!r}: {p}"
                                  for r, p in zip(self.records, problems) if p]
        if not self.batches:
            raise ConfigError(f"{s.manifest}: too few usable records for one batch of {self.batch_size}")

    # --- data -------------------------------------------------------------------------------------

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode(self, record: dict) -> dict[str, list[int]]:
        """Token ids of the normalised text (pre-network input) and the codec tokens."""
        return {"text": self._ids(normalize_tts_text(record["text"])), "codes": record[TOKENS_FIELD]}

    def length_problem(self, example: dict) -> str | None:
        """Why an example does not fit the configured shapes, or None."""
        if not 0 < len(example["text"]) <= self.max_text:
            return f"{len(example['text'])} text tokens (stage.max_text_len {self.max_text})"
        if len(example["codes"]) > self.max_codes:
            return f"{len(example['codes'])} codec tokens (largest of stage.buckets {self.max_codes})"
        return None

    def make_batch(self, bucket: int, indices: list[int], rng: np.random.Generator) -> dict[str, np.ndarray]:
        """{'text': (B, max_text_len), 'text_lens', 'codes': (B, bucket), 'code_lens'} (+ stage-3 fields)."""
        rows = [self.examples[i] for i in indices]
        text, text_lens = _pad([r["text"] for r in rows], self.max_text)
        codes, code_lens = _pad([r["codes"] for r in rows], bucket)
        return {"text": text, "text_lens": text_lens, "codes": codes, "code_lens": code_lens}

    def dataset(self, seed: int):
        return bucketed_dataset(self.batches, self.make_batch, seed)

    # --- params -----------------------------------------------------------------------------------

    def _llm_boxed(self, rng: jax.Array) -> dict:
        model = qwen2.Qwen2(self.llm)
        return model.init(rng, jnp.zeros((1, 1), jnp.int32), method=qwen2.Qwen2.embed)["params"]

    def init_boxed(self, rng: jax.Array) -> dict:
        k_decoder, k_llm = jax.random.split(rng)
        return {"decoder": init_params(self.decoder, k_decoder), "llm": self._llm_boxed(k_llm)}

    def _load_llm(self, rng: jax.Array) -> dict:
        if self.llm_path:
            # Host arrays: the trainer places them on the mesh by their logical axes.
            return {"embed_tokens": {"embedding": load_hf_embedding(self.llm_path, dtype=self.llm.param_dtype)[1]}}
        return {"embed_tokens": _random_llm(self.llm, rng)["embed_tokens"]}

    def load_params(self, rng: jax.Array) -> dict:
        k_decoder, _ = jax.random.split(rng)
        return {"decoder": nn.unbox(init_params(self.decoder, k_decoder)), "llm": self._load_llm(rng)}

    # --- loss -------------------------------------------------------------------------------------

    def prefix(self, params: dict, batch: dict) -> tuple[jax.Array | None, jax.Array | None]:
        """Prefix-stack input frames (B, P, D) and lengths (B,); none in stage 2."""
        return None, None

    def loss(self, params: dict, batch: dict, rng: jax.Array) -> tuple[jax.Array, dict]:
        """Summed CE over targets (the official criterion); metrics per target token."""
        text = qwen2.Qwen2(self.llm).apply({"params": params["llm"]}, batch["text"], method=qwen2.Qwen2.embed)
        frames, frame_lens = to_frames(text, batch["text_lens"], self.decoder.hidden_size)
        prefix, prefix_lens = self.prefix(params, batch)
        inputs, labels = make_targets(batch["codes"], batch["code_lens"], self.decoder)
        inputs = corrupt_inputs(inputs, self.input_noise, self.decoder.codec_vocab_size, rng)
        logits = SpeechDecoder(self.decoder).apply({"params": params["decoder"]}, frames, frame_lens, inputs,
                                                   batch["code_lens"] + 1, prefix, prefix_lens)
        total = decoder_loss(logits, labels, self.decoder.pad_id)
        valid = labels != self.decoder.pad_id
        targets = jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)
        correct = jnp.sum(valid & (jnp.argmax(logits, -1) == labels))
        return total, {"token_ce": total / targets, "token_acc": correct / targets, "targets": targets}


class SpeechPrefixStage(SpeechDecoderStage):
    """Stage 3: only the prefix stack trains, on the frozen LLM's answer hidden states."""

    with_prefix = True
    required = ("text", "question")

    def __init__(self, cfg):
        s = cfg.stage
        if not s.get("decoder_from"):
            raise ConfigError("stage.decoder_from is required (the work directory of a speech_decoder run)")
        self.decoder_from = str(s.decoder_from)
        self.max_dialogue, self.max_answer = s.max_dialogue_len, s.max_answer_len
        self.system = s.get("system_prompt") or DEFAULT_SYSTEM
        super().__init__(cfg)

    def encode(self, record: dict) -> dict[str, list[int]]:
        """Adds the chat prompt (system, question, assistant header) and the raw answer's ids."""
        messages = [{"role": "system", "content": self.system}, {"role": "user", "content": record["question"]}]
        return super().encode(record) | {"prompt": self._ids(chatml(messages, add_generation_prompt=True)),
                                         "answer": self._ids(record["text"])}

    def length_problem(self, example):
        if not 0 < len(example["answer"]) <= self.max_answer:
            return f"{len(example['answer'])} answer tokens (stage.max_answer_len {self.max_answer})"
        if len(example["prompt"]) + len(example["answer"]) > self.max_dialogue:
            return (f"{len(example['prompt']) + len(example['answer'])} dialogue tokens "
                    f"(stage.max_dialogue_len {self.max_dialogue})")
        return super().length_problem(example)

    def make_batch(self, bucket, indices, rng):
        """Adds 'dialogue' (B, max_dialogue_len), 'dialogue_lens', 'answer_start', 'answer_lens'."""
        rows = [self.examples[i] for i in indices]
        dialogue, lengths = _pad([r["prompt"] + r["answer"] for r in rows], self.max_dialogue)
        return super().make_batch(bucket, indices, rng) | {
            "dialogue": dialogue, "dialogue_lens": lengths,
            "answer_start": np.asarray([len(r["prompt"]) for r in rows], np.int32),
            "answer_lens": np.asarray([len(r["answer"]) for r in rows], np.int32)}

    def init_boxed(self, rng):
        k_decoder, k_llm = jax.random.split(rng)
        return {"decoder": init_params(self.decoder, k_decoder), "llm": qwen2.init_params(self.llm, k_llm)}

    def _load_llm(self, rng):
        if self.llm_path:
            return load_hf_qwen2(self.llm_path, dtype=self.llm.dtype, param_dtype=self.llm.param_dtype)[1]
        return _random_llm(self.llm, rng)

    def load_params(self, rng):
        params = super().load_params(rng)  # a random prefix stack; the rest is replaced below
        source = self.decoder_from
        trained, meta = load_trained(source)
        if meta.get("config", {}).get("stage", {}).get("name") != "speech_decoder" or "decoder" not in trained:
            raise FoJaxError(f"{source}: not a speech_decoder run (or its decoder did not train)")
        flat = flatten(params["decoder"])
        shared = {k: v for k, v in flat.items() if not k.startswith("layers_prefix_")}
        check_like(trained["decoder"], unflatten(shared), f"{source} (vs model.decoder)")
        params["decoder"] = unflatten(flat | flatten(trained["decoder"]))
        # Stage 2's frozen tree was the embedding table: it must be this LLM's.
        if fingerprint({"llm": {"embed_tokens": params["llm"]["embed_tokens"]}}) != meta["frozen_fingerprint"]:
            raise FoJaxError(f"{source}: that decoder was trained against another LLM embedding table "
                             f"(stage.llm_path / model.llm / seed differ)")
        return params

    def prefix(self, params, batch):
        hidden = answer_hidden_states(params["llm"], self.llm, batch["dialogue"], batch["dialogue_lens"],
                                      batch["answer_start"], self.max_answer)
        return to_frames(hidden, batch["answer_lens"], self.decoder.hidden_size)


def _pad(rows: list[list[int]], width: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pads id lists to (B, width) int32 with 0; returns (ids, lengths)."""
    out = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out, np.asarray([len(r) for r in rows], np.int32)


def build(cfg) -> SpeechDecoderStage:
    return SpeechDecoderStage(cfg)


def build_prefix(cfg) -> SpeechPrefixStage:
    return SpeechPrefixStage(cfg)
