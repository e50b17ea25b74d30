"""The steps of ``fo-jax toy``, in order, on the step runner (``fo_jax.toy.steps``).

    data                synthesize the world's speech, write every stage's manifest  -> WORKDIR/data
    llm                 tokenizer + text LLM (text_lm stage), HF export, frozen      -> WORKDIR/llm
    text_eval           greedy text-QA accuracy of the frozen LLM on the test split
    codec_fast          fit the mel k-means codec on the assistant voice, round trip -> WORKDIR/codec_fast
    speech_in_ctc       speech-in 1: encoder + CTC; ASR WER (greedy)                 -> WORKDIR/speech_in_ctc
    speech_in_llm       speech-in 2: encoder + adapter into the LLM; ASR WER (LLM)   -> WORKDIR/speech_in_llm
    speech_in_dialogue  speech-in 3: prompt embeddings + state head on dialogues
    speech_decoder      speech-out 2: pre-network + decoder on fast-codec tokens
    speech_prefix       speech-out 3: the prefix stack on the LLM's hidden states
    model               the trained model as a native bundle (``fo-jax infer``)      -> WORKDIR/model
    speech_in_eval      speech in -> text out through the streaming pipeline
    state_eval          the state head on the test dialogues' final chunks
    speech_out_eval     forced answers spoken by the model, pocketsphinx vs reference TTS
    talk                duplex conversations: wavs, endpoint delay, latency table    -> WORKDIR/talk
    ticodec             speech-out 1 with TiCodec (measured side step), round trip   -> WORKDIR/ticodec

Every training step runs its stage through the shared trainer with the stage config's ``toy``
(or, with ``--quick``, ``toy_quick``) preset. ``PENDING`` names parts of the toy world that are
not steps (the report shows them as NOT RUN with the reason). To add a step: write ``run(ctx) ->
result`` (files under ``ctx.dir(name)``, paths in the result relative to ``ctx.workdir``; a
``metrics`` path gets a loss plot), describe its hyper-parameters in ``inputs(ctx)``, list the
steps it needs in ``after`` and append the ``Step`` to ``steps()``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Sequence

import ml_collections

from fo_jax.toy.steps import Interrupted, Step, StepContext

TOKENIZER_VOCAB = 1024
FAST_CODEC_ITERS = {False: 20, True: 10}  # k-means iterations: full, quick
FAST_CODEC_MAX_VECTORS = 60_000  # k-means sample (the full world's assistant clips have ~75k)
BUDGET_S = {False: 30 * 60, True: 10 * 60}  # the run-time targets on 2 CPU cores
TICODEC_CONFIG = "configs/speech_out_stage1.py:tiny"
# GAN steps (full, quick): it does not get intelligible in CPU minutes either way (BENCHMARKS.md, toy world), so the
# quick run only shows it trains and is measured.
TICODEC_OVERRIDES = {False: ("stage.steps=20",), True: ("stage.steps=4", "stage.log_every=2")}
TALK_QUESTIONS = {False: 20, True: None}  # duplex conversations (None: every test question)

PENDING: dict[str, str] = {}


def _rel(ctx: StepContext, path: Path) -> str:
    return os.path.relpath(path, ctx.workdir)


def _path(ctx: StepContext, step: str, key: str) -> Path:
    """A path that step ``step`` recorded in its result (relative to the workdir)."""
    return ctx.workdir / ctx.results[step][key]


def manifest(ctx: StepContext, name: str) -> Path:
    """A manifest written by the data step."""
    return ctx.dir("data") / "manifests" / f"{name}.jsonl"


def _world_lm(ctx: StepContext, step: str) -> Path:
    from fo_jax.toy.synth import world_lm

    return world_lm(ctx.dir(step) / "world.arpa", ctx.seed)


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
    from fo_jax.toy.llm import CONFIG

    return {"vocab": TOKENIZER_VOCAB, "preset": _preset(ctx, CONFIG).to_dict()}


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

    return text_qa_accuracy(_path(ctx, "llm", "hf_dir"), manifest(ctx, "text_test"))


# --- fast codec ----------------------------------------------------------------------------------

def _codec_inputs(ctx: StepContext) -> dict[str, Any]:
    from fo_jax.models.mel_codec import MelVQConfig

    return {"config": dataclasses.asdict(MelVQConfig()), "iters": FAST_CODEC_ITERS[ctx.quick],
            "max_vectors": FAST_CODEC_MAX_VECTORS}


def _codec_fast(ctx: StepContext) -> dict[str, Any]:
    from fo_jax.models.mel_codec import MelVQConfig
    from fo_jax.toy.codec import roundtrip_intelligibility, train_fast_codec

    out = ctx.dir("codec_fast")
    config = MelVQConfig()
    history = []
    codec, vectors = train_fast_codec(manifest(ctx, "speech_out"), config, FAST_CODEC_ITERS[ctx.quick],
                                      FAST_CODEC_MAX_VECTORS, ctx.seed, ctx.progress,
                                      on_iteration=lambda i, d: history.append({"step": i + 1, "loss": d}))
    codec.save(out / "codec")
    (out / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history), encoding="utf-8")
    ev = roundtrip_intelligibility(codec, manifest(ctx, "test_qa"), _world_lm(ctx, "codec_fast"), out / "wavs",
                                   progress=ctx.progress)
    return {"config": dataclasses.asdict(config), "vectors": vectors, "max_vectors": FAST_CODEC_MAX_VECTORS,
            "intelligibility": ev, "codec_dir": _rel(ctx, out / "codec"), "wav_dir": _rel(ctx, out / "wavs"),
            "metrics": _rel(ctx, out / "metrics.jsonl"), "metrics_label": "k-means distortion (MSE)"}


# --- training stages -----------------------------------------------------------------------------

def _preset(ctx: StepContext, config: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """A stage config's toy preset (``toy``, or ``toy_quick`` with --quick)."""
    from fo_jax.config import load_config

    return load_config(f"{config}:{'toy_quick' if ctx.quick else 'toy'}", overrides)


