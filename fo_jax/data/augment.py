"""SpecAugment on fbank features (numpy, runs in the input pipeline's workers).

The released stage-3 run uses one frequency mask of up to 10 bins and one time mask of up to 20
frames; masked values are set to zero (features are CMVN-normalised, so zero is the mean).
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class SpecAugmentConfig:
    num_freq_masks: int = 1
    max_freq_width: int = 10
    num_time_masks: int = 1
    max_time_width: int = 20


def spec_augment(feats_tf: np.ndarray, rng: np.random.Generator, cfg: SpecAugmentConfig = SpecAugmentConfig(),
                 length: int | None = None) -> np.ndarray:
    """Returns a copy of (T, F) features with random frequency and time bands zeroed.

    Time masks fall inside the first ``length`` frames (default T), never on padding.
    """
    out = np.array(feats_tf, copy=True)
    frames, bins = out.shape
    length = frames if length is None else min(length, frames)
    for _ in range(cfg.num_freq_masks):
        width = int(rng.integers(0, cfg.max_freq_width + 1))
        start = int(rng.integers(0, max(bins - width, 0) + 1))
        out[:, start:start + width] = 0.0
    for _ in range(cfg.num_time_masks):
        width = int(rng.integers(0, min(cfg.max_time_width, length) + 1))
        start = int(rng.integers(0, max(length - width, 0) + 1))
        out[start:start + width, :] = 0.0
    return out
