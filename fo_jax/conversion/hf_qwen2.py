"""HF Qwen2 directory (config.json + safetensors) <-> our ``Qwen2`` param tree.

The mapping is one table of (HF name, our path, layout); layouts are reshapes only.
Errors name the file and the key in one line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from fo_jax.conversion.safetensors_io import read_checkpoint_dir, write_checkpoint_dir
from fo_jax.errors import ConfigError, LoadError
from fo_jax.models.configs import LLMConfig, to_dtype

# Layouts: HF torch Linear weights are (out, in) and so are ours (``fo_jax.layers.linear``), with
# the attention's head axes split out of the flat dimension.
Layout = tuple[Callable[[np.ndarray, LLMConfig], np.ndarray], Callable[[np.ndarray, LLMConfig], np.ndarray]]


def _heads(n: Callable[[LLMConfig], int]) -> Layout:
    """q/k/v kernel: HF (N*H, D) <-> ours (N, H, D)."""
    return (lambda w, c: w.reshape(n(c), c.head_dim, c.hidden_size),
            lambda w, c: w.reshape(-1, c.hidden_size))


def _head_bias(n: Callable[[LLMConfig], int]) -> Layout:
    return (lambda w, c: w.reshape(n(c), c.head_dim), lambda w, c: w.reshape(-1))


SAME: Layout = (lambda w, c: w, lambda w, c: w)
_O: Layout = (lambda w, c: w.reshape(c.hidden_size, c.num_heads, c.head_dim),
               lambda w, c: w.reshape(c.hidden_size, -1))
_Q, _KV = (lambda c: c.num_heads), (lambda c: c.num_kv_heads)

# (HF name with {i} for the layer, our param path, layout)
LAYER_TABLE: list[tuple[str, str, Layout]] = [
    ("model.layers.{i}.self_attn.q_proj.weight", "layers_{i}/self_attn/q_proj/kernel", _heads(_Q)),
    ("model.layers.{i}.self_attn.q_proj.bias", "layers_{i}/self_attn/q_proj/bias", _head_bias(_Q)),
    ("model.layers.{i}.self_attn.k_proj.weight", "layers_{i}/self_attn/k_proj/kernel", _heads(_KV)),
    ("model.layers.{i}.self_attn.k_proj.bias", "layers_{i}/self_attn/k_proj/bias", _head_bias(_KV)),
    ("model.layers.{i}.self_attn.v_proj.weight", "layers_{i}/self_attn/v_proj/kernel", _heads(_KV)),
    ("model.layers.{i}.self_attn.v_proj.bias", "layers_{i}/self_attn/v_proj/bias", _head_bias(_KV)),
    ("model.layers.{i}.self_attn.o_proj.weight", "layers_{i}/self_attn/o_proj/kernel", _O),
    ("model.layers.{i}.mlp.gate_proj.weight", "layers_{i}/mlp/gate_proj/kernel", SAME),
    ("model.layers.{i}.mlp.up_proj.weight", "layers_{i}/mlp/up_proj/kernel", SAME),
    ("model.layers.{i}.mlp.down_proj.weight", "layers_{i}/mlp/down_proj/kernel", SAME),
    ("model.layers.{i}.input_layernorm.weight", "layers_{i}/input_layernorm/scale", SAME),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers_{i}/post_attention_layernorm/scale", SAME),
]
_TOP_TABLE: list[tuple[str, str, Layout]] = [
    ("model.embed_tokens.weight", "embed_tokens/embedding", SAME),
    ("model.norm.weight", "norm/scale", SAME),
]
_HEAD = ("lm_head.weight", "lm_head/kernel", SAME)


def mapping_table(cfg: LLMConfig) -> list[tuple[str, str, Layout]]:
    """Every (HF name, our path, layout) of a model with this config."""
    table = list(_TOP_TABLE)
    for i in range(cfg.num_layers):
        table += [(h.format(i=i), o.format(i=i), f) for h, o, f in LAYER_TABLE
                  if cfg.qkv_bias or not h.endswith(".bias")]
    if not cfg.tie_word_embeddings:
        table.append(_HEAD)
    return table


def expected_shapes(cfg: LLMConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor shapes of a model with this config."""
    d, h, f, v = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size, cfg.vocab_size
    q, kv = cfg.num_heads * h, cfg.num_kv_heads * h
    per_layer = {"self_attn.q_proj.weight": (q, d), "self_attn.q_proj.bias": (q,),
                 "self_attn.k_proj.weight": (kv, d), "self_attn.k_proj.bias": (kv,),
                 "self_attn.v_proj.weight": (kv, d), "self_attn.v_proj.bias": (kv,),
                 "self_attn.o_proj.weight": (d, q), "mlp.gate_proj.weight": (f, d),
                 "mlp.up_proj.weight": (f, d), "mlp.down_proj.weight": (d, f),
                 "input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,)}
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,), "lm_head.weight": (v, d)}
    for i in range(cfg.num_layers):
        shapes.update({f"model.layers.{i}.{k}": s for k, s in per_layer.items()})
    return {name: shapes[name] for name, _, _ in mapping_table(cfg)}


