"""A prepared corpus goes through TFDS array_record and back, with random access, without TensorFlow."""

import grain
import numpy as np

from fo_jax.audio.io import write_wav
from fo_jax.data.manifest import write_manifest
from fo_jax.data.tfds_corpus import build_corpus, corpus_source


def test_build_and_read_corpus(tmp_path):
    rng = np.random.default_rng(0)
    waves = [(0.2 * rng.standard_normal(n)).astype(np.float32) for n in (1600, 3200, 800)]
    records = []
    for i, w in enumerate(waves):
        write_wav(tmp_path / f"{i}.wav", w, 16000)
        records.append({"audio": f"{i}.wav", "text": f"utterance {i}"})
    records.append({"audio": "missing.wav", "text": "skipped"})
    write_manifest(tmp_path / "m.jsonl", records)
    build_corpus(tmp_path / "m.jsonl", tmp_path / "tfds")
    source = corpus_source(tmp_path / "tfds")
    assert len(source) == 3
    by_id = {ex["id"].decode(): ex for ex in (source[i] for i in range(3))}  # array_record shuffles order
    for i, w in enumerate(waves):
        ex = by_id[str(i)]
        assert ex["text"].decode() == f"utterance {i}"
        expected = np.clip(np.round(w * 32768), -32768, 32767).astype(np.int16)
        np.testing.assert_array_equal(ex["audio"], expected)
        assert abs(ex["duration"] - len(w) / 16000) < 1e-6
    lengths = sorted(len(ex["audio"]) for ex in grain.MapDataset.source(source))
    assert lengths == [800, 1600, 3200]
