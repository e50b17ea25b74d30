"""Length bucketing: variable-length examples padded to a few fixed shapes.

Every distinct padded shape is one compilation of the train step, so lengths are rounded up to a
small set of bucket boundaries and batches are formed within a bucket.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import numpy as np


def bucket_for(length: int, boundaries: Sequence[int]) -> int:
    """The smallest boundary >= length; lengths past the last boundary are an error (filter them first)."""
    for b in boundaries:
        if length <= b:
            return b
    raise ValueError(f"length {length} exceeds the largest bucket {boundaries[-1]}")


def pad_to(array: np.ndarray, length: int, axis: int = 0, value: float = 0) -> np.ndarray:
    """Pads ``array`` with ``value`` along ``axis`` up to ``length``."""
    pad = [(0, 0)] * array.ndim
    pad[axis] = (0, length - array.shape[axis])
    return np.pad(array, pad, constant_values=value)


def bucket_batches(examples: Iterable[dict], length_key: str, boundaries: Sequence[int], batch_size: int,
                   pad_keys: dict[str, int]) -> Iterator[dict[str, np.ndarray]]:
    """Groups examples by bucket and yields padded batches as soon as a bucket holds ``batch_size``.

    Args:
      examples: dicts of arrays plus an int ``length_key`` (the example's true length).
      boundaries: increasing padded lengths.
      pad_keys: {key: time axis} of the arrays padded to the bucket length; other keys are stacked.
    Yields:
      dicts of stacked arrays, each batch from one bucket, with ``length_key`` as (B,) int32.
    """
    pending: dict[int, list[dict]] = {b: [] for b in boundaries}
    for ex in examples:
        bucket = bucket_for(int(ex[length_key]), boundaries)
        pending[bucket].append(ex)
        if len(pending[bucket]) == batch_size:
            rows, pending[bucket] = pending[bucket], []
            batch = {}
            for key in rows[0]:
                if key in pad_keys:
                    batch[key] = np.stack([pad_to(np.asarray(r[key]), bucket, pad_keys[key]) for r in rows])
                else:
                    batch[key] = np.stack([np.asarray(r[key]) for r in rows])
            batch[length_key] = batch[length_key].astype(np.int32)
            yield batch
