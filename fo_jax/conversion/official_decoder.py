"""Official Freeze-Omni speech decoder (``decoder/final.pt`` + ``decoder/model.json``) -> our params.

The official module (``LLM2TTSCodecAR``) holds transformers ``LlamaDecoderLayer`` stacks named
``layers_pre_nn.{i}``, ``layers.{i}``, ``layers_prefix.{i}``, plus ``embedding``, ``norm`` and
``out_fnn``; the per-layer table is the HF LLaMA/Qwen2 one of ``fo_jax.conversion.hf_qwen2``
(without biases). Layouts are reshapes only, so the mapping also runs under
``jax.eval_shape``. Errors name the file and the key in one line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np

from fo_jax.conversion.hf_qwen2 import LAYER_TABLE, SAME, Layout, set_path
from fo_jax.errors import ConfigError, LoadError
from fo_jax.models.configs import SpeechDecoderConfig, to_dtype
from fo_jax.models.speech_decoder import block_config

_HF_PREFIX, _OUR_PREFIX = "model.layers.{i}.", "layers_{i}/"
# (official stack name, our stack name, number of blocks)
_STACKS = (("layers_pre_nn", "layers_pre_nn", lambda c: c.num_layers // 2),
           ("layers", "layers", lambda c: c.num_layers),
           ("layers_prefix", "layers_prefix", lambda c: c.num_layers if c.use_prefix else 0))
_TOP_TABLE: list[tuple[str, str, Layout]] = [
    ("embedding.weight", "embedding/embedding", SAME),
    ("norm.weight", "norm/scale", SAME),
    ("out_fnn.weight", "out_fnn/kernel", SAME),
    ("out_fnn.bias", "out_fnn/bias", SAME),
]
# Non-persistent in the release's transformers, but older exports may carry them.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def mapping_table(cfg: SpeechDecoderConfig) -> list[tuple[str, str, Layout]]:
    """Every (official key, our param path, layout) of a decoder with this config."""
    table = list(_TOP_TABLE)
    for official, ours, count in _STACKS:
        for i in range(count(cfg)):
            for hf, path, layout in LAYER_TABLE:
                if hf.endswith(".bias"):
                    continue  # LLaMA blocks have no q/k/v biases
                table.append((hf.replace(_HF_PREFIX, f"{official}.{i}.").format(i=i),
                              path.replace(_OUR_PREFIX, f"{ours}_{i}/"), layout))
    return table


def expected_shapes(cfg: SpeechDecoderConfig) -> dict[str, tuple[int, ...]]:
    """Official tensor shapes of a decoder with this config."""
    d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    per_layer = {"self_attn.q_proj.weight": (q, d), "self_attn.k_proj.weight": (kv, d),
                 "self_attn.v_proj.weight": (kv, d), "self_attn.o_proj.weight": (d, q),
                 "mlp.gate_proj.weight": (f, d), "mlp.up_proj.weight": (f, d),
                 "mlp.down_proj.weight": (d, f), "input_layernorm.weight": (d,),
                 "post_attention_layernorm.weight": (d,)}
    top = {"embedding.weight": (v, d), "norm.weight": (d,), "out_fnn.weight": (v, d), "out_fnn.bias": (v,)}
    out = {}
    for key, _, _ in mapping_table(cfg):
        out[key] = top[key] if key in top else per_layer[key.split(".", 2)[2]]
    return out


def config_from_model_json(path: str | os.PathLike, **overrides: Any) -> SpeechDecoderConfig:
    """Parses the official ``decoder/model.json`` ([idim, odim, args]) into a SpeechDecoderConfig.

    ``llm_hidden_size`` (not in the file; 3584 for Qwen2-7B) and e.g. ``dtype`` come from overrides.
    """
    path = Path(path)
    try:
        idim, odim, args = json.loads(path.read_text())
    except FileNotFoundError:
        raise LoadError(f"{path}: not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoadError(f"{path}: not valid JSON ({e})") from None
    except (TypeError, ValueError):
        raise LoadError(f"{path}: expected a list [idim, odim, args]") from None
    if not isinstance(args, dict):
        raise LoadError(f"{path}: the third entry (args) is not an object")
    keys = ("transformer_attention_dim", "transformer_linear_units", "transformer_num_blocks",
            "transformer_attention_heads")
    missing = [k for k in keys if k not in args]
    if missing:
        raise LoadError(f"{path}: missing key(s) {missing}")
    hidden = args["transformer_attention_dim"]
    for name, value in (("idim", idim), ("encoder_output_dim", args.get("encoder_output_dim", hidden))):
        if value != hidden:
            raise LoadError(f"{path}: {name}={value} differs from transformer_attention_dim={hidden}")
    values = dict(hidden_size=hidden, num_layers=args["transformer_num_blocks"],
                  num_heads=args["transformer_attention_heads"],
                  num_kv_heads=args["transformer_attention_heads"],
                  intermediate_size=args["transformer_linear_units"], codec_vocab_size=odim,
                  attention_dropout=float(args.get("transformer_dropout_rate", 0.0)),
                  use_prefix=bool(args.get("kv_cache_prefix_finetune", 0)))
    values.update(overrides)
    try:
        return SpeechDecoderConfig(**values)
    except (ConfigError, TypeError) as e:
        raise LoadError(f"{path}: {e}") from None


def convert_state_dict(state_dict: Mapping[str, Any], cfg: SpeechDecoderConfig,
                       source: str = "state dict") -> dict:
    """Official state dict (name -> array with ``.shape``) -> our param tree (layouts applied, dtype kept).

    Raises:
      LoadError: ``source`` and the first missing / unexpected / wrong-shape key.
    """
    expected = expected_shapes(cfg)
    missing = [k for k in expected if k not in state_dict]
    if missing:
        raise LoadError(f"{source}: missing tensor {missing[0]!r}"
                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    unexpected = [k for k in state_dict if k not in expected and not k.endswith(_IGNORED_SUFFIXES)]
    if unexpected:
        raise LoadError(f"{source}: unexpected tensor {unexpected[0]!r}"
                        + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    params: dict = {}
    bcfg = block_config(cfg)
    for key, ours, (to_ours, _) in mapping_table(cfg):
        array = state_dict[key]
        if tuple(array.shape) != expected[key]:
            raise LoadError(f"{source}: tensor {key!r} has shape {tuple(array.shape)}, "
                            f"the config implies {expected[key]}")
        set_path(params, ours, to_ours(array, bcfg))
    return params


def read_pt(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Tensors of a ``.pt`` state dict (optionally under a ``'model'`` key) as float32/int numpy arrays."""
    try:
        import torch
    except ImportError:
        raise LoadError(f"{path}: reading .pt files needs torch (pip install 'fo_jax[torch]')") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise LoadError(f"{path}: not found") from None
    except Exception as e:  # corrupt file or pickled objects beyond tensors
        raise LoadError(f"{path}: cannot load as a weights-only state dict ({type(e).__name__})") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict):
        raise LoadError(f"{path}: expected a state dict, got {type(obj).__name__}")
    out = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise LoadError(f"{path}: entry {key!r} is not a tensor")
        value = value.detach()
        out[key] = (value.float() if value.is_floating_point() else value).numpy()
    return out


def load_official_decoder(directory: str | os.PathLike, *, llm_hidden_size: int = 3584,
                          dtype: str = "float32", param_dtype: str | None = None
                          ) -> tuple[SpeechDecoderConfig, dict]:
    """Loads ``directory/model.json`` + ``directory/final.pt`` (the release's ``checkpoints/decoder``).

    Returns (config, numpy param tree in ``param_dtype``, default ``dtype``).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise LoadError(f"{directory}: not a directory")
    cfg = config_from_model_json(directory / "model.json", llm_hidden_size=llm_hidden_size, dtype=dtype,
                                 param_dtype=param_dtype or dtype)
    pt = directory / "final.pt"
    params = convert_state_dict(read_pt(pt), cfg, source=str(pt))
    out_dtype = np.dtype(to_dtype(cfg.param_dtype))
    return cfg, jax.tree.map(lambda a: np.asarray(a).astype(out_dtype), params)
