"""Planned, bucketed speech batches: fixed shapes, deterministic, exactly resumable."""

import numpy as np

from fo_jax.audio.fbank import fbank
from fo_jax.audio.io import load_audio, write_wav
from fo_jax.data.augment import SpecAugmentConfig
from fo_jax.data.speech import FeatureCache, bucketed_dataset, feature_batch, load_features, plan_batches, record_frames


def test_plan_batches_buckets_and_drops():
    lengths = [50, 120, 80, 300, 90, 40, 110, 0]
    batches, dropped = plan_batches(lengths, [100, 200], 2, seed=0)
    assert sorted(dropped) == [3, 7]  # too long, empty
    assert all(all(lengths[i] <= b for i in idx) and len(idx) == 2 for b, idx in batches)
    assert sorted((b, tuple(sorted(idx))) for b, idx in batches)[0][0] == 100
    assert plan_batches(lengths, [100, 200], 2, seed=0) == (batches, dropped)


def test_feature_batches_resume_exactly(tmp_path):
    rng = np.random.default_rng(0)
    records = []
    for i, n in enumerate([4000, 8000, 6000, 12000, 3000, 9000]):
        write_wav(tmp_path / f"{i}.wav", (0.1 * rng.standard_normal(n)).astype(np.float32), 16000)
        records.append({"audio": f"{i}.wav", "text": str(i)})
    lengths = [record_frames(r, tmp_path) for r in records]
    assert lengths == [23, 48, 36, 73, 17, 54]
    batches, _ = plan_batches(lengths, [40, 80], 2, seed=1)
    make = lambda bucket, idx, r: feature_batch(records, tmp_path, bucket, idx, r, SpecAugmentConfig())
    it = iter(bucketed_dataset(batches, make, seed=1))
    first = [next(it) for _ in range(5)]
    for b in first:
        assert b["feats"].shape[1] in (40, 80) and b["feats"].shape[0] == 2 and b["feats"].dtype == np.float32
        for row, n in enumerate(b["feat_lengths"]):
            assert np.all(b["feats"][row, n:] == 0)
    state = None
    it2 = iter(bucketed_dataset(batches, make, seed=1))
    for _ in range(3):
        next(it2)
    state = it2.get_state()
    it3 = iter(bucketed_dataset(batches, make, seed=1))
    it3.set_state(state)
    for expected in first[3:]:
        got = next(it3)
        np.testing.assert_array_equal(got["feats"], expected["feats"])  # same batch, same augmentation
    # Without augmentation the features are exactly the file's fbank.
    plain = feature_batch(records, tmp_path, 40, [0], np.random.default_rng(0), None)
    np.testing.assert_array_equal(plain["feats"][0, :23], fbank(load_audio(tmp_path / "0.wav")[0]))


def test_feature_cache_reuses_reads_again_when_the_file_changes_and_evicts(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "a.wav"
    write_wav(path, (0.1 * rng.standard_normal(4000)).astype(np.float32), 16000)
    record = {"audio": "a.wav"}
    first = load_features(record, tmp_path)
    assert load_features(record, tmp_path) is first  # computed once
    assert load_features({"audio": str(path)}, tmp_path / "elsewhere") is first  # same file, other spelling
    assert not first.flags.writeable
    np.testing.assert_array_equal(first, fbank(load_audio(path)[0]))
    write_wav(path, (0.1 * rng.standard_normal(6400)).astype(np.float32), 16000)  # rewritten: longer
    again = load_features(record, tmp_path)
    assert again is not first and len(again) > len(first)

    calls = []
    cache = FeatureCache(max_bytes=250)
    feats = {name: np.zeros(25, np.float32) + i for i, name in enumerate("bcd")}  # 100 bytes each
    for name in "bcd":
        (tmp_path / name).write_bytes(b"x")
    get = lambda name: cache.get(tmp_path / name, lambda: calls.append(name) or feats[name].copy())  # noqa: E731
    get("b"), get("c"), get("b"), get("d")  # d evicts the least recently used: c
    assert calls == ["b", "c", "d"] and cache.bytes == 200
    get("b"), get("c")
    assert calls == ["b", "c", "d", "c"]
