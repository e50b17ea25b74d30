"""Tiny random model bundles in both layouts, written by our own code (no tests here).

One set of random tensors in the release's key names and torch layouts (the converters' key
tables) feeds both layouts: ``write_official_bundle`` saves them with ``torch.save`` next to the
release's ``train.yaml`` / ``model.json`` / ``server.json`` / ``global_cmvn`` structure (tiny
sizes) and a HF Qwen2 directory; ``write_native_bundle`` converts them with our converters (numpy,
nothing compiled) and writes them with ``save_bundle``, LLM and tokenizer in ``llm/``. Loading
either gives the same params.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
from pathlib import Path

import numpy as np
import yaml

from fo_jax.audio.cmvn import cmvn_from_stats, cmvn_stats, save_cmvn_json
from fo_jax.conversion import hf_qwen2
from fo_jax.conversion import official_audiollm as oa
from fo_jax.conversion import official_codec as oc
from fo_jax.conversion import official_decoder as od
from fo_jax.conversion.official_audiollm_heads import convert_audiollm, expected_head_shapes
from fo_jax.conversion.safetensors_io import write_checkpoint_dir
from fo_jax.inference.bundle import ServerSettings, save_bundle
from fo_jax.models.configs import AdapterConfig, EncoderConfig, LLMConfig, ModelConfig, SpeechDecoderConfig
from fo_jax.text.tokenizer import train_bpe_tokenizer
from tests.test_codec import FIXTURE as CODEC_FIXTURE
from tests.test_codec import random_official_state
from tests.test_encoder_conversion import RELEASED_YAML, random_state
from tests.test_speech_decoder import random_state_dict

TEXTS = ["Hello, how are you today? I am fine, thank you.", "What is the capital of France? It is Paris.",
         "One, two, three. The weather is nice! Let us talk about music and books.",
         "Tell me a story about a small dog that likes to run in the park.", "First line\nsecond line\n"] * 4
# The release's codec model.json at 256 channels and one resblock kernel (fast to compile).
CODEC_JSON = dict(CODEC_FIXTURE["reduced"]["model_json"], resblock_kernel_sizes=[3],
                  resblock_dilation_sizes=[[1, 3, 5]])
CHAT_TEMPLATE = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<audio><|im_end|>\n"
                 "<|im_start|>assistant\n")


@functools.cache
def tokenizer():
    """A small BPE tokenizer over ASCII bytes (ChatML specials at ids 0..2): random ids decode to text."""
    return train_bpe_tokenizer(TEXTS, vocab_size=300, all_bytes=False)


@functools.cache
def tiny_config() -> ModelConfig:
    """Tiny float32 parts around a 2-layer Qwen2 (64 wide; each LLM vector is 2 decoder frames)."""
    llm = LLMConfig(vocab_size=len(tokenizer()), hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=16, rope_theta=10000.0, max_position_embeddings=2048,
                    eos_token_ids=(2,))
    return ModelConfig(
        llm=llm,
        encoder=EncoderConfig(hidden_size=32, num_layers=2, num_heads=2, ffn_size=64, chunk_size=4, left_chunks=4,
                              ctc_vocab_size=16),
        adapter=AdapterConfig(input_dim=32, output_dim=64, prompt_num=4, task_num=6),
        decoder=SpeechDecoderConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=4, intermediate_size=64,
                                    llm_hidden_size=64),
        codec=oc.config_from_official(CODEC_JSON))


@functools.cache
def official_tensors(seed: int = 0) -> dict:
    """Random tensors of every part in the release's names and layouts (numpy), CMVN stats."""
    cfg = tiny_config()
    rng = np.random.default_rng(seed)
    llm = {}
    for name, shape in hf_qwen2.expected_shapes(cfg.llm).items():
        if name.endswith("norm.weight"):
            llm[name] = 1 + 0.1 * rng.standard_normal(shape)
        elif name.endswith("bias"):
            llm[name] = 0.1 * rng.standard_normal(shape)
        else:
            llm[name] = rng.standard_normal(shape) / np.sqrt(shape[-1])
    audio_shapes = {**oa.encoder_shapes(cfg.encoder), **{k: s for k, _, s in oa.adapter_table(cfg.adapter)},
                    **expected_head_shapes(cfg)}
    return {"llm": {k: v.astype(np.float32) for k, v in llm.items()},
            "audiollm": random_state(audio_shapes, seed),
            "cmvn": cmvn_stats(rng.normal(8.0, 3.0, (500, cfg.encoder.input_dim))),
            "decoder": random_state_dict(cfg.decoder, seed),
            "codec": random_official_state({k: s for k, s in oc.official_shapes(cfg.codec).items()
                                            if not k.startswith("encoder.")}, seed)}


