"""Speech-in stage 3 (stage ``speech_in_dialogue``): prompt embeddings + state head on multi-turn
spoken Q&A, everything else frozen (as the paper; ``stage.trainable`` may open the encoder and
adapter too, which the toy presets do).

A dialogue is laid out exactly as the streaming inference feeds it (``fo_jax.inference.session``)::

  [system ids]                                        once, without <|im_end|>
  per turn: [listen ids] [prompt_num prompts] [2 speech frames per 160 ms chunk ...]
    addressed:     [speak ids] [answer ids]           targets: answer ids, then <|im_end|> (not fed:
                                                      the next turn's listen ids start with it)
    not addressed: the turn is dropped from the history (inference resets its KV cache to the turn's
                   start): later positions do not see it and continue from its first position.

Labels: the state head at the last frame of every chunk: 0 while the user speaks, on the turn's
final chunk 1 (answer) or 2 (not addressed); with ``stage.decision_pause`` > 0 and a ``speech_end``
(seconds) in the turn's record, on every chunk from the first that ends that long after the speech
(``decision_chunk``): once the user has paused, decide. Like inference, it is read as a softmax over
the first 3 logits (the 4th class is never trained). Loss = LLM cross-entropy on the answer tokens
(mean over tokens) + ``stage.state_weight`` x state cross-entropy (mean over labelled chunks, or
with ``stage.state_balanced`` the mean of each state's mean: ``state_cross_entropy``).

The speech path runs each turn from a fresh streaming state, chunk by chunk (``stream_speech``,
the inference program itself), so the embeddings are the ones inference produces, past the
official positional quirk too; ``stage.streaming_encoder=False`` uses one whole-utterance forward
instead (equal for the first 17 chunks of a turn, faster on accelerators).

Manifest lines: ``{"turns": [{"audio", "addressed", "answer", "speech_end"}, ...]}`` (the toy world's
dialogues; ``addressed`` defaults to a non-empty ``answer``; ``speech_end`` is optional). Encoder,
adapter, task embeddings and CMVN come from a stage-2 run (``stage.speech_from=WORKDIR``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fo_jax.audio.fbank import CHUNK_FRAMES, CHUNK_OVERLAP, CHUNK_SECONDS, NUM_MEL_BINS
from fo_jax.data.augment import SpecAugmentConfig, spec_augment
from fo_jax.data.manifest import read_manifest
from fo_jax.data.prepare import check_audio
from fo_jax.data.speech import bucketed_dataset, load_features, plan_batches, record_frames, stream_chunks, stream_framed
from fo_jax.errors import ConfigError
from fo_jax.models.adapter import output_frames
from fo_jax.models.audio_llm import (HEAD_KEEP_LISTENING, HEAD_START_SPEAKING, HEAD_STOP_LISTENING, ChatTemplate,
                                     encode_speech, init_params, stream_speech)
from fo_jax.training.speech_common import (Layout, cmvn_params, layout_spec, sequence_forward, speech_model,
                                           start_params, state_cross_entropy, target_cross_entropy)


@dataclasses.dataclass(frozen=True)
class Turn:
    """One user turn as the layout needs it: its streaming chunks, the answer's token ids (None: not
    addressed to the assistant) and the first chunk labelled with the turn's decision (None: the
    last chunk only)."""

    chunks: int
    answer_ids: tuple[int, ...] | None
    decide_from: int | None = None


def decision_chunk(speech_end: float, pause: float, chunks: int) -> int:
    """The first of a turn's ``chunks`` (160 ms each, from the clip's start) that ends ``pause`` s or
    more after the speech ends at ``speech_end`` s; the last chunk if none does."""
    first = int(np.ceil(round((speech_end + pause) / CHUNK_SECONDS, 6))) - 1
    return min(max(first, 0), chunks - 1)


def _turns(record: dict) -> list[dict]:
    return record["turns"]


def _addressed(turn: dict) -> bool:
    return bool(turn.get("addressed", bool(turn.get("answer"))))


def check_dialogue(record: dict, base: Path) -> str | None:
    """Manifest validator: turns is a non-empty list; each turn's audio opens; addressed turns have
    an answer."""
    turns = record.get("turns")
    if not isinstance(turns, list) or not turns:
        return "no turns"
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict) or not turn.get("audio"):
            return f"turn {k}: no audio"
        problem = check_audio(turn, base)
        if problem:
            return f"turn {k}: {problem}"
        if _addressed(turn) and not str(turn.get("answer", "")).strip():
            return f"turn {k}: addressed but no answer"
    return None


class SpeechInDialogueStage:
    def __init__(self, cfg):
        s = cfg.stage
        self.trainable = tuple(s.trainable)
        self.llm, self.model = speech_model(cfg)
        self.batch_size, self.boundaries = s.batch_size, tuple(s.buckets)
        self.max_turns, self.max_targets = s.max_turns, s.max_answer_tokens
        if s.turn_frames % CHUNK_FRAMES:
            raise ConfigError(f"stage.turn_frames={s.turn_frames}: must be whole {CHUNK_FRAMES}-frame chunks")
        self.turn_chunks = s.turn_frames // CHUNK_FRAMES
        self.per_chunk = output_frames(self.model.adapter, self.model.encoder.chunk_size)
        self.state_weight, self.streaming = float(s.state_weight), bool(s.streaming_encoder)
        self.state_balanced = bool(s.get("state_balanced", False))
        self.decision_pause = float(s.get("decision_pause", 0.0))
        if self.decision_pause < 0:
            raise ConfigError(f"stage.decision_pause={self.decision_pause}: seconds, >= 0 (0: the last chunk only)")
        self.augment = SpecAugmentConfig(**s.spec_augment) if s.get("spec_augment") else None
        self.speech_from, self.role = s.get("speech_from") or None, s.get("system_role") or None
        self.records, self.rejected, self.manifest = None, [], s.get("manifest") or None
        if self.llm.tokenizer is not None:
            self.template = ChatTemplate.from_tokenizer(self.llm.tokenizer, self.role)
        if self.manifest:
            self._read(s.get("manifest_policy", "skip"), cfg.get("seed", 0))

    @property
    def max_states(self) -> int:
        return self.max_turns * self.turn_chunks

    def _read(self, policy: str, seed: int) -> None:
        tokenizer = self.llm.require_tokenizer()
        self.base = Path(self.manifest).resolve().parent
        report: list[str] = []
        self.records = read_manifest(self.manifest, required=["turns"], validate=check_dialogue, policy=policy,
                                     report=report)
        self.dialogues = [[self._turn(t, tokenizer) for t in _turns(r)] for r in self.records]
        lengths, problems = [], []
        for record, turns in zip(self.records, self.dialogues):
            problem = self._limits(turns)
            lengths.append(-1 if problem else len(self.layout(turns)))
            problems.append(problem or "longer than the largest bucket")
        self.batches, dropped = plan_batches(lengths, self.boundaries, self.batch_size // jax.process_count(), seed)
        self.rejected = report + [f"{self.manifest}: dialogue {i} ({self.records[i]['turns'][0]['audio']}...): "
                                  f"{problems[i]}" for i in dropped]
        if not self.batches:
            raise ConfigError(f"{self.manifest}: too few usable dialogues for one batch of {self.batch_size}")

    def _turn(self, t: dict, tokenizer) -> Turn:
        chunks = stream_chunks(record_frames(t, self.base))
        answer = tuple(tokenizer.encode(t["answer"], add_special_tokens=False)) if _addressed(t) else None
        decide = (decision_chunk(float(t["speech_end"]), self.decision_pause, chunks)
                  if self.decision_pause > 0 and "speech_end" in t else None)
        return Turn(chunks, answer, decide)

    def _limits(self, turns: Sequence[Turn]) -> str | None:
        """Why a dialogue does not fit the fixed batch shapes, or None."""
        if len(turns) > self.max_turns:
            return f"{len(turns)} turns > stage.max_turns={self.max_turns}"
        if max(t.chunks for t in turns) > self.turn_chunks:
            return f"a turn longer than stage.turn_frames={self.turn_chunks * CHUNK_FRAMES}"
        if min(t.chunks for t in turns) == 0:
            return "a turn shorter than one fbank frame"
        targets = sum(len(t.answer_ids) + 1 for t in turns if t.answer_ids is not None)
        if targets > self.max_targets:
            return f"{targets} answer tokens > stage.max_answer_tokens={self.max_targets}"
        return None

    def _require_data(self) -> None:
        if self.records is None:
            raise ConfigError("stage.manifest is required (--set stage.manifest=PATH)")

    def layout(self, turns: Sequence[Turn]) -> Layout:
        """The dialogue in inference feed order (module doc). Turn k's speech frames are rows
        k * turn_chunks * per_chunk.. of the row's speech embeddings."""
        t, per_turn = self.template, self.turn_chunks * self.per_chunk
        lay = Layout()
        lay.text(t.system_ids)
        for k, turn in enumerate(turns):
            start = len(lay)
            lay.text(t.listen_ids)
            lay.prompts(self.model.adapter.prompt_num)
            decide_from = turn.chunks - 1 if turn.decide_from is None else turn.decide_from
            for c in range(turn.chunks):
                lay.audio(k * per_turn + c * self.per_chunk, self.per_chunk)
                lay.state(HEAD_KEEP_LISTENING if c < decide_from else
                          HEAD_START_SPEAKING if turn.answer_ids is not None else HEAD_STOP_LISTENING)
            if turn.answer_ids is None:
                lay.drop_since(start)
            else:
                lay.text(t.speak_ids)
                lay.predict(turn.answer_ids, t.end_id)
        return lay

    def rows(self, dialogues: Sequence[Sequence[Turn]], feats: Sequence[Sequence[np.ndarray]], seq_len: int
             ) -> dict[str, np.ndarray]:
        """A batch from dialogues and each turn's (T, F) fbank (cut or padded to its chunks)."""
        frames = CHUNK_OVERLAP + self.turn_chunks * CHUNK_FRAMES
        out = np.zeros((len(dialogues), self.max_turns, frames, NUM_MEL_BINS), np.float32)
        rows = []
        for b, (turns, turn_feats) in enumerate(zip(dialogues, feats)):
            for k, (turn, f) in enumerate(zip(turns, turn_feats)):
                framed = stream_framed(f[:turn.chunks * CHUNK_FRAMES], turn.chunks)
                out[b, k, :len(framed)] = framed
            rows.append(self.layout(turns).arrays(seq_len, self.max_targets, self.max_states))
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]} | {"feats": out}

    def make_batch(self, bucket, indices, rng):
        feats = []
        for i in indices:
            turn_feats = []
            for turn in _turns(self.records[i]):
                f = load_features(turn, self.base)
                turn_feats.append(spec_augment(f, rng, self.augment) if self.augment is not None else f)
            feats.append(turn_feats)
        return self.rows([self.dialogues[i] for i in indices], feats, bucket)

    def example_batch(self, bucket: int | None = None):
        """Shapes of this process's batches of ``bucket`` LLM positions (default the largest)."""
        b = self.batch_size // jax.process_count()
        spec = layout_spec(b, bucket or self.boundaries[-1], self.max_targets, self.max_states)
        spec["feats"] = jax.ShapeDtypeStruct((b, self.max_turns, CHUNK_OVERLAP + self.turn_chunks * CHUNK_FRAMES,
                                              NUM_MEL_BINS), np.dtype(np.float32))
        return spec

    def init_boxed(self, rng):
        return init_params(self.model, rng)

    def load_params(self, rng):
        self._require_data()
        if not self.speech_from:
            raise ConfigError("stage.speech_from is required (--set stage.speech_from=WORKDIR of a speech-in 2 run)")
        params, stats = start_params(self.llm, self.model, rng, self.speech_from,
                                     {"encoder": r"^cmvn_", "adapter": None, "task_embeddings": None},
                                     f"stage.speech_from={self.speech_from}")
        params["encoder"] = {**params["encoder"], **cmvn_params(stats)}
        self.meta = {"cmvn_stats": stats}
        return params

    def speech(self, params: dict, feats_bntf: jax.Array) -> jax.Array:
        """(B, N, O + W C, F) stream-framed turns -> (B, N C' C, E) speech embeddings, turn after turn."""
        b, n, t, f = feats_bntf.shape
        x = feats_bntf.reshape(b * n, t, f)
        if self.streaming:
            audio = stream_speech(params, self.model, x)
        else:
            audio, _ = encode_speech(params, self.model, x, jnp.full((b * n,), t, jnp.int32))
        return audio.reshape(b, -1, audio.shape[-1])

    def outputs(self, params, batch) -> dict[str, jax.Array]:
        """{'hidden' (B, T, D), 'state_logits' (B, T, S)} of a batch."""
        return sequence_forward(params, self.model, batch, self.speech(params, batch["feats"]))

    def loss(self, params, batch, rng):
        out = self.outputs(params, batch)
        lm = target_cross_entropy(params, self.model, out["hidden"], batch["target_pos"], batch["target_ids"],
                                  batch["target_w"])
        state, accuracy = state_cross_entropy(out["state_logits"], batch["state_pos"], batch["state_label"],
                                              batch["state_w"], self.state_balanced)
        return lm + self.state_weight * state, {"lm_loss": lm, "state_loss": state, "state_accuracy": accuracy,
                                                "targets": jnp.sum(batch["target_w"]),
                                                "chunks": jnp.sum(batch["state_w"])}

    def dataset(self, seed):
        self._require_data()
        return bucketed_dataset(self.batches, self.make_batch, seed)


def build(cfg) -> SpeechInDialogueStage:
    return SpeechInDialogueStage(cfg)
