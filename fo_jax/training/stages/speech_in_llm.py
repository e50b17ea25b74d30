"""Speech-in stage 2 (stage ``speech_in_llm``): encoder + adapter + task embeddings into the frozen LLM.

Each utterance becomes a chat whose assistant turn is its transcript (ids from ``ChatTemplate``, so
the text pieces tokenize as at inference)::

  <|im_start|>system\\n{role}<|im_end|>\\n<|im_start|>user\\n{instruction}[audio][speech ...][/audio]
  <|im_end|>\\n<|im_start|>assistant\\n  ->  transcript <|im_end|>

``[audio]`` / ``[/audio]`` are task embeddings 5 and 6 (the official ``task_ids``; ``stage.audio_bos_eos``).
The loss is the LLM's cross-entropy on the transcript tokens and the closing <|im_end|> (mean over
target tokens) through the frozen LLM. Speech is framed as a turn is streamed (3 zero overlap frames,
then whole 160 ms chunks, ``stream_framed``) and encoded in one whole-utterance forward under the
encoder's static chunk mask: what the stream computes, wherever the official key positions are the
true ones (the first 17 chunks; ``fo_jax.models.encoder.stream_positions``).

Manifest: speech-in 1's ``{"audio", "text"}`` lines. The encoder starts from a stage-1 run
(``stage.encoder_from=WORKDIR``: its trained encoder and CMVN statistics) or from scratch (CMVN
estimated from the manifest). The CMVN statistics stay frozen; the run's meta carries them to stage 3.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fo_jax.audio.fbank import CHUNK_FRAMES, CHUNK_OVERLAP, NUM_MEL_BINS
from fo_jax.data.augment import SpecAugmentConfig
from fo_jax.data.bucketing import pad_to
from fo_jax.data.manifest import read_manifest
from fo_jax.data.prepare import check_audio
from fo_jax.data.speech import (bucketed_dataset, cmvn_stats_of, feature_batch, plan_batches, record_frames,
                                stream_chunks, stream_framed)
from fo_jax.errors import ConfigError
from fo_jax.models.adapter import output_frames
from fo_jax.models.audio_llm import (AUDIO_PLACEHOLDER, TASK_AUDIO_BOS, TASK_AUDIO_EOS, ChatTemplate, encode_speech,
                                     init_params)
from fo_jax.text.tokenizer import chatml
from fo_jax.training.speech_common import (Layout, cmvn_params, layout_spec, sequence_forward, speech_model,
                                           start_params, target_cross_entropy)


class SpeechInLLMStage:
    def __init__(self, cfg):
        s = cfg.stage
        self.trainable = tuple(s.trainable)
        self.llm, self.model = speech_model(cfg)
        self.bos_eos = bool(s.audio_bos_eos)
        if self.bos_eos and self.model.adapter.task_num <= TASK_AUDIO_EOS:
            raise ConfigError(f"model.adapter.task_num={self.model.adapter.task_num}: audio bos/eos use task "
                              f"embeddings {TASK_AUDIO_BOS} and {TASK_AUDIO_EOS}")
        self.batch_size, self.boundaries = s.batch_size, tuple(s.buckets)
        if any(b % CHUNK_FRAMES for b in self.boundaries):
            raise ConfigError(f"stage.buckets={self.boundaries}: fbank buckets must be whole {CHUNK_FRAMES}-frame chunks")
        self.max_label, self.template_len = s.max_label_len, s.template_len
        self.per_chunk = output_frames(self.model.adapter, self.model.encoder.chunk_size)
        self.augment = SpecAugmentConfig(**s.spec_augment) if s.get("spec_augment") else None
        self.encoder_from = s.get("encoder_from") or None
        self.cmvn_utterances = s.get("cmvn_utterances", 200)
        self.instruction, self.role = s.instruction, s.get("system_role") or None
        self.records, self.rejected, self.manifest = None, [], s.get("manifest") or None
        if self.llm.tokenizer is not None:
            chat = chatml([{"role": "user", "content": self.instruction + AUDIO_PLACEHOLDER}])
            self.template = ChatTemplate.from_tokenizer(self.llm.tokenizer, self.role, chat)
            fixed = len(self.template.system_ids) + len(self.template.listen_ids) + len(self.template.speak_ids)
            if fixed + 2 * self.bos_eos > self.template_len:
                raise ConfigError(f"stage.template_len={self.template_len}: the chat template takes "
                                  f"{fixed + 2 * self.bos_eos} tokens")
        if self.manifest:
            self._read(s.get("manifest_policy", "skip"), cfg.get("seed", 0))

    def _read(self, policy: str, seed: int) -> None:
        tokenizer = self.llm.require_tokenizer()
        self.base = Path(self.manifest).resolve().parent
        report: list[str] = []
        self.records = read_manifest(self.manifest, required=["audio", "text"], validate=check_audio,
                                     policy=policy, report=report)
        self.labels = [tokenizer.encode(r["text"], add_special_tokens=False) for r in self.records]
        self.chunks = [stream_chunks(record_frames(r, self.base)) for r in self.records]
        frames = [c * CHUNK_FRAMES if len(ids) < self.max_label else -1 for c, ids in zip(self.chunks, self.labels)]
        self.batches, dropped = plan_batches(frames, self.boundaries, self.batch_size // jax.process_count(), seed)
        self.rejected = report + [f"{self.records[i]['audio']}: longer than the largest bucket or the label limit"
                                  for i in dropped]
        if not self.batches:
            raise ConfigError(f"{self.manifest}: too few usable utterances for one batch of {self.batch_size}")

    def _require_data(self) -> None:
        if self.records is None:
            raise ConfigError("stage.manifest is required (--set stage.manifest=PATH)")

    def seq_len(self, bucket: int) -> int:
        """LLM positions of a row whose speech fills ``bucket`` fbank frames."""
        return self.template_len + (bucket // CHUNK_FRAMES) * self.per_chunk + self.max_label

    def layout(self, audio_frames: int, label_ids: list[int]) -> Layout:
        t = self.template
        lay = Layout()
        lay.text(t.system_ids + t.listen_ids)
        if self.bos_eos:
            lay.task(TASK_AUDIO_BOS)
        lay.audio(0, audio_frames)
        if self.bos_eos:
            lay.task(TASK_AUDIO_EOS)
        lay.text(t.speak_ids)
        lay.predict(label_ids, t.end_id)
        return lay

    def init_boxed(self, rng):
        return init_params(self.model, rng)

    def load_params(self, rng):
        self._require_data()
        params, stats = start_params(self.llm, self.model, rng, self.encoder_from, {"encoder": r"^cmvn_"},
                                     f"stage.encoder_from={self.encoder_from}")
        if stats is None:  # a fresh encoder: statistics of this manifest
            stats = cmvn_stats_of(self.records[: self.cmvn_utterances], self.base)
        params["encoder"] = {**params["encoder"], **cmvn_params(stats)}
        self.meta = {"cmvn_stats": stats}
        return params

    def loss(self, params, batch, rng):
        audio, _ = encode_speech(params, self.model, batch["feats"], batch["feat_lengths"], train=True, rng=rng)
        out = sequence_forward(params, self.model, batch, audio)
        loss = target_cross_entropy(params, self.model, out["hidden"], batch["target_pos"], batch["target_ids"],
                                    batch["target_w"])
        return loss, {"targets": jnp.sum(batch["target_w"]), "frames": jnp.sum(batch["feat_lengths"]).astype(jnp.float32)}

    def make_batch(self, bucket, indices, rng):
        feats = feature_batch(self.records, self.base, bucket, indices, rng, self.augment)
        rows, framed, lengths = [], [], []
        for row, i in enumerate(indices):
            chunks = self.chunks[i]
            # record_frames may come from a rounded duration: the planned chunks decide.
            f = feats["feats"][row, :min(feats["feat_lengths"][row], chunks * CHUNK_FRAMES)]
            framed.append(pad_to(stream_framed(f, chunks), CHUNK_OVERLAP + bucket))
            lengths.append(CHUNK_OVERLAP + chunks * CHUNK_FRAMES)
            rows.append(self.layout(chunks * self.per_chunk, self.labels[i]).arrays(self.seq_len(bucket), self.max_label))
        batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
        return batch | {"feats": np.stack(framed), "feat_lengths": np.asarray(lengths, np.int32)}

    def example_batch(self, bucket: int | None = None):
        """Shapes of this process's batches of ``bucket`` fbank frames (default the largest)."""
        b, bucket = self.batch_size // jax.process_count(), bucket or self.boundaries[-1]
        spec = layout_spec(b, self.seq_len(bucket), self.max_label)
        spec["feats"] = jax.ShapeDtypeStruct((b, CHUNK_OVERLAP + bucket, NUM_MEL_BINS), np.dtype(np.float32))
        spec["feat_lengths"] = jax.ShapeDtypeStruct((b,), np.dtype(np.int32))
        return spec

    def dataset(self, seed):
        self._require_data()
        return bucketed_dataset(self.batches, self.make_batch, seed)


def build(cfg) -> SpeechInLLMStage:
    return SpeechInLLMStage(cfg)
