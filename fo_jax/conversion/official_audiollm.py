"""Official Freeze-Omni ``audiollm`` checkpoint (``final.pt`` + ``train.yaml``) -> our encoder,
adapter, CTC and Qwen2 trees.

``final.pt`` is the state dict of the official ``AudioLLM``: ``encoder.*`` (speech encoder, with
the ``global_cmvn`` buffers when trained with CMVN), ``adpter.*`` (sic), ``prompt_embeddings``,
``task_embeddings``, ``predictor_head``, possibly ``llm_decoder.*`` (the frozen Qwen2) and ``ctc.*``.
This module maps the encoder, adapter, CTC and LLM parts with one table per part
(official name, our path, layout) and hands back every other key for the audio-LLM mapping.
Our encoder / adapter / CTC weights keep the PyTorch layout, so their layouts are identities except
``linear_pos`` (out, in) -> (heads, head_dim, in), a reshape; the LLM goes through ``hf_qwen2``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from fo_jax.conversion import hf_qwen2
from fo_jax.errors import ConfigError, LoadError
from fo_jax.models.configs import AdapterConfig, EncoderConfig, LLMConfig, to_dtype

_Layout = Callable[[np.ndarray, EncoderConfig], np.ndarray]
_SAME: _Layout = lambda w, c: w  # noqa: E731
_POS: _Layout = lambda w, c: w.reshape(c.num_heads, c.hidden_size // c.num_heads, c.hidden_size)  # noqa: E731

ENCODER_PREFIX, ADAPTER_PREFIX, CTC_PREFIX, LLM_PREFIX = "encoder.", "adpter.", "ctc.", "llm_decoder."
CMVN_KEYS = ("encoder.global_cmvn.mean", "encoder.global_cmvn.istd")

# (official name with {i} for the block, our param path, layout); names after "encoder."
_ENC_TOP = [
    ("enc.0.core.conv.0.weight", "subsampling/conv_0/kernel", _SAME),
    ("enc.0.core.conv.0.bias", "subsampling/conv_0/bias", _SAME),
    ("enc.0.core.conv.2.weight", "subsampling/conv_1/kernel", _SAME),
    ("enc.0.core.conv.2.bias", "subsampling/conv_1/bias", _SAME),
    ("enc.0.core.out.0.weight", "subsampling/out/kernel", _SAME),
    ("enc.0.core.out.0.bias", "subsampling/out/bias", _SAME),
    ("enc.1.embed.0.weight", "embed_linear/kernel", _SAME),
    ("enc.1.embed.0.bias", "embed_linear/bias", _SAME),
    ("enc.1.embed.1.weight", "embed_norm/scale", _SAME),
    ("enc.1.embed.1.bias", "embed_norm/bias", _SAME),
    ("enc.1.after_norm.weight", "after_norm/scale", _SAME),
    ("enc.1.after_norm.bias", "after_norm/bias", _SAME),
]
_ENC_BLOCK = [(f"enc.1.encoders.{{i}}.self_attn.{n}.{w}", f"encoders_{{i}}/self_attn/{n}/{o}", f)
              for n in ("linear_q", "linear_k", "linear_v", "linear_out")
              for w, o, f in (("weight", "kernel", _SAME), ("bias", "bias", _SAME))]
_ENC_BLOCK += [
    ("enc.1.encoders.{i}.self_attn.linear_pos.weight", "encoders_{i}/self_attn/linear_pos/kernel", _POS),
    ("enc.1.encoders.{i}.self_attn.pos_bias_u", "encoders_{i}/self_attn/pos_bias_u", _SAME),
    ("enc.1.encoders.{i}.self_attn.pos_bias_v", "encoders_{i}/self_attn/pos_bias_v", _SAME),
    ("enc.1.encoders.{i}.feed_forward.w_1.weight", "encoders_{i}/feed_forward/w_1/kernel", _SAME),
    ("enc.1.encoders.{i}.feed_forward.w_1.bias", "encoders_{i}/feed_forward/w_1/bias", _SAME),
    ("enc.1.encoders.{i}.feed_forward.w_2.weight", "encoders_{i}/feed_forward/w_2/kernel", _SAME),
    ("enc.1.encoders.{i}.feed_forward.w_2.bias", "encoders_{i}/feed_forward/w_2/bias", _SAME),
    ("enc.1.encoders.{i}.norm1.weight", "encoders_{i}/norm1/scale", _SAME),
    ("enc.1.encoders.{i}.norm1.bias", "encoders_{i}/norm1/bias", _SAME),
    ("enc.1.encoders.{i}.norm2.weight", "encoders_{i}/norm2/scale", _SAME),
    ("enc.1.encoders.{i}.norm2.bias", "encoders_{i}/norm2/bias", _SAME),
]


def encoder_table(cfg: EncoderConfig) -> list[tuple[str, str, _Layout]]:
    """Every (official name, our path, layout) of the encoder (without the optional CMVN buffers)."""
    table = [(ENCODER_PREFIX + h, o, f) for h, o, f in _ENC_TOP]
    for i in range(cfg.num_layers):
        table += [(ENCODER_PREFIX + h.format(i=i), o.format(i=i), f) for h, o, f in _ENC_BLOCK]
    return table


def encoder_shapes(cfg: EncoderConfig) -> dict[str, tuple[int, ...]]:
    """Official tensor shapes of the encoder (torch layout)."""
    d, h, f, k = cfg.hidden_size, cfg.num_heads, cfg.ffn_size, cfg.hidden_size // cfg.num_heads
    freq = ((cfg.input_dim - 1) // 2 - 1) // 2
    top = {"enc.0.core.conv.0.weight": (d, 1, 3, 3), "enc.0.core.conv.0.bias": (d,),
           "enc.0.core.conv.2.weight": (d, d, 3, 3), "enc.0.core.conv.2.bias": (d,),
           "enc.0.core.out.0.weight": (d, d * freq), "enc.0.core.out.0.bias": (d,),
           "enc.1.embed.0.weight": (d, d), "enc.1.embed.0.bias": (d,), "enc.1.embed.1.weight": (d,),
           "enc.1.embed.1.bias": (d,), "enc.1.after_norm.weight": (d,), "enc.1.after_norm.bias": (d,)}
    block = {f"self_attn.{n}.weight": (d, d) for n in ("linear_q", "linear_k", "linear_v", "linear_out",
                                                        "linear_pos")}
    block.update({f"self_attn.{n}.bias": (d,) for n in ("linear_q", "linear_k", "linear_v", "linear_out")})
    block.update({"self_attn.pos_bias_u": (h, k), "self_attn.pos_bias_v": (h, k),
                  "feed_forward.w_1.weight": (f, d), "feed_forward.w_1.bias": (f,),
                  "feed_forward.w_2.weight": (d, f), "feed_forward.w_2.bias": (d,),
                  "norm1.weight": (d,), "norm1.bias": (d,), "norm2.weight": (d,), "norm2.bias": (d,)})
    shapes = {ENCODER_PREFIX + n: s for n, s in top.items()}
    for i in range(cfg.num_layers):
        shapes.update({f"{ENCODER_PREFIX}enc.1.encoders.{i}.{n}": s for n, s in block.items()})
    return shapes


def _adapter_layout(cfg: AdapterConfig) -> list[tuple[str, int, int, int]]:
    """(module name, kind: 0 conv / 1 layer norm / 2 batch norm / 3 linear, in, out) of each part."""
    d, e = cfg.input_dim, cfg.output_dim
    if cfg.kind == "linear":
        return [("adpter", 3, d, e)]
    if cfg.kind == "cnn" or 4 * d < e:
        return [("conv1d1", 0, d, 2 * d), ("bn1", 2, 2 * d, 2 * d), ("conv1d2", 0, 2 * d, 4 * d),
                ("bn2", 2, 4 * d, 4 * d), ("project", 3, 4 * d, e)]
    return [("conv1d2", 0, d, 2 * d), ("bn2", 1 if cfg.norm == "layer" else 2, 2 * d, 2 * d),
            ("project", 3, 2 * d, e)]


def adapter_table(cfg: AdapterConfig) -> list[tuple[str, str, tuple[int, ...]]]:
    """Every (official name, our variables path, official shape) of the adapter (same layout).

    Paths start with the Flax collection (``params/`` or ``batch_stats/``). BatchNorm's
    ``num_batches_tracked`` has no counterpart and is dropped.
    """
    table = []
    for name, kind, cin, cout in _adapter_layout(cfg):
        p = ADAPTER_PREFIX + name
        if kind == 0:
            table += [(f"{p}.weight", f"params/{name}/kernel", (cout, cin, cfg.kernel_size)),
                      (f"{p}.bias", f"params/{name}/bias", (cout,))]
        elif kind == 3:
            table += [(f"{p}.weight", f"params/{name}/kernel", (cout, cin)),
                      (f"{p}.bias", f"params/{name}/bias", (cout,))]
        else:
            table += [(f"{p}.weight", f"params/{name}/scale", (cout,)),
                      (f"{p}.bias", f"params/{name}/bias", (cout,))]
            if kind == 2:
                table += [(f"{p}.running_mean", f"batch_stats/{name}/mean", (cout,)),
                          (f"{p}.running_var", f"batch_stats/{name}/var", (cout,))]
    return table


def _set(tree: dict, path: str, value: Any) -> None:
    *parents, leaf = path.split("/")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def _take(state: dict, name: str, shape: tuple[int, ...], source: str) -> np.ndarray:
    if name not in state:
        raise LoadError(f"{source}: missing tensor {name!r}")
    array = state.pop(name)
    if tuple(array.shape) != tuple(shape):
        raise LoadError(f"{source}: tensor {name!r} has shape {tuple(array.shape)}, the config implies "
                        f"{tuple(shape)}")
    return array


def _check_unexpected(state: Mapping[str, Any], prefix: str, source: str, ignore: tuple[str, ...] = ()) -> None:
    extra = sorted(k for k in state if k.startswith(prefix) and not any(k.endswith(i) for i in ignore))
    if extra:
        raise LoadError(f"{source}: unexpected tensor {extra[0]!r}"
                        + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))


def convert_encoder_adapter(state_dict: Mapping[str, Any], encoder_config: EncoderConfig,
                            adapter_config: AdapterConfig, source: str = "final.pt",
                            cmvn: tuple[np.ndarray, np.ndarray] | None = None
                            ) -> tuple[dict, dict, dict]:
    """Maps the ``encoder.*`` and ``adpter.*`` tensors of an official state dict.

    Args:
      state_dict: {official name: array} (numpy or anything ``np.asarray`` takes); not modified.
      source: file name used in error messages.
      cmvn: (mean, istd) from the ``global_cmvn`` file; the checkpoint's ``encoder.global_cmvn``
        buffers win when present, as with the official ``load_state_dict``.
    Returns:
      (encoder params, adapter variables ``{"params", ["batch_stats"]}``, remaining state dict with
      every other key, e.g. ``prompt_embeddings.weight``, ``predictor_head.*``, ``llm_decoder.*``).
    Raises:
      LoadError naming the key: missing, wrong shape, or an ``encoder.`` / ``adpter.`` key the
      config does not have.
    """
    state = dict(state_dict)
    enc_dtype = np.dtype(to_dtype(encoder_config.param_dtype))
    enc: dict = {}
    shapes = encoder_shapes(encoder_config)
    for name, path, layout in encoder_table(encoder_config):
        value = layout(np.asarray(_take(state, name, shapes[name], source)), encoder_config)
        _set(enc, path, value.astype(enc_dtype, copy=False))
    if encoder_config.use_cmvn:
        if all(k in state for k in CMVN_KEYS):
            cmvn = tuple(_take(state, k, (encoder_config.input_dim,), source) for k in CMVN_KEYS)
        if cmvn is None:
            raise LoadError(f"{source}: no {CMVN_KEYS[0]!r} / {CMVN_KEYS[1]!r}; pass the global_cmvn statistics")
        for path, value in zip(("cmvn_mean", "cmvn_istd"), cmvn):
            value = np.asarray(value, np.float32)
            if value.shape != (encoder_config.input_dim,):
                raise LoadError(f"{source}: CMVN {path} has shape {value.shape}, expected ({encoder_config.input_dim},)")
            enc[path] = value
    _check_unexpected(state, ENCODER_PREFIX, source)

    ad_dtype = np.dtype(to_dtype(adapter_config.param_dtype))
    adapter: dict = {}
    for name, path, shape in adapter_table(adapter_config):
        value = np.asarray(_take(state, name, shape, source))
        _set(adapter, path, value.astype(np.float32 if path.startswith("batch_stats") else ad_dtype, copy=False))
    for key in [k for k in state if k.startswith(ADAPTER_PREFIX) and k.endswith(".num_batches_tracked")]:
        del state[key]
    _check_unexpected(state, ADAPTER_PREFIX, source)
    return enc, adapter, state


def convert_ctc(state_dict: Mapping[str, Any], encoder_config: EncoderConfig, source: str = "final.pt"
                ) -> tuple[dict | None, dict]:
    """``ctc.ctc_lo.{weight,bias}`` (WeNet naming) -> CTC-head params, or None when absent."""
    state = dict(state_dict)
    if not any(k.startswith(CTC_PREFIX) for k in state):
        return None, state
    v, d = encoder_config.ctc_vocab_size, encoder_config.hidden_size
    dtype = np.dtype(to_dtype(encoder_config.param_dtype))
    params = {"ctc_lo": {"kernel": np.asarray(_take(state, "ctc.ctc_lo.weight", (v, d), source)).astype(dtype, copy=False),
                         "bias": np.asarray(_take(state, "ctc.ctc_lo.bias", (v,), source)).astype(dtype, copy=False)}}
    _check_unexpected(state, CTC_PREFIX, source)
    return params, state


def convert_llm(state_dict: Mapping[str, Any], llm_config: LLMConfig, source: str = "final.pt"
                ) -> tuple[dict | None, dict]:
    """``llm_decoder.<HF Qwen2 name>`` tensors -> our Qwen2 params (``hf_qwen2``'s table), or None
    when the checkpoint holds no LLM weights (the released one is expected to load the LLM from
    its own HF directory)."""
    state = dict(state_dict)
    if not any(k.startswith(LLM_PREFIX) for k in state):
        return None, state
    dtype = np.dtype(to_dtype(llm_config.param_dtype))
    expected = hf_qwen2.expected_shapes(llm_config)
    if llm_config.tie_word_embeddings:
        state.pop(LLM_PREFIX + "lm_head.weight", None)
    params: dict = {}
    for hf_name, ours, (to_ours, _) in hf_qwen2.mapping_table(llm_config):
        array = np.asarray(_take(state, LLM_PREFIX + hf_name, expected[hf_name], source))
        _set(params, ours, np.asarray(to_ours(array, llm_config)).astype(dtype, copy=False))
    _check_unexpected(state, LLM_PREFIX, source, ignore=("rotary_emb.inv_freq",))
    return params, state


def _to_numpy(t: Any) -> np.ndarray:
    import torch  # optional dependency: only for reading .pt files

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def load_official_pt(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """An official ``.pt`` state dict -> {name: numpy array} (``torch.load(weights_only=True)``,
    memory-mapped when the file format allows)."""
    path = Path(path)
    if not path.is_file():
        raise LoadError(f"{path}: not found")
    try:
        import torch
    except ImportError:
        raise LoadError(f"{path}: reading .pt checkpoints needs PyTorch (the 'torch' extra)") from None
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, pickle with non-tensor objects, ...
        raise LoadError(f"{path}: not a readable weights-only PyTorch checkpoint ({type(e).__name__})") from None
    if isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        obj = obj.get("model", obj.get("state_dict", obj))
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise LoadError(f"{path}: expected a state dict of tensors")
    return {k: _to_numpy(v) for k, v in obj.items()}


# ----------------------------------------------------------------------------------- train.yaml

def read_train_yaml(path: str | os.PathLike) -> dict:
    """The official ``audiollm/train.yaml`` as a dict (LoadError when missing or not YAML)."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise LoadError(f"{path}: not found") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise LoadError(f"{path}: not valid YAML ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise LoadError(f"{path}: expected a mapping at the top level")
    return data


def _flat(section: Mapping[str, Any] | None) -> dict:
    """Official argparse spelling: '-' and '_' are the same in option names."""
    return {str(k).replace("-", "_"): v for k, v in (section or {}).items()}


def configs_from_train_yaml(train: Mapping[str, Any] | str | os.PathLike, **encoder_overrides: Any
                            ) -> tuple[EncoderConfig, AdapterConfig]:
    """``train.yaml`` (dict or path) -> (EncoderConfig, AdapterConfig).

    Absent options take the official argparse / ``AudioLLM`` defaults. CMVN is always on (the
    official pipeline always loads ``audiollm/global_cmvn``). Options the official code
    offers but the release does not use (abs-enc, post-LN, concat-after, conv FFNs, other layer
    stacks) raise ConfigError naming the option.
    """
    source = str(train) if not isinstance(train, Mapping) else "train.yaml"
    data = read_train_yaml(train) if not isinstance(train, Mapping) else train
    try:
        enc_conf = data["encoder_conf"]
        overview, para = _flat(enc_conf.get("overview_conf")), enc_conf.get("para_conf") or {}
    except (KeyError, AttributeError):
        raise ConfigError(f"{source}: no encoder_conf.overview_conf / para_conf") from None
    sub, tr = _flat(para.get("subsampling")), _flat(para.get("transformer"))

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise ConfigError(f"{source}: unsupported encoder option {what}")

    layers = overview.get("encoder_layer_config", "tdnn-dtc")
    need(layers == "subsampling-transformer", f"encoder-layer-config={layers!r}")
    need(sub.get("subsampling_rate", 4) == 4, f"subsampling-rate={sub.get('subsampling_rate')}")
    need(tr.get("transformer_pos_enc_class", "abs-enc") == "rel-enc",
         f"transformer-pos-enc-class={tr.get('transformer_pos_enc_class', 'abs-enc')!r}")
    need(tr.get("transformer_input_layer", "linear") == "linear", "transformer-input-layer")
    need(bool(tr.get("transformer_normalize_before", True)), "transformer-normalize-before=false")
    need(not tr.get("transformer_concat_after", False), "transformer-concat-after=true")
    need(tr.get("transformer_positionwise_layer_type", "linear") == "linear",
         "transformer-positionwise-layer-type")
    width = tr.get("transformer_attention_dim", 256)
    dims = {"encoder-output-dim": overview.get("encoder_output_dim", 256),
            "subsampling-output-dim": sub.get("subsampling_output_dim", 256),
            "transformer-input-dim": tr.get("transformer_input_dim", 256),
            "transformer-output-dim": tr.get("transformer_output_dim", 4)}
    for name, value in dims.items():
        need(value == width, f"{name}={value} != transformer-attention-dim={width}")
    input_dim = overview.get("encoder_input_dim", 256)
    need(sub.get("subsampling_input_dim", 256) == input_dim, "subsampling-input-dim != encoder-input-dim")
    encoder = EncoderConfig(
        input_dim=input_dim, hidden_size=width,
        num_layers=tr.get("transformer_num_blocks", 6), num_heads=tr.get("transformer_attention_heads", 4),
        ffn_size=tr.get("transformer_linear_units", 1024), chunk_size=tr.get("transformer_chunk_size", -1),
        left_chunks=tr.get("transformer_left_chunks", -1),
        dynamic_chunks=bool(tr.get("transformer_dynamic_chunks", True)),
        dropout=float(tr.get("transformer_dropout_rate", 0.1)),
        positional_dropout=float(tr.get("transformer_positional_dropout_rate", 0.1)),
        attention_dropout=float(tr.get("transformer_attention_dropout_rate", 0.0)),
        ctc_vocab_size=int(data.get("output_dim", EncoderConfig.ctc_vocab_size)), **encoder_overrides)
    model = data.get("model_conf") or {}
    adapter = AdapterConfig(
        kind=model.get("adpter_type", "cnn"), input_dim=model.get("enc_out_dim", 512),
        output_dim=model.get("llm_embed_dim", 4096), kernel_size=model.get("kernel_size", 3),
        activation=model.get("activation_func", "relu"), norm=model.get("norm", "batch"),
        prompt_num=model.get("prompt_num", 5), num_states=model.get("predict_usr_state", 0),
        task_num=model.get("task_num", 10))
    if adapter.input_dim != encoder.hidden_size:
        raise ConfigError(f"{source}: model_conf.enc_out_dim={adapter.input_dim} != encoder width {encoder.hidden_size}")
    return encoder, adapter
