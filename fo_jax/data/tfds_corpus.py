"""A TFDS builder for prepared speech corpora (array_record), read with ``tfds.data_source``.

``build_corpus(manifest, data_dir)`` converts a manifest (see ``fo_jax.data.prepare``) into an
array_record TFDS dataset once: 16 kHz int16 audio, text, id and duration per example. Training
then reads it with random access (``tfds.data_source``) in grain pipelines, without TensorFlow.
Audio is stored as a plain int16 tensor (``tfds.features.Audio`` needs TensorFlow).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from fo_jax.audio.io import load_audio
from fo_jax.data.manifest import read_manifest, resolve
from fo_jax.data.prepare import check_audio

NAME = "fo_jax_speech"


class FoJaxSpeech(tfds.core.GeneratorBasedBuilder):
    """Speech + transcripts from a fo_jax manifest. Split ``train`` (the whole manifest)."""

    name = NAME
    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, manifest: str | os.PathLike | None = None, **kwargs):
        self._manifest = manifest
        super().__init__(file_format="array_record", **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "id": tfds.features.Text(),
            "audio": tfds.features.Tensor(shape=(None,), dtype=np.int16),
            "text": tfds.features.Text(),
            "duration": tfds.features.Scalar(dtype=np.float32),
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(Path(self._manifest))}

    def _generate_examples(self, manifest: Path):
        for i, record in enumerate(read_manifest(manifest, required=["audio", "text"], validate=check_audio)):
            audio, _ = load_audio(resolve(record["audio"], manifest.parent), 16000)
            pcm = np.clip(np.round(audio * 32768.0), -32768, 32767).astype(np.int16)
            yield i, {"id": str(i), "audio": pcm, "text": record["text"], "duration": len(pcm) / 16000}


def build_corpus(manifest: str | os.PathLike, data_dir: str | os.PathLike) -> None:
    """Writes the TFDS dataset for ``manifest`` under ``data_dir``."""
    FoJaxSpeech(manifest=manifest, data_dir=str(data_dir)).download_and_prepare()


def corpus_source(data_dir: str | os.PathLike, split: str = "train"):
    """Random-access source (``ArrayRecordDataSource``) for grain: ``grain.MapDataset.source(...)``."""
    return tfds.data_source(NAME, data_dir=str(data_dir), split=split)
