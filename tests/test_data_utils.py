"""SpecAugment and length bucketing."""

import numpy as np
import pytest

from fo_jax.data.augment import SpecAugmentConfig, spec_augment
from fo_jax.data.bucketing import bucket_batches, bucket_for


def test_spec_augment_masks_bands_within_limits():
    feats = np.ones((100, 80), np.float32)
    rng = np.random.default_rng(0)
    for _ in range(50):
        out = spec_augment(feats, rng, SpecAugmentConfig(), length=60)
        zero_cols = np.where((out == 0).all(axis=0))[0]
        zero_rows = np.where((out == 0).all(axis=1))[0]
        assert len(zero_cols) <= 10 and len(zero_rows) <= 20
        if len(zero_cols):
            assert np.all(np.diff(zero_cols) == 1)  # one contiguous band
        if len(zero_rows):
            assert zero_rows.max() < 60 and np.all(np.diff(zero_rows) == 1)  # never on padding
        assert np.count_nonzero(out == 0) == len(zero_cols) * 100 + len(zero_rows) * 80 - len(zero_cols) * len(zero_rows)
    assert feats.min() == 1  # input untouched
    a = spec_augment(feats, np.random.default_rng(3))
    np.testing.assert_array_equal(a, spec_augment(feats, np.random.default_rng(3)))


def test_bucketing_pads_to_fixed_shapes():
    assert bucket_for(1, [4, 8]) == 4 and bucket_for(8, [4, 8]) == 8
    with pytest.raises(ValueError, match="exceeds"):
        bucket_for(9, [4, 8])
    examples = [{"x": np.full((n, 2), n, np.float32), "n": n, "id": i} for i, n in enumerate([3, 7, 2, 8, 5, 6, 4])]
    batches = list(bucket_batches(examples, "n", [4, 8], 2, {"x": 0}))
    assert [b["x"].shape for b in batches] == [(2, 4, 2), (2, 8, 2), (2, 8, 2)]
    first = batches[0]
    assert first["n"].tolist() == [3, 2] and first["id"].tolist() == [0, 2]
    assert first["x"][0, 3].tolist() == [0, 0] and first["x"][0, 2].tolist() == [3, 3]
    assert batches[1]["n"].tolist() == [7, 8] and batches[2]["n"].tolist() == [5, 6]  # 4 waits for a partner
