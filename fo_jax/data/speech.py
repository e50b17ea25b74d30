"""Speech examples: audio -> Kaldi fbank (+ SpecAugment), bucketed into a few fixed padded shapes.

Batches are planned up front: records are grouped by length into buckets, each bucket is cut into
batches, and the list of batches is what grain shuffles and repeats. The iterator's state is then
just an index, so a resumed run sees exactly the batches a straight run would, and every batch has
one of ``len(boundaries)`` shapes (one compilation of the train step each).
"""

from __future__ import annotations

import collections
import os
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

import grain
import jax
import numpy as np

from fo_jax.audio.cmvn import cmvn_stats
from fo_jax.audio.fbank import CHUNK_FRAMES, CHUNK_OVERLAP, LOG_FLOOR, fbank, num_frames
from fo_jax.audio.io import audio_info, load_audio
from fo_jax.data.augment import SpecAugmentConfig, spec_augment
from fo_jax.data.bucketing import bucket_for, pad_to
from fo_jax.data.manifest import resolve


def record_frames(record: dict, base: Path) -> int:
    """Fbank frames of a manifest record's audio at 16 kHz (from ``duration`` when the record has it)."""
    if "duration" in record:
        return num_frames(int(round(float(record["duration"]) * 16000)))
    frames, rate, _ = audio_info(resolve(record["audio"], base))
    return num_frames(int(np.ceil(frames * 16000 / rate)))


class FeatureCache:
    """Fbank of recently loaded audio files, least recently used dropped past ``max_bytes``.

    Training computes a clip's fbank once per epoch and on 2 CPU cores that is most of a small
    model's step (~5-7 ms a 2 s clip: a toy speech-in 1 run spent ~2 CPU minutes on it); the toy
    world's speech stages and evaluations also hear the same clips. Keyed by path, size and mtime,
    so a rewritten file is read again. Arrays are read-only (callers copy before changing them).
    Thread-safe: grain maps examples in threads.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self._items: collections.OrderedDict[tuple, np.ndarray] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: str | os.PathLike, compute: Callable[[], np.ndarray]) -> np.ndarray:
        """``compute()``'s features of the file at ``path`` (cached)."""
        try:
            st = os.stat(path)
        except OSError:
            return compute()  # the loader reports what is wrong with the file
        key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = compute()
        value.setflags(write=False)
        with self._lock:
            if key not in self._items and value.nbytes <= self.max_bytes:
                self._items[key] = value
                self.bytes += value.nbytes
                while self.bytes > self.max_bytes:
                    self.bytes -= self._items.popitem(last=False)[1].nbytes
        return value


FEATURES = FeatureCache(1 << 30)  # 1 GiB: ~17,000 clips of 2 s


def load_features(record: dict, base: Path) -> np.ndarray:
    """(T, 80) float32 log-mel fbank of the record's audio (16 kHz, int16 scale, before CMVN);
    read-only, from ``FEATURES`` when it was computed before."""
    path = resolve(record["audio"], base)
    return FEATURES.get(path, lambda: fbank(load_audio(path, 16000)[0]))


def cmvn_stats_of(records: Sequence[dict], base: Path) -> dict:
    """Global CMVN sums (official JSON format, see ``fo_jax.audio.cmvn``) pooled over the records' fbank."""
    feats = np.concatenate([load_features(r, base) for r in records])
    return cmvn_stats(feats)


# What a silent stretch of audio gives (every mel bin at the log floor): pads a last, partial chunk.
SILENCE_FBANK = float(np.log(LOG_FLOOR))


def stream_chunks(frames: int) -> int:
    """Streaming chunks (160 ms, ``CHUNK_FRAMES`` fbank frames each) that carry ``frames`` frames."""
    return -(-frames // CHUNK_FRAMES)


def stream_framed(feats_tf: np.ndarray, chunks: int) -> np.ndarray:
    """(T, F) fbank -> (CHUNK_OVERLAP + chunks * CHUNK_FRAMES, F) as a turn is streamed.

    In front, the zero overlap frames a turn's first chunk gets (inference resets them per turn);
    after the utterance, silence up to the end of its last chunk (the stream goes on past speech).
    """
    pad = chunks * CHUNK_FRAMES - len(feats_tf)
    if pad < 0:
        raise ValueError(f"{len(feats_tf)} frames do not fit in {chunks} chunks")
    return np.concatenate([np.zeros((CHUNK_OVERLAP, feats_tf.shape[1]), np.float32),
                           np.asarray(feats_tf, np.float32),
                           np.full((pad, feats_tf.shape[1]), SILENCE_FBANK, np.float32)])


def plan_batches(lengths: Sequence[int], boundaries: Sequence[int], batch_size: int,
                 seed: int) -> tuple[list[tuple[int, list[int]]], list[int]]:
    """Groups example indices into (bucket, indices) batches; returns (batches, dropped indices).

    Examples longer than the last boundary are dropped (reported by the caller). Within a bucket
    the order is shuffled by ``seed``; incomplete last batches are dropped.
    """
    rng = np.random.default_rng(seed)
    buckets: dict[int, list[int]] = {b: [] for b in boundaries}
    dropped = []
    for i, n in enumerate(lengths):
        if n > boundaries[-1] or n <= 0:
            dropped.append(i)
        else:
            buckets[bucket_for(n, boundaries)].append(i)
    batches = []
    for bucket, idx in buckets.items():
        idx = list(rng.permutation(idx))
        batches += [(bucket, [int(i) for i in idx[s:s + batch_size]])
                    for s in range(0, len(idx) - batch_size + 1, batch_size)]
    return batches, dropped


def bucketed_dataset(batches: Sequence[tuple[int, list[int]]],
                     make_batch: Callable[[int, list[int], np.random.Generator], dict[str, np.ndarray]],
                     seed: int) -> grain.IterDataset:
    """Shuffled, endlessly repeated planned batches, each built by ``make_batch(bucket, indices, rng)``.

    The rng is derived from (seed, position in the stream), so augmentation is reproducible on resume.
    Multi-process: each process builds the batches at its own positions.
    """
    ds = grain.MapDataset.source(list(batches)).shuffle(seed=seed).repeat(None)
    if jax.process_count() > 1:
        ds = ds[jax.process_index()::jax.process_count()]
    ds = ds.map_with_index(lambda i, b: make_batch(b[0], b[1], np.random.default_rng([seed, i])))
    return ds.to_iter_dataset()


def feature_batch(records: Sequence[dict], base: Path, bucket: int, indices: Sequence[int],
                  rng: np.random.Generator, augment: SpecAugmentConfig | None) -> dict[str, Any]:
    """{'feats': (B, bucket, 80), 'feat_lengths': (B,)} for the records at ``indices``."""
    feats, lengths = [], []
    for i in indices:
        f = load_features(records[i], base)[:bucket]
        if augment is not None:
            f = spec_augment(f, rng, augment)
        feats.append(pad_to(f, bucket))
        lengths.append(len(f))
    return {"feats": np.stack(feats).astype(np.float32), "feat_lengths": np.asarray(lengths, np.int32)}
