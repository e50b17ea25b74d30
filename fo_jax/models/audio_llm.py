"""Freeze-Omni's speech-input model: encoder -> adapter -> frozen Qwen2, learned prompts, state head.

Param tree (names follow the official ``AudioLLM`` where sensible)::

  {'encoder': <SpeechEncoder>, 'adapter': <Adapter params>, 'llm': <Qwen2>,
   'prompt_embeddings': {'embedding': (prompt_num, D)},   # before every user question (stage 3)
   'task_embeddings': {'embedding': (task_num, D)},       # stage-2 special tokens
   'state_head': {'kernel': (num_states, D), 'bias': (num_states,)},
   ['adapter_batch_stats': BatchNorm statistics, only for the adapter kinds that have them]}

The Linen module ``AudioLLM`` holds the LLM and the heads; the encoder and adapter are composed
through their functional APIs (``encode_speech``, ``speech_chunk``) on the same tree.

The LLM sees, per user turn (official chat-template assembly, see ``ChatTemplate``)::

  [system ids]                                     once per conversation (cached, reused)
  [listen ids] [prompt_num prompts] [audio ...]    first chunk, then 2 audio embeddings per chunk
  [speak ids] [answer tokens ...]                  until <|im_end|> is sampled (not fed back)

The state head reads the final-norm hidden state of each chunk's last position (``state_probs``,
``decide``). Streaming steps live in ``fo_jax.inference.session``; this module holds the params and
the pure pieces.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fo_jax.layers.kv_cache import KVCache
from fo_jax.layers.linear import DEFAULT_INIT, Linear
from fo_jax.models.adapter import (SpeechInputState, adapter_forward, init_adapter_variables,
                                   speech_input_step)
from fo_jax.models.configs import ModelConfig, to_dtype
from fo_jax.models.encoder import SUBSAMPLING, encoder_forward, init_encoder_params
from fo_jax.models.qwen2 import Qwen2, init_params as init_qwen2_params
from fo_jax.text.tokenizer import IM_END, IM_START, chatml

# State-head classes (paper §2.4); the 4th logit is ignored at inference, as in the official code.
HEAD_KEEP_LISTENING, HEAD_START_SPEAKING, HEAD_STOP_LISTENING = 0, 1, 2
DECISION_THRESHOLD = 0.5

# Where each position of a training sequence takes its embedding from (``AudioLLM.assemble``).
SOURCE_TEXT, SOURCE_PROMPT, SOURCE_AUDIO, SOURCE_TASK = 0, 1, 2, 3

AUDIO_PLACEHOLDER = "<audio>"


DECISION_CLASSES = 3  # the state-head logits inference reads (the first 3 of num_states)

# Task-embedding rows around a stage-2 utterance (official task_ids "audio", "/audio").
TASK_AUDIO_BOS, TASK_AUDIO_EOS = 5, 6


def state_probs(state_logits: jax.Array) -> jax.Array:
    """(..., num_states) state-head logits -> (..., 3) float32 softmax over the first 3 classes."""
    return jax.nn.softmax(state_logits[..., :DECISION_CLASSES].astype(jnp.float32), axis=-1)


def state_log_probs(state_logits: jax.Array) -> jax.Array:
    """``log(state_probs)``, computed stably (training's state cross-entropy)."""
    return jax.nn.log_softmax(state_logits[..., :DECISION_CLASSES].astype(jnp.float32), axis=-1)


def decide(probs: jax.Array) -> jax.Array:
    """(..., 3) state probs -> (...) int32 head class.

    p2 > 0.5 -> HEAD_STOP_LISTENING (official 'el'), else p1 > 0.5 -> HEAD_START_SPEAKING ('ss'),
    else HEAD_KEEP_LISTENING ('cl').
    """
    probs = jnp.asarray(probs)
    return jnp.where(probs[..., 2] > DECISION_THRESHOLD, HEAD_STOP_LISTENING,
                     jnp.where(probs[..., 1] > DECISION_THRESHOLD, HEAD_START_SPEAKING,
                               HEAD_KEEP_LISTENING)).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """Token ids of the fixed text pieces around the speech (hashable: a static jit argument).

    Attributes:
      system_ids: "<|im_start|>system\\n" + role, without <|im_end|> (the first turn's listen
        prefix closes it). Prefilled once per conversation.
      listen_ids: <|im_end|> + "\\n<|im_start|>user\\n": starts each user turn, before the prompts.
      speak_ids: "<|im_end|>\\n<|im_start|>assistant\\n": fed when speaking starts.
      end_id: <|im_end|>: sampling it ends the answer; it is not fed back.
    """

    system_ids: tuple[int, ...]
    listen_ids: tuple[int, ...]
    speak_ids: tuple[int, ...]
    end_id: int

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, role: str | None = None,
                       template: str | None = None) -> "ChatTemplate":
        """Splits a chat template at ``<audio>`` the way the official model does.

        Args:
          tokenizer: a HF tokenizer with the ChatML specials (e.g. ``qwen2_tokenizer()``).
          role: system prompt text; None keeps the template's own system line.
          template: the chat template text with one ``<audio>`` (default: Qwen ChatML with the
            default system line, a user turn holding ``<audio>`` and an open assistant turn; the
            released ``train.yaml`` chat_template).
        """
        text = template if template is not None else chatml([{"role": "user", "content": AUDIO_PLACEHOLDER}])
        before, after = text.split(AUDIO_PLACEHOLDER)
        system, user = before.split(IM_END)[:2]

        def ids(s: str) -> tuple[int, ...]:
            return tuple(tokenizer.encode(s, add_special_tokens=False))

        end_id = tokenizer.convert_tokens_to_ids(IM_END)
        system_ids = ids(system + IM_END)[:-1] if role is None else ids(f"{IM_START}system\n{role}")
        return cls(system_ids=system_ids, listen_ids=(end_id,) + ids(user), speak_ids=ids(after),
                   end_id=end_id)


