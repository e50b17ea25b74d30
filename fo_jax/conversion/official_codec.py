"""Official TiCodec checkpoint (``codec/final.pt`` + ``codec/model.json``) -> our ``Codec`` variables.

``final.pt`` is a dict of three torch state dicts, ``generator``, ``encoder`` and ``quantizer``
(63.4 M float32 values). The mapping is one table of (official key, our collection/path, layout);
layouts are transposes only (torch NCW kernels -> our (K, Cin, Cout), see ``fo_jax.models.codec``).
Weight-norm pairs (``weight_g``, ``weight_v``) convert as they are and are folded into plain kernels
at load unless ``fold=False`` (training). Errors name the file and the key in one line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from fo_jax.errors import ConfigError, LoadError
from fo_jax.models.codec import fold_weight_norm
from fo_jax.models.configs import CodecConfig

Layout = Callable[[np.ndarray], np.ndarray]
_SAME: Layout = lambda w: w
_CONV: Layout = lambda w: w.transpose(2, 1, 0)  # Conv1d (O, I, K) and its g (O, 1, 1) -> (K, I, O) / (1, 1, O)
_CONVT: Layout = lambda w: w.transpose(2, 0, 1)  # ConvTranspose1d (I, O, K), g (I, 1, 1) -> (K, I, O) / (1, I, 1)
_LINEAR: Layout = lambda w: w.T

# Keys the official modules define but never use in their forward (Encoder.linear), and counters.
IGNORED_SUFFIXES = ("num_batches_tracked",)
IGNORED_KEYS = ("encoder.linear.0.weight", "encoder.linear.0.bias")
# model.json keys that only concern training jobs / data loading.
_TRAINING_KEYS = ("num_gpus", "batch_size", "learning_rate", "adam_b1", "adam_b2", "lr_decay", "seed",
                  "num_workers", "num_freq", "dist_config")
SECTIONS = ("generator", "encoder", "quantizer")

Entry = tuple[str, str, Layout, tuple[int, ...]]  # official key, "collection/our/path", layout, official shape


def _wn_conv(official: str, ours: str, o: int, i: int, k: int) -> list[Entry]:
    return [(f"{official}.weight_g", f"params/{ours}/weight_g", _CONV, (o, 1, 1)),
            (f"{official}.weight_v", f"params/{ours}/weight_v", _CONV, (o, i, k)),
            (f"{official}.bias", f"params/{ours}/bias", _SAME, (o,))]


def _resblock(official: str, ours: str, ch: int, k: int, n: int) -> list[Entry]:
    out = []
    for j in range(n):
        for conv in ("convs1", "convs2"):
            out += _wn_conv(f"{official}.{conv}.{j}", f"{ours}/{conv}_{j}", ch, ch, k)
    return out


def mapping_table(cfg: CodecConfig) -> list[Entry]:
    """Every (official "section.key", our "collection/path", layout, official shape) of this config."""
    nk, nd = len(cfg.resblock_kernel_sizes), len(cfg.resblock_dilations)
    t: list[Entry] = []
    # generator
    t += _wn_conv("generator.conv_pre", "generator/conv_pre", cfg.upsample_initial_channel, cfg.code_dim, 7)
    cin = cfg.upsample_initial_channel
    for i, (ch, k) in enumerate(zip(cfg.generator_channels, cfg.upsample_kernel_sizes)):
        t += [(f"generator.ups.{i}.weight_g", f"params/generator/ups_{i}/weight_g", _CONVT, (cin, 1, 1)),
              (f"generator.ups.{i}.weight_v", f"params/generator/ups_{i}/weight_v", _CONVT, (cin, ch, k)),
              (f"generator.ups.{i}.bias", f"params/generator/ups_{i}/bias", _SAME, (ch,))]
        for j, kk in enumerate(cfg.resblock_kernel_sizes):
            t += _resblock(f"generator.resblocks.{i * nk + j}", f"generator/resblocks_{i * nk + j}", ch, kk, nd)
        cin = ch
    t += _wn_conv("generator.conv_post", "generator/conv_post", 1, cin, 7)
    # encoder
    t += _wn_conv("encoder.conv_pre", "encoder/conv_pre", cfg.encoder_initial_channel, 1, 7)
    cin = cfg.encoder_initial_channel
    stages = list(reversed(cfg.upsample_kernel_sizes))
    for i, (ch, k) in enumerate(zip(cfg.encoder_channels, stages)):
        t += _wn_conv(f"encoder.ups.{i}", f"encoder/ups_{i}", ch, cin, k)
        for j, kk in enumerate(reversed(cfg.resblock_kernel_sizes)):
            n = i * nk + j
            t += _resblock(f"encoder.resblocks.{n}", f"encoder/resblocks_{n}", ch, kk, nd)
            t += [(f"encoder.normalize.{n}.weight", f"params/encoder/normalize_{n}/scale", _SAME, (ch,)),
                  (f"encoder.normalize.{n}.bias", f"params/encoder/normalize_{n}/bias", _SAME, (ch,))]
        cin = ch
    t += [("encoder.conv_post.weight", "params/encoder/conv_post/kernel", _CONV, (cfg.code_dim, cin, 3)),
          ("encoder.conv_post.bias", "params/encoder/conv_post/bias", _SAME, (cfg.code_dim,))]
    g, h, kg, mid = cfg.global_dim, cfg.global_encoder_hidden, cfg.global_encoder_kernel, cfg.global_dim
    gte = "encoder/GlobalTokenEncoder"
    for idx, (o, i) in zip((0, 2, 4), ((h, mid), (h, h), (g, h))):
        t.append((f"encoder.GlobalTokenEncoder.conv.{idx}.weight", f"params/{gte}/conv_{idx}/kernel", _CONV,
                  (o, i, kg)))
    t += [("encoder.GlobalTokenEncoder.fn.0.weight", f"params/{gte}/fn_0/kernel", _LINEAR, (g, g)),
          ("encoder.GlobalTokenEncoder.fn.0.bias", f"params/{gte}/fn_0/bias", _SAME, (g,)),
          ("encoder.GlobalTokenEncoder.fn.2.weight", f"params/{gte}/fn_2/scale", _SAME, (g,)),
          ("encoder.GlobalTokenEncoder.fn.2.bias", f"params/{gte}/fn_2/bias", _SAME, (g,)),
          ("encoder.GlobalTokenEncoder.fn.2.running_mean", f"batch_stats/{gte}/fn_2/mean", _SAME, (g,)),
          ("encoder.GlobalTokenEncoder.fn.2.running_var", f"batch_stats/{gte}/fn_2/var", _SAME, (g,))]
    # quantizer
    t.append(("quantizer.quantizer_modules.0.embedding.weight", "params/quantizer/quantizer_modules_0/embedding",
              _SAME, (cfg.n_codes, cfg.code_dim)))
    for j in range(cfg.global_codes):
        t.append((f"quantizer.quantizer_modules_globaltokens.{j}.embedding.weight",
                  f"params/quantizer/quantizer_modules_globaltokens_{j}/embedding", _SAME,
                  (cfg.global_code_size, cfg.global_code_dim)))
    return t


def official_shapes(cfg: CodecConfig) -> dict[str, tuple[int, ...]]:
    """{"section.key": shape} of the official state dicts for this config (ignored keys excluded)."""
    return {key: shape for key, _, _, shape in mapping_table(cfg)}


def config_from_official(h: Mapping[str, Any], source: str = "model.json") -> CodecConfig:
    """The official codec ``model.json`` dict -> CodecConfig. Raises ConfigError naming the key."""
    def need(key):
        if key not in h:
            raise ConfigError(f"{source}: missing key {key!r}")
        return h[key]

    if str(need("resblock")) != "1":
        raise ConfigError(f"{source}: resblock={h['resblock']!r} is not supported (the release uses '1')")
    for key in ("n_code_groups", "residul_layer"):
        if need(key) != 1:
            raise ConfigError(f"{source}: {key}={h[key]} is not supported (the release uses 1)")
    dil = [tuple(d) for d in need("resblock_dilation_sizes")]
    if len(dil) != len(need("resblock_kernel_sizes")) or len(set(dil)) != 1:
        raise ConfigError(f"{source}: resblock_dilation_sizes={h['resblock_dilation_sizes']} must repeat one "
                          "dilation list per kernel size")
    gin, ghidden, gout, gk, gs = need("global_feature_conv")
    known = {"resblock", "n_code_groups", "residul_layer", "resblock_dilation_sizes", "global_feature_conv",
             "upsample_rates", "upsample_kernel_sizes", "upsample_initial_channel", "resblock_kernel_sizes",
             "n_codes", "global_code_num", "global_tokens", "codebook_loss_lambda", "commitment_loss_lambda",
             "num_mels", "n_fft", "hop_size", "win_size", "sampling_rate", "segment_size", "fmin", "fmax",
             "fmax_for_loss", *_TRAINING_KEYS}
    unknown = sorted(set(h) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown key {unknown[0]!r}")
    n_global = need("global_code_num")
    if gout % n_global:
        raise ConfigError(f"{source}: global_feature_conv out width {gout} is not a multiple of global_code_num")
    n = len(need("upsample_rates"))
    values = dict(
            # The official Encoder hard-codes widths 32 * 2**(i+1) and 512-d codes.
            encoder_initial_channel=32, code_dim=32 * 2 ** n,
            upsample_rates=tuple(need("upsample_rates")), upsample_kernel_sizes=tuple(need("upsample_kernel_sizes")),
            upsample_initial_channel=need("upsample_initial_channel"),
            resblock_kernel_sizes=tuple(need("resblock_kernel_sizes")), resblock_dilations=dil[0],
            n_codes=need("n_codes"), global_code_size=h["n_codes"], global_codes=n_global,
            global_code_dim=gout // n_global, global_encoder_hidden=ghidden, global_encoder_kernel=gk,
            global_encoder_stride=gs, global_tokens=tuple(need("global_tokens")),
            codebook_loss_lambda=float(h.get("codebook_loss_lambda", 1.0)),
            commitment_loss_lambda=float(h.get("commitment_loss_lambda", 0.25)),
            sample_rate=need("sampling_rate"))
    for ours, theirs in (("n_mels", "num_mels"), ("n_fft", "n_fft"), ("hop_size", "hop_size"),
                         ("win_size", "win_size"), ("segment_size", "segment_size"), ("fmin", "fmin"),
                         ("fmax", "fmax"), ("fmax_for_loss", "fmax_for_loss")):
        if theirs in h:
            values[ours] = h[theirs]
    try:
        cfg = CodecConfig(**values)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    if gin != cfg.encoder_channels[n // 2 - 1]:
        raise ConfigError(f"{source}: global_feature_conv in width {gin} != encoder width "
                          f"{cfg.encoder_channels[n // 2 - 1]}")
    return cfg


def load_codec_config(path: str | os.PathLike) -> CodecConfig:
    """``model.json`` (or the directory holding it) -> CodecConfig; LoadError names the file."""
    file = Path(path)
    if file.is_dir():
        file = file / "model.json"
    try:
        h = json.loads(file.read_text())
    except FileNotFoundError:
        raise LoadError(f"{file}: not found") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoadError(f"{file}: not readable JSON ({type(e).__name__})") from None
    if not isinstance(h, dict):
        raise LoadError(f"{file}: expected a JSON object")
    try:
        return config_from_official(h, str(file))
    except ConfigError as e:
        raise LoadError(str(e)) from None


def _normalise_key(key: str) -> str:
    """torch's newer parametrized weight norm names -> the classic weight_g / weight_v."""
    return (key.replace(".parametrizations.weight.original0", ".weight_g")
            .replace(".parametrizations.weight.original1", ".weight_v"))