def write_llm_dir(path: Path, seed: int = 0) -> Path:
    """The random LLM as a HF Qwen2 directory with the tokenizer."""
    cfg = tiny_config().llm
    write_checkpoint_dir(path, official_tensors(seed)["llm"])
    (path / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2))
    tokenizer().save_pretrained(str(path))
    return path


def converted_params(seed: int = 0) -> dict:
    """``official_tensors`` through our converters: {"audiollm", "decoder", "codec"} (numpy)."""
    cfg, tensors = tiny_config(), official_tensors(seed)
    llm = {}
    for name, ours, (to_ours, _) in hf_qwen2.mapping_table(cfg.llm):
        hf_qwen2.set_path(llm, ours, np.asarray(to_ours(tensors["llm"][name], cfg.llm), np.float32))
    stats = tensors["cmvn"]
    cmvn = cmvn_from_stats(stats["mean_stat"], stats["var_stat"], stats["frame_num"])
    return {"audiollm": convert_audiollm(tensors["audiollm"], cfg, llm, (cmvn.mean, cmvn.istd)),
            "decoder": od.convert_state_dict(tensors["decoder"], cfg.decoder),
            "codec": oc.convert_state_dicts(cfg.codec, tensors["codec"])["params"]}


def write_native_bundle(directory: Path, seed: int = 0, server: ServerSettings = ServerSettings()) -> Path:
    """A self-contained native bundle (LLM + tokenizer in llm/)."""
    return save_bundle(directory, tiny_config(), copy.deepcopy(converted_params(seed)), server=server,
                       chat_template=CHAT_TEMPLATE, tokenizer=tokenizer())


def _train_yaml(cfg: ModelConfig) -> dict:
    """The release's train.yaml structure at the tiny encoder / adapter sizes."""
    data = copy.deepcopy(RELEASED_YAML)
    enc, ad = cfg.encoder, cfg.adapter
    data["output_dim"] = enc.ctc_vocab_size
    data["encoder_conf"]["overview_conf"]["encoder-output-dim"] = enc.hidden_size
    data["encoder_conf"]["para_conf"]["subsampling"]["subsampling-output-dim"] = enc.hidden_size
    tr = data["encoder_conf"]["para_conf"]["transformer"]
    for key in ("transformer-attention-dim", "transformer-input-dim", "transformer-output-dim"):
        tr[key] = enc.hidden_size
    tr.update({"transformer-attention-heads": enc.num_heads, "transformer-chunk_size": enc.chunk_size,
               "transformer-left_chunks": enc.left_chunks, "transformer-linear-units": enc.ffn_size,
               "transformer-num-blocks": enc.num_layers})
    data["model_conf"].update({"enc_out_dim": ad.input_dim, "llm_embed_dim": ad.output_dim, "prompt_num": ad.prompt_num,
                               "task_num": ad.task_num, "chat_template": CHAT_TEMPLATE})
    return data


def write_official_bundle(directory: Path, seed: int = 0, torch_files: bool = True) -> tuple[Path, Path]:
    """(model_path, llm_path) of the random bundle in the release's layout (needs torch; without
    ``torch_files`` the .pt files are placeholders: for what happens before they are read)."""
    cfg, tensors = tiny_config(), official_tensors(seed)
    if torch_files:
        import torch

        t = lambda sd: {k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}  # noqa: E731
        save = torch.save
    else:
        t, save = dict, lambda obj, path: Path(path).write_bytes(b"placeholder")  # noqa: E731
    model = directory / "checkpoints"
    for sub in ("audiollm", "decoder", "codec"):
        (model / sub).mkdir(parents=True, exist_ok=True)
    save(t(tensors["audiollm"]), model / "audiollm/final.pt")
    (model / "audiollm/train.yaml").write_text(yaml.safe_dump(_train_yaml(cfg)))
    save_cmvn_json(model / "audiollm/global_cmvn", tensors["cmvn"])
    d = cfg.decoder
    args = {"transformer_attention_dim": d.hidden_size, "transformer_attention_heads": d.num_heads,
            "transformer_linear_units": d.intermediate_size, "transformer_num_blocks": d.num_layers,
            "transformer_dropout_rate": 0.1, "kv_cache_prefix_finetune": 1, "encoder_output_dim": d.hidden_size,
            "encoder_upsample_rate": 9, "opt": "noamw"}
    (model / "decoder/model.json").write_text(json.dumps([d.hidden_size, d.codec_vocab_size, args]))
    save({"model": t(tensors["decoder"])}, model / "decoder/final.pt")
    (model / "codec/model.json").write_text(json.dumps(CODEC_JSON))
    save({sec: t(sd) for sec, sd in tensors["codec"].items()}, model / "codec/final.pt")
    release = {k: v for k, v in dataclasses.asdict(ServerSettings()).items() if k not in ServerSettings.EXTENSIONS}
    (model / "server.json").write_text(json.dumps(release, indent=4))
    return model, write_llm_dir(directory / "qwen2", seed)