def _train(ctx: StepContext, name: str, config: str, overrides: Sequence[str],
           metrics_key: str = "loss", metrics_label: str = "loss") -> dict[str, Any]:
    """Trains a stage (its toy preset + ``overrides``) in ``WORKDIR/<name>/run`` (resumes there)."""
    from fo_jax.training.trainer import train

    run = ctx.dir(name) / "run"
    summary = train(_preset(ctx, config, overrides), str(run), progress=ctx.progress)
    if summary["preempted"]:  # a half-trained stage must not be recorded as done
        raise Interrupted(f"{name} stopped at step {summary['step']} (SIGTERM), checkpoint saved; "
                          "rerun the same command to continue")
    return {"run": _rel(ctx, run), "steps": summary["step"], "final": summary["metrics"],
            "rejected": len(summary["rejected"]), "metrics": _rel(ctx, run / "metrics.jsonl"),
            "metrics_key": metrics_key, "metrics_label": metrics_label}


def _stage_step(name: str, config: str, run: Any, after: tuple[str, ...], title: str, version: int = 1) -> Step:
    return Step(name, run, lambda ctx: {"preset": _preset(ctx, config).to_dict()}, after=after, title=title,
                version=version)


def _llm_path(ctx: StepContext) -> str:
    return str(_path(ctx, "llm", "hf_dir").resolve())


def _speech_in_ctc(ctx: StepContext) -> dict[str, Any]:
    from fo_jax.data.manifest import read_manifest
    from fo_jax.toy.speech_in import asr_scores, ctc_transcripts

    result = _train(ctx, "speech_in_ctc", "configs/speech_in_stage1.py",
                    [f"stage.manifest={manifest(ctx, 'asr_train').resolve()}"], metrics_label="CTC loss")
    test = manifest(ctx, "asr_test")
    hyps = ctc_transcripts(ctx.workdir / result["run"], test, ctx.progress)
    return {**result, "asr": asr_scores([r["text"] for r in read_manifest(test)], hyps)}


def _speech_in_llm(ctx: StepContext) -> dict[str, Any]:
    from fo_jax.data.manifest import read_manifest
    from fo_jax.toy.speech_in import asr_scores, llm_transcripts

    result = _train(ctx, "speech_in_llm", "configs/speech_in_stage2.py",
                    [f"stage.manifest={manifest(ctx, 'asr_train').resolve()}", f"stage.llm_path={_llm_path(ctx)}",
                     f"stage.encoder_from={_path(ctx, 'speech_in_ctc', 'run').resolve()}"],
                    metrics_label="transcript CE")
    test = manifest(ctx, "asr_test")
    hyps = llm_transcripts(ctx.workdir / result["run"], _llm_path(ctx), test, ctx.progress)
    return {**result, "asr": asr_scores([r["text"] for r in read_manifest(test)], hyps)}


def _speech_in_dialogue(ctx: StepContext) -> dict[str, Any]:
    return _train(ctx, "speech_in_dialogue", "configs/speech_in_stage3.py",
                  [f"stage.manifest={manifest(ctx, 'dialogues_train').resolve()}", f"stage.llm_path={_llm_path(ctx)}",
                   f"stage.speech_from={_path(ctx, 'speech_in_llm', 'run').resolve()}"],
                  metrics_label="answer CE + state CE")


