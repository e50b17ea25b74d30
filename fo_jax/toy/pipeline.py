"""The steps of ``fo-jax toy``, in order, on the step runner (``fo_jax.toy.steps``).

    data        synthesize the world's speech, write every stage's manifest     -> WORKDIR/data
    llm         tokenizer + text LLM (text_lm stage, toy preset), HF export      -> WORKDIR/llm
    text_eval   greedy text-QA accuracy of the frozen LLM on the test split
    codec_fast  fit the mel k-means codec on the assistant voice, round-trip WER -> WORKDIR/codec_fast

``PENDING`` names the parts of the toy world that are not steps yet, with the reason; the report
shows them as NOT RUN. To add a stage: write ``run(ctx) -> result`` (files under
``ctx.dir(name)``, paths in the result relative to ``ctx.workdir``; a ``metrics`` path gets a loss
plot), describe its hyper-parameters in ``inputs(ctx)``, list the steps it needs in ``after``,
append the ``Step`` to ``steps()`` and drop its entry from ``PENDING``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from fo_jax.toy.steps import Step, StepContext

TOKENIZER_VOCAB = 1024
FAST_CODEC_ITERS = {False: 20, True: 10}  # k-means iterations: full, quick
FAST_CODEC_MAX_VECTORS = 60_000  # k-means sample (the full world's assistant clips have ~75k)
BUDGET_S = {False: 30 * 60, True: 10 * 60}  # the run-time targets on 2 CPU cores
TICODEC_CONFIG = "configs/speech_out_stage1.py:tiny"
TICODEC_OVERRIDES = {False: (), True: ("stage.steps=100",)}  # full, quick

PENDING = {
    "asr_eval": "speech-in stage 1/2 (CTC ASR, LLM input) are not toy steps yet",
    "speech_in_eval": "speech-in stages 2/3 are not toy steps yet",
    "state_eval": "speech-in stage 3 (state head) is not a toy step yet",
    "speech_out_eval": "speech-out stages (decoder, prefix decoder) are not toy steps yet",
    "talk": "duplex speech-to-speech talking (the inference pipeline) is not a toy step yet",
}


def _rel(ctx: StepContext, path: Path) -> str:
    return os.path.relpath(path, ctx.workdir)


def manifest(ctx: StepContext, name: str) -> Path:
    """A manifest written by the data step."""
    return ctx.dir("data") / "manifests" / f"{name}.jsonl"


# --- data --------------------------------------------------------------------------------------

def _data_inputs(ctx: StepContext) -> dict[str, Any]:
    from fo_jax.toy.build import FULL, QUICK

    return {"seed": ctx.seed, "sizes": dataclasses.asdict(QUICK if ctx.quick else FULL)}


def _data(ctx: StepContext) -> dict[str, Any]:
    from fo_jax.toy.build import build_world

    paths = build_world(ctx.dir("data"), ctx.quick, ctx.seed, progress=ctx.progress)
    info = json.loads(paths["info"].read_text())
    return {"records": info["records"], "synthesized": info["synthesized"],
            "manifests": _rel(ctx, paths["text_llm"].parent)}


# --- text LLM ----------------------------------------------------------------------------------

def _llm_inputs(ctx: StepContext) -> dict[str, Any]:
    from fo_jax.config import load_config
    from fo_jax.toy.llm import CONFIG

    preset = load_config(f"{CONFIG}:{'toy_quick' if ctx.quick else 'toy'}")
    return {"vocab": TOKENIZER_VOCAB, "preset": preset.to_dict()}


def _llm(ctx: StepContext) -> dict[str, Any]:
    from fo_jax.toy.llm import run_config, train_and_freeze, train_tokenizer

    out = ctx.dir("llm")
    if not (out / "tokenizer" / "tokenizer.json").exists():  # a resumed run keeps the checkpoints' tokenizer
        train_tokenizer(manifest(ctx, "text_llm"), out / "tokenizer", TOKENIZER_VOCAB)
    cfg = run_config(manifest(ctx, "text_llm").resolve(), (out / "tokenizer").resolve(), ctx.quick)
    result = train_and_freeze(cfg, out / "run", out / "hf", progress=ctx.progress)
    return {**result, "hf_dir": _rel(ctx, out / "hf"), "metrics": _rel(ctx, out / "run" / "metrics.jsonl")}


def _text_eval(ctx: StepContext) -> dict[str, Any]:
    from fo_jax.toy.llm import text_qa_accuracy

    return text_qa_accuracy(ctx.workdir / ctx.results["llm"]["hf_dir"], manifest(ctx, "text_test"))


# --- fast codec ----------------------------------------------------------------------------------

def _codec_inputs(ctx: StepContext) -> dict[str, Any]:
    from fo_jax.models.mel_codec import MelVQConfig

    return {"config": dataclasses.asdict(MelVQConfig()), "iters": FAST_CODEC_ITERS[ctx.quick],
            "max_vectors": FAST_CODEC_MAX_VECTORS}


def _codec_fast(ctx: StepContext) -> dict[str, Any]:
    from fo_jax.models.mel_codec import MelVQConfig
    from fo_jax.toy.codec import roundtrip_intelligibility, train_fast_codec
    from fo_jax.toy.synth import world_lm

    out = ctx.dir("codec_fast")
    config = MelVQConfig()
    history = []
    codec, vectors = train_fast_codec(manifest(ctx, "speech_out"), config, FAST_CODEC_ITERS[ctx.quick],
                                      FAST_CODEC_MAX_VECTORS, ctx.seed, ctx.progress,
                                      on_iteration=lambda i, d: history.append({"step": i + 1, "loss": d}))
    codec.save(out / "codec")
    (out / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history), encoding="utf-8")
    lm = world_lm(out / "world.arpa", ctx.seed)
    ev = roundtrip_intelligibility(codec, manifest(ctx, "test_qa"), lm, out / "wavs", progress=ctx.progress)
    return {"config": dataclasses.asdict(config), "vectors": vectors, "max_vectors": FAST_CODEC_MAX_VECTORS,
            "intelligibility": ev, "codec_dir": _rel(ctx, out / "codec"), "wav_dir": _rel(ctx, out / "wavs"),
            "metrics": _rel(ctx, out / "metrics.jsonl"), "metrics_label": "k-means distortion (MSE)"}


# --- TiCodec ------------------------------------------------------------------------------------

def _ticodec_config(ctx: StepContext, overrides: tuple[str, ...] = ()):
    from fo_jax.config import load_config

    return load_config(TICODEC_CONFIG, [*TICODEC_OVERRIDES[ctx.quick], *overrides])


def _ticodec(ctx: StepContext) -> dict[str, Any]:
    from fo_jax.toy.codec import roundtrip_intelligibility
    from fo_jax.toy.synth import world_lm
    from fo_jax.training.stages.codec import load_speech_codec
    from fo_jax.training.trainer import train

    out = ctx.dir("ticodec")
    cfg = _ticodec_config(ctx, (f"stage.manifest={manifest(ctx, 'speech_out').resolve()}",))
    summary = train(cfg, str(out / "run"), progress=ctx.progress)
    codec = load_speech_codec(out / "run")
    lm = world_lm(out / "world.arpa", ctx.seed)
    # Whole-second padding: TiCodec compiles per length, and every answer has its own.
    ev = roundtrip_intelligibility(codec, manifest(ctx, "test_qa"), lm, out / "wavs", pad_tokens=40,
                                   progress=ctx.progress)
    return {"steps": summary["step"], "note": f"{TICODEC_CONFIG}, {summary['step']} GAN steps",
            "intelligibility": ev, "wav_dir": _rel(ctx, out / "wavs"),
            "metrics": _rel(ctx, out / "run" / "metrics.jsonl"), "metrics_key": "mel",
            "metrics_label": "mel L1 (generator)"}


def steps() -> list[Step]:
    return [
        Step("data", _data, _data_inputs, clean=False, title="synthesize speech, write manifests"),
        Step("llm", _llm, _llm_inputs, after=("data",), title="train the text LLM, export, freeze"),
        Step("text_eval", _text_eval, after=("llm", "data"), title="text-QA accuracy of the frozen LLM"),
        Step("codec_fast", _codec_fast, _codec_inputs, after=("data",),
             title="fit the fast mel codec, round-trip intelligibility"),
        Step("ticodec", _ticodec, lambda ctx: {"config": _ticodec_config(ctx).to_dict()}, after=("data",),
             title="train TiCodec (speech-out stage 1, tiny), round-trip intelligibility"),
    ]


def final_checks(ctx: StepContext) -> dict[str, Any]:
    """Checks made after every step, each run: the frozen LLM's fingerprint, re-read from its files."""
    if "llm" not in ctx.results:
        return {}
    from fo_jax.conversion.hf_qwen2 import load_hf_qwen2
    from fo_jax.training.freeze import fingerprint

    _, params = load_hf_qwen2(ctx.workdir / ctx.results["llm"]["hf_dir"])
    return {"llm_fingerprint_now": fingerprint(params)}
