"""Reading and writing safetensors files (single or sharded) as numpy, bfloat16 included.

Reads are lazy (memory-mapped), so a 7B checkpoint is never held twice in host memory.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Mapping

import ml_dtypes
import numpy as np

from fo_jax.errors import LoadError

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """One ``.safetensors`` file -> {name: memory-mapped array}. Raises LoadError naming the file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > path.stat().st_size - 8:
                raise LoadError(f"{path}: not a readable safetensors file (bad header length)")
            header = json.loads(f.read(header_len))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoadError(f"{path}: not a readable safetensors file ({type(e).__name__})") from None
    header.pop("__metadata__", None)
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
    out = {}
    for name, info in header.items():
        if info.get("dtype") not in _DTYPES:
            raise LoadError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
        start, end = info["data_offsets"]
        dtype = np.dtype(_DTYPES[info["dtype"]])
        if end > data.size or (end - start) != dtype.itemsize * int(np.prod(info["shape"])):
            raise LoadError(f"{path}: tensor {name!r} is truncated or has a bad offset")
        out[name] = data[start:end].view(dtype).reshape(info["shape"])
    return out


def read_checkpoint_dir(directory: str | os.PathLike) -> dict[str, tuple[np.ndarray, Path]]:
    """All tensors of a HF directory (``model.safetensors`` or a sharded index) -> {name: (array, file)}."""
    directory = Path(directory)
    index = directory / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError):
            raise LoadError(f"{index}: not a safetensors index (no 'weight_map')") from None
        files = sorted(set(weight_map.values()))
    elif (directory / SINGLE_NAME).exists():
        files = [SINGLE_NAME]
    else:
        files = sorted(p.name for p in directory.glob("*.safetensors"))
        if not files:
            raise LoadError(f"{directory}: no model.safetensors, {INDEX_NAME} or *.safetensors file")
    tensors = {}
    for name in files:
        file = directory / name
        if not file.exists():
            raise LoadError(f"{file}: listed in the index but missing")
        tensors.update({k: (v, file) for k, v in read_safetensors(file).items()})
    return tensors


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Writes {name: array} as one safetensors file (HF-compatible)."""
    header, offset = {}, 0
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    for name, a in arrays.items():
        header[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    header["__metadata__"] = dict(metadata or {"format": "pt"})
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for a in arrays.values():
            f.write(a.tobytes())


def write_checkpoint_dir(directory: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                         max_shard_bytes: int = 4 << 30) -> list[Path]:
    """Writes tensors as ``model.safetensors``, or as shards plus an index when larger than a shard."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, a in tensors.items():
        if shards[-1] and size + a.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = a
        size += a.nbytes
    if len(shards) == 1:
        write_safetensors(directory / SINGLE_NAME, shards[0])
        return [directory / SINGLE_NAME]
    paths, weight_map = [], {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(directory / name, shard)
        weight_map.update({k: name for k in shard})
        paths.append(directory / name)
    total = sum(a.nbytes for a in tensors.values())
    (directory / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total},
                                                    "weight_map": weight_map}, indent=2))
    return paths

