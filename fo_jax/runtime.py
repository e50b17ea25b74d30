"""Process-level JAX setup shared by the CLI, tests and notebooks."""

from __future__ import annotations

import os
from pathlib import Path

import jax

DEFAULT_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fo_jax" / "jax"


def enable_compilation_cache(path: str | os.PathLike | None = None) -> Path:
    """Turns on JAX's persistent compilation cache (``$FO_JAX_CACHE_DIR`` or ~/.cache/fo_jax/jax).

    Every compiled program is cached (no minimum compile time), so a second process skips XLA
    compilation of the same steps.
    """
    path = Path(path or os.environ.get("FO_JAX_CACHE_DIR") or DEFAULT_CACHE_DIR)
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return path
