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


class CompileCounter:
    """Counts XLA compilations in this process (every ``jax.jit`` program, eager ops included).

    A program counts once per (function, shapes, static args): the first call compiles it (or loads
    it from the persistent cache, which still counts: it is a new program for this process).
    ``count`` is the total so far; take differences around a region, ``names_since`` says which.
    """

    _names: list[str] = []
    _installed = False

    def __init__(self):
        if not CompileCounter._installed:
            from jax import monitoring
            from jax._src import dispatch

            event = dispatch.BACKEND_COMPILE_EVENT

            def listen(name: str, _secs: float, **kwargs) -> None:
                if name == event:
                    CompileCounter._names.append(str(kwargs.get("fun_name", "?")))

            monitoring.register_event_duration_secs_listener(listen)
            CompileCounter._installed = True

    @property
    def count(self) -> int:
        return len(CompileCounter._names)

    def names_since(self, count: int) -> list[str]:
        """Names of the programs compiled after the counter read ``count``."""
        return list(CompileCounter._names[count:])