def _set(tree: dict, path: str, value: Any) -> None:
    *parents, leaf = path.split("/")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def convert_state_dicts(cfg: CodecConfig, state: Mapping[str, Mapping[str, Any]], *, fold: bool = True,
                        source: str = "state dict") -> dict:
    """{"generator": sd, "encoder": sd, "quantizer": sd} of numpy/torch arrays -> our variables.

    Returns {"params": {generator, quantizer[, encoder]}, "batch_stats": {...}} as float32 numpy;
    the encoder section may be absent (decode-only checkpoints). ``fold`` folds weight norm.
    Raises LoadError (one line naming ``source`` and the key) on missing, unexpected or
    wrong-shape tensors.
    """
    for section in ("generator", "quantizer"):
        if section not in state:
            raise LoadError(f"{source}: missing section {section!r} (found {sorted(state)})")
    flat = {}
    for section in SECTIONS:
        for key, value in (state.get(section) or {}).items():
            flat[f"{section}.{_normalise_key(key)}"] = value
    table = [e for e in mapping_table(cfg) if e[0].split(".")[0] in state]
    expected = {key for key, _, _, _ in table}
    missing = [k for k in expected if k not in flat]
    if missing:
        raise LoadError(f"{source}: missing key {missing[0]!r}"
                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    unexpected = sorted(k for k in flat if k not in expected and k not in IGNORED_KEYS
                        and not k.endswith(IGNORED_SUFFIXES))
    if unexpected:
        raise LoadError(f"{source}: unexpected key {unexpected[0]!r}"
                        + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    variables: dict = {"params": {}, "batch_stats": {}}
    for key, path, layout, shape in table:
        array = flat[key]
        array = array.numpy() if hasattr(array, "numpy") else np.asarray(array)
        if tuple(array.shape) != shape:
            raise LoadError(f"{source}: key {key!r} has shape {tuple(array.shape)}, model.json implies {shape}")
        _set(variables, path, np.ascontiguousarray(layout(array.astype(np.float32))))
    if fold:
        variables["params"] = fold_weight_norm(variables["params"])
    return variables


def read_pt(path: str | os.PathLike) -> dict:
    """A ``.pt`` checkpoint via ``torch.load(weights_only=True)`` (tensors only, no pickled code)."""
    try:
        import torch
    except ImportError:
        raise LoadError(f"{path}: reading .pt checkpoints needs torch (pip install torch)") from None
    if not Path(path).is_file():
        raise LoadError(f"{path}: not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt or non-checkpoint file is user input
        raise LoadError(f"{path}: not a readable torch checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict):
        raise LoadError(f"{path}: expected a dict of state dicts, got {type(ckpt).__name__}")
    return ckpt


def load_official_codec(path: str | os.PathLike, *, fold: bool = True) -> tuple[CodecConfig, dict]:
    """The release's ``codec`` directory (model.json + final.pt) -> (CodecConfig, variables).

    ``variables`` = {"params", "batch_stats"} as float32 numpy, weight norm folded unless
    ``fold=False``; pass ``variables["params"]`` to ``fo_jax.models.codec.decode_chunk``.
    """
    path = Path(path)
    if not path.is_dir():
        raise LoadError(f"{path}: not a directory")
    cfg = load_codec_config(path / "model.json")
    file = path / "final.pt"
    ckpt = read_pt(file)
    state = {k: v for k, v in ckpt.items() if k in SECTIONS}
    return cfg, convert_state_dicts(cfg, state, fold=fold, source=str(file))
