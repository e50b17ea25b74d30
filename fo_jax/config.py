"""Run configs: Python files with ``get_config(variant) -> ConfigDict``, named ``file.py:variant``.

``load_config`` imports the file, calls ``get_config`` and applies ``key=value`` overrides;
``model_config`` resolves the ``model`` section into the frozen dataclasses modules take.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path
from typing import Sequence

import ml_collections

from fo_jax.errors import ConfigError
from fo_jax.models.configs import (AdapterConfig, CodecConfig, EncoderConfig, LLMConfig, ModelConfig,
                                   SpeechDecoderConfig)

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def _resolve_path(path: str) -> Path:
    p = Path(path)
    if not p.exists() and not p.is_absolute() and (CONFIG_DIR / p.name).exists():
        p = CONFIG_DIR / p.name  # "configs/x.py" works from any working directory of a source checkout
    if not p.exists():
        raise ConfigError(f"{path}: config file not found")
    return p


# Checkpoint interval of the toy world's stages. An orbax save costs ~1.7 s of a 2-core machine
# (5 s for 3 saves in a 400-step speech-in 1 run); every 100 steps that was ~65 saves, ~2 minutes
# of a full run. A run killed between saves redoes at most ~1 minute of training.
TOY_SAVE_EVERY = 500


def stage_variant(variant: str, variants: Sequence[str], toy_steps: dict[str, int]) -> tuple[str, int | None]:
    """A stage config's variant -> (model variant, step-count override or None).

    The toy world's variants (the keys of ``toy_steps``: ``toy``, ``toy_quick``) map to ``tiny``
    with their own number of steps; a stage that gives the full ``toy`` run more (the speech-in
    stages' larger encoder, speech-out 2's batch) checks ``variant == "toy"`` before calling. An
    unknown name is a one-line error.
    """
    if variant not in (*variants, *toy_steps):
        raise ValueError(f"unknown variant {variant!r}; expected one of {', '.join((*variants, *toy_steps))}")
    steps = toy_steps.get(variant)
    return ("tiny" if steps else variant), steps


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Loads ``path/to/file.py[:variant]`` and applies overrides like ``model.llm.num_layers=2``."""
    path, _, variant = spec.partition(":")
    file = _resolve_path(path)
    module_spec = importlib.util.spec_from_file_location(f"fo_jax_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # a broken config file is user input
        raise ConfigError(f"{file}: cannot import ({type(e).__name__}: {e})") from None
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{file}: defines no get_config(variant)")
    try:
        cfg = module.get_config(variant) if variant else module.get_config()
    except (KeyError, ValueError) as e:
        raise ConfigError(f"{file}: variant {variant!r}: {e}") from None
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not key=value")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw  # bare strings
        parent = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            if p not in parent:
                raise ConfigError(f"{file}: override {key!r}: no field {p!r}")
            parent = parent[p]
        if leaf not in parent:
            raise ConfigError(f"{file}: override {key!r}: no field {leaf!r}")
        parent[leaf] = value
    cfg.lock()
    return cfg


def model_config(cfg: ml_collections.ConfigDict) -> ModelConfig:
    """The ``model`` section of a run config as a ModelConfig (missing sections take defaults)."""
    model = cfg.get("model", cfg)
    parts = {"llm": LLMConfig, "encoder": EncoderConfig, "adapter": AdapterConfig,
             "decoder": SpeechDecoderConfig, "codec": CodecConfig}
    kw = {}
    for name, cls in parts.items():
        if name in model:
            kw[name] = cls.from_dict(model[name].to_dict())
    return ModelConfig(**kw)
