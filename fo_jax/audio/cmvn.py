"""Global CMVN: per-dimension mean and inverse std of the fbank features, applied as (x - mean) * istd.

Two stats formats are read, both holding sums over all training frames:
  - JSON, Freeze-Omni's ``audiollm/global_cmvn``: {"mean_stat": [sum x], "var_stat": [sum x^2],
    "frame_num": count};
  - Kaldi text (``compute-cmvn-stats --binary=false``): a 2-row matrix ``[ sum_x.. count
    sum_x2.. 0 ]``, the frame count in the last column of row 0.
As in the official loader, mean = sum / count and var = sumsq / count - mean^2 are computed in
float64, the variance is floored at 1e-20, istd = 1 / sqrt(var), and both are then cast to float32.
"""

from __future__ import annotations

import json
import os
from typing import TypeVar

import flax.struct
import jax
import numpy as np

from fo_jax.errors import LoadError

VAR_FLOOR = 1e-20
Array = TypeVar("Array", np.ndarray, jax.Array)


@flax.struct.dataclass
class GlobalCMVN:
    """mean: (D,) float32; istd: (D,) float32 (1 / std)."""

    mean: np.ndarray | jax.Array
    istd: np.ndarray | jax.Array

    @property
    def dim(self) -> int:
        return self.mean.shape[-1]


def apply_cmvn(x: Array, cmvn: GlobalCMVN) -> Array:
    """(..., D) features -> (x - mean) * istd, in numpy or jax.numpy alike (x's type and dtype)."""
    return (x - cmvn.mean.astype(x.dtype)) * cmvn.istd.astype(x.dtype)


def cmvn_from_stats(sum_d: np.ndarray, sumsq_d: np.ndarray, count: float, source: str = "stats"
                    ) -> GlobalCMVN:
    """Mean and inverse std from accumulated sums, as the official loader computes them."""
    sum_d, sumsq_d = np.asarray(sum_d, np.float64), np.asarray(sumsq_d, np.float64)
    if sum_d.ndim != 1 or sum_d.shape != sumsq_d.shape or sum_d.size == 0:
        raise LoadError(f"{source}: mean and variance stats must be non-empty vectors of equal length, "
                        f"got {sum_d.shape} and {sumsq_d.shape}")
    if not count > 0 or not np.all(np.isfinite(sum_d)) or not np.all(np.isfinite(sumsq_d)):
        raise LoadError(f"{source}: frame count must be positive and stats finite (count={count!r})")
    mean = sum_d / count
    var = np.maximum(sumsq_d / count - mean * mean, VAR_FLOOR)
    return GlobalCMVN(mean=mean.astype(np.float32), istd=(1.0 / np.sqrt(var)).astype(np.float32))


def cmvn_stats(feats_tf: np.ndarray) -> dict:
    """Sums of frames (T, D) in the JSON format (add the fields of several utterances to pool them)."""
    feats = np.asarray(feats_tf, np.float64)
    return {"mean_stat": feats.sum(0).tolist(), "var_stat": (feats * feats).sum(0).tolist(),
            "frame_num": int(feats.shape[0])}


def save_cmvn_json(path: str | os.PathLike, stats: dict) -> None:
    """Writes stats from ``cmvn_stats`` in the official JSON format."""
    with open(path, "w") as f:
        json.dump(stats, f)


def _load_json(path, text: str) -> GlobalCMVN:
    try:
        stats = json.loads(text)
    except json.JSONDecodeError as e:
        raise LoadError(f"{path}: not valid JSON CMVN stats ({e.msg} at line {e.lineno})") from None
    if not isinstance(stats, dict):
        raise LoadError(f"{path}: JSON CMVN stats must be an object with mean_stat, var_stat, frame_num")
    for key in ("mean_stat", "var_stat", "frame_num"):
        if key not in stats:
            raise LoadError(f"{path}: missing key '{key}' in JSON CMVN stats")
    try:
        return cmvn_from_stats(stats["mean_stat"], stats["var_stat"], float(stats["frame_num"]), str(path))
    except (TypeError, ValueError) as e:
        raise LoadError(f"{path}: non-numeric JSON CMVN stats ({e})") from None


def _load_kaldi(path, text: str) -> GlobalCMVN:
    tokens = text.split()
    if len(tokens) < 6 or tokens[0] != "[" or tokens[-1] != "]":
        raise LoadError(f"{path}: not a Kaldi text CMVN matrix '[ ... ]'")
    try:
        values = np.array([float(t) for t in tokens[1:-1]])
    except ValueError as e:
        raise LoadError(f"{path}: non-numeric entry in Kaldi CMVN stats ({e})") from None
    if values.size % 2:
        raise LoadError(f"{path}: Kaldi CMVN stats need 2 rows of D+1 values, got {values.size} values")
    dim = values.size // 2 - 1
    row0, row1 = values[:dim + 1], values[dim + 1:]
    if row1[-1] != 0:
        raise LoadError(f"{path}: Kaldi CMVN stats row 2 must end in 0, got {row1[-1]:g}")
    return cmvn_from_stats(row0[:dim], row1[:dim], float(row0[dim]), str(path))


def load_cmvn(path: str | os.PathLike, is_json: bool | None = None) -> GlobalCMVN:
    """Reads global CMVN stats (JSON or Kaldi text; ``is_json=None``: JSON if it starts with '{' or
    the name ends in .json, as the official ``global_cmvn`` JSON file has no extension).

    Raises:
      LoadError: missing file, Kaldi binary stats, malformed or non-numeric contents.
    """
    if not os.path.isfile(path):
        raise LoadError(f"CMVN stats file not found: {path}")
    with open(path, "rb") as f:
        raw = f.read()
    if raw.startswith(b"\0B"):
        raise LoadError(f"{path}: Kaldi binary CMVN stats are not supported; "
                        "write them with compute-cmvn-stats --binary=false")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise LoadError(f"{path}: CMVN stats must be UTF-8 text (JSON or Kaldi text)") from None
    if is_json is None:
        is_json = text.lstrip().startswith("{") or str(path).endswith(".json")
    return _load_json(path, text) if is_json else _load_kaldi(path, text)