def _embed(num: int, features: int, dtype, pdtype) -> nn.Embed:
    return nn.Embed(num, features, dtype=dtype, param_dtype=pdtype,
                    embedding_init=nn.with_logical_partitioning(DEFAULT_INIT, (None, "embed")))


class AudioLLM(nn.Module):
    """Qwen2 + prompt / task embeddings + state head (the encoder and adapter are composed by
    ``encode_speech`` / ``speech_chunk`` / ``forward`` on the same param tree).

    Methods (call through ``apply(..., method=...)``): ``embed``, ``prompts``, ``tasks``,
    ``decode``, ``logits``, ``state_logits``, ``assemble``, ``__call__``.
    """

    config: ModelConfig

    def setup(self):
        cfg = self.config
        # The heads compute in the LLM's dtype but are initialised in the adapter's param dtype: they
        # are what trains around the frozen LLM (float32 master weights under a bfloat16 LLM).
        # Converted checkpoints may hold them in the LLM's dtype; both work here.
        dtype, pdtype = to_dtype(cfg.llm.dtype), to_dtype(cfg.adapter.param_dtype)
        d = cfg.llm.hidden_size
        self.llm = Qwen2(cfg.llm)
        self.prompt_embeddings = _embed(cfg.adapter.prompt_num, d, dtype, pdtype)
        self.task_embeddings = _embed(cfg.adapter.task_num, d, dtype, pdtype)
        self.state_head = Linear(cfg.adapter.num_states, names=(None, "embed"), use_bias=True, dtype=dtype,
                                 param_dtype=pdtype, out_dtype=jnp.float32)

    def embed(self, tokens: jax.Array) -> jax.Array:
        """(...) token ids -> (..., D) LLM input embeddings."""
        return self.llm.embed(tokens)

    def prompts(self) -> jax.Array:
        """(prompt_num, D) the learned prompt embeddings, in order."""
        return self.prompt_embeddings(jnp.arange(self.config.adapter.prompt_num))

    def tasks(self) -> jax.Array:
        """(task_num, D) the stage-2 special-token embeddings."""
        return self.task_embeddings(jnp.arange(self.config.adapter.task_num))

    def decode(self, x_btd: jax.Array, lengths_b: jax.Array | None = None,
               cache: KVCache | None = None, positions_bt: jax.Array | None = None,
               mask_bts: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
        """The frozen LLM over input embeddings (see ``Qwen2.__call__``): final-norm hidden states."""
        return self.llm(x_btd, lengths_b, cache, positions_bt, mask_bts)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """(..., D) -> (..., V) float32 LLM logits."""
        return self.llm.logits(hidden)

    def state_logits(self, hidden: jax.Array) -> jax.Array:
        """(..., D) final-norm hidden states -> (..., num_states) float32 state-head logits."""
        return self.state_head(hidden)

    def assemble(self, tokens_bt: jax.Array, source_bt: jax.Array, index_bt: jax.Array,
                 audio_bad: jax.Array | None = None) -> jax.Array:
        """Builds LLM input embeddings position by position.

        Args:
          tokens_bt: (B, T) text ids (read where source is SOURCE_TEXT).
          source_bt: (B, T) int, SOURCE_TEXT / SOURCE_PROMPT / SOURCE_AUDIO / SOURCE_TASK.
          index_bt: (B, T) int, row of the prompt table, of ``audio_bad``, or of the task table.
          audio_bad: (B, A, D) speech embeddings of each row (None: no audio positions).
        Returns:
          (B, T, D) embeddings in the LLM compute dtype.
        """
        x = self.embed(tokens_bt)
        x = jnp.where((source_bt == SOURCE_PROMPT)[..., None], self.prompts()[index_bt], x)
        x = jnp.where((source_bt == SOURCE_TASK)[..., None], self.tasks()[index_bt], x)
        if audio_bad is not None:
            audio = jnp.take_along_axis(audio_bad, index_bt[..., None], axis=1, mode="clip")
            x = jnp.where((source_bt == SOURCE_AUDIO)[..., None], audio.astype(x.dtype), x)
        return x

    def __call__(self, tokens_bt: jax.Array, source_bt: jax.Array, index_bt: jax.Array,
                 lengths_b: jax.Array, audio_bad: jax.Array | None = None,
                 with_logits: bool = True, positions_bt: jax.Array | None = None,
                 mask_bts: jax.Array | None = None) -> dict[str, jax.Array]:
        """Whole-sequence forward (training, stage 2/3): assembled embeddings -> LLM -> heads.

        ``audio_bad`` is the speech of each row, already encoded (``encode_speech``); stage 3 computes the
        LLM CE on answer positions and the state CE on chunk-final audio positions from the result.
        ``positions_bt`` / ``mask_bts``: optional rotary positions and attention mask (``Qwen2.__call__``).

        Returns:
          dict with 'hidden' (B, T, D), 'state_logits' (B, T, num_states) float32 and, with
          ``with_logits``, 'logits' (B, T, V) float32.
        """
        x = self.assemble(tokens_bt, source_bt, index_bt, audio_bad)
        hidden, _ = self.decode(x, lengths_b, None, positions_bt, mask_bts)
        out = {"hidden": hidden, "state_logits": self.state_logits(hidden)}
        if with_logits:
            out["logits"] = self.logits(hidden)
        return out


def adapter_variables(params: dict) -> dict:
    """The adapter's Flax variables inside an AudioLLM param tree."""
    out = {"params": params["adapter"]}
    if "adapter_batch_stats" in params:
        out["batch_stats"] = params["adapter_batch_stats"]
    return out


def encode_speech(params: dict, cfg: ModelConfig, fbank_btf: jax.Array, lengths_b: jax.Array, *,
                  train: bool = False, rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Whole utterances -> LLM-input speech embeddings (encoder under its static chunk mask).

    Args:
      fbank_btf: (B, T, F) raw log-mel fbank (the encoder applies CMVN), right-padded.
      lengths_b: (B,) valid fbank frames.
      train: encoder dropout (needs ``rng``); the adapter always uses running statistics.
    Returns:
      (B, A, E) embeddings and (B, A) bool validity.
    """
    enc, enc_lengths = encoder_forward(params["encoder"], cfg.encoder, fbank_btf, lengths_b,
                                       train=train, rng=rng)
    mask = jnp.arange(enc.shape[1])[None, :] < enc_lengths[:, None]
    return adapter_forward(adapter_variables(params), cfg.adapter, enc, mask)


def speech_chunk(params: dict, cfg: ModelConfig, state: SpeechInputState, fbank_bwf: jax.Array
                 ) -> tuple[SpeechInputState, jax.Array]:
    """One streaming chunk: (B, 19, F) fbank (3 overlap + 16 new) -> state, (B, 2, E) embeddings."""
    return speech_input_step(params["encoder"], adapter_variables(params), cfg.encoder, cfg.adapter,
                             state, fbank_bwf)


def stream_speech(params: dict, cfg: ModelConfig, fbank_btf: jax.Array) -> jax.Array:
    """Whole utterances through the streaming path (``speech_chunk`` scanned over chunks from a
    fresh state): the embeddings inference feeds the LLM, bit for bit the same program.

    Training-time speech for frozen encoders (stage 3): the whole-utterance forward equals the
    stream only while the official key positions are the true ones (``encoder.stream_positions``).

    Args:
      fbank_btf: (B, O + N W, F) raw fbank in streaming framing: O = 3 overlap frames (zeros: a
        turn's first chunk has no predecessor), then N chunks of W = 4 chunk_size new frames.
    Returns:
      (B, N C', E) embeddings, C' per chunk (2 for the released model), chunk after chunk.
    """
    enc = cfg.encoder
    new = SUBSAMPLING * enc.chunk_size
    overlap = enc.stream_input_frames - new
    b, t, _ = fbank_btf.shape
    if (t - overlap) % new or t <= overlap:
        raise ValueError(f"stream_speech: {t} fbank frames is not {overlap} + a whole number of {new}-frame chunks")

    def chunk(state, i):
        frames = jax.lax.dynamic_slice_in_dim(fbank_btf, i * new, enc.stream_input_frames, axis=1)
        return speech_chunk(params, cfg, state, frames)

    _, emb = jax.lax.scan(chunk, SpeechInputState.zeros(enc, cfg.adapter, b), jnp.arange((t - overlap) // new))
    return jnp.moveaxis(emb, 0, 1).reshape(b, -1, emb.shape[-1])


def forward(params: dict, cfg: ModelConfig, tokens_bt: jax.Array, source_bt: jax.Array,
            index_bt: jax.Array, lengths_b: jax.Array, fbank_bntf: jax.Array | None = None,
            fbank_lengths_bn: jax.Array | None = None, *, train: bool = False,
            rng: jax.Array | None = None, with_logits: bool = True) -> dict[str, jax.Array]:
    """Training forward (stage 2/3): speech + text -> LLM hidden states, logits, state logits.

    Each row holds N utterances (e.g. the questions of a multi-round dialogue), each encoded on its
    own as at inference; audio positions index the row's utterances' embeddings laid end to end:
    index = n * A + a, with A = embeddings per utterance (``fbank`` frames -> A is fixed by T).

    Args:
      tokens_bt, source_bt, index_bt, lengths_b: the sequence layout (``AudioLLM.assemble``).
      fbank_bntf: (B, N, T, F) raw fbank of each row's utterances (None: text only).
      fbank_lengths_bn: (B, N) valid frames.
    Returns:
      see ``AudioLLM.__call__``.
    """
    audio = None
    if fbank_bntf is not None:
        b, n, t, f = fbank_bntf.shape
        emb, _ = encode_speech(params, cfg, fbank_bntf.reshape(b * n, t, f), fbank_lengths_bn.reshape(-1),
                               train=train, rng=rng)
        audio = emb.reshape(b, n * emb.shape[1], emb.shape[2])
    return AudioLLM(cfg).apply({"params": params}, tokens_bt, source_bt, index_bt, lengths_b, audio,
                               with_logits)


def init_params(config: ModelConfig, rng: jax.Array) -> dict:
    """Random params of every part, boxed with logical axis names (``nn.unbox`` gives arrays)."""
    k_llm, k_heads, k_enc, k_ad = jax.random.split(rng, 4)

    def heads(m: AudioLLM):
        return m.prompts(), m.tasks(), m.state_logits(jnp.zeros((1, config.llm.hidden_size)))

    params = dict(AudioLLM(config).init(k_heads, method=heads)["params"])
    params["llm"] = init_qwen2_params(config.llm, k_llm)
    params["encoder"] = init_encoder_params(config.encoder, k_enc)
    adapter = init_adapter_variables(config.adapter, k_ad)
    params["adapter"] = adapter["params"]
    if "batch_stats" in adapter:
        params["adapter_batch_stats"] = adapter["batch_stats"]
    return params