def _codec_tokens(ctx: StepContext, step: str, name: str) -> Path:
    """``name``'s manifest with the fast codec's tokens (``WORKDIR/<step>/<name>.codec.jsonl``)."""
    from fo_jax.data.codec_tokens import prepare_codec_tokens
    from fo_jax.models.mel_codec import MelVQCodec

    out = ctx.dir(step) / f"{name}.codec.jsonl"
    if not out.exists():
        prepare_codec_tokens(manifest(ctx, name), out, MelVQCodec.load(_path(ctx, "codec_fast", "codec_dir")),
                             progress=ctx.progress)
    return out.resolve()


def _speech_decoder(ctx: StepContext) -> dict[str, Any]:
    tokens = _codec_tokens(ctx, "speech_decoder", "speech_out")
    return _train(ctx, "speech_decoder", "configs/speech_out_stage2.py",
                  [f"stage.manifest={tokens}", f"stage.llm_path={_llm_path(ctx)}"],
                  metrics_key="token_ce", metrics_label="codec-token CE")


def _speech_prefix(ctx: StepContext) -> dict[str, Any]:
    tokens = _codec_tokens(ctx, "speech_prefix", "speech_out_answers")
    return _train(ctx, "speech_prefix", "configs/speech_out_stage3.py",
                  [f"stage.manifest={tokens}", f"stage.llm_path={_llm_path(ctx)}",
                   f"stage.decoder_from={_path(ctx, 'speech_decoder', 'run').resolve()}"],
                  metrics_key="token_ce", metrics_label="codec-token CE")


# --- the trained model and its evaluation through the inference pipeline ------------------------

def _model(ctx: StepContext) -> dict[str, Any]:
    from fo_jax.toy.model import write_bundle

    runs = {name: _path(ctx, name, "run") for name in ("speech_in_dialogue", "speech_prefix")}
    out = write_bundle(ctx.dir("model"), _path(ctx, "llm", "hf_dir"), runs, _path(ctx, "codec_fast", "codec_dir"))
    return {"model_dir": _rel(ctx, out)}


def _engine(ctx: StepContext):
    from fo_jax.toy.talk import load_engine

    return load_engine(_path(ctx, "model", "model_dir"))


def _speech_in_eval(ctx: StepContext) -> dict[str, Any]:
    from fo_jax.toy.talk import speech_in_eval

    seen = manifest(ctx, "train_qa")  # absent in a workdir whose data step ran before it existed
    return speech_in_eval(_engine(ctx), manifest(ctx, "test_qa"), seen if seen.exists() else None, ctx.progress)


def _state_eval(ctx: StepContext) -> dict[str, Any]:
    from fo_jax.toy.talk import state_eval

    return state_eval(_engine(ctx), manifest(ctx, "dialogues_test"), ctx.progress)


def _speech_out_eval(ctx: StepContext) -> dict[str, Any]:
    from fo_jax.toy.talk import speech_out_eval

    out = ctx.dir("speech_out_eval")
    return {**speech_out_eval(_engine(ctx), manifest(ctx, "test_qa"), _world_lm(ctx, "speech_out_eval"),
                              out / "wavs", progress=ctx.progress), "wav_dir": _rel(ctx, out / "wavs")}


def _talk(ctx: StepContext) -> dict[str, Any]:
    from fo_jax.toy.talk import talk

    out = ctx.dir("talk")
    return {**talk(_engine(ctx), manifest(ctx, "test_qa"), _world_lm(ctx, "talk"), out / "wavs",
                   TALK_QUESTIONS[ctx.quick], ctx.progress), "wav_dir": _rel(ctx, out / "wavs")}


# --- TiCodec ------------------------------------------------------------------------------------

def _ticodec_config(ctx: StepContext, overrides: tuple[str, ...] = ()) -> ml_collections.ConfigDict:
    from fo_jax.config import load_config

    return load_config(TICODEC_CONFIG, [*TICODEC_OVERRIDES[ctx.quick], *overrides])


def _ticodec(ctx: StepContext) -> dict[str, Any]:
    from fo_jax.toy.codec import roundtrip_intelligibility
    from fo_jax.training.stages.codec import load_speech_codec
    from fo_jax.training.trainer import train

    out = ctx.dir("ticodec")
    cfg = _ticodec_config(ctx, (f"stage.manifest={manifest(ctx, 'speech_out').resolve()}",))
    summary = train(cfg, str(out / "run"), progress=ctx.progress)
    codec = load_speech_codec(out / "run")
    # Whole-second padding: TiCodec compiles per length, and every answer has its own.
    ev = roundtrip_intelligibility(codec, manifest(ctx, "test_qa"), _world_lm(ctx, "ticodec"), out / "wavs",
                                   pad_tokens=40, progress=ctx.progress)
    return {"steps": summary["step"], "note": f"{TICODEC_CONFIG}, {summary['step']} GAN steps",
            "intelligibility": ev, "wav_dir": _rel(ctx, out / "wavs"),
            "metrics": _rel(ctx, out / "run" / "metrics.jsonl"), "metrics_key": "mel",
            "metrics_label": "mel L1 (generator)"}


