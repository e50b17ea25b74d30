"""The trained toy model as a native bundle (``fo_jax.inference.bundle``): what ``fo-jax infer``
and the toy's talking steps load.

Assembled from the stages' runs: the frozen LLM (HF directory, copied into ``llm/`` with its
tokenizer), speech-in 2 (encoder, adapter, task embeddings, CMVN), speech-in 3 (prompt embeddings,
state head), speech-out 2 (pre-network and shared decoder), speech-out 3 (prefix stack) and the
fast mel codec. Each part's config comes from the run that trained it.

Its ``server.json`` settings are the release's, except that replies are cut into speech-decoder
segments at sentence ends only (``text_clause_splits=0``): the toy's decoder trains on whole
sentences. With the release's clause splits, "Four, five, six, seven, eight." reached it as
"Four, five。" and " six, seven, eight.", pieces unlike anything it trained on; measured over one
full run's model: counting answers recognized 0 -> 40 %, all speech out 37.3 -> 40.7 % (BENCHMARKS.md, toy world).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import ml_collections

from fo_jax.config import model_config
from fo_jax.errors import LoadError
from fo_jax.inference.bundle import ServerSettings, save_bundle
from fo_jax.models.configs import SpeechDecoderConfig
from fo_jax.models.mel_codec import MelVQCodec
from fo_jax.toy.speech_in import speech_llm
from fo_jax.training.checkpoint import load_lineage


def trained_decoder(prefix_run: str | os.PathLike, llm_hidden_size: int) -> tuple[SpeechDecoderConfig, dict]:
    """The speech decoder of a ``speech_prefix`` run: its prefix stack over the shared decoder of the
    ``speech_decoder`` run it started from (``load_lineage``)."""
    params, meta = load_lineage(prefix_run)
    if "start_run_missing" in meta:
        raise LoadError(f"{prefix_run}: its speech_decoder run {meta['start_run_missing']} is gone")
    config = dataclasses.replace(model_config(ml_collections.ConfigDict(meta["config"])).decoder,
                                 llm_hidden_size=llm_hidden_size, use_prefix=True)
    return config, params["decoder"]


def write_bundle(out_dir: str | os.PathLike, llm_path: str | os.PathLike, runs: dict[str, str | os.PathLike],
                 codec_dir: str | os.PathLike) -> Path:
    """Writes the native bundle (LLM inside, in ``out_dir/llm``).

    Args:
      runs: workdirs of the "speech_in_dialogue" and "speech_prefix" runs (each names the run it
        started from, followed back to stage 1: keep those too).
      codec_dir: the fast mel codec (``MelVQCodec.save``).
    """
    stage, model, audio = speech_llm(llm_path, runs["speech_in_dialogue"])
    decoder, decoder_params = trained_decoder(runs["speech_prefix"], model.llm.hidden_size)
    codec = MelVQCodec.load(codec_dir)
    config = dataclasses.replace(model, decoder=decoder, codec=codec.config)
    return save_bundle(out_dir, config, {"audiollm": audio, "decoder": decoder_params,
                                         "codec": {"codebook": codec.codebook}}, tokenizer=stage.llm.tokenizer,
                       server=ServerSettings(text_clause_splits=0))