def set_path(tree: dict, path: str, value: Any) -> None:
    *parents, leaf = path.split("/")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def _get(tree: dict, path: str) -> Any:
    for p in path.split("/"):
        tree = tree[p]
    return tree


def load_hf_config(path: str | os.PathLike, **overrides: Any) -> LLMConfig:
    """``config.json`` of a HF Qwen2 directory -> LLMConfig (overrides e.g. dtype='bfloat16')."""
    file = Path(path) / "config.json"
    if not Path(path).is_dir():
        raise LoadError(f"{path}: not a directory")
    try:
        hf = json.loads(file.read_text())
    except FileNotFoundError:
        raise LoadError(f"{file}: not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoadError(f"{file}: not valid JSON ({e.msg if hasattr(e, 'msg') else e})") from None
    try:
        return LLMConfig.from_hf(hf, **overrides)
    except ConfigError as e:
        raise LoadError(f"{file}: {e}") from None


def _load_config(path: str | os.PathLike, dtype: str | None, param_dtype: str | None) -> LLMConfig:
    overrides = {"param_dtype": param_dtype or dtype or "float32"}
    if dtype:
        overrides["dtype"] = dtype
    return load_hf_config(path, **overrides)


def load_hf_embedding(path: str | os.PathLike, *, dtype: str | None = None) -> tuple[LLMConfig, np.ndarray]:
    """(config, (vocab, hidden) input-embedding table) of a HF Qwen2 directory, reading only that
    tensor (speech-out stage 2 needs the frozen table, not the 7B model). Dtypes as ``load_hf_qwen2``."""
    cfg = _load_config(path, dtype, None)
    name, _, (to_ours, _) = _TOP_TABLE[0]  # the embedding table
    tensors = read_checkpoint_dir(path)
    if name not in tensors:
        raise LoadError(f"{Path(path)}: missing tensor {name!r}")
    array, file = tensors[name]
    if tuple(array.shape) != expected_shapes(cfg)[name]:
        raise LoadError(f"{file}: tensor {name!r} has shape {tuple(array.shape)}, "
                        f"config.json implies {expected_shapes(cfg)[name]}")
    return cfg, np.asarray(to_ours(array, cfg)).astype(np.dtype(to_dtype(cfg.param_dtype)))


def load_hf_qwen2(path: str | os.PathLike, *, dtype: str | None = None,
                  param_dtype: str | None = None) -> tuple[LLMConfig, dict]:
    """Loads a HF Qwen2 directory (single or sharded safetensors) into (config, numpy param tree).

    Args:
      path: directory with ``config.json`` and ``model.safetensors`` or a sharded index.
      dtype: compute dtype of the returned config (default float32).
      param_dtype: dtype of the returned params (default: the config's dtype).
    Raises:
      LoadError: one line naming the file and the key (missing, unexpected, wrong shape).
    """
    cfg = _load_config(path, dtype, param_dtype)
    tensors = read_checkpoint_dir(path)
    expected = expected_shapes(cfg)
    if cfg.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)  # some exporters write the tied copy too
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise LoadError(f"{Path(path)}: missing tensor {missing[0]!r}"
                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    unexpected = sorted(k for k in tensors if k not in expected and not k.endswith("rotary_emb.inv_freq"))
    if unexpected:
        raise LoadError(f"{tensors[unexpected[0]][1]}: unexpected tensor {unexpected[0]!r}"
                        + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    out_dtype = np.dtype(to_dtype(cfg.param_dtype))
    params: dict = {}
    for hf_name, ours, (to_ours, _) in mapping_table(cfg):
        array, file = tensors[hf_name]
        if tuple(array.shape) != expected[hf_name]:
            raise LoadError(f"{file}: tensor {hf_name!r} has shape {tuple(array.shape)}, "
                            f"config.json implies {expected[hf_name]}")
        set_path(params, ours, np.asarray(to_ours(array, cfg)).astype(out_dtype))
    return cfg, params


def save_hf_qwen2(path: str | os.PathLike, cfg: LLMConfig, params: dict,
                  max_shard_bytes: int = 4 << 30) -> None:
    """Writes our params as a HF Qwen2 directory that ``transformers`` and ``load_hf_qwen2`` read."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for hf_name, ours, (_, to_hf) in mapping_table(cfg):
        tensors[hf_name] = np.ascontiguousarray(to_hf(np.asarray(_get(params, ours)), cfg))
    write_checkpoint_dir(path, tensors, max_shard_bytes)
    (path / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2))
