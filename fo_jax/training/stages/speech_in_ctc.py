"""Stage ``speech_in_ctc`` (speech-in stage 1): speech encoder + CTC head on ASR pairs.

Targets are characters or, with ``stage.ctc_units`` > 0, that many word pieces learned from the
training transcripts (``fo_jax.text.ctc_vocab``; the official 5538-unit CTC vocabulary was not
released). The global CMVN is estimated from the training audio at start-up and kept frozen;
everything else in the encoder and the CTC head trains.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fo_jax.config import model_config
from fo_jax.data.augment import SpecAugmentConfig
from fo_jax.data.manifest import read_manifest
from fo_jax.data.prepare import check_audio
from fo_jax.data.speech import bucketed_dataset, cmvn_stats_of, feature_batch, plan_batches, record_frames
from fo_jax.errors import ConfigError
from fo_jax.models.ctc import ctc_logits, ctc_loss, ctc_min_frames, init_ctc_params
from fo_jax.models.encoder import encoder_forward, init_encoder_params, output_lengths
from fo_jax.text.ctc_vocab import CtcVocab
from fo_jax.training.speech_common import cmvn_params


class SpeechInCTCStage:
    def __init__(self, cfg):
        s = cfg.stage
        if not s.get("manifest"):
            raise ConfigError("stage.manifest is required (--set stage.manifest=PATH)")
        self.trainable = tuple(s.trainable)
        self.base = Path(s.manifest).resolve().parent
        report: list[str] = []
        self.records = read_manifest(s.manifest, required=["audio", "text"], validate=check_audio,
                                     policy=s.get("manifest_policy", "skip"), report=report)
        try:
            self.vocab = CtcVocab.from_texts((r["text"] for r in self.records), s.get("ctc_units", 0))
        except ValueError as e:
            raise ConfigError(f"stage.ctc_units: {e}") from None
        self.encoder = dataclasses.replace(model_config(cfg).encoder, ctc_vocab_size=len(self.vocab))
        self.max_label = s.max_label_len
        self.batch_size, self.boundaries = s.batch_size, tuple(s.buckets)
        self.augment = SpecAugmentConfig(**s.spec_augment) if s.get("spec_augment") else None
        frames = [record_frames(r, self.base) for r in self.records]
        enc_frames = np.asarray(output_lengths(np.asarray(frames, np.int32)))
        lengths, problems = [], []
        for n, e, r in zip(frames, enc_frames, self.records):
            ids = self.vocab.encode(r["text"])
            # An utterance that CTC cannot align (too many labels for its encoder frames) has an
            # infinite loss: its batch would teach nothing but a clipped, meaningless gradient.
            problem = (f"{len(ids)} labels > stage.max_label_len={self.max_label}" if len(ids) > self.max_label else
                       f"{ctc_min_frames(ids)} CTC frames needed, {e} encoder frames" if ctc_min_frames(ids) > e
                       else None)
            lengths.append(-1 if problem else n)
            problems.append(problem or "longer than the largest bucket")
        self.batches, dropped = plan_batches(lengths, self.boundaries, self.batch_size // jax.process_count(),
                                             cfg.get("seed", 0))
        self.rejected = report + [f"{self.records[i]['audio']}: {problems[i]}" for i in dropped]
        if not self.batches:
            raise ConfigError(f"{s.manifest}: too few usable utterances for one batch of {self.batch_size}")
        self.cmvn_utterances = s.get("cmvn_utterances", 200)

    def init_boxed(self, rng):
        r1, r2 = jax.random.split(rng)
        return {"encoder": init_encoder_params(self.encoder, r1), "ctc": init_ctc_params(self.encoder, r2)}

    def load_params(self, rng):
        params = nn.unbox(self.init_boxed(rng))
        stats = cmvn_stats_of(self.records[: self.cmvn_utterances], self.base)
        # The statistics are frozen (not in checkpoints): the run's meta carries them to later stages,
        # and the CTC vocabulary to whoever decodes the head.
        self.meta = {"cmvn_stats": stats, "vocab": list(self.vocab.units)}
        params["encoder"] = {**params["encoder"], **cmvn_params(stats)}
        return params

    def loss(self, params, batch, rng):
        enc, enc_lengths = encoder_forward(params["encoder"], self.encoder, batch["feats"], batch["feat_lengths"],
                                           train=True, rng=rng)
        logits = ctc_logits(params["ctc"], self.encoder, enc)
        loss = ctc_loss(logits, enc_lengths, batch["labels"], batch["label_lengths"])
        return loss, {"frames": jnp.sum(batch["feat_lengths"]).astype(jnp.float32)}

    def make_batch(self, bucket, indices, rng):
        batch = feature_batch(self.records, self.base, bucket, indices, rng, self.augment)
        labels = np.zeros((len(indices), self.max_label), np.int32)
        lengths = np.zeros(len(indices), np.int32)
        for row, i in enumerate(indices):
            ids = self.vocab.encode(self.records[i]["text"])
            labels[row, : len(ids)], lengths[row] = ids, len(ids)
        return batch | {"labels": labels, "label_lengths": lengths}

    def dataset(self, seed):
        return bucketed_dataset(self.batches, self.make_batch, seed)


def build(cfg) -> SpeechInCTCStage:
    return SpeechInCTCStage(cfg)
