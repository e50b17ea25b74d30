"""Converted params are cached and reused until a source changes."""

import os

import numpy as np

from fo_jax.conversion.cache import load_or_convert


def test_cache_reused_then_invalidated(tmp_path):
    src = tmp_path / "weights.bin"
    src.write_bytes(b"v1")
    calls = []

    def convert():
        calls.append(1)
        return {"w": np.arange(6, dtype=np.float32).reshape(2, 3) * len(calls), "b": {"x": np.ones(2, np.int32)}}

    cache = tmp_path / "cache"
    first, converted = load_or_convert(cache, [src], convert, {"dtype": "float32"})
    assert converted and len(calls) == 1
    again, converted = load_or_convert(cache, [src], convert, {"dtype": "float32"})
    assert not converted and len(calls) == 1  # no conversion work on the second start
    np.testing.assert_array_equal(again["w"], first["w"])
    np.testing.assert_array_equal(again["b"]["x"], [1, 1])

    src.write_bytes(b"v2 changed")
    os.utime(src, ns=(1, 1))
    changed, converted = load_or_convert(cache, [src], convert, {"dtype": "float32"})
    assert converted and len(calls) == 2
    np.testing.assert_array_equal(changed["w"], 2 * first["w"])
    _, converted = load_or_convert(cache, [src], convert, {"dtype": "bfloat16"})  # other settings: reconvert
    assert converted and len(calls) == 3
    assert not (tmp_path / "cache.tmp").exists()
