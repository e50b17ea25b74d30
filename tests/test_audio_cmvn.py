"""Global CMVN from the official JSON stats and from Kaldi text stats; errors for malformed files."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fo_jax.audio.cmvn import GlobalCMVN, apply_cmvn, cmvn_stats, load_cmvn, save_cmvn_json
from fo_jax.errors import FoJaxError, LoadError


@pytest.fixture
def feats():
    rng = np.random.default_rng(0)
    x = rng.normal(loc=np.linspace(-5, 15, 80), scale=np.linspace(0.5, 4, 80), size=(500, 80))
    x[:, 7] = 3.25  # a constant dimension: variance 0 (or a rounding-negative one) -> floor 1e-20
    return x.astype(np.float32)


def expected_mean_istd(sums, sumsq, count):
    """The official recipe, element by element in Python floats."""
    mean, istd = [], []
    for s, q in zip(sums, sumsq):
        m = s / count
        v = max(q / count - m * m, 1.0e-20)
        mean.append(m)
        istd.append(1.0 / math.sqrt(v))
    return np.array(mean, np.float32), np.array(istd, np.float32)


def write_kaldi(path, sums, sumsq, count):
    row0 = " ".join(repr(float(v)) for v in [*sums, count])
    row1 = " ".join(repr(float(v)) for v in sumsq)
    path.write_text(f" [\n  {row0}\n  {row1} 0 ]\n")


def test_json_stats(tmp_path, feats):
    stats = cmvn_stats(feats)
    assert stats["frame_num"] == 500 and len(stats["mean_stat"]) == len(stats["var_stat"]) == 80
    save_cmvn_json(tmp_path / "global_cmvn", stats)
    cmvn = load_cmvn(tmp_path / "global_cmvn")
    mean, istd = expected_mean_istd(stats["mean_stat"], stats["var_stat"], stats["frame_num"])
    assert cmvn.mean.dtype == cmvn.istd.dtype == np.float32 and cmvn.dim == 80
    np.testing.assert_array_equal(cmvn.mean, mean)
    np.testing.assert_array_equal(cmvn.istd, istd)
    assert cmvn.istd[7] == np.float32(1e10)  # floored variance
    normed = apply_cmvn(feats, cmvn)
    assert normed.dtype == np.float32
    keep = np.arange(80) != 7
    np.testing.assert_allclose(normed[:, keep].mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(normed[:, keep].std(0), 1.0, atol=1e-4)
    np.testing.assert_array_equal(normed, (feats - mean) * istd)


def test_kaldi_text_stats_equal_json(tmp_path, feats):
    stats = cmvn_stats(feats)
    write_kaldi(tmp_path / "cmvn.ark", stats["mean_stat"], stats["var_stat"], stats["frame_num"])
    from_kaldi = load_cmvn(tmp_path / "cmvn.ark")
    save_cmvn_json(tmp_path / "cmvn.json", stats)
    from_json = load_cmvn(tmp_path / "cmvn.json", is_json=True)
    np.testing.assert_array_equal(from_kaldi.mean, from_json.mean)
    np.testing.assert_array_equal(from_kaldi.istd, from_json.istd)
    # A hand-written 2-dim file: frames x = (1, 2), (3, 6) -> mean (2, 4), var (1, 4).
    (tmp_path / "small").write_text("[ 4 8 2\n10 40 0 ]")
    small = load_cmvn(tmp_path / "small", is_json=False)
    np.testing.assert_array_equal(small.mean, [2.0, 4.0])
    np.testing.assert_array_equal(small.istd, [1.0, 0.5])


def test_apply_cmvn_in_jax(feats):
    cmvn = GlobalCMVN(mean=np.linspace(-1, 1, 80).astype(np.float32),
                      istd=np.linspace(0.5, 2, 80).astype(np.float32))
    x = jnp.asarray(feats[None, :19])  # (B, 19, 80), an encoder input chunk
    out = jax.jit(apply_cmvn)(x, cmvn)
    assert out.shape == (1, 19, 80) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), apply_cmvn(feats[None, :19], cmvn), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name, content, message", [
    ("bad.json", "{ not json", "not valid JSON"),
    ("list.json", "[1, 2]", "must be an object"),
    ("nokey.json", json.dumps({"mean_stat": [1.0], "var_stat": [2.0]}), "missing key 'frame_num'"),
    ("len.json", json.dumps({"mean_stat": [1.0, 2.0], "var_stat": [2.0], "frame_num": 3}), "equal length"),
    ("zero.json", json.dumps({"mean_stat": [1.0], "var_stat": [2.0], "frame_num": 0}), "frame count"),
    ("str.json", json.dumps({"mean_stat": ["a"], "var_stat": [2.0], "frame_num": 3}), "non-numeric"),
    ("nobr.ark", "1 2 3 4 0", "not a Kaldi text CMVN matrix"),
    ("odd.ark", "[ 1 2 3 4 5 0 0 ]", "2 rows"),
    ("row2.ark", "[ 4 8 2 10 40 1 ]", "must end in 0"),
    ("nan.ark", "[ 4 x 2 10 40 0 ]", "non-numeric"),
])
def test_malformed_files_raise_one_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(LoadError, match=message) as info:
        load_cmvn(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_and_binary_files(tmp_path):
    with pytest.raises(FoJaxError, match="not found"):
        load_cmvn(tmp_path / "absent")
    (tmp_path / "bin").write_bytes(b"\0BDM \4\2\0\0\0")
    with pytest.raises(LoadError, match="binary"):
        load_cmvn(tmp_path / "bin")
