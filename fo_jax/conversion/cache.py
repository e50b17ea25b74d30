"""Convert once, then load fast: converted params cached as an orbax checkpoint keyed by their sources.

The key is a hash of every source file's path, size and modification time (cheap even for a 15 GB
checkpoint); any change to a source (or to ``extra`` settings such as the dtype) invalidates the
cache and the next start converts again. The cache is written atomically: a crash mid-write leaves
the previous state, never a half cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import orbax.checkpoint as ocp

CACHE_VERSION = 1


def sources_key(sources: Sequence[str | os.PathLike], extra: dict | None = None) -> str:
    """Hash of (path, size, mtime) of each source file (files under directories included) and ``extra``."""
    digest = hashlib.sha256(f"v{CACHE_VERSION}|{json.dumps(extra or {}, sort_keys=True)}".encode())
    files: list[Path] = []
    for src in sources:
        src = Path(src)
        files += sorted(p for p in src.rglob("*") if p.is_file()) if src.is_dir() else [src]
    for f in files:
        st = f.stat()
        digest.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def load_or_convert(cache_dir: str | os.PathLike, sources: Sequence[str | os.PathLike],
                    convert: Callable[[], Any], extra: dict | None = None) -> tuple[Any, bool]:
    """Returns (params, converted): restored from ``cache_dir`` when its key matches, else
    ``convert()`` is run and its result cached there."""
    cache_dir = Path(cache_dir).resolve()
    key = sources_key(sources, extra)
    meta_file = cache_dir / "fo_jax_cache.json"
    if meta_file.exists() and json.loads(meta_file.read_text()).get("key") == key:
        return ocp.StandardCheckpointer().restore(cache_dir / "params"), False
    params = convert()
    tmp = cache_dir.with_name(cache_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp / "params", jax.tree.map(jax.numpy.asarray, params))
    checkpointer.wait_until_finished()
    (tmp / "fo_jax_cache.json").write_text(json.dumps({"key": key, "sources": [str(s) for s in sources]}))
    shutil.rmtree(cache_dir, ignore_errors=True)
    os.replace(tmp, cache_dir)
    return params, True
