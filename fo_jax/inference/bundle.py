"""Model bundles: everything ``fo-jax infer`` loads, in the release's layout or in our own.

Official layout (the released ``checkpoints`` directory) plus a HF Qwen2 directory (``llm_path``)::

  audiollm/{train.yaml, final.pt, global_cmvn}   speech encoder, adapter, prompts, state head
  decoder/{model.json, final.pt}                 speech decoder
  codec/{model.json, final.pt}                   TiCodec
  server.json                                    streaming settings (``ServerSettings``)

Reading ``.pt`` files needs PyTorch (the ``torch`` extra). The converted params are cached as an
orbax checkpoint keyed by the sources' paths, sizes and mtimes (``fo_jax.conversion.cache``), so
the next start neither converts nor needs torch; a changed source file converts again.

Native layout (``save_bundle``; needs no torch, loads without conversion)::

  fo_jax_model.json     {"format": "fo_jax_bundle", "version": 1, "model": {encoder, adapter,
                         decoder, codec configs}, "server": {server.json keys}, "chat_template": ...}
  params.safetensors    our param trees, flat keys "audiollm/encoder/...", "decoder/...", "codec/..."
                        (codec: decoding side, weight norm folded; the LLM is not in this file)

The codec section is TiCodec's, or (``"kind": "mel_vq"``) the toy world's fast mel codec
(``fo_jax.models.mel_codec``), whose only tensor is ``codec/codebook``.
  llm/                  optional HF Qwen2 directory (weights + tokenizer); else pass ``llm_path``

Either way the LLM and the tokenizer come from a HF Qwen2 directory, as in the release.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

import flax.linen as nn
import jax
import numpy as np

from fo_jax.audio.cmvn import load_cmvn
from fo_jax.conversion import official_decoder
from fo_jax.conversion.cache import load_or_convert
from fo_jax.conversion.hf_qwen2 import load_hf_config, load_hf_qwen2, save_hf_qwen2
from fo_jax.conversion.official_audiollm import configs_from_train_yaml, load_official_pt, read_train_yaml
from fo_jax.conversion.official_audiollm_heads import HEADS_TABLE, convert_audiollm
from fo_jax.conversion.official_codec import load_codec_config, load_official_codec
from fo_jax.conversion.safetensors_io import read_safetensors, write_safetensors
from fo_jax.errors import ConfigError, FoJaxError, LoadError
from fo_jax.inference import text_segmentation as ts
from fo_jax.inference.speech_decoder import TokenSampling
from fo_jax.inference.vocoder_stream import VocoderStreamConfig
from fo_jax.models import audio_llm, codec, speech_decoder
from fo_jax.models.mel_codec import MelVQCodec, MelVQConfig
from fo_jax.models.configs import (AdapterConfig, CodecConfig, EncoderConfig, LLMConfig, ModelConfig,
                                   SpeechDecoderConfig, to_dtype)

BUNDLE_FILE, PARAMS_FILE, LLM_DIR = "fo_jax_model.json", "params.safetensors", "llm"
FORMAT, VERSION = "fo_jax_bundle", 1
OFFICIAL_FILES = ("audiollm/train.yaml", "audiollm/final.pt", "audiollm/global_cmvn", "decoder/model.json",
                  "decoder/final.pt", "codec/model.json", "codec/final.pt", "server.json")
PARTS = ("audiollm", "decoder", "codec")
CODEC_DECODE_PARTS = ("generator", "quantizer")
_HEADS = tuple(path.split("/")[0] for _, path, _ in HEADS_TABLE)  # AudioLLM tensors in the LLM dtype


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """The release's ``server.json``: speech-decoder sampling and streaming-vocoder settings.

    One key is ours (``EXTENSIONS``; the release's file lacks it and gets its behaviour):
    ``text_clause_splits`` 1 splits the reply at clause ends too (``, ，:``, in the first segment
    and in long ones: the release's server); 0 splits at sentence ends only, for speech decoders
    trained on whole sentences (the toy world's).
    """

    EXTENSIONS = ("text_clause_splits",)

    decoder_first_chunk_size: int = 20
    decoder_chunk_size: int = 40
    decoder_chunk_overlap_size: int = 10
    decoder_top_k: int = 2
    decoder_penalty_window_size: int = -1
    decoder_penalty: float = 1.1
    decoder_N: int = 2401
    decoder_seg_threshold_first_pack: float = 0.1
    decoder_seg_threshold: float = 0.015
    text_clause_splits: int = 1

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "server.json") -> "ServerSettings":
        """Checks names and types (one-line LoadError naming ``source`` and the key)."""
        if not isinstance(values, Mapping):
            raise LoadError(f"{source}: expected a JSON object")
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        kw = {}
        for key, value in values.items():
            if key not in fields:
                raise LoadError(f"{source}: unknown key {key!r}")
            want = int if fields[key] in (int, "int") else float
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (want is int and value != int(value)):
                raise LoadError(f"{source}: {key} must be {'an integer' if want is int else 'a number'}, got {value!r}")
            kw[key] = want(value)
        if kw.get("text_clause_splits", 1) not in (0, 1):
            raise LoadError(f"{source}: text_clause_splits must be 0 or 1, got {kw['text_clause_splits']}")
        return cls(**kw)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "ServerSettings":
        return cls.from_dict(_read_json(path), str(path))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def vocoder(self, cfg: CodecConfig) -> VocoderStreamConfig:
        """Streaming-vocoder settings for a codec (raises ConfigError on inconsistent values)."""
        return VocoderStreamConfig(
            first_chunk_size=self.decoder_first_chunk_size, chunk_size=self.decoder_chunk_size,
            overlap_size=self.decoder_chunk_overlap_size, seg_threshold_first_packet=self.decoder_seg_threshold_first_pack,
            seg_threshold=self.decoder_seg_threshold, window_n=self.decoder_N,
            samples_per_token=cfg.samples_per_token, sample_rate=cfg.sample_rate)

    def decoder_sampling(self, top_k: int | None = None) -> TokenSampling:
        """Speech-decoder sampler; ``top_k`` overrides ``decoder_top_k``."""
        try:
            return TokenSampling(self.decoder_top_k if top_k is None else top_k, self.decoder_penalty_window_size,
                                 self.decoder_penalty)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def segmentation(self) -> ts.SegmentationPolicy:
        """Where the reply's text is cut into speech-decoder segments (``text_clause_splits``)."""
        return ts.SERVER_POLICY if self.text_clause_splits else ts.SENTENCE_POLICY


@dataclasses.dataclass
class Bundle:
    """A loaded model.

    Attributes:
      config: the whole model's config.
      params: {"audiollm": AudioLLM tree (the LLM under "llm"), "decoder": speech-decoder params,
        "codec": TiCodec "params" collection, weight norm folded (mel codec: {"codebook"})}.
      server: streaming settings.
      llm_path: the HF Qwen2 directory (LLM weights and tokenizer); None for bundles built in memory.
      chat_template: the template text with one ``<audio>`` (None: Qwen ChatML's default).
      layout: "official" or "native".
      converted: the official checkpoints were converted by this load (False: cache hit or native).
    """

    config: ModelConfig
    params: dict
    server: ServerSettings
    llm_path: Path | None
    chat_template: str | None
    layout: str
    converted: bool = False


def bundle_layout(model_path: str | os.PathLike) -> str:
    """ "native" (``fo_jax_model.json``) or "official" (``audiollm/``); LoadError otherwise."""
    path = Path(model_path)
    if not path.is_dir():
        raise LoadError(f"{path}: not a directory")
    if (path / BUNDLE_FILE).is_file():
        return "native"
    if (path / "audiollm").is_dir():
        return "official"
    raise LoadError(f"{path}: neither a fo_jax bundle ({BUNDLE_FILE}) nor the official layout (audiollm/, "
                    "decoder/, codec/, server.json)")


def default_cache_dir(model_path: str | os.PathLike, llm_path: str | os.PathLike, dtype: str) -> Path:
    """Where converted params of this (bundle, LLM, dtype) live: ``$FO_JAX_CONVERTED_CACHE`` or
    ``~/.cache/fo_jax/converted``, one subdirectory per combination."""
    root = os.environ.get("FO_JAX_CONVERTED_CACHE") or Path(
        os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fo_jax" / "converted"
    name = hashlib.sha256(f"{Path(model_path).resolve()}|{Path(llm_path).resolve()}|{dtype}".encode()).hexdigest()
    return Path(root) / name[:16]


def load_bundle(model_path: str | os.PathLike, llm_path: str | os.PathLike | None = None, *,
                dtype: str = "float32", cache_dir: str | os.PathLike | None = None,
                use_cache: bool = True) -> Bundle:
    """Loads a bundle of either layout.

    Args:
      model_path: the bundle directory.
      llm_path: HF Qwen2 directory; default ``model_path/llm`` (native bundles that carry it).
      dtype: LLM params and compute dtype (float32 or bfloat16); the speech parts stay float32.
      cache_dir: converted-params cache of the official layout (default ``default_cache_dir``).
      use_cache: False converts every time and writes no cache.
    Raises:
      LoadError / ConfigError: one line naming the file and the key.
    """
    to_dtype(dtype)
    model_path = Path(model_path)
    layout = bundle_layout(model_path)
    if llm_path is None:
        if not (model_path / LLM_DIR).is_dir():
            what = "this bundle has no llm/ directory" if layout == "native" else "the official layout"
            raise LoadError(f"{model_path}: {what}; give the HF Qwen2 directory (llm_path)")
        llm_path = model_path / LLM_DIR
    llm_path = Path(llm_path)
    llm_cfg = load_hf_config(llm_path, dtype=dtype, param_dtype=dtype)
    if layout == "native":
        return _load_native(model_path, llm_path, dtype, llm_cfg)

    missing = [f for f in OFFICIAL_FILES if not (model_path / f).is_file()]
    if missing:
        raise LoadError(f"{model_path}: missing {missing[0]} (official layout: {', '.join(OFFICIAL_FILES)})")
    server = ServerSettings.from_file(model_path / "server.json")
    train = read_train_yaml(model_path / "audiollm/train.yaml")
    encoder, adapter = configs_from_train_yaml(train)
    decoder = official_decoder.config_from_model_json(model_path / "decoder/model.json",
                                                      llm_hidden_size=llm_cfg.hidden_size)
    config = _checked(ModelConfig(llm=llm_cfg, encoder=encoder, adapter=adapter, decoder=decoder,
                                  codec=load_codec_config(model_path / "codec/model.json")), str(model_path))

    def convert() -> dict:
        _, llm = load_hf_qwen2(llm_path, dtype=dtype)
        pt = model_path / "audiollm/final.pt"
        cmvn = load_cmvn(model_path / "audiollm/global_cmvn")
        audio = convert_audiollm(load_official_pt(pt), config, llm, (cmvn.mean, cmvn.istd), source=str(pt))
        _, dec = official_decoder.load_official_decoder(model_path / "decoder", llm_hidden_size=llm_cfg.hidden_size)
        _, codec_vars = load_official_codec(model_path / "codec")
        return {"audiollm": audio, "decoder": dec, "codec": codec_vars["params"]}

    sources = [model_path / f for f in OFFICIAL_FILES] + [llm_path]
    if use_cache:
        cache = Path(cache_dir) if cache_dir else default_cache_dir(model_path, llm_path, dtype)
        params, converted = load_or_convert(cache, sources, convert, {"dtype": dtype, "layout": "official"})
    else:
        params, converted = convert(), True
    chat_template = (train.get("model_conf") or {}).get("chat_template") or None
    return Bundle(config, params, server, llm_path, chat_template, "official", converted)


def _checked(config: ModelConfig, source: str) -> ModelConfig:
    """The parts must fit together around the LLM."""
    llm = config.llm.hidden_size
    if config.adapter.output_dim != llm:
        raise LoadError(f"{source}: the adapter outputs {config.adapter.output_dim}-d embeddings, the LLM is {llm} wide")
    if config.decoder.llm_hidden_size != llm:
        raise LoadError(f"{source}: the speech decoder expects {config.decoder.llm_hidden_size}-d LLM states, "
                        f"the LLM is {llm} wide")
    return config


def _read_json(path: str | os.PathLike) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise LoadError(f"{path}: not found") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoadError(f"{path}: not readable JSON ({type(e).__name__})") from None


def _flatten(tree: Mapping, leaf=np.asarray, prefix: str = "") -> dict[str, Any]:
    """{"a/b/c": leaf(value)} of a nested dict."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, leaf, name + "/"))
        else:
            out[name] = leaf(value)
    return out


def _unflatten(flat: Mapping[str, Any]) -> dict:
    tree: dict = {}
    for name, value in flat.items():
        *parents, leaf = name.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def expected_shapes(config: ModelConfig) -> dict:
    """Shape/dtype tree of a native bundle's params (the LLM excluded), without allocating."""
    key = jax.random.key(0)
    audio = jax.eval_shape(lambda k: nn.unbox(audio_llm.init_params(config, k)), key)
    audio.pop("llm")
    if isinstance(config.codec, MelVQConfig):
        c = config.codec
        codec_shapes = {"codebook": jax.ShapeDtypeStruct((c.n_codes, c.frames_per_token * c.n_mels), np.float32)}
    else:
        codec_shapes = _decode_side(jax.eval_shape(lambda k: codec.fold_weight_norm(nn.unbox(
            codec.init_variables(config.codec, k))["params"]), key))
    return {"audiollm": audio,
            "decoder": jax.eval_shape(lambda k: nn.unbox(speech_decoder.init_params(config.decoder, k)), key),
            "codec": codec_shapes}


def _codec_section(config: CodecConfig | MelVQConfig) -> dict[str, Any]:
    """The bundle file's codec section (the mel codec's carries its kind)."""
    if isinstance(config, MelVQConfig):
        return {"kind": MelVQCodec.KIND, **dataclasses.asdict(config)}
    return dataclasses.asdict(config)


def _codec_config(section: Mapping[str, Any]) -> CodecConfig | MelVQConfig:
    """Inverse of ``_codec_section`` (raises FoJaxError / TypeError on bad fields)."""
    if section.get("kind") == MelVQCodec.KIND:
        return MelVQConfig(**{k: v for k, v in section.items() if k != "kind"})
    return CodecConfig.from_dict(section)


def _decode_side(codec_params: Mapping) -> dict:
    """The codec params decoding needs (the encoder only serves training)."""
    return {k: codec_params[k] for k in CODEC_DECODE_PARTS}


def _check_params(params: dict, config: ModelConfig, source: str) -> None:
    shape = lambda a: tuple(a.shape)  # noqa: E731
    want, have = _flatten(expected_shapes(config), shape), _flatten(params, shape)
    for name in sorted(set(want) | set(have)):
        if name not in have:
            raise LoadError(f"{source}: missing tensor {name!r}")
        if name not in want:
            raise LoadError(f"{source}: unexpected tensor {name!r}")
        if have[name] != want[name]:
            raise LoadError(f"{source}: tensor {name!r} has shape {have[name]}, the config implies {want[name]}")


def _load_native(model_path: Path, llm_path: Path, dtype: str, llm_cfg: LLMConfig) -> Bundle:
    meta_file = model_path / BUNDLE_FILE
    meta = _read_json(meta_file)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise LoadError(f"{meta_file}: not a fo_jax bundle (format {meta.get('format') if isinstance(meta, dict) else None!r})")
    if meta.get("version") != VERSION:
        raise LoadError(f"{meta_file}: bundle version {meta.get('version')!r}, this fo_jax reads version {VERSION}")
    model = meta.get("model") or {}
    parts = {"encoder": EncoderConfig.from_dict, "adapter": AdapterConfig.from_dict,
             "decoder": SpeechDecoderConfig.from_dict, "codec": _codec_config}
    try:
        kw = {name: parse(model[name]) for name, parse in parts.items()}
    except KeyError as e:
        raise LoadError(f"{meta_file}: model section {e} missing") from None
    except (FoJaxError, TypeError) as e:
        raise LoadError(f"{meta_file}: {e}") from None
    config = _checked(ModelConfig(llm=llm_cfg, **kw), str(meta_file))
    server = ServerSettings.from_dict(meta.get("server") or {}, f"{meta_file} (server)")
    params = _unflatten(read_safetensors(model_path / PARAMS_FILE))
    _check_params(params, config, str(model_path / PARAMS_FILE))
    _, params["audiollm"]["llm"] = load_hf_qwen2(llm_path, dtype=dtype)
    llm_dtype = np.dtype(to_dtype(dtype))
    for head in _HEADS:
        params["audiollm"][head] = jax.tree.map(lambda a: np.asarray(a).astype(llm_dtype), params["audiollm"][head])
    return Bundle(config, params, server, llm_path, meta.get("chat_template"), "native")


def save_bundle(directory: str | os.PathLike, config: ModelConfig, params: Mapping[str, Any], *,
                server: ServerSettings = ServerSettings(), chat_template: str | None = None,
                tokenizer: Any = None) -> Path:
    """Writes a native bundle (no torch needed to write or read it).

    Args:
      directory: created if needed.
      config: the model config (the LLM's comes from its HF directory at load).
      params: {"audiollm", "decoder", "codec"} as in ``Bundle.params``; the codec's weight norm may
        be folded or not (it is folded here).
      server: streaming settings written as the "server" section.
      chat_template: template text with one ``<audio>`` (None: Qwen ChatML's default).
      tokenizer: when given, the LLM (``params["audiollm"]["llm"]``) and this tokenizer are written
        to ``llm/`` as a HF Qwen2 directory, so the bundle loads without ``llm_path``.
    Returns:
      the bundle directory.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    missing = [p for p in PARTS if p not in params]
    if missing:
        raise ValueError(f"save_bundle: params lack {missing}")
    audio = {k: v for k, v in params["audiollm"].items() if k != "llm"}
    tree = jax.tree.map(np.asarray, {"audiollm": audio, "decoder": params["decoder"], "codec": params["codec"]})
    if not isinstance(config.codec, MelVQConfig):
        tree["codec"] = codec.fold_weight_norm(_decode_side(tree["codec"]))
    _check_params(tree, config, "save_bundle")
    if tokenizer is not None:
        save_hf_qwen2(directory / LLM_DIR, config.llm, params["audiollm"]["llm"])
        tokenizer.save_pretrained(str(directory / LLM_DIR))
    write_safetensors(directory / PARAMS_FILE, _flatten(tree), {"format": FORMAT})
    meta = {"format": FORMAT, "version": VERSION,
            "model": {**{name: dataclasses.asdict(getattr(config, name)) for name in ("encoder", "adapter",
                                                                                     "decoder")},
                      "codec": _codec_section(config.codec)},
            "server": server.to_dict(), "chat_template": chat_template}
    (directory / BUNDLE_FILE).write_text(json.dumps(meta, indent=2))  # last: marks a complete bundle
    return directory
