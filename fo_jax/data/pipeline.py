"""grain plumbing shared by every stage's input pipeline.

A pipeline is ``records -> shuffle(seed) -> repeat -> this process's slice -> map -> batch``
over a ``grain.MapDataset``; its iterator's state (``get_state``/``set_state``) goes into every
checkpoint, so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import grain
import jax
import numpy as np


def batched(records: Sequence[Any], to_example: Callable[..., dict[str, np.ndarray]], batch_size: int,
            seed: int, shuffle: bool = True, repeat: bool = True, random: bool = False) -> grain.IterDataset:
    """Per-process batches of fixed-shape examples (``batch_size`` rows per process).

    ``random``: ``to_example(record, rng)`` gets a ``np.random.Generator`` of its own, derived by
    grain from ``seed`` and the element's index (augmentation that a resumed run repeats exactly).
    """
    ds = grain.MapDataset.source(list(records))
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if repeat:
        ds = ds.repeat(None)
    if jax.process_count() > 1:
        ds = ds[jax.process_index()::jax.process_count()]
    ds = ds.random_map(to_example, seed=seed) if random else ds.map(to_example)
    return ds.batch(batch_size, drop_remainder=True).to_iter_dataset()