def steps() -> list[Step]:
    trained = ("speech_in_llm", "speech_in_dialogue", "speech_decoder", "speech_prefix")
    return [
        # version 2: user clips end on a whole chunk >= 0.16 s after their speech (synth.end_on_chunk);
        # version 3: dialogues deal their asides from a deck (world.dialogues);
        # version 4: 160 asides (was 100), more imperatives and questions meant for someone else;
        # version 5: the assistant voice reads no asides or word lists (build.assistant_texts).
        Step("data", _data, _data_inputs, clean=False, version=5, title="synthesize speech, write manifests"),
        # version 2: kernels in torch layout (out, in) since main moved to it, which changes the fingerprint.
        Step("llm", _llm, _llm_inputs, after=("data",), version=2, title="train the text LLM, export, freeze"),
        Step("text_eval", _text_eval, after=("llm", "data"), title="text-QA accuracy of the frozen LLM"),
        Step("codec_fast", _codec_fast, _codec_inputs, after=("data",),
             title="fit the fast mel codec, round-trip intelligibility"),
        _stage_step("speech_in_ctc", "configs/speech_in_stage1.py", _speech_in_ctc, ("data",),
                    "speech-in 1: encoder + CTC, ASR WER"),
        _stage_step("speech_in_llm", "configs/speech_in_stage2.py", _speech_in_llm, ("llm", "speech_in_ctc"),
                    "speech-in 2: encoder + adapter into the frozen LLM, ASR WER"),
        _stage_step("speech_in_dialogue", "configs/speech_in_stage3.py", _speech_in_dialogue,
                    ("llm", "speech_in_llm"), "speech-in 3: prompts + state head on dialogues"),
        # version 2: training positions as inference's (a decoder trained before cannot speak).
        _stage_step("speech_decoder", "configs/speech_out_stage2.py", _speech_decoder, ("llm", "codec_fast"),
                    "speech-out 2: pre-network + decoder on fast-codec tokens", version=2),
        _stage_step("speech_prefix", "configs/speech_out_stage3.py", _speech_prefix,
                    ("llm", "codec_fast", "speech_decoder"), "speech-out 3: prefix decoder on LLM hidden states"),
        # version 2: replies reach the speech decoder cut at sentence ends only (fo_jax.toy.model).
        Step("model", _model, after=("llm", "codec_fast", *trained), version=2, title="the trained model as a bundle"),
        Step("speech_in_eval", _speech_in_eval, after=("model",), title="speech in -> text out (pipeline)"),
        Step("state_eval", _state_eval, after=("model",), title="state head on the test dialogues"),
        # version 2 (both): the reply's first packet keeps 0.1 s before its first loud sample;
        # speech_out_eval also lists its misses and per-category scores.
        Step("speech_out_eval", _speech_out_eval, after=("model",), version=2,
             title="speech out: forced answers, pocketsphinx"),
        # version 3: questions taken round-robin over the categories (the first 20 were all arithmetic).
        Step("talk", _talk, lambda ctx: {"questions": TALK_QUESTIONS[ctx.quick]}, after=("model",), version=3,
             title="duplex conversations: wavs, endpoint delay, latency"),
        Step("ticodec", _ticodec, lambda ctx: {"config": _ticodec_config(ctx).to_dict()}, after=("data",),
             title="train TiCodec (speech-out stage 1, tiny), round-trip intelligibility"),
    ]


def final_checks(ctx: StepContext) -> dict[str, Any]:
    """Checks made after every run: the frozen LLM's fingerprint, re-read from its files (the one in
    the trained model's bundle when there is one: what the speech model talks with)."""
    if "llm" not in ctx.results:
        return {}
    from fo_jax.conversion.hf_qwen2 import load_hf_qwen2
    from fo_jax.inference.bundle import LLM_DIR
    from fo_jax.training.freeze import fingerprint

    source = _path(ctx, "model", "model_dir") / LLM_DIR if "model" in ctx.results else _path(ctx, "llm", "hf_dir")
    _, params = load_hf_qwen2(source)
    return {"llm_fingerprint_now": fingerprint(params), "llm_fingerprint_source": _rel(ctx, source)}
